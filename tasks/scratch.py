"""Scratch folders on local disk (a run's spilled plan, a Ray run's spilled outcomes).

A run removes its own scratch folder when it ends, failed or not; a run that is killed
(SIGKILL, out of memory, a lost machine) cannot. So each folder's name carries the host and the
process that made it, and making a new one first removes the folders of processes on this host
that no longer exist: a service left running does not fill its temporary disk with the leftovers
of killed runs. A folder of a live process, or of another host sharing the disk, is never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile

log = logging.getLogger(__name__)


def _host() -> str:
    # a name fit for a folder: no separators, no spaces
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _prefix(kind: str) -> str:
    """The start of this host's `kind` folder names; the process id and a random part follow."""
    return f"lanceflow-{kind}-{_host()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def sweep_scratch(kind: str, parent: str | None = None) -> list[str]:
    """Remove the `kind` scratch folders under `parent` (default: the temporary directory) left
    by processes of this host that have ended; returns the folders removed."""
    parent = parent or tempfile.gettempdir()
    pattern = re.compile(rf"^{re.escape(_prefix(kind))}(\d+)-[^-]+$")
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    if removed:
        log.info(
            "removed %d %s scratch folder(s) left in %s by runs that ended without cleaning up "
            "(killed?)",
            len(removed),
            kind,
            parent,
        )
    return removed


def scratch_dir(kind: str, parent: str | None = None) -> str:
    """A new scratch folder for this process (its caller removes it when done), after sweeping
    the ones killed runs left behind."""
    sweep_scratch(kind, parent)
    return tempfile.mkdtemp(prefix=f"{_prefix(kind)}{os.getpid()}-", dir=parent)
