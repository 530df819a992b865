"""Deciding what a run must do: compare the source listing with the documents manifest.

The listing is streamed and the work (documents to read, records with their text) spills to an
Arrow file on local disk, so memory does not grow with the corpus; the flow then reads the work
back in bounded batches. Unchanged files are recognised by size and modification time without
being read; files whose size or time changed are read and compared by content hash later.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa

from tasks.errors import DeletionRefusedError, DocumentError
from tasks.identity import record_hash
from tasks.scratch import scratch_dir
from tasks.sources import FileEntry, Record, RecordError, Source
from tasks.store import ManifestRow

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
        ("etag", pa.string()),  # the listing's change token (tasks.sources.change_token)
    ]
)

Manifest = dict[str, ManifestRow]

#: the manifest status of a record file's own row, written once all its records are stored;
#: only then may a later run skip the file by its size and modification time
RECORDS_MARKER = "records-file"


class RecordFile(NamedTuple):
    path: str
    size: int
    mtime: float
    etag: str | None


def same_object(old: ManifestRow, entry: FileEntry, trust_mtime: bool) -> bool | None:
    """Whether the listing shows the content the manifest recorded, without reading it.

    True: same size and change token (an ETag, a content MD5 or a version id), or, where
    neither side has a token, same size and modification time (a folder; a bucket indexed
    before tokens were recorded). False: it must be read. None: the same by size and time
    only, and the manifest lacks the token the listing now gives (it is recorded without a
    download)."""
    if old.size != entry.size:
        return False
    if entry.etag and old.etag:
        return entry.etag == old.etag
    if trust_mtime and entry.mtime != 0.0 and old.mtime == entry.mtime:
        return None if entry.etag else True
    return False


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
    #: record files streamed to the end this run (or whose listing token is new), marked done
    #: afterwards
    record_files: list[RecordFile] = field(default_factory=list)
    #: manifest markers of record files that vanished
    deleted_markers: list[str] = field(default_factory=list)
    #: record-file paths in `seen` only as markers, not as documents
    marker_ids: set[str] = field(default_factory=set)
    #: documents of this source indexed before the run (the deletion guard's denominator)
    indexed: int = 0
    #: of those, how many the listing no longer has (deleted, or lost by a reindex)
    missing: int = 0

    @property
    def nothing_to_do(self) -> bool:
        return (
            self.to_process == 0
            and not self.deleted_ids
            and not self.deleted_markers
            and not self.record_files
        )

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

    def add_for(self, entry: FileEntry, **row: Any) -> None:
        """A row about something found in `entry` (its path, size and time filled in)."""
        self.add(
            path=entry.path,
            source=entry.rel,
            size=entry.size,
            mtime=entry.mtime,
            etag=entry.etag,
            **row,
        )

    def flush(self) -> None:
        if self.rows:
            self.writer.write_batch(pa.RecordBatch.from_pylist(self.rows, schema=WORK_SCHEMA))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.sink.close()


def plan_changes(
    source: Source,
    manifest: Manifest,
    spill_dir: str | None = None,
    *,
    verify: bool = False,
    baseline: set[str] | None = None,
) -> Plan:
    """Stream the source listing against the manifest; spill the work to disk.

    `verify` re-hashes every file whatever its size and time (so do sources whose listing
    has no modification times). `baseline` is the set of document ids the deletion guard
    compares the listing with (default: the manifest's; a reindex passes the live
    generation's, so a build from an emptied source cannot replace a full index).
    """
    directory = scratch_dir("plan", spill_dir)
    spill = _Spill(os.path.join(directory, "work.arrow"))
    plan = Plan(spill.path)
    seen: set[str] = set()
    by_source: dict[str, list[str]] | None = None
    listed = False
    try:
        for entry in source.iter_entries():
            if entry.error is not None:
                seen.add(entry.rel)
                spill.add_for(
                    entry,
                    doc_id=entry.rel,
                    kind="error",
                    state="retry",
                    error=entry.error,
                )
                continue
            if entry.is_records:
                if by_source is None:
                    by_source = _record_sources(manifest)
                _plan_records(source, entry, manifest, by_source, seen, spill, plan, verify)
                continue
            seen.add(entry.rel)
            old = manifest.get(entry.rel)
            if old is None:
                state = "new"
            elif old.status != "ok":
                state = "retry"
            elif verify:
                state = "check"
            else:
                same = same_object(old, entry, source.reliable_mtime)
                if same:
                    plan.unchanged += 1
                    continue
                if same is None:
                    # unchanged (counted when written); the manifest learns the listing's
                    # token, without a download
                    spill.add_for(
                        entry,
                        doc_id=entry.rel,
                        kind="file",
                        state="touch",
                        old_hash=old.content_hash,
                        content_hash=old.content_hash,
                    )
                    continue
                state = "check"
            spill.add_for(
                entry,
                doc_id=entry.rel,
                kind="file",
                state=state,
                old_hash=old.content_hash if old else None,
            )
        listed = True
    finally:
        spill.close()
        if not listed:  # a source that cannot be listed: no plan, no folder left behind
            plan.cleanup()
    markers = {d for d, row in manifest.items() if row[3] == RECORDS_MARKER}
    plan.seen = len(seen) - len(plan.marker_ids)
    base = baseline if baseline is not None else {d for d in manifest if d not in markers}
    plan.indexed = len(base)
    plan.missing = sum(1 for d in base if d not in seen)
    plan.to_process = spill.count
    plan.listing_complete = source.complete
    plan.listing_errors = list(source.listing_errors)
    if source.complete:
        gone = sorted(doc_id for doc_id in manifest if doc_id not in seen)
        plan.deleted_ids = [d for d in gone if d not in markers]
        plan.deleted_markers = [d for d in gone if d in markers]
    else:
        log.warning("the listing was incomplete: nothing is deleted in this run")
    return plan


def check_deletions(plan: Plan, max_fraction: float, source_uri: str) -> None:
    """Refuse a listing that would delete too much of what the source had indexed."""
    if not plan.listing_complete or plan.indexed == 0 or plan.missing == 0:
        return
    if plan.seen == 0 and max_fraction < 1.0:
        raise DeletionRefusedError(
            f"the listing of {source_uri} is empty, but {plan.indexed} documents from it are "
            "indexed: the folder may be unmounted, moved or mistyped, or the bucket prefix "
            "wrong. Nothing was changed. If the source really is empty now, confirm with "
            "--max-delete-fraction 1."
        )
    share = plan.missing / plan.indexed
    if share > max_fraction:
        raise DeletionRefusedError(
            f"this run would delete {plan.missing} of the {plan.indexed} documents indexed from "
            f"{source_uri} ({share:.0%}, above max_delete_fraction={max_fraction:g}). Nothing "
            "was changed. Check that the source is complete; if these deletions are intended, "
            "confirm with --max-delete-fraction 1."
        )


def _record_sources(manifest: Manifest) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for doc_id, row in manifest.items():
        src = row.path
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
    verify: bool = False,
) -> None:
    known = by_source.get(entry.rel, [])
    seen.add(entry.rel)  # the file's own marker row
    plan.marker_ids.add(entry.rel)
    marker = manifest.get(entry.rel)
    same = (
        same_object(marker, entry, source.reliable_mtime)
        if marker is not None and marker.status == RECORDS_MARKER and not verify
        else False
    )
    if same is not False and all(manifest[d].status == "ok" for d in known):
        seen.update(known)
        plan.unchanged += len(known)
        if same is None:  # the marker learns the listing's token, without a download
            plan.record_files.append(RecordFile(entry.rel, entry.size, entry.mtime, entry.etag))
        return
    try:
        for rec in source.iter_records(entry):
            _plan_record(rec, entry, manifest, seen, spill, plan)
        plan.record_files.append(RecordFile(entry.rel, entry.size, entry.mtime, entry.etag))
    except DocumentError as exc:
        # the whole record file is unreadable: keep its documents (nothing to compare with)
        seen.update(known)
        plan.marker_ids.discard(entry.rel)  # counted as a failed document instead
        spill.add_for(
            entry,
            doc_id=entry.rel,
            kind="error",
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
        spill.add_for(
            entry,
            doc_id=rec.doc_id,
            kind="error",
            state="retry",
            error=f"line {rec.line}: {rec.error}",
        )
        return
    if rec.doc_id in seen:
        spill.add_for(
            entry,
            doc_id=f"{entry.rel}#{rec.line}",
            kind="error",
            state="retry",
            error=f"line {rec.line}: duplicate id {rec.doc_id!r} (the first one is kept)",
        )
        return
    seen.add(rec.doc_id)
    digest = record_hash(rec.title, rec.text)
    old = manifest.get(rec.doc_id)
    if old is not None and old[3] == "ok" and old[0] == digest:
        if old.path == entry.rel and same_object(old, entry, True):
            plan.unchanged += 1
            return
        # same content, the file around it changed: only the manifest row is refreshed
        spill.add_for(
            entry,
            doc_id=rec.doc_id,
            kind="record",
            state="touch",
            old_hash=old[0],
            content_hash=digest,
        )
        return
    state = "new" if old is None else ("retry" if old[3] != "ok" else "changed")
    spill.add_for(
        entry,
        doc_id=rec.doc_id,
        kind="record",
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
                if row["kind"] == "record":
                    weight = len(row["text"] or "")
                else:  # a touched file is not read
                    weight = 0 if row["state"] == "touch" else (row["size"] or 0)
                if batch and (len(batch) >= batch_docs or size + weight > batch_bytes):
                    yield batch
                    batch, size = [], 0
                batch.append(row)
                size += weight
        if batch:
            yield batch
