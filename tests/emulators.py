"""Real object-store emulators on loopback for tests of gs:// and az:// locations.

`gcs_server`: gcp-storage-emulator (PyPI `gcp-storage-emulator`), served in-process from a
thread on 127.0.0.1 and a free port, with in-memory storage. Read and written with gcsfs.
LanceDB (Rust object_store) can not use it: object_store speaks GCS's XML API (listing with
`?list-type=2`, HEAD, multipart uploads), which the emulator does not implement.

`azurite`: Azurite's blob service (npm `azurite`), a node subprocess on 127.0.0.1 and a free
port, in-memory. Installed at test time, when missing, into `<repo>/.azurite` with
`npm install --prefix .azurite azurite@<AZURITE_VERSION>` (LANCEFLOW_AZURITE_PREFIX overrides
the folder). Without node/npm, or when the install fails, tests that use it are skipped, or
fail when LANCEFLOW_REQUIRE_AZURITE=1. Read and written with adlfs and with LanceDB
(`lance_storage_options`).

Both count the requests they serve (`requests()`, `object_gets()`, `listings()`,
`reset_counts()`), so a test can assert that unchanged documents are not downloaded again.
Nothing here sets an environment variable.

Use them from a test module with `from .emulators import azurite, gcs_server  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent

#: 3.36+ declare node >= 21/22 in `engines`; 3.35.0 runs on node 20 (this image) and newer
AZURITE_VERSION = "3.35.0"
#: the well-known development account of Azurite (and of the Azure storage emulator)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
STARTUP_TIMEOUT_S = 60.0
NPM_TIMEOUT_S = 600.0


def azurite_prefix() -> Path:
    """Where Azurite is (to be) installed: `<repo>/.azurite`, or LANCEFLOW_AZURITE_PREFIX."""
    return Path(os.environ.get("LANCEFLOW_AZURITE_PREFIX") or REPO / ".azurite").resolve()


def azurite_install_command(prefix: Path | None = None) -> list[str]:
    prefix = prefix or azurite_prefix()
    return [
        "npm",
        "install",
        "--prefix",
        str(prefix),
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        f"azurite@{AZURITE_VERSION}",
    ]


# ---- request accounting -------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request an emulator served.

    kind: "get" (object content download), "stat" (object metadata), "list" (object
    listing), "put" (object or block upload), "delete", or "other" (buckets, health, ...).
    """

    kind: str
    method: str
    bucket: str
    key: str
    detail: str  # the raw path (GCS) or Azurite's operation name (Blob_Download, ...)

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}" if self.key else self.bucket


class _Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[Request] = []

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def _sync(self) -> None:
        """Make every request answered so far visible to `requests()`."""

    def requests(self, kind: str | None = None, prefix: str = "") -> list[Request]:
        """Requests served so far (since `reset_counts`), optionally of one kind and for
        objects whose `bucket/key` starts with `prefix`."""
        self._sync()
        with self._lock:
            return [
                r
                for r in self._requests
                if (kind is None or r.kind == kind) and r.path.startswith(prefix)
            ]

    def object_gets(self, prefix: str = "") -> int:
        """How many object-content downloads (whole or ranged) were served."""
        return len(self.requests("get", prefix))

    def listings(self, prefix: str = "") -> int:
        """How many object-listing requests were served (prefix: the bucket or container)."""
        return len(self.requests("list", prefix))

    def reset_counts(self) -> None:
        self._sync()
        with self._lock:
            self._requests.clear()


# ---- GCS: gcp-storage-emulator ------------------------------------------------------------

