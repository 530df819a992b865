"""Long documents in bounded memory: a text document of any size is read, chunked, embedded and
written a segment at a time, so the peak RSS of an ingest does not grow with its size.

Measured on the CLI in a subprocess (its own peak RSS, from the kernel) with the hash embedder,
whose cost does not depend on the model, so the figures are the pipeline's own.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from tasks.store import Store

from .conftest import REPO

pytestmark = [pytest.mark.slow]

_WORDS = (
    "index vector table night batch search source model chunk token lance prefect flow task "
    "retry window budget limit cache version generation manifest document paragraph heading"
).split()

# Peak RSS (KiB) of the child, which runs the CLI in-process. Read from VmHWM, the high-water
# mark of the child's own address space: getrusage's ru_maxrss is carried across exec, and
# Python starts children with vfork, so a child of a large pytest process would report the
# parent's peak (CI saw 1.5 GiB for all three sizes).
_MEASURE = (
    "import sys;"
    "sys.argv = ['lanceflow', *sys.argv[1:]];"
    "from flows.cli import main\n"
    "def peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1])\n"
    "    return -1\n"
    "try:\n    code = main(sys.argv[1:])\n"
    "finally:\n"
    "    sys.stderr.write('PEAK_KIB=%d\\n' % peak())\n"
    "sys.exit(code)"
)


def _write_document(path, megabytes: float, seed: int) -> None:
    rng = random.Random(seed)
    target = int(megabytes * 2**20)
    written = 0
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            if n % 40 == 0:
                line = f"## Part {n // 40}\n\n"
            else:
                line = " ".join(rng.choice(_WORDS) for _ in range(60)) + f" ({n}).\n\n"
            fh.write(line)
            written += len(line)
            n += 1


def _ingest(env, src, db) -> tuple[dict, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, "ingest", str(src), "--table", str(db)]
        + ["--embedder", "hash", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stderr.rsplit("PEAK_KIB=", 1)[1].split()[0])
    return json.loads(proc.stdout), peak


def test_peak_memory_does_not_grow_with_document_size(tmp_path, cli_env):
    peaks = {}
    for mb in (2, 16, 31):
        src = tmp_path / f"src{mb}"
        src.mkdir()
        _write_document(src / "long.md", mb, seed=mb)
        report, peaks[mb] = _ingest(cli_env, src, tmp_path / f"db{mb}")
        assert report["documents"]["new"] == 1 and report["documents"]["failed"] == 0
        store = Store(str(tmp_path / f"db{mb}"))
        rows = store.chunks_table().count_rows()
        manifest = store.documents().search().limit(None).to_arrow().to_pylist()
        assert manifest[0]["chunk_count"] == rows == report["chunks"]["written"]
    # a 16 MB document peaks within 15 % of a 2 MB one; 31 MB stays far inside 1.5 GiB
    assert min(peaks.values()) > 0, peaks
    assert peaks[16] <= 1.15 * peaks[2], peaks
    assert peaks[31] <= 1.5 * 2**20, peaks


def test_a_long_document_edited_replaces_its_chunks(tmp_path, cli_env):
    src = tmp_path / "src"
    src.mkdir()
    doc = src / "long.txt"
    _write_document(doc, 6, seed=3)
    db = tmp_path / "db"
    first, _ = _ingest(cli_env, src, db)
    with open(doc, "a", encoding="utf-8") as fh:
        fh.write("A closing paragraph about the parking garage, added later.\n")
    second, _ = _ingest(cli_env, src, db)
    assert second["documents"]["changed"] == 1
    # only the last segment's text changed: the rest comes from the cache
    assert second["chunks"]["cached"] > 0.9 * first["chunks"]["written"]
    store = Store(str(db))
    ids = store.chunks_table().search().select(["chunk_id"]).limit(None).to_arrow()
    ids = ids.column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids)) == second["chunks"]["written"]
    third, _ = _ingest(cli_env, src, db)
    assert third["documents"]["unchanged"] == 1 and third["chunks"]["embedded"] == 0
