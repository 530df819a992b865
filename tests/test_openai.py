"""The OpenAI embedder against the OpenAI-compatible server in tests/fake_openai.py, through
the real `openai` SDK on loopback: packing, faults, rate limits, a poisoned input, bad keys,
and the key never leaking."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from tasks.embedders.openai import OpenAIEmbedder
from tasks.errors import ConfigurationError, EmbeddingAuthError, PartialEmbeddingError
from tasks.settings import IngestParams
from tasks.store import CHUNKS, Store

from .conftest import REPO, synthetic_records
from .fake_openai import FakeOpenAI, Faults, fake_vector

KEY = "sk-lanceflow-test-0123456789abcdef"


@pytest.fixture
def server():
    servers: list[FakeOpenAI] = []

    def start(**kw) -> tuple[FakeOpenAI, str]:
        s = FakeOpenAI(api_key=KEY, **kw)
        url = s.start()
        servers.append(s)
        return s, url

    yield start
    for s in servers:
        s.stop()


def _embedder(url: str, key: str = KEY, **kw) -> OpenAIEmbedder:
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("max_wait_s", 2.0)
    return OpenAIEmbedder("text-embedding-3-small", key, base_url=url, dimensions=64, **kw)


def _texts(n: int) -> list[str]:
    rows = synthetic_records(n, seed=4)
    return [f"{r['title']} {r['text'][:600]}" for r in rows]


def test_packing_respects_the_api_limits():
    emb = OpenAIEmbedder("text-embedding-3-small", KEY, tpm=10_000_000)
    reqs = emb._pack([5] * 5000)
    assert all(len(r.indices) <= 2048 for r in reqs) and sum(len(r.indices) for r in reqs) == 5000
    reqs = emb._pack([8000] * 100)
    assert all(r.tokens <= 300_000 for r in reqs)
    long_text = "word " * 20_000  # ~20k tokens: over the 8,191 per input
    pieces, owner, tokens, refused = emb._pieces(["short", long_text])
    assert not refused and owner.count(1) == 3 and max(tokens) <= 8191
    refusing = OpenAIEmbedder("text-embedding-3-small", KEY, oversize="refuse")
    assert 1 in refusing._pieces(["short", long_text])[3]


FAULT_MIXES = {
    "500s": Faults(error_500=0.3, seed=1),
    "dropped connections": Faults(drop=0.25, seed=2),
    "malformed json": Faults(malformed=0.25, seed=3),
    "slow past the timeout": Faults(slow=0.2, slow_seconds=3.0, seed=4),
    "all at once": Faults(
        error_500=0.15, drop=0.1, malformed=0.1, slow=0.05, slow_seconds=3.0, seed=5
    ),
}


@pytest.mark.parametrize("mix", list(FAULT_MIXES))
def test_every_text_embedded_once_in_order_under_faults(server, mix):
    srv, url = server(faults=FAULT_MIXES[mix])
    texts = _texts(200)
    emb = _embedder(url, max_concurrency=6)
    emb.request_tokens = 2_000  # many small requests, so every fault shows up
    vecs = emb.embed(texts)
    assert vecs.shape == (200, 64)
    for t, v in zip(texts, vecs, strict=True):
        np.testing.assert_allclose(v, fake_vector(t, 64), atol=1e-6)
    needed = len(emb._pack(emb.count_tokens(texts)))
    assert srv.stats.requests > needed  # faults happened and were retried


def test_oversized_input_is_split_and_averaged(server):
    _srv, url = server()
    emb = _embedder(url)
    long_text = " ".join(f"term{i}" for i in range(12_000))
    [vec] = emb.embed([long_text])
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5


def test_poisoned_input_is_isolated(server):
    srv, url = server(faults=Faults(poison="POISON"))
    texts = _texts(40)
    texts[17] = "this chunk carries POISON and the API refuses it"
    emb = _embedder(url)
    with pytest.raises(PartialEmbeddingError) as info:
        emb.embed(texts)
    assert list(info.value.failed) == [17]
    assert "400" in info.value.failed[17]
    for i, t in enumerate(texts):
        if i != 17:
            np.testing.assert_allclose(info.value.vectors[i], fake_vector(t, 64), atol=1e-6)
    assert srv.stats.status[400] >= 2  # bisection


def test_bad_key_fails_fast_and_is_never_shown(server, caplog):
    srv, url = server()
    emb = _embedder(url, key="sk-wrong-key-that-must-not-leak-42", max_concurrency=4)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EmbeddingAuthError) as info:
        emb.embed(_texts(200))
    assert srv.stats.requests <= 4  # no retries: at most the requests already in flight
    assert "sk-wrong-key" not in str(info.value) and "sk-wrong-key" not in repr(emb)
    assert "sk-wrong-key" not in caplog.text


def test_quota_exhausted_stops_at_once(server):
    from tasks.errors import QuotaExhaustedError

    srv, url = server(faults=Faults(quota_exhausted=True))
    with pytest.raises(QuotaExhaustedError, match="quota"):
        _embedder(url).embed(["a", "b"])
    assert srv.stats.requests == 1


def test_rate_limits_learned_from_headers_hold_under_a_load_past_them(server):
    """The server allows 3,000 tokens and 40 requests per 2-second window; the client is not
    told (it keeps its defaults of 1M TPM / 3,000 RPM) and must learn them from the headers.
    The work needs several windows, so the limits really bind."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI, RateLimitError

    texts = [f"text {i}: " + " ".join(f"w{i}x{j}" for j in range(40)) for i in range(120)]
    # the control: the same load sent without a budget draws 429s from this server
    ctrl, ctrl_url = server(rpm=40, tpm=3_000, window_s=2.0)
    client = OpenAI(api_key=KEY, base_url=ctrl_url, max_retries=0)

    def naive(i: int) -> None:
        try:
            client.embeddings.create(model="text-embedding-3-small", input=texts[i : i + 10])
        except RateLimitError:
            pass

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(naive, range(0, len(texts), 10)))
    assert ctrl.stats.status[429] > 0

    srv, url = server(rpm=40, tpm=3_000, window_s=2.0)
    emb = _embedder(url, max_concurrency=6, timeout_s=5.0, max_wait_s=10.0, window_s=2.0)
    vecs = emb.embed(texts)
    for t, v in zip(texts, vecs, strict=True):
        np.testing.assert_allclose(v, fake_vector(t, 64), atol=1e-6)
    sent = sum(emb.count_tokens(texts))
    assert sent > 3 * 3_000  # more than three windows' worth: the limit was reached
    # the server's own counters: every input embedded (and billed) exactly once
    assert srv.stats.inputs_ok == Counter(texts)
    assert srv.stats.tokens_ok == sent
    assert srv.stats.status[429] <= 0.02 * srv.stats.requests, srv.stats.status
    # learned from the headers, per minute
    assert emb.budget.tpm == 3_000 * 30 and emb.budget.rpm == 40 * 30


