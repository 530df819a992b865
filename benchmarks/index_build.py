"""Where the index refresh's time goes, on one core and on two: each index of a chunks table
built on its own (the steps of `Store.refresh_indexes`), then the vector index's coverage.

    python benchmarks/index_build.py [--docs 30000] [--cores 1,2] [--table DIR]

Without --table, generates --docs documents (benchmarks/ray_scale.py's generator) and ingests
them with `--embedder hash` first (untimed). For each core count, a copy of the table with its
indexes dropped, the process pinned to that many cores (CPU affinity, inherited by Lance's
threads), then, timed one after another: text_idx (English FTS), text_cjk_idx (bigram FTS),
the B-tree key indexes, vector_idx (IVF-PQ, lancedb's defaults): the very calls an ingest's
refresh makes (tasks.store's build_* functions). Also
reports the vector index's partitions and the rows they hold against the table's rows (Lance's
index statistics), and each step's CPU seconds (`cpu_s`: user + system of every thread; CPU
seconds near a step's wall seconds on two cores mean it ran on one). Prints one JSON object:
seconds per step and core count, and
`two_over_one` (1-core seconds / 2-core seconds) per step; `total` is the child's whole run
(start-up and dropping the copy's indexes included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def build_all(table: str, cores: int) -> dict[str, object]:
    """In a child pinned to `cores`: drop the copy's indexes and build each, timed."""
    code = f"""
import json, os, resource, time
os.sched_setaffinity(0, set(range({cores})))
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
from tasks.store import (CHUNK_KEYS, Store, build_cjk_index, build_key_index,
    build_text_index, build_vector_index)
store = Store({table!r})
tbl = store.chunks_table()
for ix in tbl.list_indices():
    tbl.drop_index(ix.name)
tbl = store.chunks_table()
out = {{}}
cpu = {{}}
def cpu_now():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def step(name, fn):
    t, c = time.perf_counter(), cpu_now(); fn()
    out[name] = round(time.perf_counter() - t, 2)
    cpu[name] = round(cpu_now() - c, 2)
step("text_idx", lambda: build_text_index(tbl))
step("text_cjk_idx", lambda: build_cjk_index(tbl))
step("key_indexes", lambda: [build_key_index(tbl, c) for c in CHUNK_KEYS])
step("vector_idx", lambda: build_vector_index(tbl))
ds = tbl.to_lance()
ix = ds.stats.index_stats("vector_idx")["indices"][0]
out["vector_partitions"] = ix["num_partitions"]
out["vector_rows_in_partitions"] = sum(p["size"] for p in ix["partitions"])
out["rows"] = ds.count_rows()
out["cpu_s"] = cpu
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=30000)
    ap.add_argument("--cores", default="1,2")
    ap.add_argument("--table", type=Path, help="an existing lanceflow table (not modified)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lanceflow-index-build-"))
    try:
        table = args.table
        if table is None:
            from ray_scale import generate

            corpus, table = work / "corpus", work / "db"
            generate(corpus, args.docs)
            env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
            env.setdefault("PREFECT_HOME", str(work / "prefect"))
            subprocess.run(
                [sys.executable, "-m", "flows.cli", "ingest", str(corpus), "--table", str(table)]
                + ["--embedder", "hash", "--chunk-tokens", "48", "--json"],
                env=env,
                check=True,
                capture_output=True,
            )
        result: dict[str, object] = {"table": str(table), "runs": {}}
        runs: dict[str, dict[str, object]] = result["runs"]  # type: ignore[assignment]
        for cores in [int(c) for c in args.cores.split(",")]:
            copy = work / f"copy-{cores}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(table, copy)
            started = time.perf_counter()
            runs[str(cores)] = build_all(str(copy), cores)
            runs[str(cores)]["total"] = round(time.perf_counter() - started, 2)
            shutil.rmtree(copy, ignore_errors=True)
        one, two = runs.get("1"), runs.get("2")
        if one and two:
            result["two_over_one"] = {
                k: round(float(one[k]) / float(two[k]), 2)  # type: ignore[arg-type]
                for k in ("text_idx", "key_indexes", "vector_idx", "total")
                if float(two[k]) > 0  # type: ignore[arg-type]
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
