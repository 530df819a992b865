"""The model floor on a CPU, by runtime: lanceflow's ONNX Runtime backend (int8 on a CPU)
against OpenVINO on the same chunk token ids, with each one's nDCG@10.

    pip install openvino          # for this benchmark only: not a lanceflow dependency
    python benchmarks/cpu_runtimes.py --table DIR [--data ../shared/datasets/scifact]
                                      [--rounds 2]

--table: a chunks table `lanceflow ingest` wrote from the SciFact corpus with the default model
(benchmarks/ingest_scifact.py writes one; or copy corpus.jsonl into a folder of its own and
`lanceflow ingest FOLDER --table DIR`).

Both runtimes run one text per call on each core, the way lanceflow's ONNX backend does (so a
text's vector does not depend on its neighbours), longest texts first; the token ids are made
once, outside the timing. OpenVINO runs the same fp32 ONNX graph lanceflow exports, in bf16
where the CPU has AMX (`amx_bf16` in /proc/cpuinfo), else in fp32. The rounds alternate
(onnxruntime, openvino, onnxruntime, ...), so a drift in the machine's speed lands on both.

Prints one JSON object: the CPU's flags that matter, chunks, each runtime's seconds per round,
openvino_over_onnxruntime (the median of the rounds' ratios), each runtime's nDCG@10 (a
document scores its best chunk; queries embedded by the same runtime), and the two runtimes'
lowest cosine on a chunk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "scifact"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _run_all(one: Callable[[np.ndarray], np.ndarray], ids: list[np.ndarray], cores: int) -> Any:
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    with ThreadPoolExecutor(cores) as pool:
        vectors = list(pool.map(lambda i: one(ids[i]), order))
    out = np.zeros((len(ids), vectors[0].shape[0]), dtype=np.float32)
    for i, v in zip(order, vectors, strict=True):
        out[i] = v
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _openvino(onnx_path: Path, precision: str, cores: int, pooling: str) -> Any:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(onnx_path)),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "NUM_STREAMS": str(cores),
            "INFERENCE_NUM_THREADS": str(cores),
        },
    )
    local = threading.local()

    def one(ids: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        arr = ids.astype(np.int64, copy=False).reshape(1, -1)
        hidden = request.infer({"input_ids": arr, "attention_mask": np.ones_like(arr)})[0]
        return np.array(hidden[0, 0] if pooling == "cls" else hidden[0].mean(axis=0))

    return one


def _ndcg(vectors: Any, doc_ids: list[str], queries: Any, qs: Any) -> float:
    from tasks.metrics import score_run

    sims = queries @ vectors.T
    run: dict[str, dict[str, float]] = {}
    for qi, qid in enumerate(qs.judged):
        best: dict[str, float] = {}
        for j in np.argsort(-sims[qi])[:300]:
            best.setdefault(doc_ids[j], float(sims[qi, j]))
            if len(best) == 100:
                break
        run[qid] = best
    return round(score_run(qs.qrels, run, [10])[0]["ndcg@10"], 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", required=True, help="a table ingested from the SciFact corpus")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the BEIR folder (its queries)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark needs OpenVINO: pip install openvino") from None
    sys.path.insert(0, str(REPO))
    from tasks.concurrency import usable_cores
    from tasks.embedders.local import LocalEmbedder, export_onnx
    from tasks.evaluation import load_query_set
    from tasks.store import Store

    rows = Store(args.table).chunks_table().to_lance().to_table(columns=["text", "doc_id"])
    texts = rows.column("text").to_pylist()
    doc_ids = rows.column("doc_id").to_pylist()
    qs = load_query_set(args.data)
    emb = LocalEmbedder()
    emb.load()
    if not emb.backend.startswith("onnx"):
        raise SystemExit(f"lanceflow's backend here is {emb.backend}, not ONNX Runtime")
    ids = emb.token_ids(texts)
    query_ids = emb.token_ids(list(qs.judged.values()))
    cores = usable_cores()
    flags = _cpu_flags()
    precision = "bf16" if "amx_bf16" in flags else "f32"
    ov_one = _openvino(
        export_onnx(emb.model_dir, quantized=False), precision, cores, emb.layout.pooling
    )
    impl: Any = emb._impl  # the backend lanceflow runs: one text per call on each core

    def ort_all(batch: list[np.ndarray]) -> Any:
        out = impl.encode_ids(batch)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    runtimes: dict[str, Callable[[list[np.ndarray]], Any]] = {
        "onnxruntime": ort_all,
        "openvino": lambda batch: _run_all(ov_one, batch, cores),
    }
    for run_one in runtimes.values():
        run_one(ids[:8])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runtimes}
    vectors: dict[str, Any] = {}
    for _ in range(args.rounds):
        for name, run_one in runtimes.items():
            t = time.perf_counter()
            vectors[name] = run_one(ids)
            seconds[name].append(round(time.perf_counter() - t, 2))
    ratios = [o / r for o, r in zip(seconds["openvino"], seconds["onnxruntime"], strict=True)]
    result = {
        "cpu_flags": sorted(flags & {"amx_bf16", "amx_int8", "avx512_vnni", "avx512_bf16"}),
        "cores": cores,
        "chunks": len(texts),
        "onnxruntime_backend": emb.backend,
        "openvino_precision": precision,
        "seconds": seconds,
        "openvino_over_onnxruntime": round(statistics.median(ratios), 3),
        "ndcg@10": {
            name: _ndcg(vectors[name], doc_ids, runtimes[name](query_ids), qs) for name in runtimes
        },
        "lowest_cosine": round(
            float((vectors["onnxruntime"] * vectors["openvino"]).sum(axis=1).min()), 4
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
