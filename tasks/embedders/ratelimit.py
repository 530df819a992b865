"""Client-side budgets for requests/min and tokens/min, learning from x-ratelimit-* headers.

Two leaky buckets (aiolimiter) drain at a share (`headroom`) of each limit with a short burst
allowance, so no 60-second window ever holds more than the limit. Response headers lower the
budgets to what the server says the account has, and a 429 or an exhausted `remaining` pauses
every request until the server's reset time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from aiolimiter import AsyncLimiter

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_reset(value: str | None) -> float | None:
    """'6m0s', '1.5s', '20ms' or '12' -> seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    total = 0.0
    found = False
    for number, unit in _DURATION.findall(value):
        found = True
        total += float(number) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    return total if found else None


class RateBudget:
    """Requests/min and tokens/min budgets shared by every request of one embedder."""

    def __init__(
        self,
        rpm: int,
        tpm: int,
        headroom: float = 0.95,
        burst_seconds: float = 2.0,
        max_request_tokens: int = 0,
        window_s: float = 60.0,
    ) -> None:
        self.headroom = headroom
        self.window_s = window_s
        self.burst_seconds = burst_seconds
        self.max_request_tokens = max_request_tokens
        self._pause_until = 0.0
        self.rpm = rpm
        self.tpm = tpm
        self._build()

    def _build(self) -> None:
        # Any window of the server holds at most burst + rate * window. With the rate at
        # `headroom` of the limit, the burst may use only the rest: (1 - headroom) of a
        # window's allowance (5% of a minute's tokens by default), and at most burst_seconds.
        per_window = self.window_s / 60.0
        tok_rate = self.tpm * self.headroom / 60.0
        tok_burst = min(tok_rate * self.burst_seconds, (1 - self.headroom) * self.tpm * per_window)
        tok_burst = max(tok_burst, float(self.max_request_tokens or 0), 1.0)
        self.token_capacity = tok_burst
        self._tokens = AsyncLimiter(tok_burst, tok_burst / tok_rate)
        req_rate = self.rpm * self.headroom / 60.0
        req_burst = min(req_rate * self.burst_seconds, (1 - self.headroom) * self.rpm * per_window)
        req_burst = max(1.0, req_burst)
        self._requests = AsyncLimiter(req_burst, req_burst / req_rate)

    async def acquire(self, tokens: int) -> None:
        while True:
            wait = self._pause_until - time.monotonic()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        await self._requests.acquire(1)
        left = float(tokens)
        while left > 0:  # a request larger than the burst waits for its whole size
            part = min(left, self.token_capacity)
            await self._tokens.acquire(part)
            left -= part

    def pause(self, seconds: float) -> None:
        """Hold every request for `seconds` (a 429's Retry-After, an exhausted window)."""
        self._pause_until = max(self._pause_until, time.monotonic() + max(0.0, seconds))

    def learn(self, headers: Mapping[str, Any]) -> None:
        """Adopt the server's limits when they are lower; pause when a window is spent."""
        h = {k.lower(): v for k, v in headers.items()}
        changed = False
        for key, attr in (
            ("x-ratelimit-limit-requests", "rpm"),
            ("x-ratelimit-limit-tokens", "tpm"),
        ):
            try:
                # the headers count per window (a minute for the real API)
                limit = int(float(h[key]) * 60.0 / self.window_s)
            except (KeyError, ValueError, TypeError):
                continue
            if 0 < limit < getattr(self, attr):
                log.info(
                    "server limit %s=%d is below the configured budget; adopting it", attr, limit
                )
                setattr(self, attr, limit)
                changed = True
        if changed:
            self._build()
        for kind in ("requests", "tokens"):
            try:
                remaining = int(float(h[f"x-ratelimit-remaining-{kind}"]))
            except (KeyError, ValueError, TypeError):
                continue
            if remaining <= 0:
                reset = parse_reset(h.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.pause(reset)