def test_missing_key_is_refused_before_any_work(tmp_path, monkeypatch, corpus):
    from tasks.runs import open_run

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    params = IngestParams.model_validate(
        {
            "source": {"uri": str(corpus)},
            "store": {"uri": str(tmp_path / "db")},
            "embedder": {"kind": "openai"},
        }
    )
    assert params.embedder.model == "text-embedding-3-small"
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        open_run(params)
    assert not (tmp_path / "db").exists() or not Store(str(tmp_path / "db")).has(CHUNKS)


@pytest.mark.slow
def test_cli_ingest_through_the_api_with_faults_dry_run_and_rerun(
    server, tmp_path, corpus, cli_env
):
    srv, url = server(faults=Faults(error_500=0.2, drop=0.1, seed=11))
    (corpus / "ko" / "poison.txt").write_text("A paragraph with POISON in it.", encoding="utf-8")
    srv.faults.poison = "POISON"
    env = dict(cli_env, OPENAI_API_KEY=KEY)
    env.pop("OPENAI_BASE_URL", None)
    db = str(tmp_path / "db")
    base = [
        sys.executable,
        "-m",
        "flows.cli",
        "ingest",
        str(corpus),
        "--table",
        db,
        "--embedder",
        "openai",
        "--base-url",
        url,
        "--dimensions",
        "64",
        "--json",
        "--timeout",
        "3",
    ]
    dry = subprocess.run([*base, "--dry-run"], env=env, cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["tokens"] > 0 and planned["cost_usd"] > 0 and planned["status"] == "dry-run"
    assert srv.stats.requests == 0  # the dry run calls nothing
    run = subprocess.run(base, env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["documents"]["failed"] == 1
    assert report["failures"][0]["doc_id"] == "ko/poison.txt"
    assert report["tokens"] > 0 and report["cost_usd"] > 0
    assert report["chunks"]["embedded"] == planned["chunks"]["embedded"] - 1
    store = Store(db)
    data = (
        store.table(CHUNKS).search().select(["chunk_id", "text", "vector"]).limit(None).to_arrow()
    )
    ids = data.column("chunk_id").to_pylist()
    assert len(ids) == len(set(ids))
    for text, vec in zip(
        data.column("text").to_pylist(), data.column("vector").to_pylist(), strict=True
    ):
        np.testing.assert_allclose(np.asarray(vec), fake_vector(text, 64), atol=1e-5)
    assert KEY not in run.stdout + run.stderr + dry.stdout + dry.stderr
    for name in ("chunks", "documents", "runs"):
        assert KEY not in str(store.table(name).search().limit(None).to_arrow().to_pylist())
    # a re-run with nothing changed (but the failed document, retried) sends only that chunk
    before = srv.stats.requests
    srv.faults.poison = None
    again = json.loads(
        subprocess.run(base, env=env, cwd=REPO, capture_output=True, text=True).stdout
    )
    assert again["chunks"]["embedded"] == 1 and again["documents"]["failed"] == 0
    assert srv.stats.requests - before <= 3
    nothing = json.loads(
        subprocess.run(base, env=env, cwd=REPO, capture_output=True, text=True).stdout
    )
    assert nothing["chunks"]["embedded"] == 0 and nothing["tokens"] == 0
    hits = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "search",
            "paid vacation days per year",
            "--table",
            db,
            "--json",
            "--mode",
            "vector",
        ],
        env=env,  # the endpoint recorded in the index, the key as for ingest
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert hits.returncode == 0, hits.stderr
    assert json.loads(hits.stdout)[0]["doc_id"] == "reports/vacation-policy.html"
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        json.dumps({"query": "paid vacation days", "relevant": ["reports/vacation-policy.html"]}),
        encoding="utf-8",
    )
    scored = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "evaluate",
            str(labels),
            "--table",
            db,
            "--modes",
            "vector",
            "--base-url",
            url,
            "--json",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["results"]["vector"]["ndcg@10"] > 0.5
    assert KEY not in scored.stdout + scored.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_fleet_budget_uses_prefect_global_concurrency_limits(server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    _srv, url = server()
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name="fleet-requests", limit=1000, slot_decay_per_second=1)
        )
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(
                name="fleet-tokens", limit=100_000, slot_decay_per_second=1
            )
        )
    emb = _embedder(url, fleet_limit="fleet")
    texts = [f"fleet text {i} with a few words" for i in range(50)]
    emb.request_tokens = 100
    vecs = emb.embed(texts)
    assert len(vecs) == 50
    with get_client(sync_client=True) as client:
        tokens = client.read_global_concurrency_limit_by_name("fleet-tokens")
        requests = client.read_global_concurrency_limit_by_name("fleet-requests")
    # every request took its slots from the shared limits (decaying at 1 slot a second)
    assert requests.active_slots >= emb.requests_sent - 30
    assert tokens.active_slots > 100


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_long_document_whose_stream_fails_midway_is_streamed_again_by_the_retry(
    server, tmp_path, monkeypatch
):
    """A long document is written a segment at a time (tasks.streaming). When a request
    fails every try mid-document, the task's retry must stream it again from the start (its
    written segments replaced, not doubled), not take it for done: else it has no manifest
    row and its chunks belong to no document."""
    from flows.ingest import run_ingest
    from tasks.streaming import SEGMENT_BYTES, STREAM_MIN_BYTES

    srv, url = server(faults=Faults(fail_requests=frozenset({3})))
    src = tmp_path / "src"
    src.mkdir()
    rows = synthetic_records(400, seed=9)
    text, i = [], 0
    while sum(map(len, text)) < STREAM_MIN_BYTES + 2 * SEGMENT_BYTES:
        text.append(f"## {rows[i % 400]['title']} {i}\n\n{rows[i % 400]['text']}\n\n")
        i += 1
    (src / "handbook.md").write_text("".join(text), encoding="utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    db = tmp_path / "db"
    params = IngestParams.model_validate(
        {
            "source": {"uri": str(src)},
            "store": {"uri": str(db)},
            "embedder": {
                "kind": "openai",
                "base_url": url,
                "dimensions": 64,
                "max_attempts": 1,  # the failed request fails the task: Prefect retries it
                "tpm": 10_000_000,
            },
        }
    )
    report = run_ingest(params)
    assert srv.stats.status[500] == 1  # the fault happened, past the first segment
    assert report.documents.new == 1 and report.documents.failed == 0
    store = Store(str(db))
    ids = store.table(CHUNKS).search().select(["chunk_id"]).limit(None).to_arrow()
    ids = ids.column("chunk_id").to_pylist()
    (row,) = store.documents().search().limit(None).to_arrow().to_pylist()
    assert row["status"] == "ok"
    assert len(ids) == len(set(ids)) == row["chunk_count"] == report.chunks.written > 0
