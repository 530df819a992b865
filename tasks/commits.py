"""Chunk rows written as Lance data files first, made visible later in one commit.

Both runners write a batch's chunk rows as new Lance data files (fragments) that no reader
sees yet, and spill the batch's per-document outcomes (no texts, no vectors) to local disk.
A commit then adds every pending fragment, plus the deletion files of the documents they
replace, to the table in ONE Lance transaction: one new table version however many batches it
holds. The documents' manifest rows follow the commit (so a crash in between makes the next
run redo those documents and converge to the same rows).

The Ray runner commits once, after its pipeline. The default runner (ChunkWriter) commits
once at the end of a run, or earlier at checkpoints: when `checkpoint_minutes` passed since
its last commit (a crash then loses at most that much work; the next run skips what was
committed), or after every batch with 0. Data files of a run that never committed are in no
version; Lance's cleanup of old versions (after each run that changed something, and
`lanceflow maintain`) deletes such unreferenced files once they are 7 days old.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tasks.crashpoints import crash_point
from tasks.scratch import scratch_dir

log = logging.getLogger(__name__)

#: manifest rows per documents-table commit after a chunk commit
MANIFEST_ROWS = 4096


def write_fragments(
    rows: pa.Table,
    dataset_uri: str,
    storage_options: dict[str, str] | None,
    data_storage_version: str | None,
) -> list[str]:
    """A batch's rows as new Lance data files of the dataset, not committed: their fragment
    metadata as JSON."""
    from lance.fragment import write_fragments as lance_write

    frags = lance_write(
        rows,
        dataset_uri,
        schema=rows.schema,
        mode="append",
        storage_options=storage_options,
        data_storage_version=data_storage_version,
    )
    return [json.dumps(f.to_json()) for f in frags]


def slim_outcomes(outcomes: Sequence[Any], rows: pa.Table | None) -> None:
    """Drop what the manifest does not need (chunk texts, token ids, the parsed text) from a
    written batch's outcomes, keeping each document's count of written chunks. Long documents
    ('stream') keep theirs: they are processed afterwards."""
    from tasks.parsing import ParsedDocument

    written: dict[str, int] = {}
    if rows is not None:
        for doc_id in rows.column("doc_id").to_pylist():
            written[doc_id] = written.get(doc_id, 0) + 1
    for o in outcomes:
        if o.status != "stream":
            o.chunk_total = written.get(o.doc_id, 0)
            o.chunks = []
        if o.parsed is not None:
            o.parsed = ParsedDocument(o.doc_id, "", o.parsed.title)


def iter_spilled(path: str) -> Iterator[list[Any]]:
    """The outcome lists spilled by a pipeline, one batch at a time."""
    if not path or not os.path.exists(path):
        return
    with open(path, "rb") as fh:
        while True:
            try:
                yield pickle.load(fh)
            except EOFError:
                return


def replaces_old_chunks(o: Any) -> bool:
    """Whether an outcome's written chunks replace the document's chunks in the table (a
    failed read keeps the last good ones; a failed new document has none)."""
    return (
        o.status == "ok"
        or o.partial
        or (o.status == "failed" and not o.keep_chunks and o.state != "new")
    )


def commit_fragments(
    dataset_uri: str,
    fragments: list[str],
    replace_doc_keys: list[str],
    storage_options: dict[str, str] | None,
) -> tuple[int, int]:
    """One commit: the new fragments plus deletion files for the documents they replace, as
    one Lance transaction. Returns (version before, version after)."""
    import lance
    from lance.fragment import FragmentMetadata

    from tasks.store import open_lance, sql_in

    ds = open_lance(dataset_uri, storage_options)
    before = ds.version
    new = [FragmentMetadata.from_json(f) for f in fragments]
    updated: list[Any] = []
    removed: list[int] = []
    if replace_doc_keys and ds.count_rows():
        touched: set[int] = set()
        for i in range(0, len(replace_doc_keys), 1000):
            part = replace_doc_keys[i : i + 1000]
            addr = ds.to_table(columns=[], filter=sql_in("doc_key", part), with_row_address=True)
            touched.update(int(a) >> 32 for a in addr.column("_rowaddr").to_pylist())
        where = None
        for fid in sorted(touched):
            frag: Any = ds.get_fragment(fid)
            if where is None:
                where = " OR ".join(
                    sql_in("doc_key", replace_doc_keys[i : i + 1000])
                    for i in range(0, len(replace_doc_keys), 1000)
                )
            kept = frag.delete(where)
            if kept is None:
                removed.append(fid)
            else:
                updated.append(kept)
    if not new and not updated and not removed:
        return before, before
    if updated or removed:
        op: Any = lance.LanceOperation.Update(
            removed_fragment_ids=removed, updated_fragments=updated, new_fragments=new
        )
    else:
        op = lance.LanceOperation.Append(new)
    done = lance.LanceDataset.commit(
        dataset_uri, op, read_version=before, storage_options=storage_options
    )
    return before, int(done.version)


def replaced_count(
    dataset_uri: str, before: int, keys: list[str], options: dict[str, str] | None
) -> int:
    """Chunks of the replaced documents that the commit removed and did not write again,
    a thousand documents at a time: flat memory."""
    if not keys:
        return 0
    from tasks.store import open_lance, sql_in

    old = open_lance(dataset_uri, options, version=before)
    new = open_lance(dataset_uri, options)
    gone = 0
    for i in range(0, len(keys), 1000):
        where = sql_in("doc_key", keys[i : i + 1000])
        ids_before = set(old.to_table(columns=["chunk_id"], filter=where).column(0).to_pylist())
        ids_after = set(new.to_table(columns=["chunk_id"], filter=where).column(0).to_pylist())
        gone += len(ids_before - ids_after)
    return gone


@dataclass
class Committed:
    """What one commit did."""

    version_before: int = 0
    version_after: int = 0
    fragments: int = 0
    #: long documents found among the spilled outcomes (the Ray runner streams them next)
    streamed: list[Any] = field(default_factory=list)


def commit_spilled(
    run: Any,
    dataset_uri: str | None,
    options: dict[str, str] | None,
    fragments: list[str],
    spill: str,
    chunks: int,
    *,
    replace_old: bool,
) -> Committed:
    """Commit pending fragments (dataset_uri None: the table has no chunks table, so nothing
    to commit or delete), then write the spilled documents' manifest rows and merge the
    counts into run.report. `replace_old`: the table had rows when the run started (the new
    chunks then replace their documents' old ones, and so do failed documents' empty sets)."""
    from tasks.identity import doc_key

    result = Committed(fragments=len(fragments))
    replace: list[str] = []
    if replace_old:
        for outcomes in iter_spilled(spill):
            replace.extend(
                doc_key(run.source_uri, o.doc_id)
                for o in outcomes
                if o.status != "stream" and replaces_old_chunks(o)
            )
    crash_point("before-chunk-commit")
    if dataset_uri is not None and (fragments or replace):
        before, after = commit_fragments(dataset_uri, fragments, replace, options)
        result.version_before, result.version_after = before, after
        crash_point("after-chunk-commit")
        run.store.chunks_table().checkout_latest()
        deleted = replaced_count(dataset_uri, before, replace, options)
        with run.counts_lock:
            run.report.chunks.written += chunks
            run.report.chunks.deleted += deleted
    elif dataset_uri is not None:  # nothing to commit: the table stays at its version
        result.version_before = result.version_after = int(run.store.chunks_table().version)
    pending: list[Any] = []
    for outcomes in iter_spilled(spill):
        for o in outcomes:
            if o.status == "stream":
                result.streamed.append(o)
            else:
                pending.append(o)
        if len(pending) >= MANIFEST_ROWS:
            _manifest(run, pending)
            pending = []
    if pending:
        _manifest(run, pending)
    return result


def _manifest(run: Any, outcomes: list[Any]) -> None:
    from tasks.writing import write_manifest

    per_doc = {o.doc_id: o.chunk_count for o in outcomes}
    # document outcomes only: the chunk counts came from the writes and the commit
    counts = write_manifest(run.store, outcomes, run.source_uri, per_doc)
    with run.counts_lock:
        run.report.merge(counts)


class ChunkWriter:
    """The default runner's writes: each batch's rows become data files at once (in the
    writer thread); the flow commits them with commit() when due() and at the end of the run.

    One batch is added at a time (the pipeline keeps one write in flight), and commit() runs
    after that write has finished, so the pending state needs no more than a lock for the
    counters it shares with the embedder's thread."""

    def __init__(self, run: Any, checkpoint_minutes: float) -> None:
        self.run = run
        self.checkpoint_s = checkpoint_minutes * 60.0
        #: whether the table had chunks when the run started (tasks.commits.commit_spilled)
        self.replace_old = run.store.has_chunks() and run.store.chunks_table().count_rows() > 0
        self._dir = scratch_dir("commit")
        self._spill = os.path.join(self._dir, "outcomes.pickle")
        self._fh: Any = open(self._spill, "wb")  # noqa: SIM115 - closed by commit() / close()
        self._fragments: list[str] = []
        self._chunks = 0
        self._batches = 0
        self._dataset: tuple[str, dict[str, str] | None, str | None] | None = None
        self._columns: list[str] = []
        self._last_commit = time.monotonic()
        self._lock = threading.Lock()

    def _target(self) -> tuple[str, dict[str, str] | None, str | None] | None:
        """(dataset URI, storage options, data file version) of the chunks table, once it
        exists (the first embedded rows create it)."""
        if self._dataset is None and self.run.store.has_chunks():
            from tasks.store import lance_of, table_options, write_uri

            store = self.run.store
            params = self.run.params
            ds = lance_of(store.chunks_table(), store.cache_size)
            options = table_options(params.store.uri, params.store.access) or None
            uri = write_uri(params.store.uri, ds.uri)
            self._columns = ds.schema.names
            self._dataset = (uri, options, ds.data_storage_version)
        return self._dataset

    def add(self, outcomes: Sequence[Any], rows: pa.Table | None) -> None:
        """Write one batch: its rows as data files, its outcomes to the spill file."""
        frags: list[str] = []
        if rows is not None and rows.num_rows:
            target = self._target()
            assert target is not None, "the chunks table is created with the first rows"
            uri, options, file_version = target
            if rows.schema.names != self._columns:  # a backfilled generation's column order
                rows = rows.select(self._columns)
            frags = write_fragments(rows, uri, options, file_version)
        slim_outcomes(outcomes, rows)
        blob = pickle.dumps([o for o in outcomes if o.status != "stream"], protocol=5)
        with self._lock:
            at = self._fh.tell()
            try:
                self._fh.write(blob)
                self._fh.flush()
            except BaseException:
                self._fh.seek(at)  # a retry must not find half a batch in the spill
                self._fh.truncate()
                raise
            self._fragments.extend(frags)
            self._chunks += rows.num_rows if rows is not None else 0
            self._batches += 1
        crash_point("after-chunk-write")

    def due(self) -> bool:
        """Whether a checkpoint commit is due (the end of a run always commits)."""
        with self._lock:
            if not self._batches:
                return False
            return time.monotonic() - self._last_commit >= self.checkpoint_s

    def commit(self, *, final: bool) -> Committed | None:
        """Commit what is pending (one table version) and write its manifest rows."""
        with self._lock:
            if not self._batches:
                return None
            self._fh.close()
            fragments, chunks = self._fragments, self._chunks
            self._fragments, self._chunks, self._batches = [], 0, 0
        target = self._target()
        uri, options = (target[0], target[1]) if target is not None else (None, None)
        done = commit_spilled(
            self.run, uri, options, fragments, self._spill, chunks, replace_old=self.replace_old
        )
        if not final:
            with self._lock:
                self._fh = open(self._spill, "wb")  # noqa: SIM115
                self._last_commit = time.monotonic()
            if done.fragments:
                # the next batches' lookups read the key indexes: keep them covering the rows
                self.run.store.keep_chunk_key_indexes(chunks)
        return done

    def close(self) -> None:
        """Remove the spill (a run that failed before its commit leaves the table as it was)."""
        if not self._fh.closed:
            self._fh.close()
        shutil.rmtree(self._dir, ignore_errors=True)