_GCS_ROUTES: list[tuple[re.Pattern[str], dict[str, str]]] = [
    (re.compile(r"^/download/storage/v1/b/(?P<b>[^/]+)/o/(?P<o>.+)$"), {"GET": "get"}),
    (re.compile(r"^/upload/storage/v1/b/(?P<b>[^/]+)/o$"), {"POST": "put", "PUT": "put"}),
    (re.compile(r"^(?:/storage/v1)?/b/(?P<b>[^/]+)/o$"), {"GET": "list", "POST": "put"}),
    (
        re.compile(r"^(?:/storage/v1)?/b/(?P<b>[^/]+)/o/(?P<o>.+)/(?:copyTo|rewriteTo)/.*$"),
        {"POST": "put"},
    ),
    (re.compile(r"^(?:/storage/v1)?/b/(?P<b>[^/]+)/o/(?P<o>.+)/compose$"), {"POST": "put"}),
    (
        re.compile(r"^(?:/storage/v1)?/b/(?P<b>[^/]+)/o/(?P<o>.+)$"),
        {"GET": "stat", "DELETE": "delete"},
    ),
    (re.compile(r"^(?:/storage/v1)?/b(?:/(?P<b>[^/]+).*)?$"), {}),
    (re.compile(r"^/(?:batch|wipe)?(?:/.*)?$"), {}),
    # XML API (and public URLs): /bucket/object
    (
        re.compile(r"^/(?P<b>[^/]+)/(?P<o>.+)$"),
        {"GET": "get", "HEAD": "stat", "PUT": "put", "DELETE": "delete"},
    ),
    (re.compile(r"^/(?P<b>[^/]+)/?$"), {"GET": "list"}),
]


def _classify_gcs(method: str, raw_path: str) -> Request:
    parts = urlsplit(raw_path)
    query = parse_qs(parts.query)
    for pattern, kinds in _GCS_ROUTES:
        match = pattern.match(parts.path)
        if match is None:
            continue
        groups = match.groupdict()
        kind = kinds.get(method, "other")
        if kind == "stat" and query.get("alt") == ["media"]:
            kind = "get"
        if kind == "list" and pattern.pattern.endswith("/?$") and "list-type" not in query:
            kind = "other"
        bucket = unquote(groups.get("b") or "")
        key = unquote(groups.get("o") or "")
        if kind in ("put", "list") and not key:
            key = (query.get("name") or query.get("prefix") or [""])[0]
        return Request(kind, method, bucket, key, raw_path)
    return Request("other", method, "", "", raw_path)


class GcsEmulator(_Recorder):
    """gcp-storage-emulator in a thread of this process, in memory, on 127.0.0.1."""

    project = "test"

    def __init__(self) -> None:
        super().__init__()
        from gcp_storage_emulator.server import RequestHandler
        from gcp_storage_emulator.storage import Storage

        self.storage = Storage(use_memory_fs=True)
        recorder = self
        storage = self.storage

        class Handler(RequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(storage, *args, **kwargs)

            def parse_request(self) -> bool:
                ok = bool(super().parse_request())
                if ok:
                    method = self.headers.get("x-http-method-override") or self.command
                    recorder._record(_classify_gcs(method.upper(), self.path))
                return ok

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        # one request at a time, as the emulator's own server: its storage has no locking
        self._httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._httpd.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"gcs-emulator-{self.port}", daemon=True
        )

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> GcsEmulator:
        self._thread.start()
        _wait_http(self.endpoint + "/", timeout, what="gcp-storage-emulator", ok=(200,))
        self.reset_counts()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def storage_options(self) -> dict[str, Any]:
        """gcsfs options for `fsspec.url_to_fs("gs://bucket/prefix", **storage_options)`.

        retry_timeout: gcsfs >= 2026.x (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT, on by default)
        asks the endpoint over gRPC for each bucket's storage layout before opening a file,
        and retries for 60 s when that fails, as it does against any emulator; 0 makes it
        give up at once (it logs a warning and falls back to the plain JSON API).
        """
        return {
            "endpoint_url": self.endpoint,
            "token": "anon",
            "project": self.project,
            "retry_timeout": 0.0,
        }

    def fs(self) -> Any:
        """A fresh gcsfs filesystem on the emulator (the plain JSON-API class: no gRPC)."""
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str) -> None:
        self.fs().mkdir(name)

    def wipe(self) -> None:
        """Delete every bucket and object."""
        self.storage.wipe()


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[GcsEmulator]:
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed")
    pytest.importorskip("gcsfs", reason="gcsfs is not installed")
    server = GcsEmulator().start()
    try:
        yield server
    finally:
        server.stop()


# ---- Azure Blob: Azurite ------------------------------------------------------------------

