"""The ingest flow's Prefect tasks: thin wrappers over the plain functions in this package.

Nothing large travels through task results: the work list spills to disk (tasks.plan) and each
batch's data lives only for the few tasks that handle it. Results are not persisted and not
cached (the inputs are live objects: a database handle, a model). Retries are declared where
I/O happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.commits import ChunkWriter
from tasks.documents import DocOutcome, chunk_outcomes, read_and_parse
from tasks.embedding import EmbeddedBatch
from tasks.errors import LanceflowError
from tasks.identity import doc_key
from tasks.memory import release_free_heap
from tasks.plan import RECORDS_MARKER, Plan
from tasks.report import Failure, IngestReport
from tasks.runs import (
    IngestRun,
    complete_generation,
    finish,
    open_run,
    plan_run,
    stream_one,
)
from tasks.settings import IngestParams
from tasks.store import sql_in


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O failures, never lanceflow's own errors (a retry cannot fix those)."""
    try:
        state.result()
    except LanceflowError:
        return False
    except Exception:
        return True
    return True


def _io_task(name: str) -> Any:
    """A task that does I/O: retried twice on transient errors, never cached or persisted."""
    return task(
        name=name,
        retries=2,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=_transient,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


@task(name="open_run", cache_policy=NO_CACHE, persist_result=False)
def open_run_task(params: IngestParams) -> IngestRun:
    return open_run(params)


@task(name="backfill_generation", cache_policy=NO_CACHE, persist_result=False)
def backfill_generation(run: IngestRun) -> int:
    """A reindex that changes only the embedding starts its generation as a copy of the live
    one with vectors recomputed from the stored texts (tasks.backfill); 0 when it does not
    apply."""
    from tasks.backfill import seed_generation

    seeded = seed_generation(run)
    if seeded is None:
        return 0
    run.persist_target()  # a crash from here on resumes this generation, not the copy
    with run.counts_lock:
        run.report.chunks.embedded += seeded
        run.report.backfilled = seeded
    return seeded


@_io_task("list_documents")
def list_documents(run: IngestRun) -> Plan:
    """List the source against the manifest; refuse too many deletions before any write."""
    run.source.complete = True
    run.source.listing_errors.clear()
    run.source.skipped_links.clear()
    plan = plan_run(run)
    try:
        run.persist_target()
    except BaseException:
        plan.cleanup()  # its spilled listing: a failed (or retried) task leaves no folder
        raise
    run.report.documents.seen = plan.seen
    run.report.documents.unchanged = plan.unchanged
    run.report.listing_complete = plan.listing_complete
    run.report.listing_errors = [Failure(doc_id=w, error=why) for w, why in plan.listing_errors]
    run.report.skipped_links = len(run.source.skipped_links)
    return plan


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """One batch read, parsed and chunked. Prefect links a task's state to each object of
    its result, one level down, in a map that lives as long as the flow run: wrapped, a batch
    adds two entries to it (this and the list), not one per document, so the map does not
    grow with the corpus."""

    outcomes: list[DocOutcome]


@_io_task("prepare_documents")
def prepare_documents(run: IngestRun, items: Sequence[dict[str, Any]]) -> PreparedBatch:
    """Read, parse and chunk one batch (the default runner runs it ahead of the embedder)."""
    max_bytes = int(run.params.source.max_file_mb * 2**20)
    outcomes = read_and_parse(items, run.source, max_bytes)
    if any(o.parsed is not None for o in outcomes):
        chunk_outcomes(outcomes, run.chunker)
    return PreparedBatch(outcomes)


@_io_task("embed_chunks")
def embed_chunks(run: IngestRun, outcomes: list[DocOutcome]) -> EmbeddedBatch:
    """Vectors from the cache, the run's memo of unwritten vectors, then the model."""
    batch = run.embed(outcomes)
    with run.counts_lock:
        run.report.chunks.embedded += batch.embedded
        run.report.chunks.cached += batch.cached
    return batch


@_io_task("write_chunks")
def write_chunks(
    run: IngestRun, writer: ChunkWriter, outcomes: list[DocOutcome], batch: EmbeddedBatch
) -> None:
    """One batch's rows as Lance data files (visible at the next commit); its outcomes, with
    their texts dropped, wait in the writer's spill file for the manifest."""
    writer.add(outcomes, batch.rows)
    if batch.rows is not None:  # every vector of the batch is written now
        run.committed.put(batch.rows.column("text_hash").to_pylist())
    release_free_heap()  # the batch's freed buffers go back to the OS (tasks.memory)


@task(name="commit_chunks", cache_policy=NO_CACHE, persist_result=False)
def commit_chunks(run: IngestRun, writer: ChunkWriter, final: bool) -> dict[str, Any]:
    """The written chunks in one table version, then their documents' manifest rows. Not
    retried: a failure leaves the table as it was before this commit, and a re-run redoes
    what it held."""
    done = writer.commit(final=final)
    release_free_heap()
    if done is None:
        return {"fragments": 0}
    return {
        "fragments": done.fragments,
        "version_before": done.version_before,
        "version_after": done.version_after,
    }


@_io_task("stream_documents")
def stream_documents(run: IngestRun, outcomes: list[DocOutcome]) -> int:
    """Long text documents of the batch, each read, chunked, embedded and written a segment at
    a time (tasks.streaming): memory does not grow with a document's size."""
    long_docs = [o for o in outcomes if o.status == "stream"]
    for o in long_docs:
        counts = stream_one(run, o)
        with run.counts_lock:
            run.report.merge(counts)  # once the document is complete: a retry never counts twice
    return len(long_docs)


@task(name="ingest_on_ray", cache_policy=NO_CACHE, persist_result=False)
def ingest_on_ray(run: IngestRun, plan: Plan) -> dict[str, Any]:
    """`--runner ray`: every planned document through one Ray Data pipeline (parse and chunk
    on CPU workers, embed in an actor pool, fragment writes in parallel) and one table commit.
    Not retried as a whole: Ray retries a failed shard itself, and a re-run converges."""
    from tasks.ray_runner import ingest_on_ray as run_on_ray

    result = run_on_ray(run, plan)
    return {
        "fragments": result.fragments,
        "version_before": result.version_before,
        "version_after": result.version_after,
        "streamed": len(result.streamed),
    }


@_io_task("mark_record_files")
def mark_record_files(run: IngestRun, plan: Plan) -> None:
    """Record files whose records are all stored: a later run may skip them by size and time."""
    uri = run.source_uri
    run.store.upsert_documents(
        [
            {
                "doc_key": doc_key(uri, rel),
                "doc_id": rel,
                "source_uri": uri,
                "path": rel,
                "content_hash": None,
                "size": size,
                "mtime": mtime,
                "etag": etag,
                "chunk_count": 0,
                "status": RECORDS_MARKER,
                "error": None,
                "title": None,
            }
            for rel, size, mtime, etag in plan.record_files
        ]
    )
    if plan.listing_complete and plan.deleted_markers:
        run.store.delete_documents([doc_key(uri, d) for d in plan.deleted_markers])


@_io_task("delete_documents")
def delete_documents(run: IngestRun, plan: Plan) -> int:
    """Documents of this source that the (complete) listing no longer has, with their chunks."""
    if not plan.listing_complete or not plan.deleted_ids:
        return 0
    keys = [doc_key(run.source_uri, d) for d in plan.deleted_ids]
    removed = 0
    if run.store.has_chunks():
        tbl = run.store.chunks_table()
        for i in range(0, len(keys), 500):
            removed += tbl.count_rows(sql_in("doc_key", keys[i : i + 500]))
    run.store.delete_documents(keys)
    run.report.documents.deleted = len(keys)
    run.report.chunks.deleted += removed  # set once: a retry finds nothing left to count
    return len(keys)


@_io_task("remove_unowned_chunks")
def remove_unowned_chunks(run: IngestRun) -> int:
    """Chunks an interrupted run committed whose documents no manifest row owns now (their
    file deleted, or failing, since), removed (tasks.store.Store.remove_unowned_chunks)."""
    removed, documents = run.store.remove_unowned_chunks()
    if removed:
        get_run_logger().warning(
            "removed %d chunks of %d documents that an interrupted run had committed and no "
            "document owns now",
            removed,
            documents,
        )
    run.report.chunks.deleted += removed  # a retry finds nothing left to count
    return removed


@_io_task("refresh_indexes")
def refresh_indexes(run: IngestRun, changed: bool) -> dict[str, Any]:
    s = run.params.store
    done = run.store.refresh_indexes(
        s.vector_index_min_rows,
        timedelta(days=s.cleanup_older_than_days),
        changed,
        # on Ray the refresh comes after the workers stopped, well under the run's peak
        vector_beside=run.params.runner == "ray",
    )
    if done.get("seconds"):  # set, not added: a retried refresh counts its last attempt
        # its wall time, the steps' seconds and what lies between them
        run.report.stage_seconds["indexes"] = done["wall_seconds"]
    return done


@_io_task("switch_generation")
def switch_generation(run: IngestRun) -> bool:
    """Record this source as built; make a complete reindexed generation live (one commit)."""
    limit = run.params.max_failed_fraction
    ok = not (run.report.documents.failed > 0 and run.report.failed_fraction > limit)
    return complete_generation(run, ok)


@task(name="report_run", cache_policy=NO_CACHE, persist_result=False)
def report_run(run: IngestRun, flow_run_id: str | None) -> IngestReport:
    return finish(run, flow_run_id)
