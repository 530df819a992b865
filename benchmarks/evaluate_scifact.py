"""Evaluation benchmark: the whole SciFact set, ingested with the bundled model, every mode.

    python benchmarks/evaluate_scifact.py [--chunk-tokens N] [--overlap N] [--skip-whole]

Two tables: the default chunking, and one chunk per abstract truncated at the model's limit
(MTEB's setting for its published 0.645, which checks the harness). Prints JSON.
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
DATA = REPO.parent / "shared" / "datasets" / "scifact"


def _cli(*args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"lanceflow {' '.join(args)} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_variant(work: Path, corpus: Path, data: Path, extra: list[str]) -> dict:
    table = work / ("db-" + "-".join(extra).replace("--", "") if extra else "db-default")
    t = time.perf_counter()
    report = _cli("ingest", str(corpus), "--table", str(table), "--json", *extra)
    ingest_s = time.perf_counter() - t
    t = time.perf_counter()
    ev = _cli("evaluate", str(data), "--table", str(table), "--json", "--no-gate")
    return {
        "settings": " ".join(extra) or "default (chunk_tokens=254, overlap=0)",
        "chunks": report["chunks"]["written"],
        "ingest_s": round(ingest_s, 1),
        "evaluate_s": round(time.perf_counter() - t, 1),
        "results": {
            mode: {
                k: round(v, 4)
                for k, v in values.items()
                if k in ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map@10")
            }
            for mode, values in ev["results"].items()
        },
        "queries": ev["queries"],
        "unknown_documents": ev["unknown_documents"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--overlap", type=int, default=0)
    ap.add_argument("--skip-whole", action="store_true")
    args = ap.parse_args()
    data = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="lanceflow-eval-bench-"))
    corpus = work / "corpus"
    corpus.mkdir()
    shutil.copy(data / "corpus.jsonl", corpus / "corpus.jsonl")
    variants = []
    extra = ["--overlap", str(args.overlap)] if args.overlap else []
    if args.chunk_tokens:
        extra += ["--chunk-tokens", str(args.chunk_tokens)]
    variants.append(run_variant(work, corpus, data, extra))
    if not args.skip_whole:
        variants.append(run_variant(work, corpus, data, ["--chunking", "whole"]))
    print(json.dumps({"dataset": str(data), "variants": variants}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
