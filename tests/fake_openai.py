"""An OpenAI-compatible embeddings server for tests and benchmarks, on loopback.

It speaks the real `/v1/embeddings` wire format (float or base64 vectors, usage, errors) and
returns deterministic vectors derived from the input text (a hashed bag of words, so texts
that share words are similar and retrieval tests mean something). It enforces requests- and
tokens-per-minute windows like the real API, answering 429 with `Retry-After` and
`x-ratelimit-*` headers, and injects faults on demand: 500s, responses slower than the
client's timeout, dropped connections, malformed JSON, a 400 for a poisoned input, 401 for a
wrong key and 429 `insufficient_quota`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


def fake_vector(text: str, dim: int) -> np.ndarray:
    """The server's deterministic embedding of a text."""
    v = np.zeros(dim, dtype=np.float32)
    for word in _WORD.findall(text.lower()):
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        v[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    if not v.any():
        v[0] = 1.0
    return v / np.linalg.norm(v)


@dataclass
class Faults:
    """Probabilities (0..1) of each fault per request, decided by a seeded generator."""

    error_500: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 5.0
    drop: float = 0.0
    malformed: float = 0.0
    poison: str | None = None  # a 400 for any request holding an input with this substring
    quota_exhausted: bool = False
    # a 500 for these requests (1 = the first the server receives), whatever the rolls say
    fail_requests: frozenset[int] = frozenset()
    seed: int = 7


@dataclass
class Stats:
    requests: int = 0
    status: Counter = field(default_factory=Counter)
    tokens_ok: int = 0
    inputs_ok: Counter = field(default_factory=Counter)
    ok_times: list[tuple[float, int]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)


class FakeOpenAI:
    def __init__(
        self,
        api_key: str = "sk-test-key",
        dim: int = 64,
        rpm: int | None = None,
        tpm: int | None = None,
        window_s: float = 60.0,
        faults: Faults | None = None,
    ) -> None:
        from tasks.tokens import get_encoding

        self.api_key = api_key
        self.dim = dim
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s
        self.faults = faults or Faults()
        self.stats = Stats()
        self._rng = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._window: deque[tuple[float, int]] = deque()
        self._encoding = get_encoding("cl100k_base")
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> str:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                owner._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ---- the endpoint --------------------------------------------------------------------

    def _send(
        self, h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict | None = None
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.end_headers()
        h.wfile.write(data)
        with self._lock:
            self.stats.status[status] += 1

    @staticmethod
    def _error(message: str, kind: str, code: str | None = None) -> dict:
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def _limits(self, now: float, tokens: int) -> tuple[bool, float, dict]:
        """Admit or refuse a request against the sliding windows; the rate-limit headers."""
        while self._window and self._window[0][0] <= now - self.window_s:
            self._window.popleft()
        used_req = len(self._window)
        used_tok = sum(t for _, t in self._window)
        ok = True
        wait = 0.0
        if self.rpm is not None and used_req + 1 > self.rpm:
            ok = False
            wait = max(wait, self._window[0][0] + self.window_s - now)
        if self.tpm is not None and used_tok + tokens > self.tpm:
            ok = False
            need = used_tok + tokens - self.tpm
            freed = 0
            for t, n in self._window:
                freed += n
                if freed >= need:
                    wait = max(wait, t + self.window_s - now)
                    break
        if ok:
            self._window.append((now, tokens))
            used_req += 1
            used_tok += tokens
        reset_req = (self._window[0][0] + self.window_s - now) if self._window else 0.0
        headers = {}
        if self.rpm is not None:
            headers["x-ratelimit-limit-requests"] = self.rpm
            headers["x-ratelimit-remaining-requests"] = max(0, self.rpm - used_req)
            headers["x-ratelimit-reset-requests"] = f"{max(reset_req, 0.001):.3f}s"
        if self.tpm is not None:
            headers["x-ratelimit-limit-tokens"] = self.tpm
            headers["x-ratelimit-remaining-tokens"] = max(0, self.tpm - used_tok)
            headers["x-ratelimit-reset-tokens"] = f"{int(max(reset_req, 0.001) * 1000)}ms"
        return ok, wait, headers

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        with self._lock:
            self.stats.requests += 1
            self.stats.auth_headers.append(h.headers.get("Authorization", ""))
            roll = {k: self._rng.random() for k in ("e500", "slow", "drop", "bad")}
            if self.stats.requests in self.faults.fail_requests:
                roll["e500"] = -1.0
        if h.path.rstrip("/") != "/v1/embeddings":
            self._send(h, 404, self._error("Unknown endpoint", "invalid_request_error"))
            return
        if h.headers.get("Authorization") != f"Bearer {self.api_key}":
            self._send(
                h,
                401,
                self._error(
                    "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
                ),
            )
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send(
                h, 400, self._error("We could not parse the JSON body", "invalid_request_error")
            )
            return
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or len(inputs) > 2048:
            self._send(
                h, 400, self._error("'input' must be 1..2048 strings", "invalid_request_error")
            )
            return
        counts = [len(self._encoding.encode(t, disallowed_special=())) for t in inputs]
        if any(c > 8191 for c in counts) or sum(counts) > 300_000:
            self._send(
                h, 400, self._error("maximum context length exceeded", "invalid_request_error")
            )
            return
        if self.faults.quota_exhausted:
            self._send(
                h,
                429,
                self._error(
                    "You exceeded your current quota", "insufficient_quota", "insufficient_quota"
                ),
            )
            return
        tokens = sum(counts)
        with self._lock:
            ok, wait, rl_headers = self._limits(time.monotonic(), tokens)
        if not ok:
            rl_headers["Retry-After"] = max(1, math.ceil(wait)) if wait >= 1 else round(wait, 3)
            rl_headers["retry-after-ms"] = int(wait * 1000) + 1
            self._send(
                h,
                429,
                self._error("Rate limit reached", "requests", "rate_limit_exceeded"),
                rl_headers,
            )
            return
        f = self.faults
        if f.poison and any(f.poison in t for t in inputs):
            self._send(
                h, 400, self._error("Invalid input: content rejected", "invalid_request_error")
            )
            return
        if roll["e500"] < f.error_500:
            self._send(h, 500, self._error("The server had an error", "server_error"))
            return
        if roll["drop"] < f.drop:
            h.close_connection = True
            try:
                h.connection.shutdown(2)
            except OSError:
                pass
            return
        if roll["slow"] < f.slow:
            time.sleep(f.slow_seconds)
        if roll["bad"] < f.malformed:
            self._send(h, 200, b'{"object": "list", "data": [ {"embedding": [0.1, ', rl_headers)
            return
        dim = int(body.get("dimensions") or self.dim)
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            vec = fake_vector(text, dim)
            emb: Any = (
                base64.b64encode(vec.astype("<f4").tobytes()).decode() if b64 else vec.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        with self._lock:
            self.stats.tokens_ok += tokens
            self.stats.inputs_ok.update(inputs)
            self.stats.ok_times.append((time.monotonic(), tokens))
        self._send(
            h,
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            rl_headers,
        )
