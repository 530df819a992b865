"""One writer per table: a Prefect global concurrency limit keyed by the table's location.

Every flow that writes a table (ingest, maintain, a rollback) holds the table's slot for its
whole run, also when started from the CLI: two writers of one table queue, writers of
different tables run in parallel. The slot is held under a lease that the holder renews while
it runs; a holder that dies stops renewing and the server frees the slot when the lease runs
out (LANCEFLOW_LOCK_LEASE_SECONDS, default 300, at least 60), so a crashed night does not
block the next.

Every writer also takes an OS file lock (LANCEFLOW_CACHE_DIR/locks), released by the kernel
when its process dies. Without a Prefect server (PREFECT_API_URL unset: the CLI's temporary
local API, where nothing expires a dead holder's lease) that file lock is the only one; with a
server it also keeps a CLI run without PREFECT_API_URL on the same machine from overlapping a
worker's run. LANCEFLOW_TABLE_LOCK=prefect|local|auto chooses (auto: prefect when
PREFECT_API_URL is set).

A writer waits for the slot at most LANCEFLOW_LOCK_WAIT_SECONDS (default 6 hours), then fails
with a message naming the limit: a Prefect server restarted with in-memory lease storage (the
default) forgets its leases and leaves the slot taken; `prefect gcl update NAME
--active-slots 0` frees it, and PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=
prefect.server.concurrency.lease_storage.filesystem keeps leases across restarts.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tasks.errors import TableBusyError
from tasks.storage import local_path

log = logging.getLogger(__name__)

LOCK_PREFIX = "lanceflow-table-"
DEFAULT_LEASE_SECONDS = 300.0

#: the table slots this flow run (and its subflows, which share the context) already holds
_held: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "lanceflow_table_locks", default=frozenset()
)


def table_location(uri: str) -> str:
    """One spelling per table: an absolute, resolved path, or the URL without a trailing '/'."""
    path = local_path(uri)
    if path is None:
        from tasks.sources import canonical_source_uri

        return canonical_source_uri(uri)
    return os.path.realpath(path)


def display_location(uri: str) -> str:
    """The table location for logs and errors: credentials in a URL's user part are masked."""
    import re

    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1***@", table_location(uri))


def lock_name(uri: str) -> str:
    """The global concurrency limit of one table (a hash: no path or bucket in the name)."""
    digest = hashlib.sha256(table_location(uri).encode()).hexdigest()[:16]
    return LOCK_PREFIX + digest


def env_seconds(name: str, default: float, minimum: float) -> float:
    """Seconds from an environment variable, at least `minimum`; `default` when unset or
    not a number."""
    raw = os.environ.get(name, "")
    try:
        return max(float(raw), minimum) if raw else default
    except ValueError:
        return default


def lease_seconds() -> float:
    return env_seconds("LANCEFLOW_LOCK_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, 60.0)


DEFAULT_WAIT_SECONDS = 6 * 3600.0


def wait_seconds() -> float:
    return env_seconds("LANCEFLOW_LOCK_WAIT_SECONDS", DEFAULT_WAIT_SECONDS, 1.0)


def lock_mode() -> str:
    mode = os.environ.get("LANCEFLOW_TABLE_LOCK", "auto").strip().lower()
    if mode in ("prefect", "local"):
        return mode
    if os.environ.get("PREFECT_API_URL"):
        return "prefect"
    home = os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
    if not os.path.exists(os.path.join(home, "profiles.toml")):
        return "local"  # no profile can name a server: no need to import Prefect to know
    from prefect.settings import PREFECT_API_URL

    return "prefect" if PREFECT_API_URL.value() else "local"


@contextlib.contextmanager
def hold_file_lock(
    path: Path, deadline: float, busy: Callable[[], Exception], poll_seconds: float = 0.5
) -> Iterator[None]:
    """An exclusive OS file lock on `path` (released by the kernel when the process dies),
    waited for until `deadline` (time.monotonic); then `busy()` is raised."""
    import fcntl

    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise busy() from None
                time.sleep(poll_seconds)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _file_lock(name: str, location: str, deadline: float) -> Iterator[None]:
    from tasks.embedders.local import cache_dir

    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"

    def busy() -> TableBusyError:
        return TableBusyError(
            f"{location} is being written by another process on this machine "
            f"(file lock {path}); waited {wait_seconds():.0f} s (LANCEFLOW_LOCK_WAIT_SECONDS)"
        )

    with hold_file_lock(path, deadline, busy):
        yield


@contextlib.contextmanager
def _prefect_slot(name: str, location: str, deadline: float) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    try:
        with concurrency(
            name,
            occupy=1,
            lease_duration=lease_seconds(),
            strict=True,
            timeout_seconds=max(deadline - time.monotonic(), 1.0),
        ):
            yield
    except TimeoutError as exc:
        raise TableBusyError(
            f"{location} stayed busy for {wait_seconds():.0f} s (Prefect concurrency limit "
            f"{name}). If no run is writing it (a server restart forgets the leases of "
            f"in-memory lease storage), free the slot: `prefect gcl update {name} "
            "--active-slots 0`"
        ) from exc


def ensure_limit(name: str) -> None:
    """Create the table's limit (one slot) on first use; an existing one is left as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )
            log.info("created concurrency limit %s", name)
        except ObjectAlreadyExists:  # another writer created it first
            pass


@contextlib.contextmanager
def table_lock(uri: str, holder: str = "lanceflow") -> Iterator[str]:
    """Hold the table's slot for the block; re-entrant within one flow run and its subflows."""
    name = lock_name(uri)
    held = _held.get()
    if name in held:
        yield name
        return
    location = display_location(uri)
    log.info("waiting for the write slot of %s (%s)", location, name)
    deadline = time.monotonic() + wait_seconds()
    with contextlib.ExitStack() as stack:
        if lock_mode() == "prefect":
            stack.enter_context(_prefect_slot(name, location, deadline))
        stack.enter_context(_file_lock(name, location, deadline))
        token = _held.set(held | {name})
        log.info("%s holds the write slot of %s", holder, location)
        try:
            yield name
        finally:
            _held.reset(token)
