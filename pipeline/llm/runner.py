"""`run_requests`: send every request once, keep `concurrency` in flight, record each result in the ledger.

The driver (this process) owns the ledger and the budget. It pulls requests lazily from the caller's iterable,
answers ledger hits at once (`cached=True`), asks `should_send` just before dispatch, and keeps each worker's
queue topped up to its share of `concurrency` (+ a small prefetch so a slot never waits on the driver).
Workers are Ray actors (or, with `llm.workers: 0`, one in-process thread) running `worker.WorkerCore`.
Results are written to the ledger in one transaction per arrival batch, then handed to `on_result`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.errors import ResourceUnavailable, TextbookError
from pipeline.llm.client import Secret
from pipeline.llm.ledger import Ledger
from pipeline.llm.types import LLMRequest, LLMResult, RunSummary

_OPENAI_DEFAULT = "https://api.openai.com/v1"


# --------------------------------------------------------------------------------------------- endpoint
def _needs_local_server(llm: LLMSection) -> bool:
    return llm.provider == "local" and not llm.resolved_base_url()  # OPENAI_BASE_URL set: use that endpoint


@contextlib.contextmanager
def open_endpoint(llm: LLMSection, log_dir: str | Path | None = None) -> Iterator[LLMSection]:
    """Yield an `llm` section pointing at a live endpoint: for `provider: local` without a base_url, start a local
    server for the duration (`server.local_server`: llama.cpp for GGUF, else `transformers serve`), its log in
    `log_dir` (kept) or a temporary file. Wrap a whole stage in it to reuse one server across calls."""
    if _needs_local_server(llm):
        from pipeline.llm.server import local_server

        server = local_server(llm.model, port=llm.local_port, device=llm.local_device, threads=llm.local_threads,
                              n_ctx=llm.local_ctx, startup_timeout_s=llm.local_startup_timeout_s, log_dir=log_dir)
        with server:
            yield llm.model_copy(update={"base_url": server.base_url})
        return
    yield llm


def api_key(llm: LLMSection) -> Secret:
    """The key from `llm.api_key_env`; endpoints other than OpenAI's may need none."""
    key = os.environ.get(llm.api_key_env, "")
    base = llm.resolved_base_url()
    if not key and (base is None or base.rstrip("/") == _OPENAI_DEFAULT):
        raise ResourceUnavailable(
            f"no API key: set the environment variable {llm.api_key_env} (llm.api_key_env), or point "
            "llm.base_url / OPENAI_BASE_URL at an OpenAI-compatible server, or use llm.provider: local")
    return Secret(key)


# --------------------------------------------------------------------------------------------- workers
class _RayHandle:
    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def submit(self, batch: list) -> None:
        self.actor.submit.remote(batch)

    def poll(self) -> concurrent.futures.Future:
        return self.actor.poll.remote(0.5).future()

    def cancel_queued(self) -> list[str]:
        import ray

        return ray.get(self.actor.cancel_queued.remote(), timeout=60)

    def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.get(self.actor.close.remote(), timeout=10)
        with contextlib.suppress(Exception):
            ray.kill(self.actor)


class _ThreadHandle:
    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def submit(self, batch: list) -> None:
        self.worker.submit(batch)

    def poll(self) -> concurrent.futures.Future:
        return self.worker.poll(0.5)

    def cancel_queued(self) -> list[str]:
        return self.worker.cancel_queued().result(timeout=60)

    def close(self) -> None:
        self.worker.close()


