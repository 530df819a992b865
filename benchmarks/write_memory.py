"""Memory and time of the default runner's table work as a run grows, without the model.

Each batch does to the chunks table what one default-runner batch does: look up the batch's
text hashes (the embedding cache) and its documents' old chunk ids, then write the rows
(merge_insert on chunk_id, or an append when the documents have no rows yet). Rows are
generated (random vectors), so nothing but LanceDB and lanceflow's Store runs. Every mode runs
in a fresh process:

  append   plain appends, no lookups, no merge_insert (the control)
  upsert   merge_insert only (every batch, as a run writing changed documents does)
  run      what an ingest does per batch (tasks.writing.write_batch): the lookups, then
           Store.replace_chunks with the old chunk ids found (none here: new documents, so
           it appends)

    python benchmarks/write_memory.py [--batches 120] [--rows 3650] [--dim 256]
                                      [--modes append,upsert,run]

Per mode: anonymous RSS (/proc/self/smaps_rollup, the heap; file-backed pages left out) after
the first 10 batches and at the end, its growth in MiB per 100,000 rows written after that,
and the milliseconds of the batch's table work in the first and last 10 batches (flat when
the lookups stay bounded, see tasks.store.KEY_INDEX_STALE_ROWS). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _anon_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rows(batch: int, n: int, dim: int) -> Any:
    import numpy as np
    import pyarrow as pa

    from tasks.store import chunks_schema

    schema = chunks_schema(dim, "bench", "hash")
    rng = np.random.default_rng(batch)
    docs = [
        hashlib.blake2b(f"{batch}/{i // 15}".encode(), digest_size=16).hexdigest() for i in range(n)
    ]
    texts = [
        f"batch {batch} chunk {i} " + " ".join(map(str, rng.integers(0, 9999, 40)))
        for i in range(n)
    ]
    hashes = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts]
    ids = [
        hashlib.blake2b(f"{d}/{i}/{h}".encode(), digest_size=16).hexdigest()
        for i, (d, h) in enumerate(zip(docs, hashes, strict=True))
    ]
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    cols: dict[str, Any] = {
        "chunk_id": ids,
        "doc_key": docs,
        "doc_id": docs,
        "source_uri": ["/bench"] * n,
        "chunk_index": [i % 15 for i in range(n)],
        "text": texts,
        "text_cjk": [""] * n,
        "text_hash": hashes,
        "doc_version": ["v1"] * n,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
    }
    return pa.Table.from_pydict(
        {f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema
    )


def child(mode: str, batches: int, rows: int, dim: int, db: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tasks.memory import limit_malloc_arenas

    limit_malloc_arenas()  # as the CLI does
    from tasks.store import Store, TableModel

    store = Store(db)
    store.chunks(TableModel("bench", dim, "hash"))
    ms: list[float] = []
    anon: list[float] = []
    for b in range(batches):
        data = _rows(b, rows, dim)
        keys = list(dict.fromkeys(data.column("doc_key").to_pylist()))
        t = time.perf_counter()
        if mode == "append":
            store.chunks().add(data)
        else:
            stored = None
            if mode == "run":
                store.cached_vectors(data.column("text_hash").to_pylist())
                stored = store.chunk_ids_of(keys)
            store.replace_chunks(data, keys, stored)
        ms.append(1000 * (time.perf_counter() - t))
        anon.append(_anon_mib())
    warm = min(10, batches - 1)
    grown_rows = (batches - 1 - warm) * rows
    return {
        "rows_written": batches * rows,
        "anon_mib_after_10": round(anon[warm], 1),
        "anon_mib_end": round(anon[-1], 1),
        "anon_mib_per_100k_rows": round((anon[-1] - anon[warm]) / grown_rows * 1e5, 1)
        if grown_rows
        else None,
        "ms_per_batch_first_10": round(sum(ms[:10]) / len(ms[:10]), 1),
        "ms_per_batch_last_10": round(sum(ms[-10:]) / len(ms[-10:]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--rows", type=int, default=3650)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--modes", default="append,upsert,run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batches, args.rows, args.dim, args.db)))
        return
    result: dict[str, Any] = {"batches": args.batches, "rows_per_batch": args.rows}
    with tempfile.TemporaryDirectory(prefix="lanceflow-write-memory-") as work:
        for mode in args.modes.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--db",
                str(Path(work) / mode),
                "--batches",
                str(args.batches),
                "--rows",
                str(args.rows),
                "--dim",
                str(args.dim),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
            result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            sys.stderr.write(f"{mode}: {result[mode]}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
