"""Prefect's temporary server started early (flows.api_server): the child it starts is the one
Prefect's own start would run, and the flow uses it instead of starting a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO


def test_the_early_command_line_is_prefects_own(monkeypatch):
    """server_command() copies SubprocessASGIServer._run_uvicorn_command (a private method):
    a Prefect that changes it fails here, not in users' servers."""
    import prefect.server.api.server as server_module

    from flows.api_server import server_command

    seen: list[tuple[list[str], dict[str, str]]] = []

    def popen(args, env=None, **kw):
        seen.append((list(args), dict(env or {})))
        return None

    monkeypatch.setattr(server_module.subprocess, "Popen", popen)
    server = server_module.SubprocessASGIServer(port=54_321)
    try:
        server._run_uvicorn_command()
    finally:
        server_module.SubprocessASGIServer._instances.pop(54_321, None)
    args, env = server_command(54_321)
    assert seen == [(args, env)]


_SCRIPT = r"""
import json, subprocess, sys
import httpx
spawned = []
def audit(event, args):
    if event == "subprocess.Popen" and "uvicorn" in " ".join(map(str, args[1] or [])):
        spawned.append(1)
sys.addaudithook(audit)
from flows.api_server import start_temporary_server, wait_temporary_server
began = start_temporary_server()
wait_temporary_server()
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
health = httpx.get(server.api_url + "/health").status_code
first = server.server_process.pid
from prefect import flow
@flow
def probe() -> int:
    return 41 + 1
result = probe()
print(json.dumps({"began": began, "health": health, "result": result, "spawned": len(spawned),
                  "same": SubprocessASGIServer().server_process.pid == first,
                  "again": start_temporary_server()}))
"""


def test_an_early_start_is_the_server_the_flow_uses(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PYTHONPATH=str(REPO),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    env.pop("PREFECT_SERVER_EPHEMERAL_ENABLED", None)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # one server process in all: the early one, answering, and the one the flow ran against
    assert got == {
        "began": True,
        "health": 200,
        "result": 42,
        "spawned": 1,
        "same": True,
        "again": False,
    }


def test_a_flow_is_certain_only_where_no_table_can_be(tmp_path):
    """The CLI starts the server early for a table folder that is missing or holds no table;
    anywhere else (a table there, a bucket) the no-change check decides first."""
    from flows.cli import _has_tables

    assert not _has_tables(str(tmp_path / "missing"))
    assert not _has_tables(f"file://{tmp_path}")
    (tmp_path / "notes.txt").write_text("not a table")
    assert not _has_tables(str(tmp_path))
    (tmp_path / "chunks.lance").mkdir()
    assert _has_tables(str(tmp_path)) and _has_tables(f"file://{tmp_path}")
    assert _has_tables("s3://bucket/index") and _has_tables("gs://bucket/index")
