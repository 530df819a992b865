"""The `ingest` flow: list -> read and parse -> chunk -> embed -> write -> indexes -> report."""

from __future__ import annotations

import logging
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import get_run_context
from tqdm import tqdm

from tasks.plan import iter_work
from tasks.report import IngestReport
from tasks.settings import IngestParams
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
def ingest(params: IngestParams) -> IngestReport:
    """Bring a LanceDB table up to date with a folder or bucket of documents."""
    logger = get_run_logger()
    run = open_run_task(params)
    plan = list_documents(run)
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
    changed = plan.to_process > 0 or bool(plan.deleted_ids)
    indexes = refresh_indexes(run, changed)
    logger.info("indexes: %s", ", ".join(indexes.get("indexes", [])))
    if switch_generation(run):
        logger.info("generation %d is live now", run.target.number)
    flow_run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    report = report_run(run, flow_run_id)
    logger.info(
        "done: %d new, %d changed, %d deleted, %d failed documents; %d chunks embedded, "
        "%d from the cache",
        report.documents.new,
        report.documents.changed,
        report.documents.deleted,
        report.documents.failed,
        report.chunks.embedded,
        report.chunks.cached,
    )
    return report
