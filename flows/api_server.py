"""Prefect's temporary API server, started beside the CLI's own start-up.

Without PREFECT_API_URL, a flow run's first client starts Prefect's temporary server: it
imports the server's code in this process (2-4 s, only to reach the class that starts it),
then starts a child that imports it again, builds the app and checks its database before it
answers (4-8 s on a small machine), and only then does the flow begin. When the CLI knows
early that a flow will run (a table that does not exist yet, `--always-flow`),
start_temporary_server() starts that child at once, with the command line and environment
Prefect's own start gives it, and hands it to Prefect's server object in a thread (which
imports the server's code meanwhile): the child's start overlaps the CLI's own (the table's
libraries, the no-change check, Ray's start). wait_temporary_server() joins that thread
before the flow needs the server.

Prefect's server object marks itself running before it answers, so a flow must not start
while the thread is still starting it: run_ingest's callers wait first. Should the early
start fail, or Prefect's server object not take the child (another Prefect version), the
child is stopped and the flow's own client starts the server as usual."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

#: the early start's thread: one per process (joining it again once it ended returns at once)
_STARTED: list[threading.Thread] = []


def uses_temporary_server() -> bool:
    """Whether a flow run in this process would start Prefect's temporary server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def server_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The temporary server's command line and environment, as Prefect's
    SubprocessASGIServer._run_uvicorn_command builds them (tests/test_api_server.py checks
    that they still agree)."""
    from importlib.util import find_spec

    from prefect.settings import get_current_settings

    spec = find_spec("prefect")
    assert spec is not None and spec.origin is not None
    app_dir = os.path.dirname(os.path.dirname(spec.origin))  # prefect.__module_path__.parent
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        app_dir,
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    return args, env


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_temporary_server() -> bool:
    """Start Prefect's temporary server now, where a flow would start one (see the module's
    note). Whether a start began (not when a server is configured, one was started
    already, or one is starting)."""
    if _STARTED or not uses_temporary_server():
        return False
    port = _free_port()
    args, env = server_command(port)
    child = subprocess.Popen(args, env=env)

    def begin() -> None:
        taken = False
        try:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()
            if server.running or not callable(getattr(server, "_run_uvicorn_command", None)):
                return  # started by someone else, or a Prefect this does not know
            own = server._run_uvicorn_command

            def run_command() -> subprocess.Popen[Any]:
                # the child started above, once; should it fail to bind its port (Prefect's
                # start then picks another), Prefect's own command
                nonlocal taken
                if taken:
                    return own()
                taken = True
                return child

            server.port = port
            server._run_uvicorn_command = run_command  # type: ignore[method-assign]
            try:
                server.start()
            finally:
                del server._run_uvicorn_command  # the class's own again
        except Exception as exc:  # noqa: BLE001 - the flow's client starts it again and says why
            log.info("early start of Prefect's temporary server failed: %s", exc)
        finally:
            if not taken:
                _stop(child)

    thread = threading.Thread(target=begin, name="prefect-server-start", daemon=True)
    _STARTED.append(thread)
    thread.start()
    return True


def wait_temporary_server() -> None:
    """Wait for start_temporary_server()'s start, if one began: after this, a flow's client
    finds the server answering (or, should the start have failed, starts it itself)."""
    for thread in _STARTED:
        thread.join()
