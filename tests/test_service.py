"""lanceflow as a service, against a real `prefect server start` on a loopback port.

One server for the module (its own PREFECT_HOME; PREFECT_SERVER_EPHEMERAL_ENABLED=false in
every subprocess, so nothing falls back to a hidden temporary server), the `lanceflow`
process pool, `prefect --no-prompt deploy --all` from the repository root and one worker
subprocess. Then: runs started through the API call the UI's Run button makes, the
evaluation the trigger starts, the scheduler's runs, one writer per table, rollback, a writer
killed while it holds its table, and the run form in a real browser.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import REPO, SAMPLES

pytestmark = [pytest.mark.server, pytest.mark.slow]

PREFECT = str(Path(sys.executable).parent / "prefect")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A long-running subprocess in its own process group, its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Server:
    api: str
    ui: str
    env: dict[str, str]
    home: Path
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=30, transport=_Retrying())


class _Retrying(httpx.HTTPTransport):
    """Retries a 503, as Prefect's own client does: the server's SQLite database answers
    'database is locked' now and then while several flow runs write to it at once."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(12):
            response = super().handle_request(request)
            if response.status_code != 503 or attempt == 11:
                return response
            response.close()
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


def _server_env(home: Path, api: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k not in ("LANCEFLOW_TABLE_LOCK", "LANCEFLOW_PAUSE_AT")
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_UI_API_URL=api,
        PREFECT_SERVER_EPHEMERAL_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1",
        PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS="1",
        PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS="600",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PYTHONPATH=str(REPO),
        DO_NOT_TRACK="1",
    )
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _server_env(home, api)
    log = home / "server.log"
    proc = _start(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError("prefect server did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        yield Server(api, f"http://127.0.0.1:{port}", env, home, log)
    finally:
        _stop(proc)


def _run(
    server: Server,
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args),
        env=env or server.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@dataclass
class Deployed:
    server: Server
    source: Path
    table: Path
    dataset: Path
    ids: dict[str, str]


@pytest.fixture(scope="module")
def deployed(server: Server, tmp_path_factory) -> Deployed:
    """The process pool and the four deployments of deployments/prefect.yaml."""
    root = tmp_path_factory.mktemp("service")
    source = root / "corpus"
    shutil.copytree(SAMPLES, source)
    table = root / "nightly-table"
    dataset = REPO / "samples" / "eval" / "queries.jsonl"
    _run(server, PREFECT, "work-pool", "create", "lanceflow", "--type", "process")
    env = dict(
        server.env,
        LANCEFLOW_SOURCE=str(source),
        LANCEFLOW_TABLE=str(table),
        LANCEFLOW_EVAL_DATASET=str(dataset),
        LANCEFLOW_CODE_DIR=str(REPO),
    )
    out = _run(
        server,
        PREFECT,
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        "deployments/prefect.yaml",
        env=env,
    )
    ids = {}
    with server.client() as c:
        for name in ("ingest/nightly", "ingest/manual", "evaluate/after-ingest", "maintain/weekly"):
            r = c.get(f"/deployments/name/{name}")
            assert r.status_code == 200, f"{name} not deployed:\n{out.stdout[-2000:]}"
            ids[name] = r.json()["id"]
    return Deployed(server, source, table, dataset, ids)


@pytest.fixture(scope="module")
def worker(deployed: Deployed) -> Iterator[Path]:
    server = deployed.server
    log = server.home / "worker.log"
    # started outside the checkout: the deployment's pull step finds it
    proc = _start(
        [PREFECT, "worker", "start", "--pool", "lanceflow", "--type", "process"],
        server.env,
        log,
        cwd=server.home,
    )
    _WORKERS.append(proc)
    try:
        yield log
    finally:
        if proc.poll() is None:
            _stop(proc)


#: the worker processes, for the serve test to stop (no worker may take its runs)
_WORKERS: list[subprocess.Popen] = []


# ---- API helpers: the same calls the UI makes ----------------------------------------------


def ui_run(
    server: Server,
    deployment_id: str,
    parameters: dict[str, Any],
    job_variables: dict[str, Any] | None = None,
) -> str:
    """What the Run button's custom-run form sends: POST .../create_flow_run."""
    body: dict[str, Any] = {
        "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
        "parameters": parameters,
        "enforce_parameter_schema": True,
    }
    if job_variables:
        body["job_variables"] = job_variables
    with server.client() as c:
        r = c.post(f"/deployments/{deployment_id}/create_flow_run", json=body)
        assert r.status_code in (200, 201), r.text
        return str(r.json()["id"])


def flow_run(server: Server, run_id: str) -> dict[str, Any]:
    with server.client() as c:
        return c.get(f"/flow_runs/{run_id}").json()


def _logs(server: Server, run_id: str) -> str:
    with server.client() as c:
        r = c.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}})
        return "\n".join(x["message"] for x in r.json())[-4000:]


