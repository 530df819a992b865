"""Weekly upkeep of one table: tag pruning, compaction, version cleanup, index retraining.

Run by the `maintain` flow under the table's write slot. Tagged versions are never deleted:
the newest `keep_tags` ingest tags and the last good tag of every evaluated dataset stay, and
cleanup stops at the oldest kept tag (tasks.store.keep_tagged).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pyarrow as pa
from pydantic import BaseModel, Field

from tasks.settings import MaintainSettings
from tasks.storage import redact_uri
from tasks.store import EVALUATIONS, Store, optimize
from tasks.versions import prune_tags, record_same_content

log = logging.getLogger(__name__)

MAINTENANCE = "maintenance"

MAINTENANCE_SCHEMA = pa.schema(
    [
        pa.field("at", pa.timestamp("us", tz="UTC")),
        pa.field("generation", pa.int64()),
        pa.field("chunk_rows", pa.int64()),
        pa.field("retrained", pa.bool_()),
        pa.field("versions_removed", pa.int64()),
        pa.field("tags_removed", pa.int64()),
    ]
)


class MaintenanceReport(BaseModel):
    table: str
    generation: int = 0
    chunk_rows: int = 0
    tags_removed: list[str] = Field(default_factory=list)
    tags_kept: list[str] = Field(default_factory=list)
    versions_removed: int = 0
    retrained: bool = False
    drift: float = 0.0
    tables: list[str] = Field(default_factory=list)


def last_good_tags(store: Store) -> set[str]:
    """The tag of the latest passed (or accepted) evaluation of every dataset."""
    if not store.has(EVALUATIONS):
        return set()
    rows = store.table(EVALUATIONS).to_arrow().to_pylist()
    rows.sort(key=lambda r: r["evaluated_at"])
    good: dict[str, str] = {}
    for r in rows:
        if (r.get("passed") or r.get("accepted")) and r.get("tag"):
            good[r.get("dataset_key") or r["dataset"]] = r["tag"]
    return set(good.values())


def _churn(store: Store, rows: int) -> float:
    """Chunks written or deleted since the vector index was last retrained (or since the first
    maintenance of this generation), as a share of the rows: replacing half the corpus counts
    even when the row count stays the same."""
    from tasks.store import RUNS

    if not store.has(MAINTENANCE) or not store.has(RUNS):
        return 0.0
    gen = store.generation_number
    history = [r for r in store.table(MAINTENANCE).to_arrow().to_pylist() if r["generation"] == gen]
    if not history:
        return 0.0
    history.sort(key=lambda r: r["at"])
    since = next((r for r in reversed(history) if r["retrained"]), history[0])["at"]
    changed = 0
    for run in store.table(RUNS).to_arrow().to_pylist():
        if run["generation"] != gen or run["started_at"] is None or run["started_at"] < since:
            continue
        try:
            deleted = int(json.loads(run["report"] or "{}")["chunks"]["deleted"])
        except (KeyError, TypeError, ValueError):
            deleted = 0
        changed += int(run["chunks_written"] or 0) + deleted
    return changed / max(rows, 1)


def maintain_table(store: Store, settings: MaintainSettings) -> MaintenanceReport:
    """Prune tags, compact and clean every table of the live generation and the bookkeeping
    tables, and retrain the vector index when the rows drifted past the setting."""
    report = MaintenanceReport(table=redact_uri(store.uri), generation=store.generation_number)
    protect = last_good_tags(store)
    report.tags_removed = prune_tags(store, settings.keep_tags, protect)
    retention = timedelta(days=settings.retention_days)
    if store.has_chunks():
        chunks = store.table(store.chunks_name)
        report.chunk_rows = chunks.count_rows()
        report.drift = round(_churn(store, report.chunk_rows), 4)
        has_vector_index = "vector_idx" in store.index_names()
        report.retrained = (
            has_vector_index and report.drift >= settings.rebuild_indexes_after_fraction
        )
        before = {int(v["version"]) for v in chunks.list_versions()}
        optimize(chunks, retention, retrain=report.retrained)
        after = {int(v["version"]) for v in chunks.list_versions()}
        report.versions_removed = len(before - after)
        report.tables.append(store.chunks_name)
        report.tags_kept = sorted(chunks.tags.list())
    # the manifest and the bookkeeping tables (runs, evaluations, generations, tags, this)
    report.tables += store.upkeep(retention)
    # compaction wrote new versions of the same content: they keep the tag they had
    record_same_content(store)
    store._ensure(MAINTENANCE, MAINTENANCE_SCHEMA).add(
        pa.Table.from_pylist(
            [
                {
                    "at": datetime.now(UTC),
                    "generation": report.generation,
                    "chunk_rows": report.chunk_rows,
                    "retrained": report.retrained,
                    "versions_removed": report.versions_removed,
                    "tags_removed": len(report.tags_removed),
                }
            ],
            schema=MAINTENANCE_SCHEMA,
        )
    )
    return report
