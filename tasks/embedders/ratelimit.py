"""Client-side budgets for requests/min and tokens/min, learned from x-ratelimit-* headers.

The budget keeps a log of what it sent in the last window (one entry per attempt: a request the
server saw counts against its window whether or not the answer arrived) and lets a request go
only when the window, with it, stays under a share (`headroom`) of each limit. For a server
with a sliding window that is exact; for a token bucket it is conservative.

Until the first response with rate-limit headers arrives, the limits are unknown (what the
caller configured is only an upper bound): one request at a time, small. The headers then
give the real limits (the lower of the two wins) and `remaining` (when it says more is used
than this client's log shows, someone else shares the account: the difference is booked as
used). A 429 or an exhausted `remaining` pauses every request until the server's reset.
Requests are packed to at most `request_share` of the token limit, so that no single request
can tip a full window over the limit at the moment an old one leaves it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")

#: seconds an entry stays in the log beyond the window: the server timestamps a request a
#: little later than the client sends it
_EXPIRY_MARGIN_S = 0.25


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
    """Requests and tokens per window, shared by every request of one embedder."""

    def __init__(
        self,
        rpm: int,
        tpm: int,
        headroom: float = 0.97,
        window_s: float = 60.0,
        request_share: float = 0.02,
        learn_first: bool = True,
    ) -> None:
        self.headroom = headroom
        self.window_s = window_s
        self.request_share = request_share
        # per window (the configured values are per minute)
        self.rpm = rpm
        self.tpm = tpm
        #: False until a response carried rate-limit headers: one request at a time till then
        self.learned = not learn_first
        self._probe_busy = False
        self._pause_until = 0.0
        self._log: deque[tuple[float, int]] = deque()
        self._used_tokens = 0

    # ---- limits per window ----------------------------------------------------------------

    @property
    def _req_limit(self) -> float:
        return self.rpm * self.window_s / 60.0 * self.headroom

    @property
    def _tok_limit(self) -> float:
        return self.tpm * self.window_s / 60.0 * self.headroom

    @property
    def token_capacity(self) -> float:
        """The largest request worth packing: a small share of a window's tokens (and small
        while the limits are still unknown)."""
        share = self.tpm * self.window_s / 60.0 * self.request_share
        return max(1.0, share if self.learned else min(share, 4096.0))

    # ---- taking from the budget -----------------------------------------------------------

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s - _EXPIRY_MARGIN_S
        while self._log and self._log[0][0] <= horizon:
            self._used_tokens -= self._log.popleft()[1]

    def _wait_for(self, now: float, tokens: int) -> float:
        """Seconds until `tokens` more fit the window (0: now)."""
        self._expire(now)
        if not self._log:
            return 0.0  # an empty window admits anything (a request larger than the budget)
        fits_req = len(self._log) + 1 <= self._req_limit
        fits_tok = self._used_tokens + tokens <= self._tok_limit
        if fits_req and fits_tok:
            return 0.0
        # the time the oldest entries must leave for the request to fit
        need_req = len(self._log) + 1 - self._req_limit
        need_tok = self._used_tokens + tokens - self._tok_limit
        freed_req = freed_tok = 0.0
        for t, n in self._log:
            freed_req += 1
            freed_tok += n
            if freed_req >= need_req and freed_tok >= need_tok:
                return max(0.01, t + self.window_s + _EXPIRY_MARGIN_S - now)
        return self.window_s

    async def acquire(self, tokens: int) -> None:
        """Wait until a request of `tokens` fits, then book it."""
        while True:
            now = time.monotonic()
            if self._pause_until > now:
                await asyncio.sleep(self._pause_until - now)
                continue
            if not self.learned and self._probe_busy:
                await asyncio.sleep(0.02)  # the limits are unknown: one request at a time
                continue
            wait = self._wait_for(now, tokens)
            if wait <= 0:
                self._log.append((now, tokens))
                self._used_tokens += tokens
                if not self.learned:
                    self._probe_busy = True
                return
            await asyncio.sleep(min(wait, 1.0))

    def done(self) -> None:
        """A request's answer (or failure) arrived: the next probe may go."""
        self._probe_busy = False

    def pause(self, seconds: float) -> None:
        """Hold every request for `seconds` (a 429's Retry-After, an exhausted window)."""
        self._pause_until = max(self._pause_until, time.monotonic() + max(0.0, seconds))

    # ---- learning from the server ---------------------------------------------------------

    def learn(self, headers: Mapping[str, Any], success: bool = True) -> None:
        """Adopt the server's limits (when lower than configured) and its view of `remaining`.

        `success`: the response was a 2xx. One without rate-limit headers then means the server
        does not tell, and the configured limits are what there is; an error response without
        them (a 500) teaches nothing."""
        h = {k.lower(): v for k, v in headers.items()}
        told = False
        for key, attr in (
            ("x-ratelimit-limit-requests", "rpm"),
            ("x-ratelimit-limit-tokens", "tpm"),
        ):
            try:
                # the headers count per window (a minute for the real API)
                limit = int(float(h[key]) * 60.0 / self.window_s)
            except (KeyError, ValueError, TypeError):
                continue
            told = True
            if 0 < limit < getattr(self, attr):
                log.info("the server's limit %s=%d is below the budget; adopting it", attr, limit)
                setattr(self, attr, limit)
        if told or success:
            self.learned = True
        now = time.monotonic()
        self._expire(now)
        try:
            remaining_tokens = int(float(h["x-ratelimit-remaining-tokens"]))
            server_used = self.tpm * self.window_s / 60.0 - remaining_tokens
            if server_used > self._used_tokens + 1:
                # someone else spends from the same account: book their share too
                extra = int(server_used - self._used_tokens)
                self._log.append((now, extra))
                self._used_tokens += extra
        except (KeyError, ValueError, TypeError):
            pass
        for kind in ("requests", "tokens"):
            try:
                remaining = int(float(h[f"x-ratelimit-remaining-{kind}"]))
            except (KeyError, ValueError, TypeError):
                continue
            if remaining <= 0:
                reset = parse_reset(h.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.pause(reset)