def wait_final(
    server: Server,
    run_id: str,
    worker_log: Path | None,
    timeout: float = 420,
    expect: str = "COMPLETED",
) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = flow_run(server, run_id)
        if fr["state_type"] in FINAL:
            break
        time.sleep(1)
    else:
        raise AssertionError(
            f"run {run_id} not finished in {timeout} s: {fr['state_name']}\n"
            + (worker_log.read_text()[-3000:] if worker_log else "")
        )
    assert fr["state_type"] == expect, (
        f"run {run_id} ended {fr['state_name']}\n{_logs(server, run_id)}\n"
        + (worker_log.read_text()[-2000:] if worker_log else "")
    )
    return fr


def runs_of(server: Server, deployment_id: str) -> list[dict[str, Any]]:
    with server.client() as c:
        r = c.post(
            "/flow_runs/filter",
            json={"deployments": {"id": {"any_": [deployment_id]}}, "sort": "START_TIME_DESC"},
        )
        return list(r.json())


def states(server: Server, run_id: str) -> list[dict[str, Any]]:
    with server.client() as c:
        rows = c.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
    return sorted(rows, key=lambda s: s["timestamp"])


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def run_rows(table: Path) -> list[dict[str, Any]]:
    from tasks.store import RUNS, Store

    rows = Store(str(table)).table(RUNS).to_arrow().to_pylist()
    return sorted(rows, key=lambda r: r["started_at"])


# ---- tests ---------------------------------------------------------------------------------


def test_nightly_schedule_exists_and_the_scheduler_creates_its_runs(deployed: Deployed):
    server = deployed.server
    with server.client() as c:
        dep = c.get(f"/deployments/{deployed.ids['ingest/nightly']}").json()
        schedules = [s["schedule"] for s in dep["schedules"]]
        assert {"cron": "0 2 * * *", "timezone": "UTC"}.items() <= schedules[0].items()
        weekly = c.get(f"/deployments/{deployed.ids['maintain/weekly']}").json()
        assert weekly["schedules"][0]["schedule"]["cron"] == "0 4 * * 0"
        assert dep["parameters"] == {"source": str(deployed.source), "table": str(deployed.table)}
        assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"] == {
            "directory": str(REPO)
        }
    # the server's scheduler (not this test) creates the upcoming runs: with Prefect 3.9.0
    # and SQLAlchemy 2.1 it never did
    deadline = time.time() + 120
    scheduled: list[dict[str, Any]] = []
    while time.time() < deadline and not scheduled:
        scheduled = [
            r
            for r in runs_of(server, deployed.ids["ingest/nightly"])
            if r["state_type"] == "SCHEDULED"
        ]
        time.sleep(1)
    assert scheduled, (
        "the scheduler created no run of ingest/nightly\n" + server.log.read_text()[-3000:]
    )
    for r in scheduled:
        start = _ts(r["expected_start_time"])
        assert (start.hour, start.minute) == (2, 0)
        assert r["parameters"]["table"] == str(deployed.table)