_AZ_KINDS = {
    "Blob_Download": "get",
    "Blob_GetProperties": "stat",
    "Blob_GetTags": "stat",
    "Container_ListBlobFlatSegment": "list",
    "Container_ListBlobHierarchySegment": "list",
    "BlockBlob_Upload": "put",
    "BlockBlob_StageBlock": "put",
    "BlockBlob_StageBlockFromURL": "put",
    "BlockBlob_CommitBlockList": "put",
    "BlockBlob_PutBlobFromUrl": "put",
    "Blob_StartCopyFromURL": "put",
    "Blob_CopyFromURL": "put",
    "AppendBlob_Create": "put",
    "AppendBlob_AppendBlock": "put",
    "Blob_Delete": "delete",
}
_AZ_LINE = re.compile(r"^\S+ (?P<id>\S+) \w+: (?P<component>\w+): (?P<message>.*)$")
_AZ_CONTEXT = re.compile(
    r"^Account=(?P<account>\S*) Container=(?P<container>\S*) Blob=(?P<blob>.*)$"
)
_SYNC_PREFIX = "lanceflow-sync-"


class AzuriteUnavailable(Exception):
    """node, npm or the Azurite package is not available."""


def ensure_azurite(prefix: Path | None = None) -> Path:
    """The path of Azurite's blob `main.js`, installing the package with npm when missing."""
    prefix = prefix or azurite_prefix()
    main = prefix / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
    if main.is_file():
        return main
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise AzuriteUnavailable(
            f"Azurite is not installed in {prefix} and node/npm are not on PATH "
            f"(install Node.js, then `{' '.join(azurite_install_command(prefix))}`)"
        )
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:
        with contextlib.suppress(ImportError):  # parallel workers install once
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        if main.is_file():
            return main
        cmd = azurite_install_command(prefix)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise AzuriteUnavailable(f"`{' '.join(cmd)}` timed out after {exc.timeout}s") from exc
        if proc.returncode != 0 or not main.is_file():
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise AzuriteUnavailable(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {tail or 'no output'}"
            )
    return main


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parent_death_signal() -> Any:
    """A preexec_fn that has the child get SIGTERM when the test process dies (Linux), so no
    Azurite is left behind when pytest is killed; None elsewhere. libc is loaded here, in the
    parent: the child, forked from a threaded process, only makes the call."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


def _wait_http(
    url: str,
    timeout: float,
    *,
    what: str,
    ok: tuple[int, ...] | None = None,
    proc: subprocess.Popen[bytes] | None = None,
    output: Path | None = None,
) -> None:
    """Poll `url` until it answers (any status, or one of `ok`), the process exits, or
    `timeout` passes; raise RuntimeError with the process's output then."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {proc.returncode} before it answered on {url}:\n"
                + _read_tail(output)
            )
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=2)
        try:
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
            status = conn.getresponse().status
            if ok is None or status in ok:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = repr(exc)
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not answer on {url} within {timeout:.0f}s (last: {last})"
                + (f":\n{_read_tail(output)}" if output else "")
            )
        time.sleep(0.05)


def _read_tail(path: Path | None, limit: int = 4000) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(could not read {path}: {exc})"


