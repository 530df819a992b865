"""Named crash points, for the tests that prove a run converges after a crash at each one.

`LANCEFLOW_CRASH_AT=NAME` (or `NAME:N` for its N-th passage) makes the process kill itself
with SIGKILL when it reaches that point: no cleanup, no `finally`, exactly like a power cut or
the OOM killer. Unset (always, outside those tests), a crash point costs one dict lookup.
With `LANCEFLOW_CRASH_MARKER=PATH` it fires once across processes: the first process to
create PATH dies, later ones (a restarted Ray worker) pass.
"""

from __future__ import annotations

import os
import signal
import time

POINTS = (
    "after-chunk-write",  # a batch's chunks are written as data files, not yet committed
    "before-chunk-commit",  # the pending chunks are all written, none is committed
    "after-chunk-commit",  # pending chunks are committed, their manifest rows are not
    "during-deletions",  # a deleted document's chunks are gone, its manifest row is not
    "during-index-refresh",  # one full-text index is built, the other is not
    "before-switch",  # a reindexed generation is complete and indexed, not yet live
    "after-switch",  # the new generation is live, the old one not yet dropped
    "ray-embed",  # a Ray embedding actor has embedded a shard, not yet returned it
)
#: where LANCEFLOW_PAUSE_AT can hold a run
PAUSE_POINTS = ("after-plan",)  # the ingest flow holds the table's write slot and has its plan

_passed: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get("LANCEFLOW_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] >= int(nth or 1):
        marker = os.environ.get("LANCEFLOW_CRASH_MARKER")
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(name: str) -> None:
    """`LANCEFLOW_PAUSE_AT=NAME:SECONDS` holds a run at a named point (tests that need two
    runs to be in flight at once: the one-writer-per-table tests)."""
    wanted = os.environ.get("LANCEFLOW_PAUSE_AT")
    if not wanted:
        return
    point, _, seconds = wanted.partition(":")
    if point == name:
        time.sleep(float(seconds or 1))
