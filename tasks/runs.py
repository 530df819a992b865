"""One ingest run's live objects and its bookkeeping, without Prefect (the CLI's no-change
check uses these without starting the orchestrator)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tasks.chunking import Chunker
from tasks.embedders.base import Embedder
from tasks.errors import TooManyFailuresError
from tasks.plan import plan_changes
from tasks.report import IngestReport
from tasks.settings import IngestParams
from tasks.sources import Source
from tasks.store import Store, report_json


@dataclass
class IngestRun:
    """Live objects of one run, shared by its tasks in this process."""

    params: IngestParams
    store: Store
    source: Source
    report: IngestReport
    started: float = field(default_factory=time.time)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _embedder: Embedder | None = None
    _chunker: Chunker | None = None

    dry_run: bool = False

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

            self._chunker = make_chunker(self.embedder, self.params.chunking)
        return self._chunker

    def count_usage(self) -> None:
        """Copy the API embedder's token use and cost into the report."""
        emb: Any = self._embedder
        if emb is not None and hasattr(emb, "tokens_used"):
            used = emb.tokens_used - self._tokens_at_start
            self.report.tokens = used
            self.report.cost_usd = round(used * emb.price / 1e6, 6)

    _tokens_at_start: int = 0


def open_run(params: IngestParams, dry_run: bool = False) -> IngestRun:
    """Open the source and the store and refuse a model the table was not built with."""
    store = Store(params.store.uri)
    store.check_model(params.embedder.model, params.embedder.kind)
    if params.embedder.kind == "openai" and not dry_run:
        from tasks.embedding import resolve_api_key

        resolve_api_key(params.embedder)  # a missing key fails here, before any work
    source = Source(params.source)
    report = IngestReport(
        run_id=str(uuid.uuid4()),
        source=params.source.uri,
        table=params.store.uri,
        model=params.embedder.model,
    )
    return IngestRun(params, store, source, report, dry_run=dry_run)


def finish(run: IngestRun, flow_run_id: str | None = None) -> IngestReport:
    """Record the run in the runs table; raise when too many documents failed."""
    report = run.report
    run.count_usage()
    report.seconds = round(time.time() - run.started, 3)
    report.table_version = run.store.version()
    limit = run.params.max_failed_fraction
    too_many = report.documents.failed > 0 and report.failed_fraction > limit
    report.status = "failed" if too_many else "completed"
    run.store.record_run(
        {
            "run_id": report.run_id,
            "flow_run_id": flow_run_id,
            "source": report.source,
            "model": report.model,
            "started_at": run.started_at,
            "seconds": report.seconds,
            "status": report.status,
            "documents_seen": report.documents.seen,
            "documents_failed": report.documents.failed,
            "chunks_embedded": report.chunks.embedded,
            "chunks_written": report.chunks.written,
            "table_version": report.table_version,
            "report": report_json(report.model_dump()),
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
    if not run.store.indexes_current():
        return None
    plan = plan_changes(run.source, run.store.load_manifest())
    try:
        if not plan.nothing_to_do or not plan.listing_complete:
            return None
    finally:
        plan.cleanup()
    run.report.documents.seen = plan.seen
    run.report.documents.unchanged = plan.unchanged
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
    plan = plan_changes(run.source, run.store.load_manifest())
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
                report.count_outcome(o.doc_id, o.state, o.status, o.error)
                if o.status == "ok":
                    for c in o.chunks:
                        texts.setdefault(text_hash(c.text), c.text)
            cached = run.store.cached_vectors(list(texts))
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
