"""Embedding a batch of chunks: the cache first, then the model for what is left.

Vectors are reused by chunk-text hash from the table itself (which records its one model), so
identical chunks are never embedded twice: duplicate files, renamed files and the unchanged
chunks of an edited document all come from the cache.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.chunking import Chunker
from tasks.documents import DocOutcome
from tasks.embedders.base import Embedder
from tasks.errors import ConfigurationError, PartialEmbeddingError
from tasks.identity import chunk_id, doc_key, text_hash
from tasks.settings import DEFAULT_API_CHUNK_TOKENS, ChunkSettings, EmbedderSettings
from tasks.store import Store, chunks_schema, cjk_text, vectors_to_arrow

log = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    rows: pa.Table | None
    embedded: int
    cached: int


#: texts per model call: a failure loses at most this much work (the rest is in the memo)
SUB_BATCH = 512


def embed_outcomes(
    outcomes: Sequence[DocOutcome],
    embedder: Embedder,
    store: Store,
    embedder_kind: str,
    source_uri: str,
    *,
    cache_tables: Sequence[str] = (),
    memo: dict[str, np.ndarray] | None = None,
    owners: dict[str, int] | None = None,
    owner: int = 0,
    recent: OrderedDict[str, np.ndarray] | None = None,
) -> EmbeddedBatch:
    """Vectors for every chunk of the batch, as the Arrow rows to write.

    Looked up first in the table (this generation, and `cache_tables`: generations of the same
    embedding space), then in `memo` (vectors this run already computed but has not written:
    a retried task does not send them again), then computed in sub-batches that land in the
    memo as each finishes. With `owners`, the memo records which batch (`owner`) computed each
    vector; another batch's count as reused (cached), not embedded. `recent`: vectors of
    chunks this run wrote but has not committed (found there, they count as cached; a hit
    moves to the end, so a text that keeps recurring stays).
    """
    spans = [(o, c) for o in outcomes if o.status == "ok" for c in o.chunks]
    if not spans:
        return EmbeddedBatch(None, 0, 0)
    memo = {} if memo is None else memo
    hashes = [text_hash(c.text) for _, c in spans]
    cached = store.cached_vectors(hashes, cache_tables)
    if recent:
        for h in hashes:
            if h not in cached and h in recent:
                cached[h] = recent[h]
                recent.move_to_end(h)
    missing: dict[str, str] = {}
    ids: dict[str, Any] = {}
    for h, (_, c) in zip(hashes, spans, strict=True):
        if h not in cached and h not in missing:
            missing[h] = c.text
            if c.token_ids is not None:
                ids[h] = c.token_ids
    embed_ids = getattr(embedder, "embed_ids", None)
    vectors: dict[str, np.ndarray] = dict(cached)
    rejected: dict[str, str] = {}
    todo = [h for h in missing if h not in memo]
    for start in range(0, len(todo), SUB_BATCH):
        keys = todo[start : start + SUB_BATCH]
        try:
            if embed_ids is not None and all(h in ids for h in keys):
                fresh = embed_ids([missing[h] for h in keys], [ids[h] for h in keys])
            else:
                fresh = embedder.embed([missing[h] for h in keys])
        except PartialEmbeddingError as exc:
            fresh = exc.vectors
            rejected.update({keys[i]: why for i, why in exc.failed.items()})
        for h, v in zip(keys, fresh, strict=True):
            if h not in rejected:
                memo[h] = v
                if owners is not None:
                    owners[h] = owner
    for h in missing:
        if h not in rejected:
            vectors[h] = memo[h]
    for _, c in spans:  # embedded: the ids are not needed again (a retry reads the text)
        c.token_ids = None
    if rejected:
        # the document keeps its other chunks and is marked failed, so the next run retries
        # only the rejected chunk (the others come from the cache)
        for o in outcomes:
            bad = [c for c in o.chunks if text_hash(c.text) in rejected]
            if bad and o.status == "ok":
                o.status, o.partial = "failed", True
                o.error = f"chunk {bad[0].index}: {rejected[text_hash(bad[0].text)]}"
        kept = [(s, h) for s, h in zip(spans, hashes, strict=True) if h not in rejected]
        spans = [s for s, _ in kept]
        hashes = [h for _, h in kept]
        if not spans:
            return EmbeddedBatch(None, len(missing) - len(rejected), 0)
    matrix = np.stack([vectors[h] for h in hashes]).astype(np.float32, copy=False)
    dim = int(matrix.shape[1])
    schema = chunks_schema(dim, embedder.model_id, embedder_kind)
    keys_of = {o.doc_id: doc_key(source_uri, o.doc_id) for o in outcomes}
    columns = {
        "chunk_id": [
            chunk_id(keys_of[o.doc_id], c.index, h) for (o, c), h in zip(spans, hashes, strict=True)
        ],
        "doc_key": [keys_of[o.doc_id] for o, _ in spans],
        "doc_id": [o.doc_id for o, _ in spans],
        "source_uri": [source_uri] * len(spans),
        "chunk_index": [c.index for _, c in spans],
        "text": [c.text for _, c in spans],
        "text_cjk": [cjk_text(c.text) for _, c in spans],
        "text_hash": hashes,
        "doc_version": [o.content_hash for o, _ in spans],
        "vector": vectors_to_arrow(matrix),
        "title": [o.title for o, _ in spans],
        "heading": [c.heading for _, c in spans],
        "path": [o.source for o, _ in spans],
        "char_start": [c.char_start for _, c in spans],
        "char_end": [c.char_end for _, c in spans],
        "page_start": [c.page_start for _, c in spans],
        "page_end": [c.page_end for _, c in spans],
    }
    arrays = [
        columns[f.name]
        if isinstance(columns[f.name], pa.Array)
        else pa.array(columns[f.name], f.type)
        for f in schema
    ]
    table = pa.Table.from_arrays(arrays, schema=schema)
    embedded = len(missing) - len(rejected)
    if owners is not None:
        # vectors another batch computed and has not committed yet are reuse, not new work
        embedded -= sum(1 for h in missing if h not in rejected and owners.get(h, owner) != owner)
    return EmbeddedBatch(table, embedded, len(spans) - embedded)


def build_embedder(
    settings: EmbedderSettings, require_key: bool = True, api_key: Any = None
) -> Embedder:
    """The embedder the settings ask for; one per process and settings. `api_key` (a
    SecretStr): an OpenAI key resolved elsewhere (a Ray worker gets the driver's)."""
    if settings.kind == "hash":
        from tasks.embedders.hashing import HashEmbedder

        return HashEmbedder.from_settings(settings)
    if settings.kind == "local":
        from tasks.embedders.local import get_local_embedder

        return get_local_embedder(
            settings.model,
            device=settings.device,
            backend=settings.backend,
            batch_size=settings.batch_size,
        )
    from tasks.embedders.openai import get_openai_embedder

    if api_key is not None:
        return get_openai_embedder(settings, api_key.get_secret_value())
    return get_openai_embedder(settings, resolve_api_key(settings, required=require_key))


def prepare_model(settings: EmbedderSettings, *, wait_for_graph: bool = False) -> bool:
    """Start a local model's one-time ONNX export in a child process (start_onnx_export), for
    a run about to embed: whether one started. Nothing for other embedders and backends, or
    when the export is cached; a failure here only logs, and the model's load reports it.
    `wait_for_graph`: as start_onnx_export's (a caller that has not loaded the table's
    libraries yet, such as the CLI, keeps the export's peak apart from its own)."""
    if settings.kind != "local":
        return False
    from tasks.embedders.local import get_local_embedder, start_onnx_export

    try:
        local = get_local_embedder(
            settings.model,
            device=settings.device,
            backend=settings.backend,
            batch_size=settings.batch_size,
        )
        backend = local.planned()[1]
        if not backend.startswith("onnx"):
            return False
        return start_onnx_export(
            local.model_dir, quantized=backend == "onnx-int8", wait_for_graph=wait_for_graph
        )
    except Exception as exc:  # the load, which runs next, says what is wrong
        log.debug("no early ONNX export: %s", exc)
        return False


def resolved_api_key(settings: EmbedderSettings) -> Any:
    """The OpenAI key as a SecretStr, to hand to remote workers (None for other embedders)."""
    if settings.kind != "openai":
        return None
    from pydantic import SecretStr

    key = resolve_api_key(settings)
    return SecretStr(key) if key else None


def resolve_api_key(settings: EmbedderSettings, required: bool = True) -> str | None:
    """The API key from a Prefect Secret block or OPENAI_API_KEY; never logged."""
    import os

    key: str | None = None
    if settings.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            block: Any = Secret.load(settings.api_key_secret)
            key = str(block.get())
        except ValueError as exc:
            raise ConfigurationError(
                f"no Prefect Secret block named {settings.api_key_secret!r}: create it in the UI "
                "or with Secret(value=...).save(name)"
            ) from exc
    else:
        key = os.environ.get("OPENAI_API_KEY") or None
    if required and not key:
        raise ConfigurationError(
            "no OpenAI API key: set OPENAI_API_KEY, or name a Prefect Secret block with "
            "--api-key-secret (for an OpenAI-compatible server without keys, set any value)"
        )
    return key


def make_chunker(embedder: Embedder, chunking: ChunkSettings, token_ids: bool = True) -> Chunker:
    """A chunker counting in the embedder's own tokens. With `token_ids`, and where the
    model reads ids (ONNX, or torch for a transformer + pooling model), each chunk also
    carries its input ids (tokenise once)."""
    from tasks.embedders.hashing import HashEmbedder
    from tasks.embedders.openai import OpenAIEmbedder

    whole = chunking.strategy == "whole"
    if isinstance(embedder, HashEmbedder):
        size = chunking.chunk_tokens or embedder.max_tokens
        return Chunker(None, size, chunking.overlap, whole=whole, words=True)
    if isinstance(embedder, OpenAIEmbedder):
        from tasks.tokens import encoding_name_for

        size = chunking.chunk_tokens or DEFAULT_API_CHUNK_TOKENS
        # inputs above the per-input limit are split (or refused) by the embedder itself
        tiktoken_model = {"o200k_base": "gpt-4o"}.get(
            encoding_name_for(embedder.model_id), "text-embedding-3-small"
        )
        return Chunker(None, size, chunking.overlap, whole=whole, tiktoken_model=tiktoken_model)
    from tasks.embedders.local import torch_reads_ids

    emb: Any = embedder
    limit = emb.max_tokens
    size = chunking.chunk_tokens or limit
    if size > limit:
        raise ConfigurationError(
            f"chunk_tokens={size} exceeds what {emb.model_id} reads ({limit} tokens plus its "
            "special tokens); longer chunks would be truncated silently. Lower --chunk-tokens."
        )
    # tokenise once: the chunker encodes each document once, in the parse stage (in parallel
    # threads), counts its chunks from that encoding and, where the model reads input ids
    # (ONNX; torch for a transformer + pooling model), hands the model each chunk's slice
    backend = emb.requested_backend
    if backend == "auto":
        backend = emb.planned()[1]
    reads_ids = token_ids and (
        backend.startswith("onnx") or (backend == "torch" and torch_reads_ids(emb.layout))
    )
    encoder = emb.token_ids if reads_ids else None
    template = emb.input_template if reads_ids else None
    return Chunker(
        emb.tokenizer, size, chunking.overlap, whole=whole, encoder=encoder, template=template
    )
