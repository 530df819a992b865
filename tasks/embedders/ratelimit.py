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
    ) -> None:
        self.headroom = headroom
        self.burst_seconds = burst_seconds
        self.max_request_tokens = max_request_tokens
        self._pause_until = 0.0
        self.rpm = rpm
        self.tpm = tpm
        self._build()

    def _build(self) -> None:
        # burst long enough that one maximal request fits the token bucket
        tok_rate = self.tpm * self.headroom / 60.0
        period = max(self.burst_seconds, (self.max_request_tokens or 0) / max(tok_rate, 1e-9))
        self.token_capacity = tok_rate * period
        self._tokens = AsyncLimiter(self.token_capacity, period)
        req_rate = self.rpm * self.headroom / 60.0
        req_period = max(self.burst_seconds, 1.0 / max(req_rate, 1e-9))
        self._requests = AsyncLimiter(max(1.0, req_rate * req_period), req_period)

    async def acquire(self, tokens: int) -> None:
        while True:
            wait = self._pause_until - time.monotonic()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        await self._requests.acquire(1)
        await self._tokens.acquire(min(float(tokens), self.token_capacity))

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
                limit = int(float(h[key]))
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
