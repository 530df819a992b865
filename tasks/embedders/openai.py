"""OpenAI (and OpenAI-compatible) embeddings: packed, rate-limited, retrying, never leaking
the key.

Requests are packed by exact token counts (tiktoken) under the API's limits (2,048 inputs,
300,000 tokens per request, 8,191 per input) and sent concurrently from a private event loop,
while a RateBudget keeps requests/min and tokens/min under the account's limits. tenacity
retries 429s, 5xx, timeouts, dropped connections and malformed responses with exponential
backoff and jitter, honouring Retry-After; the SDK's own retries are off. A 400 is bisected
down to the input that causes it, which is reported as failed while the rest are embedded.
Authentication and exhausted-quota errors stop the run at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.embedders.base import normalize
from tasks.embedders.ratelimit import RateBudget, parse_reset
from tasks.errors import (
    ConfigurationError,
    EmbeddingAuthError,
    PartialEmbeddingError,
    QuotaExhaustedError,
)
from tasks.tokens import encoding_name_for, get_encoding

log = logging.getLogger(__name__)

MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
MAX_INPUT_TOKENS = 8191

#: known output dimensions (the v3 models accept a smaller `dimensions`)
MODEL_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
#: USD per million input tokens
DEFAULT_PRICES = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}


DEFAULT_ENDPOINT = "https://api.openai.com/v1"


def normalized_endpoint(base_url: str | None) -> str:
    """The endpoint as recorded in an index fingerprint (no trailing slash, lower-case host)."""
    url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_ENDPOINT).strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rstrip("/")
    host, slash, path = rest.partition("/")
    host = host.rsplit("@", 1)[-1]  # never record credentials put in a URL
    return f"{scheme.lower()}://{host.lower()}{slash}{path}".rstrip("/")


def redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
        if len(secret) > 8:
            text = text.replace(secret[:8], "***").replace(secret[-6:], "***")
    return text


@dataclass
class _Request:
    indices: list[int]  # positions in the piece list
    tokens: int


class OpenAIEmbedder:
    """The `embed(texts)` protocol over the OpenAI embeddings API."""

    def __init__(
        self,
        model: str,
        api_key: str | None,
        *,
        base_url: str | None = None,
        dimensions: int | None = None,
        organization: str | None = None,
        project: str | None = None,
        rpm: int = 3_000,
        tpm: int = 1_000_000,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_attempts: int = 8,
        oversize: str = "split",
        price_per_million: float | None = None,
        max_wait_s: float = 60.0,
        fleet_limit: str | None = None,
        window_s: float = 60.0,
    ) -> None:
        if dimensions is not None and not model.startswith("text-embedding-3"):
            log.info("passing dimensions=%d to %s", dimensions, model)
        self.model_id = model
        self._key = api_key
        self.base_url = base_url
        self.dimensions = dimensions
        self.organization = organization
        self.project = project
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_wait_s = max_wait_s
        self.oversize = oversize
        self.fleet_limit = fleet_limit
        self.price = (
            price_per_million if price_per_million is not None else DEFAULT_PRICES.get(model, 0.0)
        )
        self.encoding = get_encoding(encoding_name_for(model))
        self.max_tokens = MAX_INPUT_TOKENS
        self.budget = RateBudget(rpm, tpm, window_s=window_s)
        self._request_tokens: int | None = None
        self.tokens_used = 0
        self.requests_sent = 0
        self._dimension = dimensions or MODEL_DIMENSIONS.get(model)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"OpenAIEmbedder(model={self.model_id!r}, base_url={self.base_url!r})"

    @property
    def request_tokens(self) -> int:
        """Tokens packed into one request: the API's limit, or less so that one request fits
        the token budget's burst (large requests against a small budget arrive in bursts)."""
        if self._request_tokens is not None:
            return self._request_tokens
        return int(min(MAX_REQUEST_TOKENS, max(self.budget.token_capacity, 1)))

    @request_tokens.setter
    def request_tokens(self, value: int) -> None:
        self._request_tokens = value

    @property
    def cost_usd(self) -> float:
        return self.tokens_used * self.price / 1e6

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self._dimension = int(self.embed(["dimension probe"]).shape[1])
        return self._dimension

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t) for t in self.encoding.encode_ordinary_batch(list(texts))]

    # ---- the event loop this embedder's requests run on -----------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="lanceflow-openai", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def _make_client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            api_key=self._key,
            base_url=self.base_url,
            organization=self.organization,
            project=self.project,
            max_retries=0,  # tenacity owns the retry policy
            timeout=self.timeout_s,
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not self._key:
            raise ConfigurationError(
                "no OpenAI API key: set OPENAI_API_KEY or name a Prefect Secret block "
                "(--api-key-secret)"
            )
        if not texts:
            return np.zeros((0, self._dimension or 0), dtype=np.float32)
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(self._embed(list(texts)), loop)
        return future.result()

    # ---- packing ------------------------------------------------------------------------

    def _pieces(self, texts: list[str]) -> tuple[list[str], list[int], list[int], dict[int, str]]:
        """Texts cut to the per-input limit: pieces, their owner text, their tokens, refusals."""
        pieces: list[str] = []
        owner: list[int] = []
        tokens: list[int] = []
        refused: dict[int, str] = {}
        for i, ids in enumerate(self.encoding.encode_ordinary_batch(texts)):
            if not ids:
                ids = self.encoding.encode_ordinary(" ")
            if len(ids) <= self.max_tokens:
                pieces.append(texts[i])
                owner.append(i)
                tokens.append(len(ids))
                continue
            if self.oversize == "refuse":
                refused[i] = (
                    f"{len(ids)} tokens, above the model's {self.max_tokens}: lower --chunk-tokens"
                )
                continue
            for start in range(0, len(ids), self.max_tokens):
                part = ids[start : start + self.max_tokens]
                pieces.append(self.encoding.decode(part))
                owner.append(i)
                tokens.append(len(part))
        return pieces, owner, tokens, refused

    def _pack(self, tokens: list[int]) -> list[_Request]:
        limit = max(1, self.request_tokens)
        requests: list[_Request] = []
        current: list[int] = []
        total = 0
        for i, n in enumerate(tokens):
            if current and (len(current) >= MAX_INPUTS or total + n > limit):
                requests.append(_Request(current, total))
                current, total = [], 0
            current.append(i)
            total += n
        if current:
            requests.append(_Request(current, total))
        return requests

    # ---- sending ------------------------------------------------------------------------

    async def _embed(self, texts: list[str]) -> np.ndarray:
        if self._client is None:
            self._client = self._make_client()
        pieces, owner, tokens, refused = self._pieces(texts)
        vectors: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        sem = asyncio.Semaphore(self.max_concurrency)

        async def run(req: _Request) -> None:
            async with sem:
                await self._send_bisecting(req.indices, pieces, tokens, vectors, failed)

        pending = list(range(len(pieces)))
        if not self.budget.learned and pending:
            # the limits are unknown: one small request first; its headers tell them, and the
            # rest is packed for the real limits (small requests keep every window smooth)
            probe = self._pack(tokens)[0].indices
            await run(_Request(probe, sum(tokens[i] for i in probe)))
            pending = pending[len(probe) :]
        packed = self._pack([tokens[i] for i in pending])
        await asyncio.gather(
            *(run(_Request([pending[j] for j in r.indices], r.tokens)) for r in packed)
        )
        dim = next((v.shape[0] for v in vectors.values()), self._dimension or 1)
        self._dimension = self._dimension or dim
        out = np.zeros((len(texts), dim), dtype=np.float32)
        weight = np.zeros(len(texts), dtype=np.float32)
        bad: dict[int, str] = dict(refused)
        for p, text_index in enumerate(owner):
            if p in failed:
                bad[text_index] = failed[p]
            elif p in vectors:
                out[text_index] += vectors[p] * tokens[p]
                weight[text_index] += tokens[p]
        for i in bad:
            out[i] = 0.0
        out = normalize(out)
        if bad:
            raise PartialEmbeddingError(out, bad)
        return out

    async def _send_bisecting(
        self,
        idx: list[int],
        pieces: list[str],
        tokens: list[int],
        vectors: dict[int, np.ndarray],
        failed: dict[int, str],
    ) -> None:
        from openai import BadRequestError

        try:
            got = await self._send([pieces[i] for i in idx], sum(tokens[i] for i in idx))
        except BadRequestError as exc:
            if len(idx) == 1:
                failed[idx[0]] = redact(f"rejected by the API (400): {_message(exc)}", self._key)
                log.warning("one input was rejected by the API: %s", failed[idx[0]])
                return
            mid = len(idx) // 2
            await self._send_bisecting(idx[:mid], pieces, tokens, vectors, failed)
            await self._send_bisecting(idx[mid:], pieces, tokens, vectors, failed)
            return
        for i, v in zip(idx, got, strict=True):
            vectors[i] = v

    async def _send(self, inputs: list[str], n_tokens: int) -> list[np.ndarray]:
        import openai
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        wait = _RetryAfterWait(self.budget, self.max_wait_s)
        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait,
            stop=stop_after_attempt(self.max_attempts),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self.budget.acquire(n_tokens)
                    try:
                        if self.fleet_limit:
                            await _fleet_acquire(self.fleet_limit, n_tokens)
                        self.requests_sent += 1
                        kwargs: dict[str, Any] = {"model": self.model_id, "input": inputs}
                        if self.dimensions:
                            kwargs["dimensions"] = self.dimensions
                        raw = await self._client.embeddings.with_raw_response.create(**kwargs)
                    except openai.APIStatusError as exc:
                        self.budget.learn(exc.response.headers, success=False)  # 429s tell too
                        raise
                    finally:
                        self.budget.done()
                    self.budget.learn(raw.headers)
                    resp = raw.parse()
                    data = sorted(resp.data, key=lambda d: d.index)
                    if len(data) != len(inputs):
                        raise _MalformedResponse(f"{len(data)} vectors for {len(inputs)} inputs")
                    usage = getattr(resp, "usage", None)
                    self.tokens_used += int(getattr(usage, "total_tokens", 0) or n_tokens)
                    return [np.asarray(d.embedding, dtype=np.float32) for d in data]
        except openai.AuthenticationError:
            raise EmbeddingAuthError(
                f"the embeddings API rejected the key (401) at {self.base_url or 'OpenAI'}: "
                "check OPENAI_API_KEY or the Secret block"
            ) from None
        except openai.PermissionDeniedError as exc:
            raise EmbeddingAuthError(
                f"the key may not use {self.model_id} (403): check the project's permissions. "
                + redact(_message(exc), self._key)
            ) from None
        except openai.NotFoundError as exc:
            raise ConfigurationError(
                f"model {self.model_id!r} not found at {self.base_url or 'OpenAI'} (404): "
                + redact(_message(exc), self._key)
            ) from None
        except openai.RateLimitError as exc:
            if _is_quota(exc):
                raise QuotaExhaustedError(
                    "the account's quota is exhausted (429 insufficient_quota): add credit or "
                    "raise the spending limit, then re-run; nothing was lost"
                ) from None
            raise
        raise AssertionError("unreachable")


