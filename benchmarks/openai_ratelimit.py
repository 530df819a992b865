"""Rate-limit benchmark: lanceflow's OpenAI embedder against a naive client, both against the
OpenAI-compatible server of tests/fake_openai.py enforcing a TPM and an RPM window.

    python benchmarks/openai_ratelimit.py [--tpm 1000000] [--rpm 3000] [--seconds 60] [--scale 1]

`--scale S` shrinks the server's window to 60/S seconds (the same limits per window), so a
minute of traffic takes 60/S seconds; the client is configured with the per-minute equivalent.
Prints JSON: sustained tokens/min as a share of the limit, the share of requests answered 429,
texts lost or wrong, and texts the server embedded (and billed) more than once.

`unknown_limits` is the case where nobody told the client the limits: the server allows
60,000 TPM and 300 RPM in a 60 s window (`--unknown-window` to shorten it), the client keeps
its defaults (3,000 RPM, 1M TPM) and learns the real limits only from the x-ratelimit-*
headers, with 8 % injected faults (500s, dropped connections, malformed bodies), embedding
1,500 chunk-sized texts (about 200 tokens each, as an ingest sends them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.embedders.openai import OpenAIEmbedder  # noqa: E402
from tasks.tokens import count_tokens  # noqa: E402
from tests.fake_openai import FakeOpenAI, Faults, fake_vector  # noqa: E402

KEY = "sk-bench"
DIM = 64


def corpus_texts(tokens_needed: int) -> list[str]:
    texts: list[str] = []
    total = 0
    path = REPO.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl"
    while total < tokens_needed:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                text = f"{row['title']}\n{row['text']}"[:1500]
                texts.append(f"[{len(texts)}] {text}")
                total += len(text) // 4
                if total >= tokens_needed:
                    break
    return texts


def chunk_texts(n: int) -> list[str]:
    """n chunk-sized texts (about 200 tokens) from SciFact, or generated when it is absent."""
    path = REPO.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl"
    texts: list[str] = []
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                texts.append(f"[{len(texts)}] {row['title']}\n{row['text']}"[:850])
                if len(texts) >= n:
                    break
    while len(texts) < n:
        i = len(texts)
        texts.append(f"[{i}] " + " ".join(f"term{(i * 31 + j) % 997}" for j in range(110)))
    return texts


def run_unknown_limits(window_s: float, chunks: int) -> dict:
    """The client is not told the limits and faults are on (see the module docstring)."""
    tpm, rpm = 60_000, 300
    faults = Faults(error_500=0.03, drop=0.03, malformed=0.02, seed=8)
    server = FakeOpenAI(api_key=KEY, dim=DIM, tpm=tpm, rpm=rpm, window_s=window_s, faults=faults)
    url = server.start()
    texts = chunk_texts(chunks)
    try:
        emb = OpenAIEmbedder(
            "text-embedding-3-small",
            KEY,
            base_url=url,
            dimensions=DIM,
            max_concurrency=8,
            window_s=window_s,
            timeout_s=10.0,
        )
        started = time.monotonic()
        t = time.perf_counter()
        vectors = emb.embed(texts)
        seconds = time.perf_counter() - t
        limit_per_min = tpm * 60.0 / window_s
        out = summarize(server, texts, vectors, seconds, limit_per_min, started)
        out["tokens_accepted_share_of_limit"] = round(
            server.stats.tokens_ok / (seconds / 60.0) / limit_per_min, 4
        )
        out["responses_by_status"] = {str(k): v for k, v in sorted(server.stats.status.items())}
        out["learned_limits"] = {"tpm": emb.budget.tpm, "rpm": emb.budget.rpm}
        return out
    finally:
        server.stop()


def summarize(
    server: FakeOpenAI,
    texts: list[str],
    vectors: np.ndarray | None,
    seconds: float,
    limit_per_min: float,
    started: float,
) -> dict:
    st = server.stats
    sent = sum(count_tokens(texts, "text-embedding-3-small"))
    lost = 0
    if vectors is None:
        lost = len(texts)
    else:
        for t, v in zip(texts, vectors, strict=True):
            if not np.allclose(v, fake_vector(t, DIM), atol=1e-5):
                lost += 1
    # after the first window: a client may legitimately spend a whole window's allowance at
    # once at the start, which flatters any short run
    window = server.window_s
    late = [(t, n) for t, n in st.ok_times if t >= started + window]
    steady = (
        sum(n for _, n in late) / ((late[-1][0] - (started + window)) / 60.0) / limit_per_min
        if len(late) > 1
        else float("nan")
    )
    return {
        "seconds": round(seconds, 2),
        "requests": st.requests,
        "http_429_share": round(st.status[429] / max(1, st.requests), 4),
        "tokens_per_min_share_of_limit": round(sent / (seconds / 60.0) / limit_per_min, 4),
        "tokens_per_min_share_after_first_window": round(steady, 4),
        "texts": len(texts),
        "texts_lost_or_wrong": lost,
        "texts_billed_twice": sum(1 for c in st.inputs_ok.values() if c > 1),
    }


def run_ours(texts: list[str], tpm: int, rpm: int, scale: float) -> dict:
    server = FakeOpenAI(api_key=KEY, dim=DIM, tpm=tpm, rpm=rpm, window_s=60.0 / scale)
    url = server.start()
    try:
        # the client is configured per minute, as for the real API; window_s tells it the
        # server's (scaled) window so its burst allowance scales with it
        emb = OpenAIEmbedder(
            "text-embedding-3-small",
            KEY,
            base_url=url,
            dimensions=DIM,
            tpm=int(tpm * scale),
            rpm=int(rpm * scale),
            max_concurrency=16,
            window_s=60.0 / scale,
        )
        started = time.monotonic()
        t = time.perf_counter()
        vectors = emb.embed(texts)
        seconds = time.perf_counter() - t
        return summarize(server, texts, vectors, seconds, tpm * scale, started)
    finally:
        server.stop()


def run_naive(
    texts: list[str], tpm: int, rpm: int, scale: float, batch: int = 100, sleep_s: float = 1.0
) -> dict:
    """One request per fixed batch, sequential; on a 429 sleep a fixed second and try again."""
    from openai import OpenAI, RateLimitError

    server = FakeOpenAI(api_key=KEY, dim=DIM, tpm=tpm, rpm=rpm, window_s=60.0 / scale)
    url = server.start()
    try:
        client = OpenAI(api_key=KEY, base_url=url, max_retries=0)
        out: list[np.ndarray] = []
        started = time.monotonic()
        t = time.perf_counter()
        for i in range(0, len(texts), batch):
            part = texts[i : i + batch]
            while True:
                try:
                    resp = client.embeddings.create(
                        model="text-embedding-3-small", input=part, dimensions=DIM
                    )
                    break
                except RateLimitError:
                    time.sleep(sleep_s / scale)
            out.extend(np.asarray(d.embedding, dtype=np.float32) for d in resp.data)
        seconds = time.perf_counter() - t
        vecs = np.stack(out)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        return summarize(server, texts, vecs, seconds, tpm * scale, started)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tpm", type=int, default=1_000_000)
    ap.add_argument("--rpm", type=int, default=3_000)
    ap.add_argument("--seconds", type=float, default=60.0, help="target length of each run")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--unknown-window", type=float, default=60.0)
    ap.add_argument("--unknown-chunks", type=int, default=1500)
    ap.add_argument("--only-unknown", action="store_true", help="run only the unknown-limits case")
    args = ap.parse_args()
    unknown = run_unknown_limits(args.unknown_window, args.unknown_chunks)
    if args.only_unknown:
        print(json.dumps({"unknown_limits": unknown}, indent=2))
        return
    texts = corpus_texts(int(args.tpm * args.seconds / 60.0 * 1.0))
    result = {
        "limit_tpm": args.tpm,
        "limit_rpm": args.rpm,
        "window_s": 60.0 / args.scale,
        "tokens": sum(count_tokens(texts, "text-embedding-3-small")),
        "lanceflow": run_ours(texts, args.tpm, args.rpm, args.scale),
        "naive": run_naive(texts, args.tpm, args.rpm, args.scale),
        "unknown_limits": unknown,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
