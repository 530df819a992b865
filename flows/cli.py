"""The `lanceflow` command line. Each command runs its flow under Prefect: against the server
PREFECT_API_URL names, or else a temporary local one (no server to start)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tasks.settings import DEFAULT_DB_URI, DEFAULT_MODEL

EXIT_FAILED_RUN = 1
EXIT_USAGE = 2


def _source_access_options(p: Any) -> None:
    g = p.add_argument_group(
        "buckets (credentials: the standard environment and provider chains, or a block)"
    )
    g.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the source's fsspec filesystem (s3fs, gcsfs, adlfs), e.g. "
        "endpoint_url=http://127.0.0.1:9000; repeatable; JSON values (true, 5) are parsed",
    )
    g.add_argument(
        "--credentials-block",
        default=None,
        metavar="BLOCK",
        help="Prefect credentials block for the source bucket: aws-credentials/NAME, "
        "gcp-credentials/NAME or azure-blob-storage-credentials/NAME",
    )
    g.add_argument("--download-concurrency", type=int, default=8, help="objects downloaded at once")


def _table_access_options(p: Any) -> None:
    p.add_argument(
        "--table-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a LanceDB storage option for a table in a bucket, e.g. "
        "aws_endpoint=http://127.0.0.1:9000 or allow_http=true; repeatable",
    )
    p.add_argument(
        "--table-credentials-block",
        default=None,
        metavar="BLOCK",
        help="Prefect credentials block for the table's bucket (as --credentials-block)",
    )


def _table_access(args: argparse.Namespace) -> Any:
    from tasks.settings import TableAccess
    from tasks.storage import parse_options

    return TableAccess(
        storage_options=parse_options(getattr(args, "table_option", None)),
        credentials_block=getattr(args, "table_credentials_block", None),
    )


def _file_access(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.storage import parse_options

    return {
        "storage_options": parse_options(getattr(args, "storage_option", None)),
        "credentials_block": getattr(args, "credentials_block", None),
        "download_concurrency": getattr(args, "download_concurrency", 8),
    }


def _source_settings(args: argparse.Namespace, uri: str) -> Any:
    """The source's settings from the command line; keys in its URL move into secret options
    before anything is stored."""
    from tasks.settings import SourceSettings

    return SourceSettings.model_validate({"uri": uri, **_file_access(args)})


def _open_table(args: argparse.Namespace) -> Any:
    from tasks.store import store_at

    return store_at(args.table, _table_access(args))


def _ingest_parser(sub: Any) -> None:
    p = sub.add_parser("ingest", help="extract, chunk, embed and index a folder or bucket")
    p.add_argument("source", help="a folder, a file, or an fsspec URL such as s3://bucket/prefix")
    p.add_argument(
        "--table", default=DEFAULT_DB_URI, help=f"LanceDB directory (default {DEFAULT_DB_URI})"
    )
    p.add_argument(
        "--embedder",
        default="local",
        choices=["local", "openai", "hash"],
        help="local sentence-transformers model, the OpenAI(-compatible) API, or 'hash' "
        "(hashed word features: a deterministic aid for tests and benchmarks, not semantic)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model id or directory")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where a local model runs ('auto': CUDA, then MPS, then CPU)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnx", "onnx-int8"],
        help="local model runtime ('auto': torch fp16 on a GPU, int8 ONNX on a CPU)",
    )
    p.add_argument("--chunk-tokens", type=int, default=None, help="chunk size in model tokens")
    p.add_argument("--overlap", type=int, default=0, help="overlap in model tokens")
    p.add_argument(
        "--chunking",
        default="split",
        choices=["split", "whole"],
        help="'whole': one chunk per document, truncated by the model",
    )
    p.add_argument("--batch-size", type=int, default=None, help="texts per model call")
    p.add_argument("--batch-docs", type=int, default=256, help="documents per write batch")
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=15.0,
        help="default runner: one commit per run, or one each time this many minutes passed "
        "(a crash loses at most that much work); 0: a commit per batch",
    )
    g = p.add_argument_group("runner (--runner ray: pip install 'lanceflow[ray]')")
    g.add_argument(
        "--runner",
        default="local",
        choices=["local", "ray"],
        help="'local': this process, stages overlapped; 'ray': a Ray Data pipeline, one commit",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join ('auto', 'ray://head:10001'); default: a local Ray instance",
    )
    g.add_argument("--ray-workers", type=int, default=2, help="Ray: embedding actors")
    g.add_argument(
        "--ray-gpus-per-worker", type=float, default=0.0, help="Ray: GPUs per embedding actor"
    )
    g.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="Ray, local instance: CPUs it may use (default: every core)",
    )
    g.add_argument(
        "--ray-memory-mb",
        type=int,
        default=None,
        help="Ray: object-store memory for the pipeline's blocks in flight (default 128 per "
        "embedding worker)",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only paths matching this glob, relative to the source (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out paths matching this glob (repeatable)",
    )
    p.add_argument(
        "--max-file-mb",
        type=float,
        default=64.0,
        help="refuse files above this size, from the listed size before reading (default 64)",
    )
    p.add_argument(
        "--max-failed-fraction",
        type=float,
        default=0.5,
        help="fail the run when more than this share of the documents failed (default 0.5)",
    )
    p.add_argument(
        "--max-delete-fraction",
        type=float,
        default=0.5,
        help="refuse a run that would delete more than this share of the source's indexed "
        "documents, or (below 1) an empty listing; 1 confirms intended deletions (default 0.5)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every document whatever its size and modification time (weekly)",
    )
    p.add_argument(
        "--reindex",
        action="store_true",
        help="rebuild with changed settings as a new generation beside the live one, then "
        "switch atomically (search keeps answering; an interrupted rebuild resumes)",
    )
    p.add_argument(
        "--keep-generations",
        type=int,
        default=1,
        help="earlier generations kept for rollback after a --reindex switch (default 1)",
    )
    p.add_argument(
        "--follow-external-links",
        action="store_true",
        help="follow symbolic links that lead outside the source folder",
    )
    p.add_argument("--id-field", default=None, help="record files: id column")
    p.add_argument("--title-field", default="title", help="record files: title column")
    p.add_argument("--text-field", default="text", help="record files: text column")
    api = p.add_argument_group("openai embedder (the key: OPENAI_API_KEY or --api-key-secret)")
    api.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint")
    api.add_argument("--dimensions", type=int, default=None, help="text-embedding-3 dimensions")
    api.add_argument("--api-key-secret", default=None, help="Prefect Secret block with the key")
    api.add_argument("--organization", default=None, help="OpenAI-Organization header")
    api.add_argument("--project", default=None, help="OpenAI-Project header")
    api.add_argument("--rpm", type=int, default=3_000, help="requests per minute")
    api.add_argument("--tpm", type=int, default=1_000_000, help="tokens per minute")
    api.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    api.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    api.add_argument(
        "--oversize",
        default="split",
        choices=["split", "refuse"],
        help="an input over the model's 8,191 tokens: split and average, or refuse",
    )
    api.add_argument("--price", type=float, default=None, help="USD per million tokens")
    api.add_argument(
        "--fleet-limit", default=None, help="Prefect global concurrency limit shared by workers"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="count documents, chunks, tokens and cost; write and embed nothing",
    )
    p.add_argument(
        "--always-flow", action="store_true", help="run the Prefect flow even when nothing changed"
    )
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    _source_access_options(p)


def _api_options(p: Any) -> None:
    """search and evaluate on a table built with the OpenAI embedder: the endpoint recorded
    in the index is used unless given here; the key as for ingest."""
    api = p.add_argument_group("openai tables (the key: OPENAI_API_KEY or --api-key-secret)")
    api.add_argument(
        "--base-url", default=None, help="endpoint for query embeddings (default: the index's)"
    )
    api.add_argument("--api-key-secret", default=None, help="Prefect Secret block with the key")


def _query_embedder_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "base_url", None):
        out["base_url"] = args.base_url
    if getattr(args, "api_key_secret", None):
        out["api_key_secret"] = args.api_key_secret
    return out


def _search_parser(sub: Any) -> None:
    p = sub.add_parser("search", help="search the table")
    p.add_argument("query", help="what to look for")
    p.add_argument("--table", default=DEFAULT_DB_URI, help="LanceDB directory")
    p.add_argument(
        "--mode",
        default="hybrid",
        choices=["vector", "fts", "hybrid"],
        help="vector (cosine), fts (BM25) or hybrid (rank fusion of both; default)",
    )
    p.add_argument("-k", type=int, default=5, help="hits to show (default 5)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    _api_options(p)


def _evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="score retrieval quality on a labelled query set")
    p.add_argument("dataset", help="BEIR folder (queries.jsonl + qrels/) or JSONL/CSV queries")
    p.add_argument("--table", default=DEFAULT_DB_URI, help="LanceDB directory")
    p.add_argument("--split", default="test", help="BEIR qrels split")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["vector", "fts", "hybrid"],
        choices=["vector", "fts", "hybrid"],
        help="retrieval modes to score (default: all three)",
    )
    p.add_argument(
        "-k",
        nargs="+",
        type=int,
        default=[1, 3, 5, 10, 100],
        dest="ks",
        help="cut-offs for the metrics (default 1 3 5 10 100)",
    )
    p.add_argument("--min-ndcg", type=float, default=None, help="fail below this nDCG@10")
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.02,
        help="fail when nDCG@10 falls by more than this versus the last run",
    )
    p.add_argument("--no-gate", action="store_true", help="never fail on quality")
    p.add_argument(
        "--accept",
        action="store_true",
        help="after reviewing a change in quality, pin this run as the baseline that later "
        "runs are compared with (it does not fail)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _api_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lanceflow", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details to stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _ingest_parser(sub)
    _search_parser(sub)
    _evaluate_parser(sub)
    _generations_parser(sub)
    _rollback_parser(sub)
    _maintain_parser(sub)
    _serve_parser(sub)
    _prepare_model_parser(sub)
    for name, sp in sub.choices.items():
        if "--table" in sp._option_string_actions:
            _table_access_options(sp)
        # `-v` works after the subcommand too (`lanceflow ingest -v ...`)
        sp.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help=f"log progress details of {name} to stderr",
        )
    return parser


def _ingest(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tasks.errors import TooManyFailuresError
    from tasks.settings import IngestParams

    try:
        params = IngestParams.model_validate(
            {
                "source": {
                    "uri": args.source,
                    "include": args.include,
                    "exclude": args.exclude,
                    "max_file_mb": args.max_file_mb,
                    "follow_external_links": args.follow_external_links,
                    "id_field": args.id_field,
                    "title_field": args.title_field,
                    "text_field": args.text_field,
                    **_file_access(args),
                },
                "store": {
                    "uri": args.table,
                    "keep_generations": args.keep_generations,
                    "access": _table_access(args),
                },
                "chunking": {
                    "chunk_tokens": args.chunk_tokens,
                    "overlap": args.overlap,
                    "strategy": args.chunking,
                },
                "embedder": {
                    "kind": args.embedder,
                    "model": args.model,
                    "device": args.device,
                    "backend": args.backend,
                    "batch_size": args.batch_size,
                    "base_url": args.base_url,
                    "dimensions": args.dimensions,
                    "api_key_secret": args.api_key_secret,
                    "organization": args.organization,
                    "project": args.project,
                    "rpm": args.rpm,
                    "tpm": args.tpm,
                    "max_concurrency": args.concurrency,
                    "timeout_s": args.timeout,
                    "oversize": args.oversize,
                    "price_per_million_tokens": args.price,
                    "fleet_limit": args.fleet_limit,
                },
                "batch_docs": args.batch_docs,
                "checkpoint_minutes": args.checkpoint_minutes,
                "runner": args.runner,
                "ray_address": args.ray_address,
                "ray_workers": args.ray_workers,
                "ray_gpus_per_worker": args.ray_gpus_per_worker,
                "ray_cpus": args.ray_cpus,
                "ray_memory_mb": args.ray_memory_mb,
                "max_failed_fraction": args.max_failed_fraction,
                "max_delete_fraction": args.max_delete_fraction,
                "verify": args.verify,
                "reindex": args.reindex,
            }
        )
    except ValidationError as exc:
        print(f"lanceflow: invalid option: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        from tasks.runs import dry_run

        planned = dry_run(params)
        if args.json:
            print(planned.model_dump_json())
        else:
            d, c = planned.documents, planned.chunks
            print(
                f"dry run: {d.seen} documents seen, {d.new} new, {d.changed} changed, "
                f"{d.deleted} to delete, {d.failed} unreadable\n"
                f"chunks: {c.embedded} to embed, {c.cached} from the cache\n"
                f"tokens: {planned.tokens}, estimated cost: ${planned.cost_usd:.4f} "
                f"({params.embedder.model})"
            )
        return 0
    from flows.api_server import start_temporary_server, wait_temporary_server
    from tasks.sources import stat_local_root
    from tasks.storage import local_path

    root = local_path(params.source.uri)
    if root is not None:
        # a mistyped local path fails here, before the model, Prefect's server or Ray start
        stat_local_root(params.source.uri, root)
    code = 0
    try:
        if params.runner == "local":
            from tasks.embedding import prepare_model

            # a first ONNX export's torch stage runs while this process is still small (no
            # LanceDB, no Prefect server yet), so the two peaks do not add up; its
            # quantisation overlaps the no-change check and Prefect's start-up
            prepare_model(params.embedder, wait_for_graph=True)
        if args.always_flow or not _has_tables(params.store.uri):
            # a flow will run: Prefect's server starts beside the no-change check
            start_temporary_server()
        from tasks.locking import table_lock
        from tasks.runs import quick_check

        report = None
        if not args.always_flow:
            # the no-change check records a run: it too holds the table's write slot
            with table_lock(params.store.uri, holder="ingest (no-change check)"):
                report = quick_check(params)
        if report is None:
            start_temporary_server()  # beside Ray's start and the flow's imports
            early = params.runner == "ray"
            if early:
                from tasks.ray_runner import start_early

                # Ray's start overlaps Prefect's and the plan (on a machine with cores to spare)
                start_early(params.ray_address, params.ray_cpus, params.ray_memory)
            try:
                from flows.ingest import run_ingest

                wait_temporary_server()
                report = run_ingest(params)
            finally:
                if early:
                    from tasks.ray_runner import stop_early

                    stop_early()  # a run with nothing for Ray to do
    except TooManyFailuresError as exc:
        print(f"lanceflow: {exc}", file=sys.stderr)
        report, code = exc.report, EXIT_FAILED_RUN
    finally:
        # a start still under way ends before this process does (its exit stops the server)
        wait_temporary_server()
    if report is None:
        return EXIT_FAILED_RUN
    if args.json:
        print(report.model_dump_json())
    else:
        d, c = report.documents, report.chunks
        print(
            f"documents: {d.seen} seen, {d.new} new, {d.changed} changed, {d.unchanged} "
            f"unchanged, {d.deleted} deleted, {d.failed} failed\n"
            f"chunks: {c.embedded} embedded, {c.cached} from cache, {c.written} written, "
            f"{c.deleted} deleted\n"
            + (f"tokens: {report.tokens}, cost ${report.cost_usd:.4f}\n" if report.tokens else "")
            + f"table {report.table} generation {report.generation} ({report.generation_status}"
            + (", switched by this run" if report.switched else "")
            + f") version {report.table_version}"
            + (f", tag {report.tag}" if report.tag else "")
            + f", {report.seconds:.1f} s"
        )
        if report.waiting_for_sources:
            print(
                "the new generation goes live once these sources are rebuilt with --reindex: "
                + ", ".join(report.waiting_for_sources)
            )
        if not report.listing_complete:
            print("the listing was incomplete, so nothing was deleted:")
            for f in report.listing_errors[:20]:
                print(f"  {f.doc_id}: {f.error}")
        if report.skipped_links:
            print(
                f"{report.skipped_links} links to outside the source were left out "
                "(--follow-external-links follows them)"
            )
        for f in report.failures[:20]:
            print(f"  failed: {f.doc_id}: {f.error}")
    return code


def _has_tables(uri: str) -> bool:
    """Whether a LanceDB location may hold tables already: False only for a local folder
    that is missing or holds no table (a first run, whose flow is certain); a bucket is not
    listed here (True: the no-change check decides)."""
    from tasks.storage import local_path

    path = local_path(uri)
    if path is None:
        return True
    folder = Path(path)
    try:
        return any(p.name.endswith(".lance") for p in folder.iterdir())
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _search(args: argparse.Namespace) -> int:
    from tasks.search import search

    store = _open_table(args)
    embedder = None
    overrides = _query_embedder_overrides(args)
    if overrides and args.mode != "fts":
        from tasks.search import embedder_for_table

        embedder = embedder_for_table(store, **overrides)
    hits = search(store, args.query, mode=args.mode, k=args.k, embedder=embedder)
    if args.json:
        print(
            json.dumps(
                [
                    h.model_dump(
                        include={"doc_id", "chunk_id", "text", "score", "source", "generation"}
                    )
                    for h in hits
                ],
                ensure_ascii=False,
            )
        )
        return 0
    generation = hits[0].generation if hits else 0
    print(f"{args.mode} search (generation {generation}): {args.query}")
    for rank, h in enumerate(hits, start=1):
        snippet = " ".join(h.text.split())[:160]
        print(f"{rank:>3}. {h.score:.4f}  {h.doc_id}  [{h.source}]\n       {snippet}")
    return 0


def _generations_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generations", help="list the index generations of a table, or make another one live"
    )
    p.add_argument("--table", default=DEFAULT_DB_URI, help="LanceDB directory")
    p.add_argument(
        "--activate",
        type=int,
        default=None,
        metavar="N",
        help="make generation N live again (a rollback after a --reindex); one atomic switch",
    )
    p.add_argument("--json", action="store_true", help="print the generations as JSON")


def _generations(args: argparse.Namespace) -> int:
    from tasks import generations
    from tasks.errors import ConfigurationError

    store = _open_table(args)
    gens = store.generations()
    if args.activate is not None:
        chosen = next((g for g in gens if g.number == args.activate), None)
        if chosen is None or not store.has(chosen.chunks_table):
            raise ConfigurationError(
                f"no generation {args.activate} in {args.table!r}: `lanceflow generations "
                f"--table {args.table}` lists them"
            )
        current = generations.live(gens)
        if current is not None and current.number == chosen.number:
            print(f"generation {chosen.number} is already live")
            return 0
        from tasks.locking import table_lock

        with table_lock(args.table, holder="generations --activate"):
            generations.switch(store.db, chosen, current)
        print(f"generation {chosen.number} is live now")
        gens = store.generations()
    rows: list[dict[str, Any]] = [
        {
            "generation": g.number,
            "status": g.status,
            "sources": list(g.sources),
            "fingerprint": g.fingerprint.model_dump() if g.fingerprint else None,
            "switched_at": str(g.switched_at) if g.switched_at else None,
        }
        for g in gens
    ]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for r in rows:
        fp = r["fingerprint"] or {}
        print(
            f"{r['generation']:>3} {r['status']:<9} {fp.get('model', '?')} "
            f"({fp.get('backend', '?')}, {fp.get('chunk_tokens', '?')} tokens, overlap "
            f"{fp.get('overlap', '?')}, {fp.get('chunking', '?')})  sources: "
            + ", ".join(r["sources"])
        )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tasks.settings import EvaluateParams

    try:
        params = EvaluateParams.model_validate(
            {
                "dataset": args.dataset,
                "split": args.split,
                "store": {"uri": args.table, "access": _table_access(args)},
                "modes": args.modes,
                "ks": args.ks,
                "accept": args.accept,
                "query_embedder": _query_embedder_overrides(args),
                "gate": {
                    "min_ndcg_at_10": None if args.no_gate else args.min_ndcg,
                    "max_drop": None if args.no_gate else args.max_drop,
                },
            }
        )
    except ValidationError as exc:
        print(f"lanceflow: invalid option: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from flows.evaluate import QualityGateError, run_evaluate

    code = 0
    try:
        summary = run_evaluate(params)
    except QualityGateError as exc:
        print(f"lanceflow: {exc}", file=sys.stderr)
        summary, code = exc.summary, EXIT_FAILED_RUN
    if args.json:
        print(json.dumps(summary))
        return code
    print(
        f"{summary['dataset']}: {summary['queries']} queries, generation "
        f"{summary['generation']} version {summary['table_version']}, model {summary['model']}"
    )
    if summary["unknown_documents"]:
        print(f"  {summary['unknown_documents']} judged documents are not in the table")
    for mode, values in summary["results"].items():
        shown = ", ".join(
            f"{k} {v:.4f}"
            for k, v in values.items()
            if k in ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map@10")
        )
        print(f"  {mode:<7} {shown}")
    gate = summary["gate"]
    print(
        "gate: "
        + ("passed" if gate["passed"] else "FAILED")
        + (" (accepted as the new baseline)" if gate.get("accepted") else "")
        + (f", scored tag {summary['tag']}" if summary.get("tag") else "")
    )
    return code


def _rollback_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rollback",
        help="restore a tagged version of a table (each successful ingest tags its version)",
        description="Without --to: one tag back from where the table stands (repeat it to go "
        "further back). The restore is a new version, so a rollback can be undone with "
        "--to the later tag.",
    )
    p.add_argument("--table", default=DEFAULT_DB_URI, help="LanceDB directory")
    p.add_argument("--to", default=None, metavar="TAG", help="the tag to restore")
    p.add_argument("--list", action="store_true", help="list the tags and rollbacks, newest last")
    p.add_argument("--json", action="store_true", help="print JSON")


def _rollback(args: argparse.Namespace) -> int:
    from tasks import versions
    from tasks.locking import table_lock

    store = _open_table(args)
    if args.list:
        rows = versions.history(store)
        current = versions.current_tag(store)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "tag": r.tag,
                            "kind": r.kind,
                            "generation": r.generation,
                            "chunks_version": r.chunks_version,
                            "restored": r.restored,
                            "created_at": str(r.created_at),
                            "current": r.tag == current,
                        }
                        for r in rows
                    ]
                )
            )
            return 0
        for r in rows:
            mark = "*" if (r.kind == versions.INGEST and r.tag == current) else " "
            what = f"restored {r.restored}" if r.kind == versions.ROLLBACK else "ingest"
            print(
                f"{mark} {r.created_at:%Y-%m-%d %H:%M:%S} {r.tag:<40} generation "
                f"{r.generation} chunks v{r.chunks_version}  {what}"
            )
        return 0
    with table_lock(args.table, holder="rollback"):
        target = versions.rollback(store, args.to)
    if args.json:
        print(json.dumps({"restored": target.tag, "generation": target.generation}))
    else:
        print(
            f"restored tag {target.tag} (generation {target.generation}, chunks "
            f"v{target.chunks_version}) as a new version of {args.table}; "
            f"`lanceflow rollback --table {args.table} --list` shows the history"
        )
    return 0


def _maintain_parser(sub: Any) -> None:
    p = sub.add_parser(
        "maintain", help="verify against the source, compact, prune old versions and tags"
    )
    p.add_argument("--table", default=DEFAULT_DB_URI, help="LanceDB directory")
    p.add_argument("--source", default="", help="the source to verify against (empty: no verify)")
    p.add_argument("--retention-days", type=float, default=7.0, help="version retention (days)")
    p.add_argument("--keep-tags", type=int, default=14, help="ingest tags kept for rollback")
    p.add_argument("--json", action="store_true", help="print JSON")
    _source_access_options(p)


def _maintain(args: argparse.Namespace) -> int:
    from flows.maintain import maintain
    from tasks.settings import FileSettings, MaintainSettings

    source = _source_settings(args, args.source or "-")
    result = maintain(
        table=args.table,
        source=source.uri if args.source else "",
        files=FileSettings.model_validate(source.model_dump(exclude={"uri"})),
        table_access=_table_access(args),
        maintenance=MaintainSettings(
            retention_days=args.retention_days, keep_tags=args.keep_tags, verify=bool(args.source)
        ),
    )
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    done = result["maintenance"]
    print(
        f"{done['versions_removed']} old versions removed, {len(done['tags_removed'])} tags "
        f"removed, {len(done['tags_kept'])} kept; vector index "
        + ("retrained" if done["retrained"] else "kept")
    )
    return 0


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the nightly ingest, the evaluation after each ingest and the weekly "
        "maintenance from this process (Prefect's serve: no work pool or worker)",
    )
    p.add_argument(
        "--source",
        default=os.environ.get("LANCEFLOW_SOURCE", "samples/corpus"),
        help="the source (default $LANCEFLOW_SOURCE, else samples/corpus)",
    )
    p.add_argument(
        "--table",
        default=os.environ.get("LANCEFLOW_TABLE", DEFAULT_DB_URI),
        help=f"LanceDB directory (default $LANCEFLOW_TABLE, else {DEFAULT_DB_URI})",
    )
    p.add_argument(
        "--dataset",
        default=os.environ.get("LANCEFLOW_EVAL_DATASET"),
        help="the evaluation dataset (default $LANCEFLOW_EVAL_DATASET; none: no evaluation)",
    )
    p.add_argument("--cron", default="0 2 * * *", help="nightly ingest schedule (cron)")
    p.add_argument("--timezone", default="UTC", help="time zone of the schedules (IANA name)")
    p.add_argument("--maintain-cron", default="0 4 * * 0", help="weekly maintenance (cron)")
    _source_access_options(p)


def _serve(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    from flows.service import serve_all
    from tasks.errors import ConfigurationError

    if not PREFECT_API_URL.value():
        raise ConfigurationError(
            "serve needs a Prefect server to register its schedules with: start one with "
            "`prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from tasks.settings import table_access_parameter, with_options

    source = _source_settings(args, args.source)
    serve_all(
        os.path.abspath(source.uri) if "://" not in source.uri else source.uri,
        os.path.abspath(args.table) if "://" not in args.table else args.table,
        args.dataset,
        cron=args.cron,
        timezone=args.timezone,
        maintain_cron=args.maintain_cron,
        files=with_options(source.model_dump(mode="json", exclude={"uri"}), source, False),
        table_access=table_access_parameter(_table_access(args)),
    )
    return 0


def _prepare_model_parser(sub: Any) -> None:
    p = sub.add_parser(
        "prepare-model",
        help="load a local model once and export its ONNX file into the cache (for images)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model id or directory")
    p.add_argument(
        "--backend",
        default="onnx-int8",
        choices=["torch", "onnx", "onnx-int8"],
        help="the runtime to prepare (default onnx-int8, what a CPU worker uses)",
    )


def _prepare_model(args: argparse.Namespace) -> int:
    from tasks.embedding import build_embedder
    from tasks.fingerprint import compute
    from tasks.settings import ChunkSettings, EmbedderSettings

    settings = EmbedderSettings(model=args.model, backend=args.backend, device="cpu")
    embedder: Any = build_embedder(settings)
    vectors = embedder.embed(["lanceflow prepare-model"])
    fp = compute(settings, ChunkSettings())
    print(
        f"prepared {fp.model} ({fp.backend}, {vectors.shape[1]} dimensions, revision "
        f"{fp.revision[:12]}) in {os.environ.get('LANCEFLOW_CACHE_DIR', 'the default cache')}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # no telemetry: nothing leaves this machine
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # the temporary server's first start migrates a new database: slow on a small machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from tasks.errors import LanceflowError

    try:
        if args.command == "ingest":
            return _ingest(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "generations":
            return _generations(args)
        if args.command == "rollback":
            return _rollback(args)
        if args.command == "maintain":
            return _maintain(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "prepare-model":
            return _prepare_model(args)
        return _search(args)
    except LanceflowError as exc:
        print(f"lanceflow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        print(
            f"lanceflow: {exc}\nPrefect's temporary server did not start. A database left in "
            "PREFECT_HOME (~/.prefect) by another Prefect version is the usual cause: point "
            "PREFECT_HOME at a new folder, or run `prefect server database reset -y`.",
            file=sys.stderr,
        )
        return EXIT_FAILED_RUN


if __name__ == "__main__":
    sys.exit(main())
