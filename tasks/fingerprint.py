"""What built an index: the fingerprint of the embedding and chunking settings.

A table records the fingerprint of every index generation it holds. A run computes the
fingerprint of its own settings before any work (cheaply: the model is not loaded) and refuses
to add to a generation built differently, naming each setting that differs. The embedding part
alone (`embedding_key`) keys the embedding cache: vectors are reused only between generations
whose embedding space is the same, whatever their chunking.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

#: bump when lanceflow's own chunking (offsets, headings, whitespace) changes its output
CHUNKING_VERSION = "2"  # 2: a piece without a letter or digit is no chunk

#: fields that decide the vectors a text gets; the rest decide which texts there are
EMBEDDING_FIELDS = (
    "embedder",
    "model",
    "revision",
    "endpoint",
    "backend",
    "precision",
    "dimension",
    "normalization",
)
CHUNKING_FIELDS = ("tokenizer", "chunker", "chunk_tokens", "overlap", "chunking")


class Fingerprint(BaseModel):
    """The settings an index generation was built with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embedder: str
    model: str
    revision: str
    endpoint: str | None = None
    backend: str
    precision: str
    dimension: int | None = None
    normalization: str = "l2"
    tokenizer: str
    chunker: str
    chunk_tokens: int
    overlap: int
    chunking: str

    def _digest(self, fields: tuple[str, ...]) -> str:
        data = self.model_dump()
        payload = json.dumps({f: data[f] for f in fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    @property
    def embedding_key(self) -> str:
        """Identity of the embedding space (the cache key, with a chunk's text hash)."""
        return self._digest(EMBEDDING_FIELDS)

    @property
    def key(self) -> str:
        """Identity of the whole index: embedding space and chunking."""
        return self._digest(EMBEDDING_FIELDS + CHUNKING_FIELDS)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | None) -> Fingerprint | None:
        if not text:
            return None
        try:
            return cls.model_validate_json(text)
        except ValueError:
            return None


def differences(old: Fingerprint | None, new: Fingerprint) -> list[tuple[str, Any, Any]]:
    """(setting, old value, new value) for each setting that differs.

    The model id is only a name: two ids (an alias, a copy of the folder) with the same
    revision are the same model, so the id differs only when the revision does too.
    """
    if old is None:
        return [("fingerprint", "(not recorded: built by an older lanceflow)", "recorded")]
    a, b = old.model_dump(), new.model_dump()
    out = []
    for name in a:
        if a[name] == b[name]:
            continue
        if name == "model" and a["revision"] == b["revision"]:
            continue
        if name == "dimension" and (a[name] is None or b[name] is None):
            continue  # unknown before the model runs; checked against the vectors instead
        out.append((name, a[name], b[name]))
    return out


def chunker_name(kind: str = "") -> str:
    """What cuts the chunks: for a local model lanceflow's own splitter over one encoding of
    each document, else semantic-text-splitter."""
    if kind == "local":
        return f"lanceflow token-splitter / lanceflow {CHUNKING_VERSION}"
    try:
        version = metadata.version("semantic-text-splitter")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"semantic-text-splitter {version} / lanceflow {CHUNKING_VERSION}"


def compute(embedder_settings: Any, chunking: Any) -> Fingerprint:
    """The fingerprint of a run's settings, without loading the model (only its tokenizer)."""
    whole = chunking.strategy == "whole"
    if embedder_settings.kind == "openai":
        from tasks.embedders.openai import MODEL_DIMENSIONS, normalized_endpoint
        from tasks.settings import DEFAULT_API_CHUNK_TOKENS
        from tasks.tokens import encoding_name_for

        model = embedder_settings.model
        return Fingerprint(
            embedder="openai",
            model=model,
            revision=f"api:{model}",
            endpoint=normalized_endpoint(embedder_settings.base_url),
            backend="api",
            precision="float32",
            dimension=embedder_settings.dimensions or MODEL_DIMENSIONS.get(model),
            tokenizer=f"tiktoken:{encoding_name_for(model)}",
            chunker=chunker_name(),
            chunk_tokens=chunking.chunk_tokens or DEFAULT_API_CHUNK_TOKENS,
            overlap=0 if whole else chunking.overlap,
            chunking=chunking.strategy,
        )
    if embedder_settings.kind == "hash":
        from tasks.embedders.hashing import HashEmbedder

        emb = HashEmbedder.from_settings(embedder_settings)
        return Fingerprint(
            embedder="hash",
            model=emb.model_id,
            revision=emb.revision,
            backend="numpy",
            precision="float32",
            dimension=emb.dimension,
            tokenizer="hash-words",
            chunker=chunker_name(),
            chunk_tokens=chunking.chunk_tokens or emb.max_tokens,
            overlap=0 if whole else chunking.overlap,
            chunking=chunking.strategy,
        )
    from tasks.embedders.local import get_local_embedder

    local = get_local_embedder(
        embedder_settings.model,
        device=embedder_settings.device,
        backend=embedder_settings.backend,
        batch_size=embedder_settings.batch_size,
    )
    device, backend = local.planned()
    precision = (
        "int8"
        if backend == "onnx-int8"
        else ("fp32" if backend == "onnx" or device != "cuda" else "fp16")
    )
    return Fingerprint(
        embedder="local",
        model=local.canonical_id,
        revision=local.revision,
        backend=backend if backend.startswith("onnx") else f"torch-{device}",
        precision=precision,
        dimension=local.planned_dimension,
        tokenizer=f"model:{local.revision}",
        chunker=chunker_name("local"),
        chunk_tokens=chunking.chunk_tokens or local.max_tokens,
        overlap=0 if whole else chunking.overlap,
        chunking=chunking.strategy,
    )
