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
    #: why the listing was incomplete (then nothing was deleted)
    listing_errors: list[Failure] = Field(default_factory=list)
    #: links to outside the source that were left out (follow_external_links is off)
    skipped_links: int = 0
    #: the index generation written, its status after the run, and whether this run made it
    #: live (a --reindex switch)
    generation: int = 0
    generation_status: str = ""
    switched: bool = False
    #: a reindex builds every source of the live generation before it switches
    waiting_for_sources: list[str] = Field(default_factory=list)
    table_version: int = 0
    #: chunks of the live generation re-embedded from their stored text (a reindex that
    #: changed only the embedding: tasks.backfill)
    backfilled: int = 0
    #: the version tag left on the live generation's tables (`lanceflow rollback --to TAG`)
    tag: str = ""
    #: whether this run loaded the local model's weights (a no-change run does not)
    model_loaded: bool = False
    tokens: int = 0  # tokens sent to a paid embeddings API
    cost_usd: float = 0.0  # their estimated cost at the configured price
    seconds: float = 0.0
    #: wall seconds of the run's stages: 'pipeline' (read, parse, chunk, embed and write the
    #: documents to process), on Ray also 'ray_start' (joining or starting the cluster),
    #: 'ray_stop' (leaving it: a local instance the run started stops before the commit) and
    #: 'commit' (the one table commit and the manifest rows); on Ray, documents too long for
    #: a shard are streamed on the driver after 'commit' and counted in neither; 'indexes':
    #: the index refresh that ends a run (compaction, index builds and folding, pruning),
    #: each step's seconds in the run's log
    stage_seconds: dict[str, float] = Field(default_factory=dict)
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

    def merge(self, other: IngestReport) -> None:
        """Add another report's document and chunk counts and failures to this one."""
        for name in DocumentCounts.model_fields:
            if name != "failed":
                setattr(
                    self.documents,
                    name,
                    getattr(self.documents, name) + getattr(other.documents, name),
                )
        for name in ChunkCounts.model_fields:
            setattr(self.chunks, name, getattr(self.chunks, name) + getattr(other.chunks, name))
        for f in other.failures:
            self.add_failure(f.doc_id, f.error)
        self.failures_not_listed += other.failures_not_listed
        self.documents.failed += other.failures_not_listed

    @property
    def failed_fraction(self) -> float:
        return self.documents.failed / self.documents.seen if self.documents.seen else 0.0