def test_ui_run_with_only_table_overridden_then_the_trigger_evaluates_it(
    deployed: Deployed, worker: Path, tmp_path: Path
):
    server = deployed.server
    # the form's bounds and choices hold at the API: a bad value never becomes a run
    with server.client() as c:
        for bad in ({"run": {"batch_docs": 0}}, {"embedder": {"kind": "word2vec"}}):
            r = c.post(
                f"/deployments/{deployed.ids['ingest/manual']}/create_flow_run",
                json={"parameters": bad, "enforce_parameter_schema": True},
            )
            assert r.status_code in (409, 422), (bad, r.status_code, r.text)
    table = tmp_path / "ui-table"
    run_id = ui_run(server, deployed.ids["ingest/manual"], {"table": str(table)})
    fr = wait_final(server, run_id, worker)
    # the deployment's source, the overridden table
    assert fr["parameters"]["source"] == str(deployed.source)
    rows = run_rows(table)
    assert len(rows) == 1 and rows[0]["flow_run_id"] == run_id
    report = json.loads(rows[0]["report"])
    assert report["documents"]["new"] == 8 and report["model_loaded"]
    tag = rows[0]["tag"]
    assert tag and tag.startswith("ingest-")

    # the trigger starts evaluate/after-ingest on the table the ingest run wrote
    deadline = time.time() + 300
    evals: list[dict[str, Any]] = []
    while time.time() < deadline:
        evals = [
            r
            for r in runs_of(server, deployed.ids["evaluate/after-ingest"])
            if r["parameters"].get("table") == str(table)
        ]
        if evals:
            break
        time.sleep(1)
    assert evals, "no evaluation was triggered"
    ev = wait_final(server, evals[0]["id"], worker)
    assert ev["parameters"]["ingest_run"] == f"prefect.flow-run.{run_id}"
    assert ev["parameters"]["dataset"] == str(deployed.dataset)
    from tasks.store import EVALUATIONS, Store

    history = Store(str(table)).table(EVALUATIONS).to_arrow().to_pylist()
    assert {r["flow_run_id"] for r in history} == {ev["id"]}
    assert {r["tag"] for r in history} == {tag}
    assert {r["mode"] for r in history} == {"vector", "fts", "hybrid"}

    # a night with nothing changed: from the worker picking it up to Completed, no model
    again = ui_run(server, deployed.ids["ingest/manual"], {"table": str(table)})
    wait_final(server, again, worker)
    rows = run_rows(table)
    last = json.loads(rows[-1]["report"])
    assert last["documents"]["unchanged"] == 8 and last["chunks"]["embedded"] == 0
    assert last["model_loaded"] is False
    assert rows[-1]["tag"] == tag  # nothing new to tag
    timeline = {s["type"]: _ts(s["timestamp"]) for s in states(server, again)}
    picked_up = timeline.get("PENDING") or timeline["RUNNING"]
    started = (timeline["RUNNING"] - picked_up).total_seconds()
    ran = (timeline["COMPLETED"] - timeline["RUNNING"]).total_seconds()
    print(
        f"\nno-change ingest under a real server: {started + ran:.1f} s from the worker "
        f"picking it up (Pending) to Completed: {started:.1f} s starting the flow process, "
        f"{ran:.1f} s running; model loaded: {last['model_loaded']}",
        file=sys.stderr,
    )
    _disable_trigger(server)


ARTIFACTS = REPO / "build" / "test-artifacts"


def test_run_form_in_a_real_browser(deployed: Deployed, worker: Path, tmp_path: Path):
    """Headless Chromium opens ingest/manual's run form in the Prefect UI, fills source and
    table, submits; the worker runs it to Completed. The form's screenshot is kept in
    build/test-artifacts/."""
    from .browser import CHROMIUM, submit_run_form

    if not Path(CHROMIUM).exists():
        if os.environ.get("LANCEFLOW_REQUIRE_BROWSER") == "1":
            pytest.fail("no chromium: `apt-get install chromium` (make test does, as root)")
        pytest.skip("no chromium (apt-get install chromium)")
    pytest.importorskip("playwright")
    server = deployed.server
    source = tmp_path / "docs from the form"
    shutil.copytree(SAMPLES / "guides", source)
    table = tmp_path / "form-table"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "prefect-ui-run-form.png"
    log: list[str] = []
    run_id = submit_run_form(
        server.ui,
        deployed.ids["ingest/manual"],
        str(source),
        str(table),
        str(shot),
        timeout_s=120,
        api_url=server.api,
        console_log=log,
    )
    assert shot.stat().st_size > 10_000, log
    fr = wait_final(server, run_id, worker)
    assert fr["parameters"]["source"] == str(source)
    assert fr["parameters"]["table"] == str(table)
    report = json.loads(run_rows(table)[-1]["report"])
    assert report["documents"]["new"] == 3


def _disable_trigger(server: Server) -> None:
    """The remaining tests run many ingests; their evaluations would only cost time."""
    with server.client() as c:
        for a in c.post("/automations/filter", json={}).json():
            r = c.patch(f"/automations/{a['id']}", json={"enabled": False})
            assert r.status_code in (200, 204), r.text


