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
from tasks.errors import ConfigurationError, TooManyFailuresError
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

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            e = self.params.embedder
            from tasks.embedders.local import get_local_embedder

            self._embedder = get_local_embedder(
                e.model, device=e.device, backend=e.backend, batch_size=e.batch_size
            )
        return self._embedder

    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            emb: Any = self.embedder
            limit = emb.max_tokens
            size = self.params.chunking.chunk_tokens or limit
            if size > limit:
                raise ConfigurationError(
                    f"chunk_tokens={size} exceeds what {emb.model_id} reads ({limit} tokens plus "
                    "its special tokens); longer chunks would be truncated silently. Lower "
                    "--chunk-tokens."
                )
            self._chunker = Chunker(
                emb.tokenizer,
                size,
                self.params.chunking.overlap,
                whole=self.params.chunking.strategy == "whole",
            )
        return self._chunker


def open_run(params: IngestParams) -> IngestRun:
    """Open the source and the store and refuse a model the table was not built with."""
    store = Store(params.store.uri)
    store.check_model(params.embedder.model, params.embedder.kind)
    source = Source(params.source)
    report = IngestReport(
        run_id=str(uuid.uuid4()),
        source=params.source.uri,
        table=params.store.uri,
        model=params.embedder.model,
    )
    return IngestRun(params, store, source, report)


def finish(run: IngestRun, flow_run_id: str | None = None) -> IngestReport:
    """Record the run in the runs table; raise when too many documents failed."""
    report = run.report
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