def _slots(llm: LLMSection) -> list[int]:
    """Each worker's share of `concurrency` (never an idle worker with zero slots)."""
    n = min(max(1, llm.workers), llm.concurrency)
    return [llm.concurrency // n + (1 if i < llm.concurrency % n else 0) for i in range(n)]


class WorkerPool:
    """The LLM workers, being started. A Ray actor takes 1-2 s to come up (a process that imports openai), and
    creating one does not block: a caller that builds the pool before its own planning (`prestart_workers`)
    overlaps the two. `ready()` waits for the start; `close()` stops the workers. A pool serves one run: a
    worker may still hold the last run's unanswered poll, which would swallow the next run's results."""

    def __init__(self, llm: LLMSection, secret: Secret) -> None:
        self.llm = llm
        self.handles: list[Any] = []
        self._pending: list[Any] = []
        self.used = False
        base_url = llm.resolved_base_url()
        if llm.workers == 0:
            from pipeline.llm.worker import ThreadWorker

            self.handles = [_ThreadHandle(ThreadWorker(llm, base_url, secret, llm.concurrency))]
            return
        import ray

        from pipeline.llm.limiter import LimiterActor
        from pipeline.llm.worker import RayWorker

        if not ray.is_initialized():
            ray.init(address=llm.resolved_ray_address(), include_dashboard=False, ignore_reinit_error=True,
                     log_to_driver=False)
        limiter = None
        if llm.requests_per_minute or llm.tokens_per_minute:
            limiter = ray.remote(num_cpus=0)(LimiterActor).remote(llm.requests_per_minute, llm.tokens_per_minute)
        actor_cls = ray.remote(num_cpus=0, max_concurrency=16)(RayWorker)
        strategy = "SPREAD" if llm.workers > 1 else "DEFAULT"
        self.handles = [_RayHandle(actor_cls.options(scheduling_strategy=strategy).remote(llm, base_url, secret, s,
                                                                                           limiter))
                        for s in _slots(llm)]
        self._pending = [h.actor.ping.remote() for h in self.handles]  # builds each client (imports openai)

    def ready(self) -> list[Any]:
        if self.used:
            raise TextbookError("a worker pool serves one run: start another with prestart_workers()")
        self.used = True
        if self._pending:
            import ray

            ray.get(self._pending, timeout=300)
            self._pending = []
        return self.handles

    def close(self) -> None:
        for h in self.handles:
            h.close()
        self.handles = []
        self.used = True


def prestart_workers(llm: LLMSection) -> WorkerPool | None:
    """Start Ray worker actors now, for a `run_requests(..., pool=...)` that follows the caller's planning.
    None where there is nothing to gain or it cannot start yet: the thread worker (starts instantly), a local
    server not started yet, or no API key (run_requests then reports what is missing)."""
    if llm.workers == 0 or _needs_local_server(llm):
        return None
    try:
        secret = api_key(llm)
    except ResourceUnavailable:
        return None
    return WorkerPool(llm, secret)


# --------------------------------------------------------------------------------------------- budget
class _Budget:
    """Hard caps. A request is dispatched only if spend so far + worst case of everything in flight + its own
    worst case (estimated prompt + max_tokens) stays within the cap, so the cap cannot be overshot."""

    def __init__(self, budget: BudgetSection, llm: LLMSection) -> None:
        self.b = budget
        self.default_max_tokens = llm.max_tokens
        # uncapped (the usual case): nothing to reserve against, so the driver's per-request path only adds spend
        self.capped = budget.max_usd is not None or budget.max_tokens is not None
        self.spent_usd = self.reserved_usd = 0.0
        self.spent_tok = self.reserved_tok = 0

    def _worst(self, req: LLMRequest) -> tuple[float, int]:
        p, c = req.estimated_prompt_tokens(), req.max_completion_tokens(self.default_max_tokens)
        return self.b.cost(p, c), p + c

    def take(self, req: LLMRequest) -> bool:
        """Reserve the request's worst case if it fits under the caps; False (nothing reserved) if not."""
        if not self.capped:
            return True
        usd, tok = self._worst(req)
        if self.b.max_usd is not None and self.spent_usd + self.reserved_usd + usd > self.b.max_usd:
            return False
        if self.b.max_tokens is not None and self.spent_tok + self.reserved_tok + tok > self.b.max_tokens:
            return False
        self.reserved_usd += usd
        self.reserved_tok += tok
        return True

    def release(self, req: LLMRequest) -> None:
        if self.capped:
            usd, tok = self._worst(req)
            self.reserved_usd -= usd
            self.reserved_tok -= tok

    def settle(self, req: LLMRequest, result: LLMResult) -> None:
        self.release(req)
        self.spent_usd += self.b.cost(result.prompt_tokens, result.completion_tokens)
        self.spent_tok += result.prompt_tokens + result.completion_tokens

    def message(self) -> str:
        caps = []
        if self.b.max_usd is not None:
            caps.append(f"budget.max_usd={self.b.max_usd} (spent ${self.spent_usd:.4f})")
        if self.b.max_tokens is not None:
            caps.append(f"budget.max_tokens={self.b.max_tokens} (used {self.spent_tok})")
        return "budget cap reached: " + ", ".join(caps) + "; results so far are in the ledger, " \
            "raise the cap and re-run to continue"


# --------------------------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, enabled: bool, total: int | None) -> None:
        self.total = total
        self.bar = None
        self.t0 = time.monotonic()
        self._last = 0.0
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]llm"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("llm", total=total, info="")

    def update(self, s: RunSummary, spent: float, force: bool = False) -> None:
        if self.bar is None:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.25:
            return
        self._last = now
        done = s.ok + s.failed + s.skipped
        dt = max(now - self.t0, 1e-6)
        rate = s.sent / dt
        eta = ""
        if self.total and rate > 0:
            eta = f" eta {max(0, self.total - done) / rate:,.0f}s"
        info = (f"{rate:.1f} req/s {s.completion_tokens / dt:,.0f} out tok/s | ok {s.ok} (cached {s.cached}) "
                f"failed {s.failed} skipped {s.skipped} retries {s.retries} | ${spent:.4f}{eta}")
        self.bar.update(self.task, completed=done, total=self.total, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))], 4)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(v[-1], 4), "mean": round(sum(v) / len(v), 4)}


