"""Rate limits shared by every worker: requests/min, tokens/min, and a pause after 429s.

One `LimiterActor` (a Ray actor) holds the buckets for the whole job; each worker talks to it through
`SharedLimiter`. Without configured limits each worker uses a `LocalLimiter`, which only carries the 429 pause.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol


class Limiter(Protocol):
    async def acquire(self, est_tokens: int) -> None: ...
    def settle(self, est_tokens: int, used_tokens: int) -> None: ...
    def pause(self, seconds: float) -> None: ...


class LocalLimiter:
    """Per-process token buckets (requests/min, tokens/min) plus a shared pause after 429s.

    Reservations may drive a bucket negative; the caller then sleeps until it refills, so requests are paced
    rather than bursting into 429s.
    """

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._req_cap, self._tok_cap = self._burst(self.rpm), self._burst(self.tpm)
        self._req, self._tok = self._req_cap, self._tok_cap
        self._t = time.monotonic()
        self.paused_until = 0.0

    @staticmethod
    def _burst(limit: int | None) -> float:
        # a few seconds' worth of burst, at least one request's worth
        return max(1.0, limit / 60 * 5) if limit else 0.0

    def _refill(self) -> None:
        now = time.monotonic()
        dt, self._t = now - self._t, now
        if self.rpm:
            self._req = min(self._req_cap, self._req + dt * self.rpm / 60)
        if self.tpm:
            self._tok = min(self._tok_cap, self._tok + dt * self.tpm / 60)

    def reserve(self, est_tokens: int) -> float:
        """Take a request slot and `est_tokens`; return how long the caller must wait before sending."""
        self._refill()
        wait = max(0.0, self.paused_until - time.monotonic())
        if self.rpm:
            self._req -= 1
            if self._req < 0:
                wait = max(wait, -self._req * 60 / self.rpm)
        if self.tpm:
            # a request larger than the whole bucket must still be able to go eventually
            self._tok -= min(est_tokens, self._tok_cap)
            if self._tok < 0:
                wait = max(wait, -self._tok * 60 / self.tpm)
        return wait

    async def acquire(self, est_tokens: int) -> None:
        wait = self.reserve(est_tokens)
        while wait > 0:
            await asyncio.sleep(wait)
            # a 429 elsewhere may have extended the pause while we slept
            wait = self.paused_until - time.monotonic()

    def settle(self, est_tokens: int, used_tokens: int) -> None:
        if self.tpm:
            self._tok = min(self._tok_cap, self._tok + est_tokens - used_tokens)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


class SharedLimiter:
    """Worker-side proxy for the limiter Ray actor shared by every worker, plus a local pause for this worker."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.local = LocalLimiter(None, None)

    async def acquire(self, est_tokens: int) -> None:
        wait = await self.actor.reserve.remote(est_tokens)
        if wait > 0:
            await asyncio.sleep(wait)
        await self.local.acquire(0)

    def settle(self, est_tokens: int, used_tokens: int) -> None:
        if est_tokens != used_tokens:
            self.actor.settle.remote(est_tokens, used_tokens)

    def pause(self, seconds: float) -> None:
        self.local.pause(seconds)
        self.actor.pause.remote(seconds)


class LimiterActor:
    """Body of the shared Ray actor (wrapped with `ray.remote` by the runner)."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.limiter = LocalLimiter(requests_per_minute, tokens_per_minute)

    def reserve(self, est_tokens: int) -> float:
        return self.limiter.reserve(est_tokens)

    def settle(self, est_tokens: int, used_tokens: int) -> None:
        self.limiter.settle(est_tokens, used_tokens)

    def pause(self, seconds: float) -> None:
        self.limiter.pause(seconds)