_EMBEDDERS: dict[tuple[Any, ...], OpenAIEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_openai_embedder(settings: Any, api_key: str | None) -> OpenAIEmbedder:
    """One embedder (one client, one rate budget) per settings and key in a process."""
    import hashlib

    key_id = hashlib.sha256((api_key or "").encode()).hexdigest()
    cache_key = (settings.model_dump_json(), key_id)
    with _EMBEDDERS_LOCK:
        emb = _EMBEDDERS.get(cache_key)
        if emb is None:
            emb = OpenAIEmbedder(
                settings.model,
                api_key,
                base_url=settings.base_url,
                dimensions=settings.dimensions,
                organization=settings.organization,
                project=settings.project,
                rpm=settings.rpm,
                tpm=settings.tpm,
                max_concurrency=settings.max_concurrency,
                timeout_s=settings.timeout_s,
                max_attempts=settings.max_attempts,
                oversize=settings.oversize,
                price_per_million=settings.price_per_million_tokens,
                fleet_limit=settings.fleet_limit,
            )
            _EMBEDDERS[cache_key] = emb
        return emb


class _MalformedResponse(Exception):
    """The server answered 200 with something that is not a complete embeddings response."""


async def _fleet_acquire(name: str, tokens: int) -> None:
    """Take from Prefect global concurrency limits shared by every worker (slot decay makes
    them rate limits): '<name>-requests' one slot, '<name>-tokens' one slot per token."""
    from prefect.concurrency.asyncio import rate_limit

    await rate_limit(f"{name}-requests", occupy=1)
    await rate_limit(f"{name}-tokens", occupy=max(1, tokens))


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc)