# --------------------------------------------------------------------------------------------- driver
def run_requests(
    requests: Iterable[LLMRequest],
    llm: LLMSection,
    budget: BudgetSection,
    ledger_path: Path,
    *,
    should_send: Callable[[LLMRequest], str | None] | None = None,
    on_result: Callable[[LLMResult], None] | None = None,
    progress: bool = True,
    pool: WorkerPool | None = None,
    server_log_dir: str | Path | None = None,
) -> RunSummary:
    """Run every request; `on_result` is called in this thread exactly once per request (ok, failed or skipped).

    Ledger hits come back at once with `cached=True` and cost nothing. Requests are pulled lazily, so a
    generator works; `should_send(req)` may return a reason to skip it, checked just before dispatch.
    On the budget cap the run stops dispatching, lets requests in flight finish (they are recorded), reports
    the rest as skipped `budget`, and sets `summary.stopped_reason`. Ctrl-C / kill loses nothing recorded.
    `pool` (from `prestart_workers(llm)`, same `llm`) is used instead of starting workers, and closed at the end.
    `server_log_dir`: where a local server (provider local) writes `server.log`, kept after the run.
    """
    if pool is not None and pool.llm != llm:
        raise TextbookError("run_requests: the worker pool was started for another llm section")
    with open_endpoint(llm, server_log_dir) as live:
        return _Driver(requests, live, budget, Path(ledger_path), should_send, on_result, progress, pool).run()


