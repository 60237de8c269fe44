"""A worker: `slots` asyncio tasks, each taking the next queued request the moment its previous one finishes.

No batch barrier: the driver keeps the queue topped up and collects finished results with `poll`, so one slow
request only ever occupies its own slot. A queued item is `(key, request, allowance)`: `allowance` is how many
unusable answers the request may still take (`LLMClient.call`). `poll` answers `{"results": [LLMResult, ...],
"notices": [...]}`, the notices being the client's waits and one-time warnings for the driver's progress line. The same `WorkerCore` runs inside a Ray actor (`RayWorker`) or, with
`llm.workers: 0`, in a background event-loop thread of the driver (`ThreadWorker`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from typing import Any

from pipeline.config.llm import LLMSection
from pipeline.llm.client import LLMClient, Secret
from pipeline.llm.limiter import LocalLimiter, SharedLimiter
from pipeline.llm.types import LLMRequest, LLMResult


class WorkerCore:
    def __init__(self, llm: LLMSection, base_url: str | None, api_key: Secret, slots: int,
                 limiter_actor: Any = None) -> None:
        self.llm, self.base_url, self.api_key, self.slots = llm, base_url, api_key, slots
        self.limiter_actor = limiter_actor
        self.queue: collections.deque[tuple[str, LLMRequest, int]] = collections.deque()
        self.done: list[LLMResult] = []
        self._started = False

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.limiter_actor is not None:
            limiter: Any = SharedLimiter(self.limiter_actor)
        else:
            limiter = LocalLimiter(self.llm.requests_per_minute, self.llm.tokens_per_minute)
        self.client = LLMClient(self.llm, self.base_url, self.api_key, limiter, max_connections=self.slots)
        self.has_work = asyncio.Event()
        self.has_done = asyncio.Event()
        self.tasks = [asyncio.get_running_loop().create_task(self._slot()) for _ in range(self.slots)]

    async def _slot(self) -> None:
        while True:
            if not self.queue:
                self.has_work.clear()
                await self.has_work.wait()
                continue
            key, req, allowance = self.queue.popleft()
            try:
                result = await self.client.call(req, key, allowance)
            except Exception as e:  # noqa: BLE001 - a bug here must not lose the request
                result = LLMResult(key=key, ok=False, text=None, finish_reason=None, prompt_tokens=0,
                                   completion_tokens=0, latency_s=0.0, attempts=1,
                                   error=f"worker error: {type(e).__name__}: {e}", model=self.llm.model)
            self.done.append(result)
            self.has_done.set()

    async def submit(self, batch: list[tuple[str, LLMRequest, int]]) -> None:
        self._start()
        self.queue.extend(batch)
        self.has_work.set()

    async def poll(self, timeout: float = 1.0) -> dict[str, list]:
        """Finished results and the client's notices since the last poll (waits up to `timeout` for a result)."""
        self._start()
        if not self.done and not self.client.notices:
            self.has_done.clear()
            try:
                await asyncio.wait_for(self.has_done.wait(), timeout)
            except TimeoutError:
                pass
        out, self.done = self.done, []
        return {"results": out, "notices": self.client.drain_notices()}

    async def cancel_queued(self) -> list[str]:
        """Drop requests not started yet (budget stop); returns their keys."""
        keys = [item[0] for item in self.queue]
        self.queue.clear()
        return keys

    async def close(self) -> None:
        if not self._started:
            return
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()


class RayWorker(WorkerCore):
    """The Ray actor body; `ray.remote(num_cpus=0)` is applied by the runner (network-bound, needs no CPU slot)."""

    async def ping(self) -> bool:
        # build the client now (importing openai/httpx takes seconds) so startup is measured as startup
        self._start()
        return True


class ThreadWorker:
    """`WorkerCore` on a private event loop in a daemon thread, with the same future-returning API as an actor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llm-worker", daemon=True)
        self.thread.start()
        self.core = WorkerCore(*args, **kwargs)

    def _run(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def submit(self, batch: list[tuple[str, LLMRequest, int]]) -> concurrent.futures.Future:
        return self._run(self.core.submit(batch))

    def poll(self, timeout: float = 1.0) -> concurrent.futures.Future:
        return self._run(self.core.poll(timeout))

    def cancel_queued(self) -> concurrent.futures.Future:
        return self._run(self.core.cancel_queued())

    def close(self) -> None:
        async def shutdown() -> None:
            await self.core.close()
            # an outstanding poll of the driver is abandoned at close
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            self._run(shutdown()).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
