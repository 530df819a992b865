"""The run report: what an ingest run did, as a typed model (printed by `--json`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

MAX_FAILURES_LISTED = 1_000


class DocumentCounts(BaseModel):
    seen: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0


class ChunkCounts(BaseModel):
    embedded: int = 0
    cached: int = 0
    written: int = 0
    deleted: int = 0


class Failure(BaseModel):
    doc_id: str
    error: str


class IngestReport(BaseModel):
    run_id: str = ""
    source: str = ""
    table: str = ""
    model: str = ""
    documents: DocumentCounts = Field(default_factory=DocumentCounts)
    chunks: ChunkCounts = Field(default_factory=ChunkCounts)
    failures: list[Failure] = Field(default_factory=list)
    failures_not_listed: int = 0
    listing_complete: bool = True
    table_version: int = 0
    tokens: int = 0  # tokens sent to a paid embeddings API
    cost_usd: float = 0.0  # their estimated cost at the configured price
    seconds: float = 0.0
    orchestrated: bool = True
    status: str = "completed"

    def add_failure(self, doc_id: str, error: str) -> None:
        self.documents.failed += 1
        if len(self.failures) < MAX_FAILURES_LISTED:
            self.failures.append(Failure(doc_id=doc_id, error=error))
        else:
            self.failures_not_listed += 1

    def count_outcome(self, doc_id: str, state: str, status: str, error: str | None) -> None:
        """Count one processed document: unchanged content, a failure, or new/changed."""
        if status == "touch":
            self.documents.unchanged += 1
        elif status == "failed":
            self.add_failure(doc_id, error or "failed")
        elif state == "new":
            self.documents.new += 1
        else:
            self.documents.changed += 1

    @property
    def failed_fraction(self) -> float:
        return self.documents.failed / self.documents.seen if self.documents.seen else 0.0
