"""Shared fixtures: offline settings, the Prefect test harness, a deterministic fake embedder,
the bundled model, and copies of the sample corpus."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# a private Prefect home for the test session (and the CLI subprocesses it starts): the
# temporary server's database in ~/.prefect may have been migrated by another Prefect version
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lanceflow-prefect-home-")
os.environ["DO_NOT_TRACK"] = "1"

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "corpus"
SCIFACT = REPO.parent / "shared" / "datasets" / "scifact"


class FakeEmbedder:
    """Deterministic vectors from the text's hash; counts batches and texts."""

    model_id = "fake-hash-embedder"

    def __init__(self, dim: int = 16) -> None:
        self._dim = dim
        self.batches = 0
        self.texts: list[str] = []

    @property
    def dimension(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.batches += 1
        self.texts.extend(texts)
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self._dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture(scope="session")
def bundled_model():
    """The real default model (int8 ONNX on CPU), loaded once for the session."""
    from tasks.embedders.local import get_local_embedder
    from tasks.settings import DEFAULT_MODEL

    emb = get_local_embedder(DEFAULT_MODEL)
    emb.load()
    return emb


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A private copy of the sample corpus."""
    dst = tmp_path / "corpus"
    shutil.copytree(SAMPLES, dst)
    return dst


def scifact_slice(n: int) -> list[dict[str, str]]:
    import json

    rows = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows
