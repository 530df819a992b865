"""Memory of the index refresh that ends a run, against the table's size, without the model.

A first run writes its chunks, then `Store.refresh_indexes` compacts, builds the full-text
indexes, the B-tree key indexes and the IVF-PQ vector index, and prunes. This benchmark fills a
chunks table with generated rows (48 words of ray_scale.py's vocabulary, random unit vectors),
one fragment per 3,734 rows as a run's batches write them, then,
in a fresh process, runs that same `refresh_indexes` and samples the process's anonymous RSS
(/proc/self/smaps_rollup, the heap) every 50 ms:

    python benchmarks/index_memory.py [--rows 146000,1460000] [--dim 256]

Per size: the seconds and peak heap growth over the process's heap before the refresh (MiB),
for the whole refresh and for each LanceDB call it makes (compact_fragments, create_fts_index,
create_scalar_index, create_index, optimize), and the heap left after it. The two default
sizes are the chunk counts of ray_scale.py's 10k and 100k documents. Prints one JSON object,
with peak_ratio: the largest size's peak growth over the smallest's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from write_memory import _anon_mib  # the heap: anonymous RSS

REPO = Path(__file__).resolve().parent.parent
#: rows per append: one fragment per batch, as a first run writes them (ray_scale.py's batches
#: of 256 documents make 3,734 chunks on average), so the compaction has as many to merge
BATCH = 3_734


def build(db: str, rows: int, dim: int) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ray_scale import _WORDS

    from tasks.store import Store, TableModel, chunks_schema

    store = Store(db)
    tbl = store.chunks(TableModel("bench", dim, "hash"))
    schema = chunks_schema(dim, "bench", "hash")
    rng = random.Random(0)
    nrng = np.random.default_rng(0)
    done = 0
    while done < rows:
        m = min(BATCH, rows - done)
        texts = [" ".join(rng.choice(_WORDS) for _ in range(48)) for _ in range(m)]
        docs = [f"doc{(done + i) // 15}" for i in range(m)]
        vectors = nrng.standard_normal((m, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        cols: dict[str, Any] = {
            "chunk_id": [
                hashlib.blake2b(str(done + i).encode(), digest_size=16).hexdigest()
                for i in range(m)
            ],
            "doc_key": docs,
            "doc_id": docs,
            "source_uri": ["/bench"] * m,
            "chunk_index": [(done + i) % 15 for i in range(m)],
            "text": texts,
            "text_cjk": [""] * m,
            "text_hash": [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts],
            "doc_version": ["v1"] * m,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        }
        tbl.add(
            pa.Table.from_pydict(
                {f.name: cols.get(f.name, pa.nulls(m, f.type)) for f in schema}, schema=schema
            )
        )
        done += m
    return {"rows": tbl.count_rows()}


def refresh(db: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tasks.memory import limit_malloc_arenas

    limit_malloc_arenas()  # as the CLI does
    import tasks.store
    from tasks.store import Store

    store = Store(db)
    tbl = store.table(store.chunks_name)  # the object refresh_indexes will use
    peak = [0.0]
    lock = threading.Lock()  # a step's reset of the peak and the sampler's update, not both
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            heap = _anon_mib()
            with lock:
                peak[0] = max(peak[0], heap)
            time.sleep(0.05)

    start = _anon_mib()
    steps: dict[str, dict[str, float]] = {}

    def timed(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            label = name
            if name in ("create_fts_index", "create_scalar_index"):
                label = f"{name}({args[0] if args else kwargs.get('field_names', '')})"
            with lock:
                before_peak = peak[0]
                peak[0] = _anon_mib()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                time.sleep(0.1)
                with lock:
                    steps[label] = {
                        "seconds": round(time.perf_counter() - t, 1),
                        "peak_over_start_mib": round(peak[0] - start),
                    }
                    peak[0] = max(peak[0], before_peak)

        return call

    for name in ("create_fts_index", "create_scalar_index", "create_index", "optimize"):
        setattr(tbl, name, timed(name, getattr(tbl, name)))
    tasks.store.compact_fragments = timed("compact_fragments", tasks.store.compact_fragments)
    threading.Thread(target=sample, daemon=True).start()
    with lock:
        peak[0] = start
    t = time.perf_counter()
    store.refresh_indexes(vector_index_min_rows=1, cleanup_older_than=None, changed=True)
    seconds = time.perf_counter() - t
    time.sleep(0.1)
    stop.set()
    return {
        "seconds": round(seconds, 1),
        "anon_mib_before": round(start),
        "peak_over_start_mib": round(peak[0] - start),
        "left_after_mib": round(_anon_mib() - start),
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="146000,1460000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--child", choices=("build", "refresh"), help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "build":
        print(json.dumps(build(args.db, int(args.rows), args.dim)))
        return
    if args.child == "refresh":
        print(json.dumps(refresh(args.db)))
        return
    result: dict[str, Any] = {"dim": args.dim}
    sizes = [int(s) for s in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="lanceflow-index-memory-") as work:
        for rows in sizes:
            db = str(Path(work) / f"db-{rows}")
            for step in ("build", "refresh"):
                cmd = [sys.executable, __file__, "--child", step, "--db", db]
                cmd += ["--rows", str(rows), "--dim", str(args.dim)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
                if step == "refresh":
                    result[str(rows)] = json.loads(out.stdout.strip().splitlines()[-1])
            sys.stderr.write(f"{rows}: {json.dumps(result[str(rows)])}\n")
    lo, hi = result[str(sizes[0])], result[str(sizes[-1])]
    if len(sizes) > 1 and lo["peak_over_start_mib"]:
        result["peak_ratio"] = round(hi["peak_over_start_mib"] / lo["peak_over_start_mib"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
