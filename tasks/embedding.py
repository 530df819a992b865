"""Embedding a batch of chunks: the cache first, then the model for what is left.

Vectors are reused by chunk-text hash from the table itself (which records its one model), so
identical chunks are never embedded twice: duplicate files, renamed files and the unchanged
chunks of an edited document all come from the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tasks.documents import DocOutcome
from tasks.embedders.base import Embedder
from tasks.identity import chunk_id, text_hash
from tasks.store import Store, chunks_schema, cjk_text, vectors_to_arrow

log = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    rows: pa.Table | None
    embedded: int
    cached: int


def embed_outcomes(
    outcomes: Sequence[DocOutcome], embedder: Embedder, store: Store, embedder_kind: str
) -> EmbeddedBatch:
    """Vectors for every chunk of the batch, as the Arrow rows to write."""
    spans = [(o, c) for o in outcomes if o.status == "ok" for c in o.chunks]
    if not spans:
        return EmbeddedBatch(None, 0, 0)
    hashes = [text_hash(c.text) for _, c in spans]
    cached = store.cached_vectors(hashes)
    missing: dict[str, str] = {}
    for h, (_, c) in zip(hashes, spans, strict=True):
        if h not in cached and h not in missing:
            missing[h] = c.text
    vectors: dict[str, np.ndarray] = dict(cached)
    if missing:
        fresh = embedder.embed(list(missing.values()))
        for h, v in zip(missing, fresh, strict=True):
            vectors[h] = v
    matrix = np.stack([vectors[h] for h in hashes]).astype(np.float32, copy=False)
    dim = int(matrix.shape[1])
    schema = chunks_schema(dim, embedder.model_id, embedder_kind)
    columns = {
        "chunk_id": [
            chunk_id(o.doc_id, c.index, h) for (o, c), h in zip(spans, hashes, strict=True)
        ],
        "doc_id": [o.doc_id for o, _ in spans],
        "chunk_index": [c.index for _, c in spans],
        "text": [c.text for _, c in spans],
        "text_cjk": [cjk_text(c.text) for _, c in spans],
        "text_hash": hashes,
        "vector": vectors_to_arrow(matrix),
        "title": [o.title for o, _ in spans],
        "heading": [c.heading for _, c in spans],
        "source": [o.source for o, _ in spans],
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
    embedded = len(missing)
    return EmbeddedBatch(table, embedded, len(spans) - embedded)
