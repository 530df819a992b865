"""Scale benchmark of the pipeline itself: generated documents, `--embedder hash` (so the
model's cost does not hide the plumbing), on the default runner and on Ray with 1 and 2
workers.

A Ray "worker" here is one core: `rayN` runs N embedding actors on a local Ray instance of N
CPUs (`--ray-workers N --ray-cpus N`), and the whole command (the driver, Prefect's server,
Ray's processes) is pinned to N cores (CPU affinity, inherited by every child), so 1 vs 2
workers compares one core with two. Ray's CPU counts are logical: unpinned, a "one-CPU"
instance still spreads its processes over every core, and on a 2-core machine the second
worker would find no idle core to add.

    python benchmarks/ray_scale.py [--sizes 10000,100000] [--runners local,ray1,ray2]
                                   [--repeat N]

For each size and runner, a cold `lanceflow ingest` into an empty table (a fresh process;
Prefect's temporary server and, for Ray, a fresh local Ray instance included):
  seconds, chunks, chunks_per_s   the whole command (start-up included)
  stage_seconds        the run report's stages: 'pipeline' (read to written rows), on Ray
                       'ray_start' and 'commit'
  pipeline_chunks_per_s  chunks / the pipeline stage: the rate a long run converges to
  peak_rss_gib         peak of the summed RSS of the whole process tree (the CLI, Prefect's
                       server, Ray's raylet/GCS/workers), sampled every 0.1 s (the tree's
                       processes listed once a second)
  peak_pss_gib         the same tree's peak PSS, sampled every 2 s: a page shared by several
                       processes (Ray's object store is shared memory that every worker maps,
                       and so are the libraries) counts once in all, not once per process
  peak_at_s            when the tree's peak was sampled, seconds from the command's start: after
                       start-up plus the pipeline stage, it was in the index refresh that ends
                       the run
  peak_rss_by_process  each process's own peak RSS (GiB), by role: 'cli' (the command itself),
                       else the first words of its command line (Prefect's server, Ray's
                       processes); a role with several processes sums their peaks
  cpu_s_by_process     CPU seconds (user + system) by the same roles: where the cores went
  cpu_utilisation      all of those CPU seconds / (seconds x the cores the run was pinned to)
  sampler_cpu_s        the CPU seconds this sampling took (at the lowest priority; in the
                       2-worker runs it shares the run's 2 cores)
  versions_added       chunks-table versions whose row count differs from the one before
                       (data commits; index builds and compaction add versions too but no rows)
  fragments_written    fragments in the table right after the run
  fragments_compacted  after `lanceflow maintain`'s compaction (Lance optimize)
and the ratios the targets are about: rss_100k_over_10k per runner, ray2_over_ray1 per size (on
chunks/s and pipeline chunks/s). Prints one JSON object.

With --repeat N, each size runs N rounds of the runners, interleaved (a round's ray1 and ray2
run back to back, so a drift in the machine's speed, which on a shared VM reaches 30 % between
runs minutes apart, lands on both): runs after the first are keyed SIZE/RUNNER/ROUND, the
ray2_over_ray1 ratios are the median of the rounds' own ratios (each round's listed in
..._rounds), and rss_100k_over_10k divides the highest peaks of the two sizes' rounds.

Before the timed runs, one untimed ingest of 20 documents per kind of runner (local, Ray):
Prefect's database migrations and the first start of Ray are one-time costs that would
otherwise land on whichever runner runs first.

With --trace-dir DIR, each ingest's RSS over time also goes to DIR/SIZE-RUNNER.jsonl, one line
a second: {"s", "tree_mib", "cli_mib", "cli_file_mib" (the command's file-backed share),
"cpu_s" (CPU seconds so far, by role)}, to place a peak or an idle core in the pipeline or the
refresh.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from process_tree import run_tree

REPO = Path(__file__).resolve().parent.parent
LANCEFLOW = [sys.executable, "-m", "flows.cli"]

_WORDS = (
    "index vector table night batch search source model chunk token lance prefect flow task "
    "retry window budget limit cache version generation manifest document paragraph heading "
    "river mountain garden lamp paper music coffee winter station bridge market harbor forest"
).split()


def generate(root: Path, n: int, seed: int = 0) -> None:
    """n Markdown documents of 3-12 paragraphs (about 10 chunks of 48 words each)."""
    rng = random.Random(seed)
    for i in range(n):
        sub = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        paras = [
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(30, 60))) + "."
            for _ in range(rng.randint(3, 12))
        ]
        (sub / f"doc{i:06d}.md").write_text(f"# Document {i}\n\n" + "\n\n".join(paras) + "\n")


def ingest_cmd(
    corpus: Path,
    db: Path,
    runner: str,
    chunk_tokens: int,
    batch_docs: int,
    ray_memory_mb: int | None = None,
) -> tuple[list[str], int | None]:
    """`lanceflow ingest` of `corpus` with the hash embedder on `runner` ('local', 'rayN'),
    and the cores to pin it to (N for rayN, None for the default runner)."""
    cmd = [*LANCEFLOW, "ingest", str(corpus), "--table", str(db), "--embedder", "hash"]
    cmd += ["--chunk-tokens", str(chunk_tokens), "--batch-docs", str(batch_docs), "--json"]
    if not runner.startswith("ray"):
        return cmd, None
    n = runner[3:] or "2"
    cmd += ["--runner", "ray", "--ray-workers", n, "--ray-cpus", n]
    if ray_memory_mb is not None:
        cmd += ["--ray-memory-mb", str(ray_memory_mb)]
    return cmd, int(n)


def warm_up(
    work: Path, runners: list[str], env: dict[str, str], chunk_tokens: int, batch_docs: int
) -> None:
    """One untimed ingest of a few documents per kind of runner, before any timed one:
    Prefect's database migrations (once per PREFECT_HOME) and the first start of Ray and of
    the code's files (cold page cache) would otherwise land on whichever runner runs first."""
    tiny = work / "warmup"
    generate(tiny, 20)
    for kind in sorted({"local" if r == "local" else "ray1" for r in runners}):
        cmd, _ = ingest_cmd(tiny, work / f"warm-{kind}", kind, chunk_tokens, batch_docs)
        run_tree(cmd, env)
    shutil.rmtree(tiny, ignore_errors=True)