def test_two_writers_of_one_table_queue_while_other_tables_run_in_parallel(
    deployed: Deployed, worker: Path, tmp_path: Path
):
    from tasks.locking import lock_name

    server = deployed.server
    a, b = tmp_path / "table-a", tmp_path / "table-b"
    _disable_trigger(server)  # evaluations of these runs would only take CPU
    hold = {"env": {"LANCEFLOW_PAUSE_AT": "after-plan:12"}}
    fast = {"kind": "hash"}
    ids = [
        ui_run(server, deployed.ids["ingest/manual"], {"table": str(t), "embedder": fast}, hold)
        for t in (a, a, b)
    ]
    for run_id in ids:
        wait_final(server, run_id, worker)

    def held(table: Path) -> list[tuple[float, float]]:
        """When each run held the table: from opening the run (inside the slot) to its end."""
        return [
            (r["started_at"].timestamp(), r["started_at"].timestamp() + r["seconds"])
            for r in run_rows(table)
        ]

    a_runs, b_runs = held(a), held(b)
    assert len(a_runs) == 2 and len(b_runs) == 1
    (a1s, a1e), (a2s, a2e) = sorted(a_runs)
    assert a2s >= a1e, f"two writers of one table overlapped: {a_runs}"
    (bs, be) = b_runs[0]
    assert any(bs < e and s < be for s, e in a_runs), (
        f"writers of different tables did not overlap: a={a_runs} b={b_runs}"
    )
    with server.client() as c:
        for t in (a, b):
            gcl = c.get(f"/v2/concurrency_limits/{lock_name(str(t))}").json()
            assert gcl["limit"] == 1 and gcl["active_slots"] == 0, gcl


def _cli(server: Server, *args: str, check: bool = True, **env: str):
    return _run(
        server, sys.executable, "-m", "flows.cli", *args, env=dict(server.env, **env), check=check
    )


def test_rollback_restores_the_last_good_version_after_a_bad_run(server: Server, tmp_path: Path):
    src = tmp_path / "corpus"
    shutil.copytree(SAMPLES, src)
    db = str(tmp_path / "db")
    queries = REPO / "samples" / "eval" / "queries.jsonl"
    _cli(server, "ingest", str(src), "--table", db, "--embedder", "hash")
    first = _cli(server, "evaluate", str(queries), "--table", db, "--json")
    good = json.loads(first.stdout)
    tag1 = good["tag"]
    assert tag1 and good["gate"]["passed"]

    # a bad night: the documents that answer the queries lose their content
    for rel in ("reports/vacation-policy.html", "guides/troubleshooting.md", "guides/setup.md"):
        (src / rel).write_text("intentionally unrelated filler text " * 20, encoding="utf-8")
    bad = json.loads(
        _cli(server, "ingest", str(src), "--table", db, "--embedder", "hash", "--json").stdout
    )
    assert bad["tag"] and bad["tag"] != tag1 and bad["documents"]["changed"] == 3
    failed = _cli(server, "evaluate", str(queries), "--table", db, check=False)
    assert failed.returncode == 1
    assert f"last good version is tag {tag1}" in failed.stderr
    assert f"lanceflow rollback --table {db} --to {tag1}" in failed.stderr

    back = _cli(server, "rollback", "--table", db, "--json")
    assert json.loads(back.stdout)["restored"] == tag1
    restored = json.loads(_cli(server, "evaluate", str(queries), "--table", db, "--json").stdout)
    assert restored["gate"]["passed"]
    assert restored["results"]["fts"]["ndcg@10"] == pytest.approx(good["results"]["fts"]["ndcg@10"])
    from tasks.store import Store

    texts = Store(db).chunks_table().search().select(["text"]).limit(None).to_arrow()
    assert not any("intentionally unrelated" in t for t in texts.column("text").to_pylist())

    # one more step back: there is none; the rollback itself can be undone
    none = _cli(server, "rollback", "--table", db, check=False)
    assert none.returncode == 2 and "oldest tag" in none.stderr
    _cli(server, "rollback", "--table", db, "--to", bad["tag"])
    texts = Store(db).chunks_table().search().select(["text"]).limit(None).to_arrow()
    assert any("intentionally unrelated" in t for t in texts.column("text").to_pylist())
    listing = json.loads(_cli(server, "rollback", "--table", db, "--list", "--json").stdout)
    assert [r["kind"] for r in listing] == ["ingest", "ingest", "rollback", "rollback"]


