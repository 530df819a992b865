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
# gcsfs >= 2026 asks a gs:// endpoint over gRPC for the bucket's layout and retries for a
# minute when it cannot answer, as no emulator can: the JSON API alone is what the tests use
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
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
    """The first n SciFact abstracts (only for tests that need real data; see requires_scifact)."""
    import json

    rows = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


_TOPICS = {
    "coffee": "espresso grinder beans roast milk foam cup machine descaling barista",
    "travel": "flight hotel receipt per diem booking train airport visa luggage itinerary",
    "security": "password badge laptop encryption phishing token access audit incident vpn",
    "payroll": "salary payslip bonus tax pension deduction overtime bank transfer month",
    "garden": "tomato compost soil seed watering pruning roses shade mulch harvest",
    "network": "router switch latency packet firewall subnet cable bandwidth outage dns",
    "kitchen": "oven recipe knife pan butter garlic simmer bake dough spice",
    "health": "doctor appointment vaccine sleep exercise diet stress checkup clinic insurance",
}


def synthetic_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n record documents written for these tests (no outside data): each about one topic,
    with its own id, title and a few sentences of that topic's words."""
    import random

    rng = random.Random(seed)
    topics = sorted(_TOPICS)
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        words = _TOPICS[topic].split()
        sentences = [
            " ".join(rng.choice(words) for _ in range(rng.randint(8, 16))).capitalize() + "."
            for _ in range(rng.randint(3, 9))
        ]
        rows.append(
            {"_id": f"doc-{i:05d}", "title": f"Note {i} on {topic}", "text": " ".join(sentences)}
        )
    return rows


def write_records(path: Path, rows: list[dict[str, str]]) -> Path:
    import json

    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def pytest_report_header(config) -> list[str]:
    """The free disk where the suite writes (its tmp dirs, the checkout's .venv and
    .azurite): a run that fails with 'No space left on device' then says how little there
    was at the start. The suite itself keeps under about 1 GiB of scratch at a time."""
    lines = []
    for label, where in (("tmp", tempfile.gettempdir()), ("checkout", str(Path.cwd()))):
        free = shutil.disk_usage(where).free / 2**30
        lines.append(f"disk free in {label} ({where}): {free:.1f} GiB")
    return lines


def pytest_collection_modifyitems(config, items):
    """Tests marked `scifact` need the shared SciFact set beside the checkout: skipped in a
    plain clone, but a failure when LANCEFLOW_REQUIRE_SCIFACT=1 (CI), so they cannot be
    skipped silently there."""
    required = os.environ.get("LANCEFLOW_REQUIRE_SCIFACT") == "1"
    present = (SCIFACT / "corpus.jsonl").exists()
    for item in items:
        if "scifact" not in item.keywords or present:
            continue
        if required:
            raise pytest.UsageError(
                f"LANCEFLOW_REQUIRE_SCIFACT=1 but {SCIFACT} is missing: {item.nodeid} and the "
                "other `scifact` tests cannot run"
            )
        else:
            item.add_marker(pytest.mark.skip(reason="needs ../shared/datasets/scifact"))


@pytest.fixture(scope="session")
def cli_env(prefect_harness) -> dict[str, str]:
    """Environment for `lanceflow` subprocesses: they talk to the harness's Prefect server
    instead of each starting a temporary one."""
    from prefect.settings import PREFECT_API_URL

    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_SERVER_EPHEMERAL_ENABLED="false",
        # the harness's server frees no expired lease (no repossessor, unlike `prefect server
        # start`), and the crash tests kill writers: they lock the table with a file lock
        LANCEFLOW_TABLE_LOCK="local",
    )


def run_cli(env: dict[str, str], *args: str, check: bool = True, **kw):
    """`python -m flows.cli ARGS` in a subprocess; AssertionError on a non-zero exit."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def table_snapshot(db: str) -> dict:
    """The live generation's rows, for comparing a table with a clean build: chunk id ->
    (document, source, text, vector bytes), and the manifest."""
    from tasks.store import store_at

    store = store_at(db)  # a bucket's endpoints from the environment, as a run's
    data = (
        store.chunks_table()
        .search()
        .select(["chunk_id", "doc_id", "source_uri", "text", "vector"])
        .limit(None)
        .to_arrow()
    )
    ids = data.column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate chunk ids"
    vecs = data.column("vector").to_pylist()
    chunks = {
        cid: (doc, src, text, np.asarray(vec, dtype=np.float32).tobytes())
        for cid, doc, src, text, vec in zip(
            ids,
            data.column("doc_id").to_pylist(),
            data.column("source_uri").to_pylist(),
            data.column("text").to_pylist(),
            vecs,
            strict=True,
        )
    }
    docs = store.documents().search().limit(None).to_arrow().to_pylist()
    manifest = {
        (r["source_uri"], r["doc_id"]): (r["content_hash"], r["chunk_count"], r["status"])
        for r in docs
    }
    # every chunk is owned by a manifest row that counts it (Store.remove_unowned_chunks
    # relies on this to tell, by one count, that an interrupted run left none unowned)
    assert sum(r["chunk_count"] or 0 for r in docs) == len(ids), "manifest counts != chunks"
    fp = store.generation.fingerprint if store.generation else None
    return {"chunks": chunks, "manifest": manifest, "fingerprint": fp}


@pytest.fixture(autouse=True)
def _no_scratch_left_behind(request) -> Iterator[None]:
    """Every run this process makes removes its scratch folder (tasks.scratch) when it ends,
    failed or not: a test whose flows leave one fails."""
    import glob
    import os
    import tempfile

    from tasks.scratch import _host

    pattern = os.path.join(tempfile.gettempdir(), f"lanceflow-*-{_host()}-{os.getpid()}-*")
    before = set(glob.glob(pattern))
    yield
    left = sorted(set(glob.glob(pattern)) - before)
    for path in left:  # not into the next test
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    assert not left, f"{request.node.nodeid} left scratch folders: {left}"
