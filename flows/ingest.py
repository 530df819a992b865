"""The `ingest` flow: list -> read and parse -> chunk -> embed -> write -> indexes -> report.

Its parameters are top-level (`source`, `table`, then grouped settings), so a deployment run,
a UI form or a trigger can override `table` alone: Prefect merges run parameters shallowly.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import get_run_context
from pydantic import Field
from tqdm import tqdm

from tasks.crashpoints import pause_point
from tasks.locking import table_lock
from tasks.plan import iter_work
from tasks.report import IngestReport
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
    chunk_documents,
    delete_documents,
    embed_chunks,
    list_documents,
    mark_record_files,
    open_run_task,
    read_documents,
    refresh_indexes,
    report_run,
    stream_documents,
    switch_generation,
    write_chunks,
)

log = logging.getLogger(__name__)


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


def ingest_with(params: IngestParams) -> IngestReport:
    """The ingest flow's body, for a caller that holds the table's write slot."""
    logger = get_run_logger()
    run = open_run_task(params)
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
    progress_id: Any = create_progress_artifact(
        progress=0.0, description=f"documents processed of {plan.to_process}"
    )
    done = 0
    try:
        with tqdm(
            total=plan.to_process, unit="doc", file=sys.stderr, disable=None, desc="ingest"
        ) as bar:
            for items in iter_work(plan, params.batch_docs, int(params.batch_mb * 2**20)):
                outcomes = read_documents(run, items)
                chunk_documents(run, outcomes)
                batch = embed_chunks(run, outcomes)
                write_chunks(run, outcomes, batch)
                stream_documents(run, outcomes)
                done += len(items)
                bar.update(len(items))
                update_progress_artifact(progress_id, progress=100.0 * done / plan.to_process)
    finally:
        plan.cleanup()
    mark_record_files(run, plan)
    delete_documents(run, plan)
    # documents or chunks written or removed; a run that only recorded new listing tokens (or
    # times) in the manifest changed nothing the indexes cover
    d, c = run.report.documents, run.report.chunks
    changed = bool(d.new or d.changed or d.failed or c.written or c.deleted or plan.deleted_ids)
    indexes = refresh_indexes(run, changed)
    logger.info("indexes: %s", ", ".join(indexes.get("indexes", [])))
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
