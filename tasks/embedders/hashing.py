"""`--embedder hash`: hashed word features, a deterministic embedder for tests and benchmarks.

NOT a semantic model and never a default: it maps each word (lower-cased, split on non-word
characters) and each pair of neighbouring words to a signed slot of a fixed-size vector, then
L2-normalises. Texts that share words land near each other, which is enough to check that the
plumbing (chunking, caching, writing, search) works and to measure it without a model's cost.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.embedders.base import normalize

_WORD = re.compile(r"\w+", re.UNICODE)
HASH_MODEL = "lanceflow-hash"
HASH_VERSION = "1"
#: a file to which every embed call appends "PID TEXTS" (tests and benchmarks count the
#: texts embedded across processes with it)
CALLS_LOG_ENV = "LANCEFLOW_HASH_CALLS_LOG"


class _WordTokenizer:
    """Counts words as tokens (the chunker's budget for the hash embedder)."""

    class _Encoding:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode_batch(self, texts: Sequence[str]) -> list[_Encoding]:
        return [self._Encoding(list(range(len(_WORD.findall(t))))) for t in texts]


class HashEmbedder:
    """Deterministic hashed bag of words and word pairs."""

    def __init__(self, dimension: int = 256, max_tokens: int = 256) -> None:
        self._dimension = dimension
        self.max_tokens = max_tokens
        self.model_id = f"{HASH_MODEL}-{dimension}"
        self.revision = f"hash-v{HASH_VERSION}"
        self.batches = 0
        self.texts_embedded = 0
        self.tokenizer = _WordTokenizer()

    @classmethod
    def from_settings(cls, settings: Any) -> HashEmbedder:
        return cls(dimension=settings.dimensions or 256)

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.batches += 1
        self.texts_embedded += len(texts)
        calls_log = os.environ.get(CALLS_LOG_ENV)
        if calls_log:
            # one line per call, appended atomically: counts across processes (Ray workers)
            with open(calls_log, "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()} {len(texts)}\n")
        dim = self._dimension
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = [w.lower() for w in _WORD.findall(text)]
            feats = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
            if not feats:
                continue
            hashed = np.fromiter(
                (hash_feature(f) for f in feats), dtype=np.uint64, count=len(feats)
            )
            slots = (hashed % np.uint64(dim)).astype(np.int64)
            signs = np.where((hashed >> np.uint64(63)) == 0, 1.0, -1.0).astype(np.float32)
            np.add.at(out[row], slots, signs)
        return normalize(out)


def hash_feature(feature: str) -> int:
    """A stable 64-bit hash (Python's own hash() is salted per process)."""
    import hashlib

    return int.from_bytes(
        hashlib.blake2b(feature.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )
