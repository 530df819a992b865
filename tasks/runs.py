"""One ingest run's live objects and its bookkeeping, without Prefect (the CLI's no-change
check uses these without starting the orchestrator)."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from tasks import generations
from tasks.chunking import Chunker
from tasks.embedders.base import Embedder
from tasks.errors import IndexDriftError, TooManyFailuresError
from tasks.fingerprint import Fingerprint, differences
from tasks.generations import Generation
from tasks.memory import WRITE_CACHE_MB
from tasks.plan import Plan, plan_changes
from tasks.report import IngestReport
from tasks.settings import IngestParams
from tasks.sources import Source
from tasks.storage import redact_uri
from tasks.store import CHUNKS, Store, TableModel, open_store, report_json

log = logging.getLogger(__name__)

#: vectors of written, not yet committed chunks kept for reuse within a run (IngestRun.recent)
RECENT_VECTOR_MB = 16


@dataclass
class IngestRun:
    """Live objects of one run, shared by its tasks in this process."""

    params: IngestParams
    store: Store  # bound to the generation this run writes
    source: Source
    report: IngestReport
    fingerprint: Fingerprint
    target: Generation
    live: Generation | None
    #: chunks tables of other generations in the same embedding space (the cache reads them)
    cache_tables: tuple[str, ...] = ()
    #: vectors computed but not yet written (a retried embed task reuses them)
    memo: dict[str, Any] = field(default_factory=dict)
    #: which batch computed each memo entry (tasks.embedding.embed_outcomes)
    memo_owners: dict[str, int] = field(default_factory=dict)
    #: text hashes of batches whose chunks are written (the writer may run beside the
    #: embedder): moved from the memo to `recent` before the next embedding looks anything up
    committed: queue.SimpleQueue[list[str]] = field(default_factory=queue.SimpleQueue)
    #: vectors of written chunks, most recent last, bounded (see embed()): until their
    #: commit the table's cache cannot find them, and a text that recurs across batches (a
    #: footer, a disclaimer) is not embedded again
    recent: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    _recent_bytes: int = 0
    #: the report's counters are updated by the embedder and the writer, in two threads
    counts_lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.time)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _embedder: Embedder | None = None
    _chunker: Chunker | None = None

    dry_run: bool = False

    @property
    def source_uri(self) -> str:
        return self.source.uri

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from tasks.embedding import build_embedder

            self._embedder = build_embedder(self.params.embedder, require_key=not self.dry_run)
            self._tokens_at_start = getattr(self._embedder, "tokens_used", 0)
        return self._embedder

    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            from tasks.embedding import make_chunker

            # a dry run embeds nothing: its chunks need no token ids
            self._chunker = make_chunker(
                self.embedder, self.params.chunking, token_ids=not self.dry_run
            )
        return self._chunker

    def count_usage(self) -> None:
        """Copy the API embedder's token use and cost into the report."""
        emb: Any = self._embedder
        if emb is not None and hasattr(emb, "tokens_used"):
            used = emb.tokens_used - self._tokens_at_start
            self.report.tokens = used
            self.report.cost_usd = round(used * emb.price / 1e6, 6)

    def embed(self, outcomes: Any) -> Any:
        """A batch's chunk rows (tasks.embedding.embed_outcomes with this run's cache and
        memo); the chunks table is created, and its dimension checked, on the first rows."""
        from tasks.embedding import embed_outcomes
        from tasks.errors import ModelMismatchError

        # a batch's vectors move from the memo to `recent` once written: it holds
        # RECENT_VECTOR_MB, or the last written batch's new vectors twice if that is more, so
        # a text first seen in that batch is still there when the next one is drained
        limit = RECENT_VECTOR_MB * 2**20
        while not self.committed.empty():  # those vectors are written now
            again: list[str] = []
            fresh = 0
            for h in self.committed.get_nowait():
                v = self.memo.pop(h, None)
                self.memo_owners.pop(h, None)
                if h in self.recent:
                    again.append(h)
                elif v is not None:
                    v = np.array(v, copy=True)  # not a view pinning its whole sub-batch
                    self.recent[h] = v
                    self._recent_bytes += v.nbytes
                    fresh += v.nbytes
            for h in again:  # a text that recurs goes behind the batch's new ones: it stays
                self.recent.move_to_end(h)
            limit = max(limit, 2 * fresh)
        while self._recent_bytes > limit:
            _, v = self.recent.popitem(last=False)
            self._recent_bytes -= v.nbytes
        batch = embed_outcomes(
            outcomes,
            self.embedder,
            self.store,
            self.params.embedder.kind,
            self.source_uri,
            cache_tables=self.cache_tables,
            memo=self.memo,
            owners=self.memo_owners,
            owner=id(outcomes),
            recent=self.recent,
        )
        if batch.rows is not None:
            dim = batch.rows.schema.field("vector").type.list_size
            expected = self.fingerprint.dimension
            if expected is not None and expected != dim:
                raise ModelMismatchError(
                    f"{self.fingerprint.model} gives {dim}-dimensional vectors, not the "
                    f"{expected} its configuration promised: pass --reindex to rebuild"
                )
            self.store.check_dimension(self.fingerprint.model, dim)
            if not self.store.has_chunks():
                model = TableModel(self.fingerprint.model, dim, self.params.embedder.kind)
                self.store.chunks(model)
        return batch

    def persist_target(self) -> None:
        """Write the generation this run builds into the generations table (once)."""
        if self.live is not None and not self.live.persisted:
            (self.live,) = generations.save(self.store.db, self.live)  # adopted legacy tables
        if not self.target.persisted:
            (self.target,) = generations.save(self.store.db, self.target)
            if self.target.status == generations.LIVE:
                self.live = self.target
            self.store = self.store.at(self.target)

    _tokens_at_start: int = 0