def table_facts(db: Path) -> tuple[int, int]:
    """(data versions, fragments) of the live chunks table."""
    sys.path.insert(0, str(REPO))
    from tasks.store import Store

    ds = Store(str(db)).chunks_table().to_lance()
    rows_before = 0
    data_versions = 0
    for v in ds.versions():
        rows = ds.checkout_version(v["version"]).count_rows()
        if rows != rows_before:
            data_versions += 1
        rows_before = rows
    return data_versions, len(ds.get_fragments())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--runners", default="local,ray1,ray2")
    ap.add_argument("--chunk-tokens", type=int, default=48)
    ap.add_argument("--batch-docs", type=int, default=256)
    ap.add_argument(
        "--ray-memory-mb",
        type=int,
        help="the Ray runs' --ray-memory-mb (default: lanceflow's)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every runner at each size, interleaved (local, ray1, ray2, local, ...): "
        "the ratios are the median of the rounds' own, each round's runs back to back",
    )
    ap.add_argument(
        "--trace-dir",
        type=Path,
        help="write each ingest's RSS over time to DIR/SIZE-RUNNER.jsonl (one line a second)",
    )
    args = ap.parse_args()
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="lanceflow-bench-prefect-"))
    work = Path(tempfile.mkdtemp(prefix="lanceflow-scale-"))
    result: dict[str, object] = {"cpus": os.cpu_count(), "runs": {}}
    runs: dict[str, dict[str, Any]] = result["runs"]  # type: ignore[assignment]
    try:
        warm_up(work, args.runners.split(","), env, args.chunk_tokens, args.batch_docs)
        for size in [int(s) for s in args.sizes.split(",")]:
            corpus = work / f"corpus-{size}"
            t = time.perf_counter()
            generate(corpus, size)
            sys.stderr.write(f"generated {size} documents in {time.perf_counter() - t:.1f}s\n")
            for round_, runner in [
                (r, x) for r in range(1, args.repeat + 1) for x in args.runners.split(",")
            ]:
                key = f"{size}/{runner}" + (f"/{round_}" if round_ > 1 else "")
                db = work / f"db-{size}-{runner}"
                cmd, cores = ingest_cmd(
                    corpus, db, runner, args.chunk_tokens, args.batch_docs, args.ray_memory_mb
                )
                name = key.replace("/", "-")
                trace = args.trace_dir / f"{name}.jsonl" if args.trace_dir else None
                ran = run_tree(cmd, env, cores, trace)
                seconds, peak = ran.seconds, ran.peak
                report = json.loads(ran.stdout.strip().splitlines()[-1])
                chunks = report["chunks"]["written"]
                versions, fragments = table_facts(db)
                run_tree([*LANCEFLOW, "maintain", "--table", str(db), "--json"], env)
                _, compacted = table_facts(db)
                stages = report.get("stage_seconds", {})
                runs[key] = {
                    "seconds": round(seconds, 2),
                    "chunks": chunks,
                    "chunks_per_s": round(chunks / seconds, 1),
                    "stage_seconds": stages,
                    "pipeline_chunks_per_s": round(chunks / stages["pipeline"], 1),
                    "peak_rss_gib": round(peak / 2**30, 3),
                    "peak_pss_gib": round(ran.peak_pss / 2**30, 3),
                    "peak_at_s": round(ran.peak_at, 1),
                    "peak_rss_by_process": ran.peak_by_role,
                    "cpu_s_by_process": ran.cpu_by_role,
                    "sampler_cpu_s": ran.sampler_cpu_s,
                    # the share of the pinned cores (all of them, unpinned) the tree kept busy
                    "cpu_utilisation": round(
                        sum(ran.cpu_by_role.values()) / (seconds * (cores or os.cpu_count() or 1)),
                        3,
                    ),
                    "versions_added": versions,
                    "fragments_written": fragments,
                    "fragments_compacted": compacted,
                }
                sys.stderr.write(f"{key}: {json.dumps(runs[key])}\n")
                shutil.rmtree(db, ignore_errors=True)
            shutil.rmtree(corpus, ignore_errors=True)
        sizes = sorted({int(k.split("/")[0]) for k in runs})

        def rounds(size: int, runner: str) -> list[dict[str, Any]]:
            first = runs.get(f"{size}/{runner}")
            more = [runs.get(f"{size}/{runner}/{r}") for r in range(2, args.repeat + 1)]
            return [x for x in [first, *more] if x]

        for runner in args.runners.split(","):
            if len(sizes) > 1:
                lo, hi = rounds(sizes[0], runner), rounds(sizes[-1], runner)
                if lo and hi:
                    # the highest peak of each size's rounds
                    for m in ("rss", "pss"):
                        top = max(float(x[f"peak_{m}_gib"]) for x in hi)
                        base = max(float(x[f"peak_{m}_gib"]) for x in lo)
                        result[f"{m}_{sizes[-1]}_over_{sizes[0]}_{runner}"] = round(top / base, 3)
        for size in sizes:
            pairs = list(zip(rounds(size, "ray1"), rounds(size, "ray2"), strict=False))
            for rate in ("chunks_per_s", "pipeline_chunks_per_s") if pairs else ():
                ratios = sorted(float(b[rate]) / float(a[rate]) for a, b in pairs)
                result[f"ray2_over_ray1_{size}_{rate}"] = round(statistics.median(ratios), 3)
                if len(ratios) > 1:
                    result[f"ray2_over_ray1_{size}_{rate}_rounds"] = [round(r, 3) for r in ratios]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
