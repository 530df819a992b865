"""The `ingest` flow: list -> read and parse -> chunk -> embed -> write -> commit -> indexes ->
report.

Its parameters are top-level (`source`, `table`, then grouped settings), so a deployment run,
a UI form or a trigger can override `table` alone: Prefect merges run parameters shallowly.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.utilities.annotations import quote
from pydantic import Field
from tqdm import tqdm

from tasks.commits import ChunkWriter
from tasks.concurrency import prompt_gil_handoffs, usable_cores
from tasks.crashpoints import pause_point
from tasks.embedding import prepare_model
from tasks.locking import table_lock
from tasks.plan import Plan, iter_work
from tasks.report import IngestReport
from tasks.runs import IngestRun
from tasks.settings import (
    DEFAULT_DB_URI,
    ChunkSettings,
    EmbedderSettings,
    FileSettings,
    IngestParams,
    RunSettings,
    StoreOptions,
    TableAccess,
)
from tasks.steps import (
    backfill_generation,
    commit_chunks,
    delete_documents,
    embed_chunks,
    ingest_on_ray,
    list_documents,
    mark_record_files,
    open_run_task,
    prepare_documents,
    refresh_indexes,
    remove_unowned_chunks,
    report_run,
    stream_documents,
    switch_generation,
    write_chunks,
)

log = logging.getLogger(__name__)


def prefetch_batches(cores: int | None = None) -> int:
    """Batches read, parsed and chunked ahead of the one being embedded, each in its own
    thread: 2, and on a larger machine one per two cores up to 8. The splitter and the
    tokenizer run in Rust without the GIL, so a GPU or an API, which embed faster than one
    thread chunks, is fed by several; memory stays bounded (at most this many batches of
    --batch-docs documents and --batch-mb bytes ahead), whatever the corpus size."""
    if cores is None:
        cores = usable_cores()
    return max(2, min(8, cores // 2))


@flow(name="ingest", persist_result=False, validate_parameters=True)
def ingest(
    source: Annotated[str, Field(min_length=1)],
    table: Annotated[str, Field(min_length=1)] = DEFAULT_DB_URI,
    embedder: EmbedderSettings = EmbedderSettings(),  # noqa: B008
    chunking: ChunkSettings = ChunkSettings(),  # noqa: B008
    files: FileSettings = FileSettings(),  # noqa: B008
    run: RunSettings = RunSettings(),  # noqa: B008
    store: StoreOptions = StoreOptions(),  # noqa: B008
    table_access: TableAccess = TableAccess(),  # noqa: B008
) -> IngestReport:
    """Bring a LanceDB table up to date with a folder or bucket of documents.

    New and changed documents are embedded, deleted ones removed, unchanged ones skipped; the
    result is tagged for `lanceflow rollback`. One run per table at a time.

    Args:
        source: A local folder or file, or an fsspec URL (s3://bucket/prefix, gs://, az://),
            as the worker sees it.
        table: The LanceDB database directory of the index (a path on the worker, or an
            object-store URL). Runs that write one table never overlap.
        embedder: The model that embeds the chunks: a local sentence-transformers model, the
            OpenAI API (or a compatible server), or 'hash' for tests.
        chunking: Chunk size and overlap in model tokens.
        files: Which files of the source are taken, record-file columns, size limits.
        run: Batch sizes, failure and deletion limits, and the verify and reindex switches.
        store: Index upkeep: vector index threshold, version pruning, generations kept.
        table_access: For a table in a bucket: LanceDB storage options (endpoint, region) and
            a credentials block.
    """
    params = IngestParams.build(
        source,
        table,
        embedder=embedder,
        chunking=chunking,
        files=files,
        run=run,
        store=store,
        table_access=table_access,
    )
    with table_lock(table, holder="ingest"):
        return ingest_with(params)


def run_ingest(params: IngestParams) -> IngestReport:
    """Run the `ingest` flow with one IngestParams (the CLI, tests, benchmarks)."""
    return ingest(**params.flow_parameters(secrets=True))


def _pipeline(run: IngestRun, plan: Plan, progress_id: Any) -> None:
    """The default runner: read+parse+chunk, embed and write overlap. While the model embeds
    batch N, batch N+1 (and N+2) are read, parsed and chunked and batch N-1 is written, each
    in the flow's task-runner threads; bounded (prefetch_batches() ahead, one write in flight,
    so memory stays flat). A batch is written as Lance data files that no reader sees until
    the commit: one at the end of the run (one new table version), and checkpoints every
    `checkpoint_minutes` (tasks.commits). Long documents are streamed after their batch is
    written."""
    params = run.params
    work = iter_work(plan, params.batch_docs, int(params.batch_mb * 2**20))
    ahead: deque[Any] = deque()
    run.chunker  # noqa: B018 - built once here, not by two prefetching threads at once
    prefetch = prefetch_batches()
    writer = ChunkWriter(run, params.checkpoint_minutes)
    logger = get_run_logger()

    def refill() -> None:
        while len(ahead) < prefetch:
            items = next(work, None)
            if items is None:
                return
            ahead.append((len(items), prepare_documents.submit(quote(run), quote(items))))

    writing: tuple[int, Any, Any] | None = None
    done = 0

    def commit(final: bool) -> None:
        # quoted: Prefect does not walk the run's objects (typed Task overloads do not know quote)
        result = commit_chunks(quote(run), quote(writer), final)  # type: ignore[call-overload]
        if result["fragments"]:
            logger.info(
                "%s: %d fragments in one commit (table version %d -> %d)",
                "commit" if final else "checkpoint",
                result["fragments"],
                result["version_before"],
                result["version_after"],
            )

    def finish_write() -> None:
        nonlocal writing, done
        if writing is None:
            return
        count, outcomes, future = writing
        writing = None
        future.result()
        if writer.due():
            commit(final=False)
        stream_documents(quote(run), quote(outcomes))
        done += count
        bar.update(count)
        update_progress_artifact(progress_id, progress=100.0 * done / plan.to_process)

    with tqdm(
        total=plan.to_process, unit="doc", file=sys.stderr, disable=None, desc="ingest"
    ) as bar:
        refill()
        try:
            while ahead:
                count, prepared = ahead.popleft()
                outcomes = prepared.result().outcomes
                refill()
                batch = embed_chunks(quote(run), quote(outcomes))
                finish_write()  # one write in flight, in order
                writing = (
                    count,
                    outcomes,
                    write_chunks.submit(quote(run), quote(writer), quote(outcomes), quote(batch)),
                )
            finish_write()
            commit(final=True)
        finally:
            for _, future in ahead:  # a failed run leaves no task behind
                future.wait()
            if writing is not None:
                writing[2].wait()
            writer.close()


def ingest_with(params: IngestParams) -> IngestReport:
    """The ingest flow's body, for a caller that holds the table's write slot."""
    logger = get_run_logger()
    run = open_run_task(params)
    if backfill_generation(run):
        logger.info(
            "generation %d: %d chunks re-embedded from the live generation's stored text",
            run.target.number,
            run.report.backfilled,
        )
    plan = list_documents(run)
    pause_point("after-plan")
    logger.info(
        "generation %d (%s): %d documents seen, %d unchanged, %d to process, %d to delete",
        run.target.number,
        run.target.status,
        plan.seen,
        plan.unchanged,
        plan.to_process,
        len(plan.deleted_ids),
    )
    if plan.to_process and params.runner == "local":
        prepare_model(params.embedder)  # a first ONNX export overlaps the first chunking
    progress_id: Any = create_progress_artifact(
        progress=0.0, description=f"documents processed of {plan.to_process}"
    )
    try:
        # the pipeline's threads hand the GIL to each other promptly (tasks.concurrency)
        with prompt_gil_handoffs():
            if params.runner == "ray" and plan.to_process:
                ray_step = ingest_on_ray(run, plan)
                logger.info(
                    "ray: %d fragments in one commit (table version %d -> %d)",
                    ray_step["fragments"],
                    ray_step["version_before"],
                    ray_step["version_after"],
                )
                update_progress_artifact(progress_id, progress=100.0)
            elif plan.to_process:
                started = time.perf_counter()
                _pipeline(run, plan, progress_id)
                run.report.stage_seconds["pipeline"] = round(time.perf_counter() - started, 3)
    finally:
        plan.cleanup()
    mark_record_files(quote(run), quote(plan))
    delete_documents(quote(run), quote(plan))
    remove_unowned_chunks(quote(run))
    # documents or chunks written or removed; a run that only recorded new listing tokens (or
    # times) in the manifest changed nothing the indexes cover
    d, c = run.report.documents, run.report.chunks
    changed = bool(d.new or d.changed or d.failed or c.written or c.deleted or plan.deleted_ids)
    indexes = refresh_indexes(run, changed)
    logger.info(
        "indexes: %s%s",
        ", ".join(indexes.get("indexes", [])),
        "".join(f"; {k} {v:.1f} s" for k, v in indexes.get("seconds", {}).items()),
    )
    if switch_generation(run):
        logger.info("generation %d is live now", run.target.number)
    flow_run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    report = report_run(run, flow_run_id)
    logger.info(
        "done: %d new, %d changed, %d deleted, %d failed documents; %d chunks embedded, "
        "%d from the cache; tag %s",
        report.documents.new,
        report.documents.changed,
        report.documents.deleted,
        report.documents.failed,
        report.chunks.embedded,
        report.chunks.cached,
        report.tag or "-",
    )
    return report
