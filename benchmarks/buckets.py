"""Bucket benchmark: 1,000 objects in an S3-compatible server on loopback (moto's server mode,
counting the object GETs it serves), ingested with the bundled model.

    python benchmarks/buckets.py [--objects 1000] [--embedder local|hash] [--corpus FILE]

The objects are SciFact abstracts (../shared/datasets/scifact/corpus.jsonl) as .txt files
under 20 nested prefixes, or generated text when SciFact is not there. Endpoint and
credentials come from the standard variables (AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, ...).

Every run is `lanceflow ingest` called in this process (flows.cli.main), after Prefect's
temporary API is up, so the seconds are the ingest's own work. The model's one-time int8
ONNX export is done first (`lanceflow prepare-model`, into a fresh LANCEFLOW_CACHE_DIR) and
not timed; the first run starts with an empty table and loads the model. Two scenarios, each
with its own empty table: the table on local disk, and the table in the same bucket server
(s3://...). For each:

  first_s                  first run (everything downloaded, embedded, written, indexed)
  rerun_s, rerun_gets      a no-change re-run: seconds, GETs of document objects at the
                           server (target 0)
  rerun_share              rerun_s / first_s (target <= 0.03)
  resync_rerun_s, resync_gets, resync_share   after every object was re-uploaded with the
                           same bytes (every modification time new): target 0 GETs
  rerun_lists, rerun_requests   listing requests, and all requests (a table in the bucket
                           included), of the no-change re-run
  rerun_cli_s              the no-change re-run as a separate `lanceflow ingest` process
                           (Python and library start-up included), for comparison
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_CORPUS = REPO.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl"
KEY_ID, SECRET = "bench", "bench-secret"


def _texts(corpus: Path, n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if corpus.is_file():
        with corpus.open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                out.append((str(row["_id"]), f"{row.get('title', '')}\n\n{row['text']}"))
                if len(out) == n:
                    return out
    import random

    rng = random.Random(0)
    words = "index vector search bucket table night change policy office report".split()
    while len(out) < n:
        i = len(out)
        out.append((f"gen-{i}", " ".join(rng.choice(words) for _ in range(180))))
    return out


def _ingest(argv: list[str]) -> tuple[float, dict[str, Any]]:
    from flows.cli import main

    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = main(["ingest", *argv, "--json"])
    seconds = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"lanceflow ingest {argv} exited {code}")
    return seconds, json.loads(buf.getvalue().strip().splitlines()[-1])


def _source_gets(server: Any) -> int:
    """Object GETs of the documents (a table in the same server has its own)."""
    return sum(n for key, n in server.object_gets.items() if key.startswith("bench-docs/"))


def _scenario(
    server: Any, fs: Any, objects: dict[str, bytes], source: str, table: str, embedder: str
) -> dict[str, Any]:
    argv = [source, "--table", table, "--embedder", embedder]
    server.reset()
    first_s, first = _ingest(argv)
    first_gets = _source_gets(server)
    server.reset()
    rerun_s, rerun = _ingest(argv)
    rerun_gets, rerun_lists = _source_gets(server), server.counts["list"]
    rerun_requests = sum(server.counts.values())
    assert rerun["documents"]["unchanged"] == len(objects), rerun["documents"]

    time.sleep(1.1)  # S3 modification times have one-second resolution
    for key, data in objects.items():
        fs.pipe(key, data)
    server.reset()
    resync_s, resync = _ingest(argv)
    resync_gets = _source_gets(server)
    assert resync["documents"]["unchanged"] == len(objects), resync["documents"]

    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", *argv, "--json"],
        check=True,
        capture_output=True,
        env=env,
        cwd=REPO,
    )
    cli_s = time.perf_counter() - t
    return {
        "documents": first["documents"]["new"],
        "chunks": first["chunks"]["written"],
        "first_s": round(first_s, 2),
        "first_gets": first_gets,
        "rerun_s": round(rerun_s, 3),
        "rerun_gets": rerun_gets,
        "rerun_lists": rerun_lists,
        "rerun_requests": rerun_requests,
        "rerun_share": round(rerun_s / first_s, 4),
        "rerun_model_loaded": rerun.get("model_loaded"),
        "resync_rerun_s": round(resync_s, 3),
        "resync_gets": resync_gets,
        "resync_share": round(resync_s / first_s, 4),
        "rerun_cli_s": round(cli_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=1000)
    ap.add_argument("--embedder", default="local", choices=["local", "hash"])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lanceflow-bench-buckets-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("LANCEFLOW_CACHE_DIR", str(work / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["LANCEFLOW_TABLE_LOCK"] = "local"

    from tests.s3server import S3Server

    server = S3Server().start()
    os.environ.update(
        AWS_ACCESS_KEY_ID=KEY_ID,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_ALLOW_HTTP="true",
    )
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir("bench-docs")
    fs.mkdir("bench-tables")
    objects = {
        f"bench-docs/corpus/part-{i % 20:02d}/{doc_id}.txt": text.encode()
        for i, (doc_id, text) in enumerate(_texts(args.corpus, args.objects))
    }
    for key, data in objects.items():
        fs.pipe(key, data)

    from prefect.testing.utilities import prefect_test_harness

    if args.embedder == "local":
        from flows.cli import main as cli

        with contextlib.redirect_stdout(io.StringIO()):
            cli(["prepare-model"])

    result: dict[str, Any] = {
        "objects": len(objects),
        "bytes": sum(len(v) for v in objects.values()),
        "embedder": args.embedder,
        "corpus": "scifact" if args.corpus.is_file() else "generated",
        "cpus": os.cpu_count(),
    }
    try:
        with prefect_test_harness(server_startup_timeout=120):
            source = "s3://bench-docs/corpus"
            for name, table in (
                ("table_on_disk", str(work / "db")),
                ("table_in_bucket", "s3://bench-tables/idx"),
            ):
                result[name] = _scenario(server, fs, objects, source, table, args.embedder)
    finally:
        server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