def _drift_message(uri: str, diffs: list[tuple[str, Any, Any]], live: Generation | None) -> str:
    if diffs and diffs[0][0] == "fingerprint":
        return (
            f"the index at {uri!r} was built by an older lanceflow that did not record its "
            "settings, so a run cannot tell whether yours match. Pass --reindex once: it "
            "rebuilds the index with your settings beside the old one (search keeps answering "
            "from the old one until the atomic switch), and records them."
        )
    lines = "\n".join(f"  {name}: {old!r} -> {new!r}" for name, old, new in diffs)
    number = live.number if live else 1
    return (
        f"the index at {uri!r} (generation {number}) was built with other settings:\n{lines}\n"
        "Mixing them would leave the table different from a clean build. Either restore the "
        "old settings, or pass --reindex to rebuild with the new ones beside the live index "
        "(search keeps answering meanwhile; the switch is atomic), or write to a new --table."
    )


def choose_generation(
    store: Store, gens: list[Generation], fp: Fingerprint, reindex: bool
) -> tuple[Generation, Generation | None]:
    """The generation a run with fingerprint `fp` writes, and the live one.

    Same settings as the live generation: the live one. Other settings: refused with the
    differences, unless `reindex`, which resumes the build with these settings or plans a new
    one (written to the table only once the run passes its checks). `gens`: the table's
    generations, as store.generations() lists them.
    """
    live = generations.live(gens)
    if live is None and store.has(CHUNKS):
        # a table from before generations: adopt it as generation 1 with no fingerprint
        chunks, documents = generations.table_names(1)
        live = Generation(1, generations.LIVE, None, chunks, documents, persisted=False)
        gens = [live]
    if live is None:
        return generations.planned(1, fp, generations.LIVE), None
    if live.key == fp.key:
        return live, live
    diffs = differences(live.fingerprint, fp)
    if not diffs:
        return live, live  # the same model under another name (same revision)
    if not reindex:
        raise IndexDriftError(_drift_message(store.uri, diffs, live), diffs)
    building = next((g for g in gens if g.status == generations.BUILDING and g.key == fp.key), None)
    if building is not None:
        log.info("resuming the build of generation %d", building.number)
        return building, live
    number = max(g.number for g in gens) + 1
    return generations.planned(number, fp, generations.BUILDING), live


def open_run(params: IngestParams, dry_run: bool = False) -> IngestRun:
    """Open the source and the store; refuse settings the index was not built with."""
    from tasks import fingerprint as fingerprints

    if params.embedder.kind == "openai" and not dry_run:
        from tasks.embedding import resolve_api_key

        resolve_api_key(params.embedder)  # a missing key fails here, before any work
    # a run's own, smaller Lance caches (tasks.memory.WRITE_CACHE_MB)
    store = open_store(params.store, cache_mb=WRITE_CACHE_MB)
    fp = fingerprints.compute(params.embedder, params.chunking)
    gens = store.generations()
    target, live = choose_generation(store, gens, fp, params.reindex)
    source = Source(params.source)
    report = IngestReport(
        run_id=str(uuid.uuid4()),
        source=source.uri,
        table=redact_uri(params.store.uri),
        model=fp.model,
        generation=target.number,
        generation_status=target.status,
    )
    cache = tuple(
        g.chunks_table
        for g in gens
        if g.embedding_key == fp.embedding_key and g.number != target.number
    )
    return IngestRun(
        params,
        store.at(target),
        source,
        report,
        fp,
        target,
        live,
        cache_tables=cache,
        dry_run=dry_run,
    )


