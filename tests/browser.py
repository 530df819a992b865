"""Drive the Prefect 3.9.1 web UI (headless Chromium via Playwright) to start a
deployment run from the *custom run* form, as a person would (tests/test_service.py).

Playwright's own browser download cannot work offline: Debian's `chromium` is launched by
its path.

Design notes
------------
* Prefect 3.9.1 serves two UIs from the same server: V1 at ``/...`` and V2 at
  ``/v2/...``. Only the neutral root ``/`` is redirected to the "default" UI (V2
  unless ``PREFECT_SERVER_UI_V2_ENABLED=false`` or a ``prefect_ui_version``
  cookie says otherwise); deep links are honoured as-is. We open the V2 form
  (``/v2/deployments/deployment/<id>/run``) first because its labels are
  correctly associated with the inputs (``get_by_label`` works) and fall back
  to V1 (``/deployments/deployment/<id>/run``) if V2 does not render.
* No generated CSS class names are used: fields are found by their label text
  (``source`` / ``source (Optional)``), the button by role+name ``Submit``.
* The flow-run id is taken from the JSON response of the UI's own
  ``POST /api/deployments/<id>/create_flow_run`` request (V2 navigates to the
  *deployment* page after submitting, so the URL does not carry the run id).
  Fallbacks: the ``/runs/flow-run/<id>`` URL V1 navigates to, then the REST API
  (newest run of the deployment created after we clicked Submit).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from datetime import UTC, datetime

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def _label_regex(name: str) -> re.Pattern:
    # Property labels are "<name>" for required params and "<name> (Optional)"
    # for params with a default.
    return re.compile(r"^\s*" + re.escape(name) + r"(\s*\(Optional\))?\s*$")


def _xpath_literal(s: str) -> str:
    if "'" not in s:
        return f"'{s}'"
    if '"' not in s:
        return f'"{s}"'
    parts = s.split("'")
    return "concat(" + ', "\'", '.join(f"'{p}'" for p in parts) + ")"


def _find_field(page, name: str):
    """Return a locator for the text control of schema property ``name``, or None."""
    # 1) accessible label association (works in the V2 UI)
    loc = page.get_by_label(_label_regex(name)).locator("xpath=self::textarea | self::input")
    if loc.count() == 1:
        return loc
    # 2) structural fallback (V1 UI: <label for=X> but the control lacks id=X):
    #    the first textarea/input following the label whose text is the name.
    cond = " or ".join(
        f"normalize-space(.)={_xpath_literal(t)}" for t in (name, f"{name} (Optional)")
    )
    loc = page.locator(
        f"xpath=(//label[{cond}])[1]/following::*[self::textarea or "
        f"(self::input and not(@type='checkbox') and not(@type='hidden'))][1]"
    )
    if loc.count() == 1:
        return loc
    return None


def _api_get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _api_post(url: str, body: dict):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _fill_checked(page, field, value: str, deadline: float) -> None:
    """Clear + fill a control and make sure the value sticks (async prefill of
    deployment defaults could otherwise overwrite an early fill)."""
    while True:
        field.click()
        field.fill("")
        field.fill(value)
        page.wait_for_timeout(300)
        if field.input_value() == value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"field value did not stick: {field.input_value()!r} != {value!r}")


def _full_screenshot(page, path: str) -> None:
    """Full-page screenshot that also covers SPA layouts whose content scrolls
    inside an inner container (the V1 UI does this, so Playwright's
    ``full_page=True`` alone stops at the viewport and omits the Submit button):
    temporarily grow the viewport to the tallest scrollable element."""
    vp = page.viewport_size or {"width": 1400, "height": 1000}
    try:
        needed = page.evaluate(
            """() => {
                let h = Math.max(document.documentElement.scrollHeight,
                                 document.body ? document.body.scrollHeight : 0);
                for (const el of document.querySelectorAll('*')) {
                    if (el.scrollHeight > el.clientHeight + 1) {
                        const st = getComputedStyle(el);
                        if (/(auto|scroll)/.test(st.overflowY)) {
                            h = Math.max(h, el.scrollHeight + el.getBoundingClientRect().top);
                        }
                    }
                }
                return Math.ceil(h);
            }"""
        )
    except Exception:
        needed = vp["height"]
    needed = int(min(max(needed, vp["height"]), 6000))
    if needed > vp["height"]:
        page.set_viewport_size({"width": vp["width"], "height": needed})
        page.wait_for_timeout(400)
    try:
        page.screenshot(path=path, full_page=True)
    finally:
        if needed > vp["height"]:
            page.set_viewport_size(vp)
            page.wait_for_timeout(200)


def submit_run_form(
    ui_base: str,
    deployment_id: str,
    source: str,
    table: str,
    screenshot_path: str,
    timeout_s: float = 60,
    ui: str = "auto",  # "auto" (v2 then v1), "v2" or "v1"
    api_url: str | None = None,  # defaults to <ui_base>/api (only for fallback)
    console_log: list | None = None,  # if given, console errors/page errors appended
) -> str:
    from playwright.sync_api import sync_playwright

    base = ui_base.rstrip("/")
    api = (api_url or base + "/api").rstrip("/")
    deadline = time.monotonic() + timeout_s
    ms_left = lambda: max(1000, int((deadline - time.monotonic()) * 1000))  # noqa: E731

    candidates = {
        "v2": f"{base}/v2/deployments/deployment/{deployment_id}/run",
        "v1": f"{base}/deployments/deployment/{deployment_id}/run",
    }
    order = ["v2", "v1"] if ui == "auto" else [ui]
    logs = console_log if console_log is not None else []
    t0 = time.monotonic()
    mark = lambda what: logs.append(f"[{time.monotonic() - t0:6.2f}s] {what}")  # noqa: E731

    with sync_playwright() as p:
        mark("launching chromium")
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            # The V2 UI tries to fetch amplitude telemetry config
            # (sr-client-cfg.amplitude.com); offline that only yields console
            # noise (net::ERR_NAME_NOT_RESOLVED), abort it up front.
            context.route(re.compile(r"^https?://[^/]*amplitude\.com/"), lambda r: r.abort())
            page = context.new_page()
            mark("browser ready")
            page.on(
                "console",
                lambda m: m.type == "error" and logs.append(f"console: {m.text}"),
            )
            page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))

            src_field = tbl_field = None
            used = None
            errors = []
            for which in order:
                # split the remaining budget if we may still fall back
                budget = ms_left() if which == order[-1] else max(5000, ms_left() // 2)
                page.goto(candidates[which], wait_until="domcontentloaded", timeout=budget)
                t_end = time.monotonic() + budget / 1000
                while time.monotonic() < t_end:
                    src_field = _find_field(page, "source")
                    tbl_field = _find_field(page, "table")
                    if (
                        src_field is not None
                        and tbl_field is not None
                        and src_field.is_visible()
                        and tbl_field.is_visible()
                    ):
                        break
                    src_field = tbl_field = None
                    page.wait_for_timeout(250)
                if src_field is not None:
                    used = which
                    mark(f"form rendered ({which} UI: {candidates[which]})")
                    break
                errors.append(f"{which}: form did not render at {candidates[which]}")
            if used is None:
                raise TimeoutError("; ".join(errors))

            submit = page.get_by_role("button", name="Submit", exact=True)
            submit.wait_for(state="visible", timeout=ms_left())
            # let the deployment's default parameters finish prefilling
            # (they arrive with the deployment query; wait for a non-empty value
            # in the required 'source' field, which the deployment sets)
            t_end = min(deadline, time.monotonic() + 10)
            while not src_field.input_value() and time.monotonic() < t_end:
                page.wait_for_timeout(200)
            page.wait_for_timeout(300)

            _fill_checked(page, src_field, source, deadline)
            _fill_checked(page, tbl_field, table, deadline)
            # blur so any on-change/validation handlers run before the screenshot
            tbl_field.evaluate("e => e.blur()")
            page.wait_for_timeout(300)
            if src_field.input_value() != source or tbl_field.input_value() != table:
                raise RuntimeError(
                    "form values changed after filling: "
                    f"{src_field.input_value()!r}, {tbl_field.input_value()!r}"
                )

            mark("fields filled")
            _full_screenshot(page, screenshot_path)
            mark("screenshot saved")

            clicked_at = datetime.now(UTC)
            create_re = re.compile(
                r"/deployments/" + re.escape(deployment_id) + r"/create_flow_run/?$"
            )
            run_id = None
            try:
                for attempt in range(1, 4):
                    with page.expect_response(
                        lambda r: r.request.method == "POST" and bool(create_re.search(r.url)),
                        timeout=min(ms_left(), 30000),
                    ) as resp_info:
                        submit.click()
                    resp = resp_info.value
                    # a busy server (its SQLite database locked) answers 503 and creates
                    # nothing: submit again, as a user would
                    if resp.status != 503 or attempt == 3:
                        break
                    logs.append(f"create_flow_run answered 503 (attempt {attempt}); resubmitting")
                    page.wait_for_timeout(2000)
                if resp.status >= 400:
                    raise RuntimeError(
                        f"create_flow_run failed: HTTP {resp.status}: {resp.text()[:500]}"
                    )
                run_id = resp.json()["id"]
                mark(f"create_flow_run response -> {run_id}")
            except RuntimeError:
                raise
            except Exception as exc:  # response not observed -> fall back
                logs.append(f"create_flow_run response not captured: {exc!r}")

            if run_id is None:
                # V1 navigates to /runs/flow-run/<id>
                try:
                    page.wait_for_url(
                        re.compile(r"/runs/flow-run/[0-9a-f-]{36}"),
                        timeout=min(ms_left(), 15000),
                    )
                    m = re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url)
                    if m:
                        run_id = m.group(1)
                except Exception:
                    pass
            if run_id is None:
                # last resort: newest run of the deployment created after the click
                runs = _api_post(
                    f"{api}/flow_runs/filter",
                    {
                        "deployments": {"id": {"any_": [deployment_id]}},
                        "sort": "CREATED_DESC",
                        "limit": 5,
                    },
                )
                for r in runs:
                    created = datetime.fromisoformat(r["created"].replace("Z", "+00:00"))
                    if (
                        created >= clicked_at.replace(microsecond=0)
                        and r["parameters"].get("source") == source
                    ):
                        run_id = r["id"]
                        break
            if run_id is None:
                raise RuntimeError(
                    "could not determine created flow run id; page url="
                    + page.url
                    + "; logs="
                    + repr(logs[-10:])
                )
            # Let the UI finish its post-submit navigation (not required).
            try:
                page.wait_for_load_state("domcontentloaded", timeout=3000)
            except Exception:
                pass
            return run_id
        finally:
            browser.close()


if __name__ == "__main__":  # pragma: no cover  # small CLI for manual checks
    import sys

    base, dep, src, tbl, shot = sys.argv[1:6]
    which = sys.argv[6] if len(sys.argv) > 6 else "auto"
    t0 = time.monotonic()
    log: list = []
    rid = submit_run_form(base, dep, src, tbl, shot, ui=which, console_log=log)
    print(json.dumps({"run_id": rid, "seconds": round(time.monotonic() - t0, 2), "logs": log}))
