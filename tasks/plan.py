"""Deciding what a run must do: compare the source listing with the documents manifest.

The listing is streamed and the work (documents to read, records with their text) spills to an
Arrow file on local disk, so memory does not grow with the corpus; the flow then reads the work
back in bounded batches. Unchanged files are recognised by size and modification time without
being read; files whose size or time changed are read and compared by content hash later.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tasks.errors import DocumentError
from tasks.identity import record_hash
from tasks.sources import FileEntry, Record, RecordError, Source

log = logging.getLogger(__name__)

WORK_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("kind", pa.string()),  # 'file' | 'record' | 'error'
        ("path", pa.string()),
        ("source", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("state", pa.string()),  # 'new' | 'changed' | 'check' | 'retry' | 'touch'
        ("old_hash", pa.string()),
        ("content_hash", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("error", pa.string()),
    ]
)

Manifest = dict[str, tuple[str | None, int, float, str, str]]


@dataclass
class Plan:
    """What a run has to do. The work itself lives in the spill file."""

    spill_path: str
    to_process: int = 0
    seen: int = 0
    unchanged: int = 0
    deleted_ids: list[str] = field(default_factory=list)
    listing_complete: bool = True
    listing_errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return self.to_process == 0 and not self.deleted_ids

    def cleanup(self) -> None:
        try:
            os.remove(self.spill_path)
            os.rmdir(os.path.dirname(self.spill_path))
        except OSError:
            pass


class _Spill:
    def __init__(self, path: str, flush_rows: int = 512) -> None:
        self.path = path
        self.sink = pa.OSFile(path, "wb")
        self.writer = pa.ipc.new_file(self.sink, WORK_SCHEMA)
        self.rows: list[dict[str, Any]] = []
        self.flush_rows = flush_rows
        self.count = 0

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_batch(pa.RecordBatch.from_pylist(self.rows, schema=WORK_SCHEMA))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.sink.close()


def plan_changes(source: Source, manifest: Manifest, spill_dir: str | None = None) -> Plan:
    """Stream the source listing against the manifest; spill the work to disk."""
    directory = tempfile.mkdtemp(prefix="lanceflow-plan-", dir=spill_dir)
    spill = _Spill(os.path.join(directory, "work.arrow"))
    plan = Plan(spill.path)
    seen: set[str] = set()
    by_source: dict[str, list[str]] | None = None
    try:
        for entry in source.iter_entries():
            if entry.error is not None:
                seen.add(entry.rel)
                spill.add(
                    doc_id=entry.rel,
                    kind="error",
                    path=entry.path,
                    source=entry.rel,
                    size=entry.size,
                    mtime=entry.mtime,
                    state="retry",
                    error=entry.error,
                )
                continue
            if entry.is_records:
                if by_source is None:
                    by_source = _record_sources(manifest)
                _plan_records(source, entry, manifest, by_source, seen, spill, plan)
                continue
            seen.add(entry.rel)
            old = manifest.get(entry.rel)
            if old is None:
                state = "new"
            elif old[3] != "ok":
                state = "retry"
            elif old[1] == entry.size and old[2] == entry.mtime:
                plan.unchanged += 1
                continue
            else:
                state = "check"
            spill.add(
                doc_id=entry.rel,
                kind="file",
                path=entry.path,
                source=entry.rel,
                size=entry.size,
                mtime=entry.mtime,
                state=state,
                old_hash=old[0] if old else None,
            )
    finally:
        spill.close()
    plan.seen = len(seen)
    plan.to_process = spill.count
    plan.listing_complete = source.complete
    plan.listing_errors = list(source.listing_errors)
    if source.complete:
        plan.deleted_ids = sorted(doc_id for doc_id in manifest if doc_id not in seen)
    else:
        log.warning("the listing was incomplete: nothing is deleted in this run")
    return plan


def _record_sources(manifest: Manifest) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for doc_id, (_h, _s, _m, _st, src) in manifest.items():
        if src != doc_id:
            out.setdefault(src, []).append(doc_id)
    return out


def _plan_records(
    source: Source,
    entry: FileEntry,
    manifest: Manifest,
    by_source: dict[str, list[str]],
    seen: set[str],
    spill: _Spill,
    plan: Plan,
) -> None:
    known = by_source.get(entry.rel, [])
    if known and all(
        manifest[d][3] == "ok" and manifest[d][1] == entry.size and manifest[d][2] == entry.mtime
        for d in known
    ):
        seen.update(known)
        plan.unchanged += len(known)
        return
    try:
        for rec in source.iter_records(entry):
            _plan_record(rec, entry, manifest, seen, spill, plan)
    except DocumentError as exc:
        # the whole record file is unreadable: keep its documents (nothing to compare with)
        seen.update(known)
        seen.add(entry.rel)
        spill.add(
            doc_id=entry.rel,
            kind="error",
            path=entry.path,
            source=entry.rel,
            size=entry.size,
            mtime=entry.mtime,
            state="retry",
            error=str(exc),
        )


def _plan_record(
    rec: Record | RecordError,
    entry: FileEntry,
    manifest: Manifest,
    seen: set[str],
    spill: _Spill,
    plan: Plan,
) -> None:
    if isinstance(rec, RecordError):
        seen.add(rec.doc_id)
        spill.add(
            doc_id=rec.doc_id,
            kind="error",
            path=entry.path,
            source=entry.rel,
            size=entry.size,
            mtime=entry.mtime,
            state="retry",
            error=f"line {rec.line}: {rec.error}",
        )
        return
    if rec.doc_id in seen:
        spill.add(
            doc_id=f"{entry.rel}#{rec.line}",
            kind="error",
            path=entry.path,
            source=entry.rel,
            size=entry.size,
            mtime=entry.mtime,
            state="retry",
            error=f"line {rec.line}: duplicate id {rec.doc_id!r} (the first one is kept)",
        )
        return
    seen.add(rec.doc_id)
    digest = record_hash(rec.title, rec.text)
    old = manifest.get(rec.doc_id)
    if old is not None and old[3] == "ok" and old[0] == digest:
        if old[1] == entry.size and old[2] == entry.mtime and old[4] == entry.rel:
            plan.unchanged += 1
            return
        # same content, the file around it changed: only the manifest row is refreshed
        spill.add(
            doc_id=rec.doc_id,
            kind="record",
            path=entry.path,
            source=entry.rel,
            size=entry.size,
            mtime=entry.mtime,
            state="touch",
            old_hash=old[0],
            content_hash=digest,
        )
        return
    state = "new" if old is None else ("retry" if old[3] != "ok" else "changed")
    spill.add(
        doc_id=rec.doc_id,
        kind="record",
        path=entry.path,
        source=entry.rel,
        size=entry.size,
        mtime=entry.mtime,
        state=state,
        old_hash=old[0] if old else None,
        content_hash=digest,
        title=rec.title,
        text=rec.text,
    )


def iter_work(plan: Plan, batch_docs: int, batch_bytes: int) -> Iterator[list[dict[str, Any]]]:
    """The spilled work in batches bounded by document count and bytes."""
    if plan.to_process == 0:
        return
    with pa.memory_map(plan.spill_path, "r") as source:
        reader = pa.ipc.open_file(source)
        batch: list[dict[str, Any]] = []
        size = 0
        for i in range(reader.num_record_batches):
            for row in reader.get_batch(i).to_pylist():
                weight = len(row["text"] or "") if row["kind"] == "record" else (row["size"] or 0)
                if batch and (len(batch) >= batch_docs or size + weight > batch_bytes):
                    yield batch
                    batch, size = [], 0
                batch.append(row)
                size += weight
        if batch:
            yield batch
