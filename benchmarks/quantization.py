"""Retrieval quality of the CPU backend's ONNX files: fp32, int8 with 8-bit weights (what a CPU
with VNNI gets) and int8 with 7-bit weights (`reduce_range`, what other CPUs get), on the same
chunks of the same table (tasks.embedders.local.export_onnx).

Ingests the SciFact corpus with the default settings (unless --table names a table built so),
then re-embeds every chunk text and every query with each file, one text per call on every
core as the product does, and scores exact cosine search, each document by its best chunk,
with tasks.metrics (pytrec_eval). The search is exact so that only the vectors differ; the
product's own figure (`lanceflow evaluate`, through the IVF-PQ index) is printed beside them.

    python benchmarks/quantization.py [--data DIR] [--table PATH] [--files fp32,int8-8bit,int8-7bit]

Per file: nDCG@10, recall@10 and the seconds to embed the chunks (model load excluded).
Prints one JSON object. 7-bit weights run on any x86 CPU, so the 7-bit figure measured on a
VNNI machine is what a machine without VNNI gets, up to its kernel's rounding.
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "datasets" / "scifact"
FILES = ("fp32", "int8-8bit", "int8-7bit")


def _cli(*args: str) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env
    )
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"lanceflow {' '.join(args)} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _onnx_file(kind: str) -> Path:
    """The export_onnx file of that kind, as the product makes it on such a CPU."""
    from tasks.embedders import local
    from tasks.settings import DEFAULT_MODEL

    model_dir = local.resolve_model_dir(DEFAULT_MODEL)
    if kind == "fp32":
        return local.export_onnx(model_dir, quantized=False)
    return local.export_onnx(model_dir, quantized=True, vnni=kind == "int8-8bit")


def _score(kind: str, texts: list[str], doc_ids: list[str], query_set: Any) -> dict[str, Any]:
    import numpy as np

    from tasks.embedders import local
    from tasks.metrics import score_run
    from tasks.settings import DEFAULT_MODEL

    path = _onnx_file(kind)
    owner = local.LocalEmbedder(DEFAULT_MODEL, backend="onnx-int8")
    model = local._OnnxModel(owner, quantized=kind != "fp32", path=path)
    ids = owner.token_ids(texts)
    started = time.perf_counter()
    docs = model.encode_ids(ids)
    seconds = time.perf_counter() - started
    qids = list(query_set.judged)
    queries = model.encode([query_set.judged[q] for q in qids], 64)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    run: dict[str, dict[str, float]] = {}
    for i, q in enumerate(qids):
        sims = docs @ queries[i]
        best: dict[str, float] = {}
        for j in np.argsort(-sims):
            best.setdefault(doc_ids[j], float(sims[j]))
            if len(best) == 100:
                break
        run[q] = best
    means, _ = score_run(query_set.qrels, run, ks=(10,))
    return {
        "file": path.name,
        "ndcg@10": round(means["ndcg@10"], 4),
        "recall@10": round(means["recall@10"], 4),
        "embed_s": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--table", help="a table of the corpus ingested with default settings")
    ap.add_argument("--files", default=",".join(FILES))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="lanceflow-quant-"))
    table = args.table
    if not table:
        (work / "corpus").mkdir()
        shutil.copy(data / "corpus.jsonl", work / "corpus" / "corpus.jsonl")
        table = str(work / "db")
        _cli("ingest", str(work / "corpus"), "--table", table, "--json")
    product = _cli("evaluate", str(data), "--table", table, "--json", "--no-gate")

    from tasks.embedders.local import _cpu_has_vnni
    from tasks.evaluation import load_query_set
    from tasks.store import Store

    rows = Store(table).chunks_table().to_arrow().select(["doc_id", "text"])
    texts = rows.column("text").to_pylist()
    doc_ids = rows.column("doc_id").to_pylist()
    query_set = load_query_set(str(data))
    out = {
        "chunks": len(texts),
        "cpu_has_vnni": _cpu_has_vnni(),
        "product_vector_ndcg@10": round(product["results"]["vector"]["ndcg@10"], 4),
        "exact_search": {
            kind: _score(kind, texts, doc_ids, query_set) for kind in args.files.split(",")
        },
    }
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