class AzuriteServer(_Recorder):
    """Azurite's blob service in a node subprocess, in memory, on 127.0.0.1.

    Requests are counted from Azurite's debug log (`--debug FILE`), which names each
    request's operation (Blob_Download, Container_ListBlobFlatSegment, ...) and blob. The log
    is written asynchronously, so `requests()` first sends a marker request and waits for it
    to appear: everything answered before the marker is in the log by then.
    """

    account_name = AZURITE_ACCOUNT
    account_key = AZURITE_KEY

    def __init__(self, main_js: Path) -> None:
        super().__init__()
        self._main_js = main_js
        self._workdir = Path(tempfile.mkdtemp(prefix="lanceflow-azurite-"))
        self._log = self._workdir / "debug.log"
        self._output = self._workdir / "output.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._pending = b""
        self._by_id: dict[str, dict[str, str]] = {}
        self._seen_markers: set[str] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The blob service URL of the account (path style: http://127.0.0.1:PORT/account)."""
        return f"http://127.0.0.1:{self.port}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.endpoint};"
        )

    @property
    def storage_options(self) -> dict[str, Any]:
        """adlfs options for `fsspec.url_to_fs("az://container/prefix", **storage_options)`."""
        return {"connection_string": self.connection_string}

    @property
    def lance_storage_options(self) -> dict[str, str]:
        """LanceDB options for `lancedb.connect("az://container/db", storage_options=...)`
        (the container must exist). `azure_storage_use_emulator` is no use here: it takes
        the URL from AZURITE_BLOB_STORAGE_URL, else 127.0.0.1:10000."""
        return {
            "account_name": self.account_name,
            "account_key": self.account_key,
            "azure_storage_endpoint": self.endpoint,
            "allow_http": "true",
        }

    def fs(self) -> Any:
        """A fresh adlfs filesystem on the emulator."""
        from adlfs import AzureBlobFileSystem

        return AzureBlobFileSystem(
            connection_string=self.connection_string, skip_instance_cache=True
        )

    def make_container(self, name: str) -> None:
        """Create a container (names: 3-63 lower-case letters, digits and hyphens)."""
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string) as client:
            client.create_container(name)

    def start(self, timeout: float = STARTUP_TIMEOUT_S, attempts: int = 3) -> AzuriteServer:
        for attempt in range(attempts):
            self.port = _free_port()
            cmd = [
                shutil.which("node") or "node",
                str(self._main_js),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
                "--disableTelemetry",
                "--debug",
                str(self._log),
            ]
            with open(self._output, "wb") as out:
                self._proc = subprocess.Popen(
                    cmd,
                    cwd=self._workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_parent_death_signal(),  # noqa: PLW1509
                )
            try:
                _wait_http(
                    f"{self.endpoint}?comp=list",
                    timeout,
                    what=f"Azurite ({' '.join(cmd)})",
                    proc=self._proc,
                    output=self._output,
                )
            except RuntimeError:
                in_use = "EADDRINUSE" in _read_tail(self._output)
                self._terminate()
                if in_use and attempt + 1 < attempts:
                    continue
                raise
            self.reset_counts()
            return self
        raise AssertionError("unreachable")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self._workdir, ignore_errors=True)

    # -- counting

    def _sync(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        marker = f"{_SYNC_PREFIX}{uuid.uuid4().hex[:16]}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", f"/{self.account_name}/{marker}?restype=container")
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + timeout
        while True:
            self._read_log()
            if marker in self._seen_markers:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Azurite's debug log {self._log} did not show {marker}")
            time.sleep(0.02)

    def _read_log(self) -> None:
        try:
            with open(self._log, "rb") as fh:
                fh.seek(self._log_offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        self._log_offset += len(chunk)
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for raw in lines:
            match = _AZ_LINE.match(raw.decode("utf-8", "replace"))
            if match is None:
                continue
            rid, component, message = match.group("id", "component", "message")
            if component == "BlobStorageContextMiddleware":
                ctx = _AZ_CONTEXT.match(message)
                if ctx is not None:
                    self._by_id.setdefault(rid, {}).update(ctx.groupdict())
                elif message.startswith("RequestMethod="):
                    info = self._by_id.setdefault(rid, {})
                    info["method"] = message.split()[0].split("=", 1)[1]
                    url = message.split(" RequestURL=", 1)[-1].split(" ", 1)[0]
                    info["prefix"] = parse_qs(urlsplit(url).query).get("prefix", [""])[0]
            elif component == "DispatchMiddleware" and message.startswith("Operation="):
                info = self._by_id.pop(rid, {})
                container = info.get("container", "")
                if container.startswith(_SYNC_PREFIX):
                    self._seen_markers.add(container)
                    continue
                operation = message.split("=", 1)[1].strip()
                kind = _AZ_KINDS.get(operation, "other")
                key = info.get("blob", "") or (info.get("prefix", "") if kind == "list" else "")
                self._record(Request(kind, info.get("method", ""), container, key, operation))


@pytest.fixture(scope="module")
def azurite() -> Iterator[AzuriteServer]:
    pytest.importorskip("adlfs", reason="adlfs is not installed")
    try:
        main_js = ensure_azurite()
    except AzuriteUnavailable as exc:
        reason = f"Azurite is not available: {exc}"
        if os.environ.get("LANCEFLOW_REQUIRE_AZURITE") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    server = AzuriteServer(main_js)
    try:
        yield server.start()
    finally:
        server.stop()
