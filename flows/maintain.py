"""The `maintain` flow: a verify pass over the source, tag pruning, compaction, cleanup of old
versions (tagged versions kept) and retraining of a drifted vector index."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.ingest import ingest
from tasks.locking import table_lock
from tasks.maintenance import MaintenanceReport, maintain_table
from tasks.settings import (
    DEFAULT_DB_URI,
    ChunkSettings,
    EmbedderSettings,
    FileSettings,
    MaintainSettings,
    RunSettings,
    TableAccess,
)
from tasks.storage import redact_uri
from tasks.store import store_at


@task(name="maintain_table", cache_policy=NO_CACHE, persist_result=False)
def maintain_table_task(
    table: str, settings: MaintainSettings, access: TableAccess
) -> MaintenanceReport:
    return maintain_table(store_at(table, access), settings)


@flow(name="maintain", persist_result=False, validate_parameters=True)
def maintain(
    table: Annotated[str, Field(min_length=1)] = DEFAULT_DB_URI,
    source: str = "",
    maintenance: MaintainSettings = MaintainSettings(),  # noqa: B008
    embedder: EmbedderSettings = EmbedderSettings(),  # noqa: B008
    chunking: ChunkSettings = ChunkSettings(),  # noqa: B008
    files: FileSettings = FileSettings(),  # noqa: B008
    table_access: TableAccess = TableAccess(),  # noqa: B008
) -> dict[str, Any]:
    """Keep a table healthy: verify it against its source, then compact and prune it.

    Args:
        table: The LanceDB database directory to maintain.
        source: The source the table indexes, for the verify pass (every document re-hashed).
            Empty: no verify pass.
        maintenance: Version retention, tags kept for rollback, the verify switch, and when
            the vector index is retrained.
        embedder: The embedder settings the table was built with (used by the verify pass).
        chunking: The chunking settings the table was built with (used by the verify pass).
        files: The file selection of the source (used by the verify pass).
        table_access: For a table in a bucket: LanceDB storage options (endpoint, region) and
            a credentials block.
    """
    logger = get_run_logger()
    result: dict[str, Any] = {"table": redact_uri(table)}
    with table_lock(table, holder="maintain"):
        if maintenance.verify and source:
            report = ingest(
                source=source,
                table=table,
                embedder=embedder,
                chunking=chunking,
                files=files,
                run=RunSettings(verify=True),
                table_access=table_access,
            )
            result["verify"] = report.model_dump(include={"documents", "chunks", "tag"})
            logger.info(
                "verify: %d documents re-hashed, %d changed",
                report.documents.seen,
                report.documents.changed,
            )
        done = maintain_table_task(table, maintenance, table_access)
    result["maintenance"] = done.model_dump()
    logger.info(
        "maintenance: %d old versions removed, %d tags removed, %d kept, vector "
        "index %s (drift %.1f%%)",
        done.versions_removed,
        len(done.tags_removed),
        len(done.tags_kept),
        "retrained" if done.retrained else "kept",
        100 * done.drift,
    )
    create_markdown_artifact(
        f"## Maintenance of `{redact_uri(table)}`\n\n"
        f"- old versions of the chunks table removed: {done.versions_removed}\n"
        f"- tags removed: {', '.join(done.tags_removed) or 'none'}\n"
        f"- tags kept: {', '.join(done.tags_kept) or 'none'}\n"
        f"- vector index: {'retrained' if done.retrained else 'kept'} "
        f"(rows drifted {100 * done.drift:.1f}%)\n",
        key="maintenance",
        description="what the maintenance run did",
    )
    return result