def test_a_writer_killed_while_it_holds_the_table_frees_it_when_its_lease_ends(
    server: Server, tmp_path: Path
):
    from tasks.locking import lock_name

    src = tmp_path / "corpus"
    shutil.copytree(SAMPLES, src)
    db = str(tmp_path / "db")
    env = dict(server.env, LANCEFLOW_PAUSE_AT="after-plan:600", LANCEFLOW_LOCK_LEASE_SECONDS="60")
    doomed = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "ingest",
            str(src),
            "--table",
            db,
            "--embedder",
            "hash",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    name = lock_name(db)
    deadline = time.time() + 120
    with server.client() as c:
        while time.time() < deadline:
            r = c.get(f"/v2/concurrency_limits/{name}")
            if r.status_code == 200 and r.json()["active_slots"] == 1:
                break
            time.sleep(0.5)
        else:
            doomed.kill()
            raise AssertionError("the writer never took its slot: " + doomed.stderr.read().decode())
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    killed_at = time.time()
    done = _cli(server, "ingest", str(src), "--table", db, "--embedder", "hash", "--json")
    waited = time.time() - killed_at
    assert json.loads(done.stdout)["documents"]["new"] == 8
    print(f"\nslot of a killed writer freed after {waited:.0f} s (lease 60 s)", file=sys.stderr)
    with server.client() as c:
        assert c.get(f"/v2/concurrency_limits/{name}").json()["active_slots"] == 0


def test_serve_declares_the_same_deployments_as_prefect_yaml():
    import yaml

    from flows.service import AFTER_INGEST, serve_deployments

    found = {
        d.name: d
        for d in serve_deployments(
            "/data/docs", "/data/db", "/data/q.jsonl", timezone="Europe/Berlin"
        )
    }
    assert set(found) == {"nightly", "manual", "weekly", "after-ingest"}
    assert found["nightly"].schedules[0].schedule.cron == "0 2 * * *"
    assert found["nightly"].schedules[0].schedule.timezone == "Europe/Berlin"
    assert found["after-ingest"].triggers[0].parameters == AFTER_INGEST["parameters"]
    declared = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    after = next(d for d in declared["deployments"] if d["name"] == "after-ingest")
    trigger = after["triggers"][0]
    assert trigger["parameters"] == AFTER_INGEST["parameters"]
    assert trigger["match_related"] == AFTER_INGEST["match_related"]
    assert trigger["expect"] == AFTER_INGEST["expect"]


def test_lanceflow_serve_runs_the_deployments_without_a_worker(deployed: Deployed, tmp_path: Path):
    """`lanceflow serve` (last: it takes over the deployment names): a run started from the
    API is executed by the serve process, and its trigger starts the evaluation."""
    server = deployed.server
    for proc in _WORKERS:
        if proc.poll() is None:
            _stop(proc)
    # the worker deployments go: serve registers its own under the same names
    with server.client() as c:
        for dep_id in deployed.ids.values():
            assert c.delete(f"/deployments/{dep_id}").status_code in (200, 204)
    names = ("ingest/nightly", "ingest/manual", "evaluate/after-ingest", "maintain/weekly")
    table = tmp_path / "served-table"
    log = tmp_path / "serve.log"
    env = dict(server.env, PREFECT_RUNNER_POLL_FREQUENCY="1")
    args = ["serve", "--source", str(deployed.source), "--table", str(table)]
    args += ["--dataset", str(deployed.dataset), "--timezone", "Europe/Berlin"]
    proc = _start([sys.executable, "-m", "flows.cli", *args], env, log)
    try:
        deadline = time.time() + 120
        now: dict[str, Any] = {}
        with server.client() as c:
            while time.time() < deadline:
                found = {n: c.get(f"/deployments/name/{n}") for n in names}
                now = {n: r.json() for n, r in found.items() if r.status_code == 200}
                if len(now) == len(names):
                    break
                time.sleep(1)
            else:
                raise AssertionError("serve registered nothing\n" + log.read_text()[-3000:])
        dep = now["ingest/nightly"]
        assert dep["schedules"][0]["schedule"]["timezone"] == "Europe/Berlin"
        with server.client() as c:
            manual = c.get("/deployments/name/ingest/manual").json()["id"]
            after = c.get("/deployments/name/evaluate/after-ingest").json()["id"]
        run_id = ui_run(server, manual, {"embedder": {"kind": "hash"}})
        wait_final(server, run_id, log)
        assert json.loads(run_rows(table)[-1]["report"])["documents"]["new"] == 8
        deadline = time.time() + 180
        evals: list[dict[str, Any]] = []
        while time.time() < deadline and not evals:
            evals = runs_of(server, after)
            time.sleep(1)
        assert evals, "serve's trigger started no evaluation\n" + log.read_text()[-3000:]
        ev = wait_final(server, evals[0]["id"], log)
        assert ev["parameters"]["table"] == str(table)
    finally:
        _stop(proc)
