"""Manifest rows after their chunks, and the one-commit-per-call write of a batch's chunks.

The runners write chunks through tasks.commits (data files, one commit per run or
checkpoint) and then write_manifest(); write_batch() upserts a batch in one commit and is what
a long document's manifest row goes through (tasks.streaming). A crash between chunks and
manifest leaves the manifest pointing at the old content, so the next run
processes those documents again and upserts the same chunk ids: it converges to exactly the
table a clean run writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from tasks.commits import replaces_old_chunks
from tasks.crashpoints import crash_point
from tasks.documents import DocOutcome
from tasks.identity import doc_key
from tasks.report import IngestReport
from tasks.store import Store


def write_batch(
    store: Store,
    outcomes: Sequence[DocOutcome],
    rows: pa.Table | None,
    source_uri: str,
    *,
    streamed_chunks: int | None = None,
) -> IngestReport:
    """Upsert the batch's chunks and manifest rows; returns what happened as a report to add
    to the run's (only once both commits succeeded, so a retried write never counts twice).

    `streamed_chunks`: the outcomes are one long document whose chunks are already written
    (tasks.streaming); only its manifest row is written, with that many chunks."""
    counts = IngestReport()
    keys = {o.doc_id: doc_key(source_uri, o.doc_id) for o in outcomes}
    if streamed_chunks is not None:
        _write_manifest(store, outcomes, keys, source_uri, counts, {}, streamed_chunks)
        return counts
    replace = [keys[o.doc_id] for o in outcomes if replaces_old_chunks(o)]
    old_ids = store.chunk_ids_of(replace)
    new_ids = set(rows.column("chunk_id").to_pylist()) if rows is not None else set()
    if rows is not None or (replace and store.has_chunks()):
        empty = pa.Table.from_pylist([], schema=store.chunks().schema) if rows is None else rows
        store.replace_chunks(empty, replace, old_ids)
    crash_point("after-chunk-commit")
    counts.chunks.written += len(new_ids)
    counts.chunks.deleted += len(old_ids - new_ids)

    per_doc: dict[str, int] = {}
    if rows is not None:
        for doc_id in rows.column("doc_id").to_pylist():
            per_doc[doc_id] = per_doc.get(doc_id, 0) + 1
    _write_manifest(store, outcomes, keys, source_uri, counts, per_doc, None)
    return counts


def write_manifest(
    store: Store, outcomes: Sequence[DocOutcome], source_uri: str, per_doc: dict[str, int]
) -> IngestReport:
    """Manifest rows for outcomes whose chunks are committed already (the Ray runner);
    `per_doc`: chunks written per document id."""
    counts = IngestReport()
    keys = {o.doc_id: doc_key(source_uri, o.doc_id) for o in outcomes}
    _write_manifest(store, outcomes, keys, source_uri, counts, per_doc, None)
    return counts


def _write_manifest(
    store: Store,
    outcomes: Sequence[DocOutcome],
    keys: dict[str, str],
    source_uri: str,
    counts: IngestReport,
    per_doc: dict[str, int],
    streamed_chunks: int | None,
) -> None:
    # a long document's row is written once all its segments are (tasks.streaming)
    outcomes = [o for o in outcomes if o.status != "stream"]
    need_old = [keys[o.doc_id] for o in outcomes if o.status in ("touch", "failed")]
    old = store.document_rows(need_old)
    manifest: list[dict[str, Any]] = []
    for o in outcomes:
        prev = old.get(keys[o.doc_id], {})
        row: dict[str, Any] = {
            "doc_key": keys[o.doc_id],
            "doc_id": o.doc_id,
            "source_uri": source_uri,
            "path": o.source,
            "content_hash": o.content_hash,
            "size": o.size,
            "mtime": o.mtime,
            "etag": o.etag,
            "chunk_count": o.chunk_count if streamed_chunks is None else streamed_chunks,
            "status": "ok",
            "error": None,
            "title": o.title,
        }
        if o.status == "touch":
            row.update(chunk_count=prev.get("chunk_count", 0), title=prev.get("title"))
        elif o.status == "failed":
            row.update(
                status="failed",
                error=o.error,
                chunk_count=prev.get("chunk_count", 0) if o.keep_chunks else 0,
                title=prev.get("title"),
            )
            if o.keep_chunks:
                row["content_hash"] = prev.get("content_hash")
            if o.partial:
                count = per_doc.get(o.doc_id, 0) if streamed_chunks is None else streamed_chunks
                row.update(chunk_count=count, title=o.title)
        counts.count_outcome(o.doc_id, o.state, o.status, o.error)
        manifest.append(row)
    store.upsert_documents(manifest)