class _Driver:
    def __init__(self, requests: Iterable[LLMRequest], llm: LLMSection, budget: BudgetSection, ledger_path: Path,
                 should_send: Callable[[LLMRequest], str | None] | None,
                 on_result: Callable[[LLMResult], None] | None, progress: bool, pool: WorkerPool | None) -> None:
        self.llm, self.should_send, self.on_result, self.pool = llm, should_send, on_result, pool
        total = len(requests) if hasattr(requests, "__len__") else None  # type: ignore[arg-type]
        self.requests = iter(requests)
        self.ledger = Ledger(ledger_path)
        # one query up front instead of one per request: most requests of a run are not in the ledger yet
        self.ok_keys = self.ledger.ok_keys()
        self.budget = _Budget(budget, llm)
        self.s = RunSummary(total=0, model=llm.model, ledger=str(ledger_path))
        self.progress = _Progress(progress, total)
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.seen: set[str] = set()
        self.inflight: dict[str, LLMRequest] = {}
        self.held: tuple[str, LLMRequest] | None = None  # next request, waiting for budget room
        self.exhausted = False
        self.t0 = time.monotonic()

    # -- emitting results (exactly one per request)
    def _emit(self, result: LLMResult) -> None:
        s = self.s
        if result.ok:
            s.ok += 1
            if result.cached:
                s.cached += 1
        elif result.skipped:
            s.skipped += 1
            self.skipped[result.skipped] += 1
        else:
            s.failed += 1
            self.failed[(result.error or "unknown").split(":", 2)[-1].strip()[:80]] += 1
        if self.on_result is not None:
            self.on_result(result)

    def _skip(self, key: str, req: LLMRequest, reason: str) -> None:
        self._emit(LLMResult(key=key, ok=False, text=None, finish_reason=None, prompt_tokens=0,
                             completion_tokens=0, latency_s=0.0, attempts=0, error=None, model=self.llm.model,
                             tag=req.tag, skipped=reason))

    # -- pulling requests
    def _next(self) -> tuple[str, LLMRequest] | None:
        """Next request that needs a call, answering ledger hits and duplicates on the way."""
        if self.held is not None:
            item, self.held = self.held, None
            return item
        for req in self.requests:
            self.s.total += 1
            key = req.key(self.llm.model)
            if key in self.seen:
                self._skip(key, req, "duplicate")
                continue
            self.seen.add(key)
            hit = self.ledger.get_ok(key) if key in self.ok_keys else None
            if hit is not None:
                hit.tag = req.tag
                self._emit(hit)
                continue
            return key, req
        self.exhausted = True
        return None

    def _fill(self, capacity: int) -> list[tuple[str, LLMRequest]]:
        batch: list[tuple[str, LLMRequest]] = []
        while len(batch) < capacity and self.s.stopped_reason is None:
            item = self._next()
            if item is None:
                break
            key, req = item
            if self.should_send is not None:
                reason = self.should_send(req)
                if reason:
                    self._skip(key, req, reason)
                    continue
            if not self.budget.take(req):
                if self.inflight or batch:
                    self.held = item  # room may free up when in-flight requests report real usage
                else:
                    self.s.stopped_reason = self.budget.message()
                    self._skip(key, req, "budget")
                break
            self.inflight[key] = req
            batch.append(item)
        return batch

    def _drain_unsent(self) -> None:
        """After a budget stop: every request not sent is reported (ledger hits still count as ok)."""
        if self.held is not None:
            key, req = self.held
            self.held = None
            self._skip(key, req, "budget")
        while (item := self._next()) is not None:
            self._skip(item[0], item[1], "budget")

    # -- results
    def _record(self, results: list[LLMResult]) -> None:
        pairs = []
        for r in results:
            req = self.inflight.pop(r.key)
            r.tag = req.tag
            pairs.append((r, req))
        self.ledger.put_many(pairs)  # durable before anyone downstream sees it
        for r, req in pairs:
            self.budget.settle(req, r)
            self.s.sent += 1
            self.s.attempts += r.attempts
            self.s.retries += r.attempts - 1
            self.s.prompt_tokens += r.prompt_tokens
            self.s.completion_tokens += r.completion_tokens
            self.latencies.append(r.latency_s)
            self._emit(r)

    def run(self) -> RunSummary:
        pool = self.pool
        try:
            first = self._fill(1)
            if first:
                t_start = time.monotonic()
                if pool is None:
                    pool = WorkerPool(self.llm, api_key(self.llm))
                handles = pool.ready()
                # with a prestarted pool: only the part of the start-up that planning did not hide
                self.s.startup_s = round(time.monotonic() - t_start, 3)
                self._loop(handles, first)
            self.progress.update(self.s, self.budget.spent_usd, force=True)
        finally:
            if pool is not None:
                pool.close()
            self.progress.close()
            self.ledger.close()
        return self._summary()

    def _loop(self, handles: list[Any], first: list[tuple[str, LLMRequest]]) -> None:
        slots = _slots(self.llm)
        caps = [s + max(2, s // 2) for s in slots]  # prefetch: a freed slot never waits on the driver
        outstanding = [0] * len(handles)
        handles[0].submit(first)
        outstanding[0] = len(first)
        polls = {h.poll(): i for i, h in enumerate(handles)}
        cancelled = False
        while True:
            if self.s.stopped_reason is None:
                for i, h in enumerate(handles):
                    batch = self._fill(caps[i] - outstanding[i])
                    if batch:
                        h.submit(batch)
                        outstanding[i] += len(batch)
            if self.s.stopped_reason is not None and not cancelled:
                cancelled = True
                for i, h in enumerate(handles):
                    for key in h.cancel_queued():
                        outstanding[i] -= 1
                        req = self.inflight.pop(key)
                        self.budget.release(req)
                        self._skip(key, req, "budget")
                self._drain_unsent()
            if sum(outstanding) == 0 and self.held is None and (self.exhausted or cancelled):
                break
            done, _ = concurrent.futures.wait(list(polls), return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                i = polls.pop(fut)
                try:
                    results = fut.result()
                except Exception as e:  # worker died: its requests fail (not in the ledger, re-run sends them)
                    raise TextbookError(f"LLM worker {i} died: {type(e).__name__}: {e}") from e
                outstanding[i] -= len(results)
                self._record(results)
                polls[handles[i].poll()] = i
            self.progress.update(self.s, self.budget.spent_usd)

    def _summary(self) -> RunSummary:
        s = self.s
        s.skipped_reasons = dict(self.skipped)
        s.failed_reasons = dict(self.failed)
        s.cost_usd = round(self.budget.spent_usd, 6)
        s.elapsed_s = round(time.monotonic() - self.t0, 3)
        s.requests_per_s = round(s.sent / s.elapsed_s, 3) if s.elapsed_s else 0.0
        s.output_tokens_per_s = round(s.completion_tokens / s.elapsed_s, 3) if s.elapsed_s else 0.0
        s.latency_s = _percentiles(self.latencies)
        if not s.reconciled:  # a bug, not a user error: say so loudly
            raise TextbookError(f"LLM run does not reconcile: total {s.total} != ok {s.ok} + failed {s.failed} "
                                f"+ skipped {s.skipped}")
        return s


# --------------------------------------------------------------------------------------------- dry run
def estimate(requests: Iterable[LLMRequest], llm: LLMSection, budget: BudgetSection, *,
             ledger_path: Path | None = None, assumed_latency_s: float | None = None) -> dict:
    """For --dry-run: n requests, estimated tokens, cost (upper bound: every completion hits max_tokens) and
    time at the configured concurrency. Requests already answered in the ledger are free and not counted."""
    n = cached = 0
    p_tok = c_tok = 0
    ok_keys: set[str] = set()
    if ledger_path is not None and Path(ledger_path).exists():
        with Ledger(ledger_path) as ledger:  # one query, not a row (with its whole text) per request
            ok_keys = ledger.ok_keys()
    for req in requests:
        n += 1
        if req.key(llm.model) in ok_keys:
            cached += 1
            continue
        p_tok += req.estimated_prompt_tokens()
        c_tok += req.max_completion_tokens(llm.max_tokens)
    to_send = n - cached
    # without a measurement, assume ~50 output tokens/s per stream for the worst-case completion length
    latency = assumed_latency_s if assumed_latency_s is not None else (c_tok / to_send / 50 if to_send else 0.0)
    rate = llm.concurrency / latency if latency > 0 else float("inf")
    if llm.requests_per_minute:
        rate = min(rate, llm.requests_per_minute / 60)
    if llm.tokens_per_minute and to_send:
        rate = min(rate, llm.tokens_per_minute / 60 / ((p_tok + c_tok) / to_send))
    return {
        "requests": n,
        "cached": cached,
        "to_send": to_send,
        "est_prompt_tokens": p_tok,
        "max_completion_tokens": c_tok,
        "est_max_cost_usd": round(budget.cost(p_tok, c_tok), 4),
        "concurrency": llm.concurrency,
        "assumed_latency_s": round(latency, 3),
        "est_time_s": round(to_send / rate, 1) if to_send and rate != float("inf") else 0.0,
        "model": llm.model,
    }