def plan_run(run: IngestRun) -> Plan:
    """List the source against this source's manifest, then refuse too many deletions.

    A reindex compares the listing with the *live* generation too: a build from an emptied
    source must not become the live index.
    """
    from tasks.plan import check_deletions

    baseline: set[str] | None = None
    if run.live is not None and run.target.number != run.live.number:
        baseline = set(run.store.at(run.live).load_manifest(run.source_uri))
    plan = plan_changes(
        run.source,
        run.store.load_manifest(run.source_uri),
        verify=run.params.verify,
        baseline=baseline,
    )
    try:
        check_deletions(plan, run.params.max_delete_fraction, run.source_uri)
    except Exception:
        plan.cleanup()
        raise
    return plan


def complete_generation(run: IngestRun, ok: bool) -> bool:
    """Record that this run's source is built into its generation; when a reindexed
    generation now has every source the live one has, switch to it (one commit) and drop
    generations past the retention setting. Returns whether it switched."""
    from tasks.crashpoints import crash_point

    if not ok or not run.report.listing_complete:
        return False
    target = generations.with_source(run.target, run.source_uri)
    if target.status != generations.BUILDING:
        if target != run.target:
            (run.target,) = generations.save(run.store.db, target)
        return False
    # every source with documents in the live generation must be in the new one
    needed = set(run.store.at(run.live).sources()) if run.live is not None else set()
    waiting = sorted(needed - set(target.sources))
    if waiting:
        (run.target,) = generations.save(run.store.db, target)
        run.report.waiting_for_sources = waiting
        log.warning(
            "generation %d is built for %s; it goes live once these sources are rebuilt too "
            "(run `lanceflow ingest SOURCE --reindex` for each): %s",
            target.number,
            run.source_uri,
            ", ".join(waiting),
        )
        return False
    crash_point("before-switch")
    run.target = generations.switch(run.store.db, target, run.live)
    run.live = run.target
    crash_point("after-switch")
    generations.drop_old(run.store.db, run.params.store.keep_generations)
    run.report.generation_status = run.target.status
    run.report.switched = True
    return True


def stream_one(run: IngestRun, outcome: Any) -> IngestReport:
    """One long document, a segment at a time; returns its counts (tasks.streaming)."""
    from tasks.identity import doc_key
    from tasks.streaming import stream_document
    from tasks.writing import write_batch

    counts = IngestReport()
    key = doc_key(run.source_uri, outcome.doc_id)
    written = 0
    first_failure: list[str] = []

    def write_segment(o: Any) -> None:
        nonlocal written
        o.status = "ok"
        batch = run.embed([o])
        if o.status == "failed" and not first_failure:
            first_failure.append(o.error or "failed")  # a chunk the API rejected
        if batch.rows is not None:
            if not written and o.content_hash:
                run.store.delete_version(key, o.content_hash)  # an interrupted attempt's rows
            run.store.append_chunks(batch.rows)
            written += batch.rows.num_rows
        counts.chunks.embedded += batch.embedded
        counts.chunks.cached += batch.cached
        if batch.rows is not None:  # this segment's vectors are in the table now
            for h in batch.rows.column("text_hash").to_pylist():
                run.memo.pop(h, None)
                run.memo_owners.pop(h, None)

    def finish_document(o: Any) -> None:
        if o.status == "ok" and first_failure:
            o.status, o.partial, o.error = "failed", True, first_failure[0]
        if o.status == "ok" or o.partial:
            counts.chunks.deleted += run.store.delete_other_versions(key, o.content_hash)
            counts.chunks.written += written
        elif o.status == "failed" and not o.keep_chunks and o.state != "new":
            counts.chunks.deleted += run.store.delete_other_versions(key, "")  # unparseable now
        o.chunks = []
        doc_counts = write_batch(run.store, [o], None, run.source_uri, streamed_chunks=written)
        counts.documents = doc_counts.documents
        counts.failures = doc_counts.failures

    max_bytes = int(run.params.source.max_file_mb * 2**20)
    try:
        stream_document(outcome, run.source, run.chunker, max_bytes, write_segment, finish_document)
    except BaseException:
        # an error the document's own handling does not take (an embedding request that
        # failed every try, a lost connection): the task's retry streams it again from the
        # start, its first write dropping what this attempt wrote (delete_version). Without
        # this the retry would find it 'ok' and skip it, with no manifest row
        outcome.status, outcome.chunks = "stream", []
        raise
    return counts


