"""Query latency against the size of Lance's caches: why search keeps larger caches than an
ingest run (tasks.memory.READ_CACHE_MB and WRITE_CACHE_MB).

Builds a chunks table of generated rows with every index a run's refresh builds
(index_memory.py's build and refresh steps), then, in a fresh process per cache size
(LANCEFLOW_LANCE_CACHE_MB, process set up as the CLI's: two malloc arenas), runs 50 warm-up
and 550 timed queries of each kind as `lanceflow search` makes them (tasks.search: vector over
IVF-PQ with nprobes 32 and refine 5, full text on `text`; k=10, the search's columns). The
generated text draws on ray_scale.py's 45 words, so every word is in most rows: the full-text
figure is for common terms, the expensive case.

    python benchmarks/search_cache.py [--rows 1460000] [--cache-mb 16,64]

Per cache size: mean milliseconds a query of each kind and the process's RSS after them (MiB).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
WARM, TIMED = 50, 550


def measure(db: str) -> dict[str, float]:
    import numpy as np
    import psutil

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    from ray_scale import _WORDS

    from tasks.memory import limit_malloc_arenas

    limit_malloc_arenas()  # as flows/__init__.py does for every CLI command
    from tasks.search import _fts_hits, _vector_hits
    from tasks.store import Store

    tbl = Store(db).chunks_table()
    dim = tbl.schema.field("vector").type.list_size
    rng = np.random.default_rng(1)
    q = rng.standard_normal((WARM + TIMED, dim)).astype("float32")
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    n = len(_WORDS)

    def vector(i: int) -> None:
        _vector_hits(tbl, q[i].tolist(), 10, indexed=True)

    def text(i: int) -> None:
        _fts_hits(tbl, f"{_WORDS[i % n]} {_WORDS[(i * 7 + 3) % n]}", "text", 10)

    out: dict[str, float] = {}
    for name, query in (("vector", vector), ("full_text", text)):
        for i in range(WARM):
            query(i)
        t = time.perf_counter()
        for i in range(WARM, WARM + TIMED):
            query(i)
        out[f"{name}_ms"] = round((time.perf_counter() - t) / TIMED * 1000, 2)
    out["rss_mib"] = psutil.Process().memory_info().rss // 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_460_000)
    ap.add_argument("--cache-mb", default="16,64")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    result: dict[str, object] = {"rows": args.rows}
    with tempfile.TemporaryDirectory(prefix="lanceflow-search-cache-") as work:
        db = str(Path(work) / "db")
        for step in ("build", "refresh"):
            cmd = [sys.executable, str(HERE / "index_memory.py"), "--child", step, "--db", db]
            subprocess.run(
                [*cmd, "--rows", str(args.rows)], check=True, capture_output=True, cwd=REPO
            )
        for mb in args.cache_mb.split(","):
            env = dict(os.environ, LANCEFLOW_LANCE_CACHE_MB=mb)
            out = subprocess.run(
                [sys.executable, __file__, "--child", db],
                check=True,
                capture_output=True,
                text=True,
                cwd=REPO,
                env=env,
            )
            result[f"cache_{mb}_mib"] = json.loads(out.stdout.strip().splitlines()[-1])
            sys.stderr.write(f"{mb} MiB: {result[f'cache_{mb}_mib']}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
