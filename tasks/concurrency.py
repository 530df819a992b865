"""Threads of one run that must not wait on each other: prompt GIL hand-offs while a pipeline
runs.

The default runner overlaps reading and chunking, embedding and writing in threads of one
process. Every LanceDB call (a write, a cache lookup, the manifest's lookups) is a chain of
hand-offs between the calling thread and LanceDB's event-loop thread, and each hand-off needs
the GIL. While a thread is busy in Python (chunking, a tokenizer, the hash embedder), the
interpreter lets it keep the GIL for `sys.getswitchinterval()` (5 ms by default) before a
waiting thread gets it, so a lookup that takes 8 ms alone took 120-190 ms beside a busy thread,
and a batch's write was as slow. Ingest of 30,000 generated documents (`--embedder hash`),
per run: chunk-id lookups 25.8 -> 7.5 s, writes 15.3 -> 6.6 s, pipeline 144.4 -> 129.9 s with
a 0.5 ms interval; 1 ms gave the same pipeline (129.3 s) with fewer forced switches.

The interval is process-wide: it is lowered while at least one pipeline runs in the process
and restored when the last one ends.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: seconds a busy thread keeps the GIL while another waits, during a pipeline
PIPELINE_SWITCH_INTERVAL = 0.001

_lock = threading.Lock()
_active = 0
_saved = 0.0


@contextmanager
def prompt_gil_handoffs(interval: float = PIPELINE_SWITCH_INTERVAL) -> Iterator[None]:
    """Lower the interpreter's switch interval to `interval` (never raise it) while the block
    runs; nested and concurrent blocks share one setting, restored by the last to leave."""
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = sys.getswitchinterval()
        _active += 1
        sys.setswitchinterval(min(interval, sys.getswitchinterval()))
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                sys.setswitchinterval(_saved)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's or
    `taskset`'s limit narrows), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