def finish(run: IngestRun, flow_run_id: str | None = None) -> IngestReport:
    """Record the run in the runs table; raise when too many documents failed."""
    report = run.report
    run.count_usage()
    report.seconds = round(time.time() - run.started, 3)
    report.table_version = run.store.version()
    report.model_loaded = bool(getattr(run._embedder, "loaded", False))
    limit = run.params.max_failed_fraction
    too_many = report.documents.failed > 0 and report.failed_fraction > limit
    report.status = "failed" if too_many else "completed"
    if not too_many and report.generation_status == generations.LIVE:
        from tasks.versions import tag_version

        report.tag = tag_version(run.store, report.run_id)
    run.store.record_run(
        {
            "run_id": report.run_id,
            "flow_run_id": flow_run_id,
            "source": report.source,
            "model": report.model,
            "generation": run.target.number,
            "started_at": run.started_at,
            "seconds": report.seconds,
            "status": report.status,
            "documents_seen": report.documents.seen,
            "documents_failed": report.documents.failed,
            "chunks_embedded": report.chunks.embedded,
            "chunks_written": report.chunks.written,
            "table_version": report.table_version,
            "report": report_json(report.model_dump()),
            "tag": report.tag or None,
        }
    )
    if too_many:
        raise TooManyFailuresError(
            f"{report.documents.failed} of {report.documents.seen} documents failed "
            f"({report.failed_fraction:.0%}, above max_failed_fraction={limit:g}); see the "
            "failures in the run report and the documents table",
            report,
        )
    return report


def quick_check(params: IngestParams) -> IngestReport | None:
    """Without Prefect or the model: when nothing changed and the indexes are current, record
    the run and return its report; else None (the flow has work to do)."""
    run = open_run(params)
    target = run.target
    if (
        target.status != generations.LIVE
        or not target.persisted
        or run.source_uri not in target.sources
        or not run.store.indexes_current()
    ):
        return None
    plan = plan_run(run)
    try:
        if not plan.nothing_to_do or not plan.listing_complete:
            return None
    finally:
        plan.cleanup()
    run.report.documents.seen = plan.seen
    run.report.documents.unchanged = plan.unchanged
    run.report.skipped_links = len(run.source.skipped_links)
    run.report.orchestrated = False
    return finish(run)


def dry_run(params: IngestParams) -> IngestReport:
    """What a run would do, without writing or calling the embeddings API: documents,
    chunks, the tokens that would be sent (the cache is honoured) and their estimated cost."""
    from tasks.documents import chunk_outcomes, read_and_parse
    from tasks.identity import text_hash
    from tasks.plan import iter_work

    run = open_run(params, dry_run=True)
    report = run.report
    plan = plan_changes(run.source, run.store.load_manifest(run.source_uri), verify=params.verify)
    report.documents.seen = plan.seen
    report.documents.unchanged = plan.unchanged
    report.documents.deleted = len(plan.deleted_ids)
    max_bytes = int(params.source.max_file_mb * 2**20)
    emb: Any = run.embedder
    seen_hashes: set[str] = set()
    try:
        for items in iter_work(plan, params.batch_docs, int(params.batch_mb * 2**20)):
            outcomes = read_and_parse(items, run.source, max_bytes)
            chunk_outcomes(outcomes, run.chunker)
            texts: dict[str, str] = {}
            for o in outcomes:
                if o.status == "stream":
                    from tasks.streaming import chunk_segments

                    o.status = "ok"
                    for spans, _title in chunk_segments(run.source, o.path, o.doc_id, run.chunker):
                        o.chunks.extend(spans)  # a dry run holds them: it writes nothing
                report.count_outcome(o.doc_id, o.state, o.status, o.error)
                if o.status == "ok":
                    for c in o.chunks:
                        texts.setdefault(text_hash(c.text), c.text)
            cached = run.store.cached_vectors(list(texts), run.cache_tables)
            fresh = [t for h, t in texts.items() if h not in cached and h not in seen_hashes]
            seen_hashes.update(texts)
            total = sum(len(o.chunks) for o in outcomes if o.status == "ok")
            report.chunks.embedded += len(fresh)
            report.chunks.cached += total - len(fresh)
            report.tokens += sum(_count_tokens(emb, fresh))
    finally:
        plan.cleanup()
    report.cost_usd = round(report.tokens * getattr(emb, "price", 0.0) / 1e6, 6)
    report.seconds = round(time.time() - run.started, 3)
    report.status = "dry-run"
    return report


def _count_tokens(emb: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    if hasattr(emb, "count_tokens"):
        return list(emb.count_tokens(texts))
    return [len(e.ids) for e in emb.tokenizer.encode_batch(texts)]