def _is_quota(exc: Exception) -> bool:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return (
                err.get("code") == "insufficient_quota" or err.get("type") == "insufficient_quota"
            )
    return "insufficient_quota" in str(exc)


def _transient(exc: BaseException) -> bool:
    import json

    import openai

    if isinstance(exc, openai.RateLimitError):
        return not _is_quota(exc)
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in (408, 409)
    return isinstance(
        exc,
        (
            openai.APITimeoutError,
            openai.APIConnectionError,
            openai.APIResponseValidationError,
            _MalformedResponse,
            json.JSONDecodeError,
        ),
    )


class _RetryAfterWait:
    """Exponential backoff with full jitter, or the server's Retry-After when it gives one."""

    def __init__(self, budget: RateBudget, max_wait: float) -> None:
        from tenacity import wait_random_exponential

        self.budget = budget
        self.max_wait = max_wait
        self.backoff = wait_random_exponential(multiplier=0.5, max=max_wait)

    def __call__(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None) or {}
        after = None
        if headers:
            ms = headers.get("retry-after-ms")
            if ms is not None:
                try:
                    after = float(ms) / 1000.0
                except ValueError:
                    after = None
            if after is None:
                after = parse_reset(headers.get("retry-after"))
        if after is not None:
            after = min(after, self.max_wait)
            self.budget.pause(after)  # every request waits, not only this one
            return after
        return float(self.backoff(retry_state))
