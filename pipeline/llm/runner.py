"""`run_requests`: send every request once, keep `concurrency` in flight, record each result in the ledger.

The driver (this process) owns the ledger and the budget. It pulls requests lazily from the caller's iterable,
answers ledger hits at once (`cached=True`), asks `should_send` just before dispatch, and keeps each worker's
queue topped up to its share of `concurrency` (+ a small prefetch so a slot never waits on the driver).
Workers are Ray actors (or, with `llm.workers: 0`, one in-process thread) running `worker.WorkerCore`.
Results are written to the ledger in one transaction per arrival batch, then handed to `on_result`.
With `llm.mode: batch` the same accounting (`DriverBase`) drives the batch API instead (`pipeline.llm.batch`).

Budget (`budget.max_usd` / `budget.max_tokens`, a cap on what ONE run spends; a re-run may spend it again): every
answer with `usage` is billed, usable or not. A request is dispatched only if spent + the reserved worst case of
everything in flight + its own worst case fits under the cap; its worst case is (1 + unusable answers it may still
take) x (estimated prompt tokens x the largest billed/estimated prompt ratio seen so far + max_tokens x the
largest billed/max_tokens completion ratio seen so far) at the configured prices. Estimates learn from bills: the
first request goes alone (online: until its answer; batch: in a batch of its own) until an answer has been billed,
and when a bill raises a ratio, what is in flight is reserved again at the new estimate. With a cap, the online
driver queues no request beyond `concurrency` (no prefetch), so requests dispatched but not yet billed never
exceed `llm.concurrency`. The cap is overshot only where a bill exceeds its reservation, and never by more than
the requests in flight when spend crossed the cap: overshoot <= sum over those of (billed - reserved) <=
`llm.concurrency` (batch: the requests of the batches in flight) x one request's largest billed cost.
`summary.max_inflight_usd` is the largest reservation that was in flight at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import sys
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
# skip/failure reasons of requests a run leaves for a re-run (`RunSummary.unanswered`): the run stopped before them
# (the budget cap; a server wait above llm.max_wait_s), or they sit in a batch an earlier batch-mode run left open
LEFT_FOR_RERUN = ("budget", "server_wait", "in_open_batch")
PRINTED_WAIT_S = 5.0  # a wait this long or longer is also printed as a line (logs, non-TTY output, narrow terminals)


# --------------------------------------------------------------------------------------------- endpoint
def _needs_local_server(llm: LLMSection) -> bool:
    return llm.provider == "local" and not llm.resolved_base_url()  # OPENAI_BASE_URL set: use that endpoint


@contextlib.contextmanager
def open_endpoint(llm: LLMSection, log_dir: str | Path | None = None) -> Iterator[LLMSection]:
    """Yield an `llm` section pointing at a live endpoint: for `provider: local` without a base_url, start a local
    server for the duration (`server.local_server`: llama.cpp for GGUF, else `transformers serve`), its log in
    `log_dir` (kept) or a temporary file. Wrap a whole stage in it to reuse one server across calls."""
    with _endpoint(llm, log_dir) as (live, _):
        yield live


@contextlib.contextmanager
def _endpoint(llm: LLMSection, log_dir: str | Path | None) -> Iterator[tuple[LLMSection, Any]]:
    """`open_endpoint`, also yielding the local server it started (None: none). A `TextbookError` raised while
    the server runs carries the tail of the server's log, which is kept."""
    if not _needs_local_server(llm):
        yield llm, None
        return
    from pipeline.llm.server import local_server

    server = local_server(llm.model, port=llm.local_port, device=llm.local_device, threads=llm.local_threads,
                          n_ctx=llm.local_ctx, startup_timeout_s=llm.local_startup_timeout_s, log_dir=log_dir)
    with server:
        try:
            yield llm.model_copy(update={"base_url": server.base_url}), server
        except TextbookError as e:
            server.failed = True
            raise type(e)(f"{e}\n{server.log_note()}") from e


def server_failure_note(server: Any, summary: RunSummary) -> str | None:
    """When requests to a local server failed: how many and why (the commonest errors), with the tail of the
    server's log, which is then kept (`server.failed`). None when none failed."""
    failed = {k: v for k, v in summary.failed_reasons.items() if v}
    if not failed or server is None:
        return None
    server.failed = True
    errors = "; ".join(f"{n:,} x {reason}" for reason, n in sorted(failed.items(), key=lambda kv: -kv[1])[:3])
    return f"{sum(failed.values()):,} request(s) to the local server failed ({errors}). {server.log_note()}"


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
            from pipeline.scale.engine import check_ray_address
            from pipeline.signals import keep_signal_handlers

            # "local": without an address ray.init joins any cluster a `ray start` left on this machine (another
            # user's, perhaps gone: it then waits minutes and fails), not the local Ray that llm.ray_address promises
            address = llm.resolved_ray_address() or "local"
            check_ray_address(address)
            with keep_signal_handlers():  # ray.init sets SIGTERM to sys.exit(15): `textbook`'s handlers stay
                ray.init(address=address, include_dashboard=False,
                         ignore_reinit_error=True, log_to_driver=False)
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
    """Start the workers now, for a `run_requests(..., pool=...)` that follows the caller's planning: Ray actors
    come up meanwhile; the thread worker (`llm.workers: 0`) imports the HTTP client here (openai and httpx, about
    0.5 s), while the caller's child processes load. None where there is nothing to gain or it cannot start yet:
    batch mode (no workers), a local server not started yet, or no API key (run_requests then reports what is
    missing)."""
    if llm.mode == "batch" or _needs_local_server(llm):
        return None
    try:
        secret = api_key(llm)
    except ResourceUnavailable:
        return None
    return WorkerPool(llm, secret)


# --------------------------------------------------------------------------------------------- budget
class Budget:
    """Hard caps on this run's spend (USD, tokens), counting what was billed and what is in flight (see the module
    docstring).

    `take(key, req, allowance)` reserves a request's worst case if it fits (`force=True`: reserve whatever, for
    requests already at the provider, e.g. a resumed batch); `settle(key, req, result)` swaps the reservation for
    the result's billed cost (`result.cost_usd`, set by `price`); `release(key)` drops a reservation unused.
    Until a billed answer has been settled (`calibrated`), a capped budget holds one reservation at a time."""

    def __init__(self, budget: BudgetSection, llm: LLMSection, batch: bool = False) -> None:
        self.b = budget
        self.batch = batch
        self.default_max_tokens = llm.max_tokens
        # uncapped (the usual case): nothing to reserve against, so the driver's per-request path only adds spend
        self.capped = budget.max_usd is not None or budget.max_tokens is not None
        self.spent_usd = self.reserved_usd = 0.0
        self.spent_tok = self.reserved_tok = 0
        self.held: dict[str, tuple[float, int, LLMRequest, int]] = {}  # key -> (USD, tokens, request, allowance)
        # estimates learn from bills: the largest billed / estimated prompt tokens, billed / max_tokens completion
        self.prompt_scale = 1.0
        self.completion_scale = 1.0
        self.calibrated = False  # an answer has been billed: its ratios are known
        self.max_inflight_usd = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD at the configured prices (batch mode: with `budget.batch_discount`)."""
        return self.b.cost(prompt_tokens, completion_tokens, batch=self.batch)

    def worst(self, req: LLMRequest, allowance: int = 1) -> tuple[float, int]:
        """(USD, tokens) the request may be billed at most, `allowance` answers of it, at the current estimate."""
        p = math.ceil(req.estimated_prompt_tokens() * self.prompt_scale)
        c = math.ceil(req.max_completion_tokens(self.default_max_tokens) * self.completion_scale)
        n = max(1, allowance)
        return self.cost(p, c) * n, (p + c) * n

    def take(self, key: str, req: LLMRequest, allowance: int = 1, force: bool = False) -> bool:
        """Reserve the request's worst case if it fits under the caps; False (nothing reserved) if not, and while
        the budget is not calibrated and another reservation is held (the first request goes alone)."""
        if not self.capped:
            return True
        if not force and not self.calibrated and self.held:
            return False
        usd, tok = self.worst(req, allowance)
        if not force:
            if self.b.max_usd is not None and self.spent_usd + self.reserved_usd + usd > self.b.max_usd:
                return False
            if self.b.max_tokens is not None and self.spent_tok + self.reserved_tok + tok > self.b.max_tokens:
                return False
        self.held[key] = (usd, tok, req, allowance)
        self.reserved_usd += usd
        self.reserved_tok += tok
        self.max_inflight_usd = max(self.max_inflight_usd, self.reserved_usd)
        return True

    def release(self, key: str) -> None:
        usd, tok, _, _ = self.held.pop(key, (0.0, 0, None, 0))
        self.reserved_usd -= usd
        self.reserved_tok -= tok

    def settle(self, key: str, req: LLMRequest | None, result: LLMResult) -> None:
        self.release(key)
        self.spent_usd += result.cost_usd
        self.spent_tok += result.billed_prompt_tokens + result.billed_completion_tokens
        answers = result.unusable_answers + (1 if result.ok else 0)
        if not (self.capped and req is not None and answers):
            return
        self.calibrated = True
        p_scale = result.billed_prompt_tokens / (req.estimated_prompt_tokens() * answers)
        c_scale = result.billed_completion_tokens / (req.max_completion_tokens(self.default_max_tokens) * answers)
        if p_scale > self.prompt_scale or c_scale > self.completion_scale:
            self.prompt_scale = max(self.prompt_scale, p_scale)
            self.completion_scale = max(self.completion_scale, c_scale)
            self._reserve_again()

    def _reserve_again(self) -> None:
        """A bill raised the estimate: what is in flight is reserved at the new estimate (never less than before),
        so no further request is dispatched on the old, too low one."""
        for key, (usd, tok, req, allowance) in list(self.held.items()):
            new_usd, new_tok = self.worst(req, allowance)
            new_usd, new_tok = max(usd, new_usd), max(tok, new_tok)
            self.held[key] = (new_usd, new_tok, req, allowance)
            self.reserved_usd += new_usd - usd
            self.reserved_tok += new_tok - tok
        self.max_inflight_usd = max(self.max_inflight_usd, self.reserved_usd)

    def price(self, result: LLMResult) -> None:
        """Set the result's `cost_usd` (all it was billed) and `unusable_cost_usd` at this run's prices."""
        result.cost_usd = self.cost(result.billed_prompt_tokens, result.billed_completion_tokens)
        result.unusable_cost_usd = self.cost(result.unusable_prompt_tokens, result.unusable_completion_tokens)

    def exhausted(self) -> bool:
        """Spend alone has reached a cap (a provider billed more than its reservation): stop at once."""
        if not self.capped:
            return False
        return ((self.b.max_usd is not None and self.spent_usd >= self.b.max_usd)
                or (self.b.max_tokens is not None and self.spent_tok >= self.b.max_tokens))

    def message(self) -> str:
        """What the stop says (the caller adds what to do): the caps, per run, and this run's spend so far (the
        driver asks again at the end, so the summary quotes the final spend, requests in flight at the stop
        included)."""
        caps = []
        if self.b.max_usd is not None:
            caps.append(f"budget.max_usd={self.b.max_usd:g}: this run spent ${self.spent_usd:.4f} (at most "
                        f"${self.max_inflight_usd:.4f} reserved in flight at once)")
        if self.b.max_tokens is not None:
            caps.append(f"budget.max_tokens={self.b.max_tokens:,}: this run used {self.spent_tok:,} tokens")
        return "budget cap reached (a cap per run): " + "; ".join(caps)


# --------------------------------------------------------------------------------------------- progress
def wait_text(seconds_left: float, reason: str) -> str:
    """The progress line's wait notice: 'waiting 45 s: server rate limit (retry-after: 45)'."""
    return f"waiting {max(0.0, seconds_left):,.0f} s: {reason}"


class _Progress:
    """The progress line (rich, when enabled). A running wait leads the line, so it survives an 80-column terminal
    (rich cuts the end of a long line); a wait of `PRINTED_WAIT_S` or more is also printed as a line of its own on
    stderr when progress is enabled, which is all a log or a non-TTY output shows while the run waits."""

    def __init__(self, enabled: bool, total: int | None, console: Any = None) -> None:
        self.total = total
        self.bar = None
        self.t0 = time.monotonic()
        self._last = 0.0
        self.wait: tuple[float, str] | None = None  # (until, epoch s; reason) of the longest wait announced
        self.printed_until = 0.0  # epoch s: the end of the last wait printed as a line
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]llm"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False,
                                console=console)
            self.bar.start()
            self.task = self.bar.add_task("llm", total=total, info="")

    def announce_wait(self, seconds: float, reason: str, until: float) -> None:
        if self.wait is None or until > self.wait[0] or self.wait[0] < time.time():
            self.wait = (until, reason)
        # one line per stretch of waiting: the many requests that hear the same 429 at once print it once
        if self.enabled and seconds >= PRINTED_WAIT_S and until > self.printed_until + PRINTED_WAIT_S:
            self.printed_until = until
            print(f"llm: {wait_text(seconds, reason)}", file=sys.stderr, flush=True)

    def wait_line(self) -> str:
        """The active wait's notice, '' when none is running."""
        if self.wait is None:
            return ""
        left = self.wait[0] - time.time()
        if left <= 0:
            self.wait = None
            return ""
        return wait_text(left, self.wait[1])

    def info(self, s: RunSummary, spent: float, extra: str = "") -> str:
        now = time.monotonic()
        done = s.ok + s.failed + s.skipped
        dt = max(now - self.t0, 1e-6)
        rate = s.sent / dt
        eta = ""
        if self.total and rate > 0:
            eta = f" eta {max(0, self.total - done) / rate:,.0f}s"
        unusable = f" (unusable ${s.unusable['cost_usd']:.4f})" if s.unusable["answers"] else ""
        info = (f"{rate:.1f} req/s {s.completion_tokens / dt:,.0f} out tok/s | ok {s.ok} (cached {s.cached}) "
                f"failed {s.failed} skipped {s.skipped} retries {s.retries} | ${spent:.4f}{unusable}{eta}")
        if extra:
            info += f" | {extra}"
        wait = self.wait_line()
        return f"{wait} | {info}" if wait else info  # first: the end of a long line is what a terminal cuts

    def update(self, s: RunSummary, spent: float, force: bool = False, extra: str = "") -> None:
        if self.bar is None:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.25:
            return
        self._last = now
        done = s.ok + s.failed + s.skipped
        self.bar.update(self.task, completed=done, total=self.total, info=self.info(s, spent, extra))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _union_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the (start, end) spans: wall-clock time spent waiting."""
    total = 0.0
    end = -math.inf
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


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
    the rest as skipped `budget`, and sets `summary.stopped_reason`; the same when the server asks for a wait
    above `llm.max_wait_s` (skipped `server_wait`). Ctrl-C / kill loses nothing recorded.
    `pool` (from `prestart_workers(llm)`, same `llm`) is used instead of starting workers, and closed at the end.
    `server_log_dir`: where a local server (provider local) writes `server.log`, kept after the run.
    `llm.mode: batch` sends the requests through the batch API (`pipeline.llm.batch.BatchDriver`) instead.
    """
    if pool is not None and pool.llm != llm:
        raise TextbookError("run_requests: the worker pool was started for another llm section")
    if llm.mode == "batch":
        if pool is not None:
            pool.close()
        if _needs_local_server(llm):
            raise TextbookError("llm.mode: batch needs an endpoint with the OpenAI batch API (/v1/files, "
                                "/v1/batches); provider local starts a server without one: use mode online")
        from pipeline.llm.batch import BatchDriver

        return BatchDriver(requests, llm, budget, Path(ledger_path), should_send, on_result, progress).run()
    with _endpoint(llm, server_log_dir) as (live, server):
        summary = _Driver(requests, live, budget, Path(ledger_path), should_send, on_result, progress, pool).run()
        note = server_failure_note(server, summary)
        if note:
            summary.warnings.append(note)
            print(f"llm: {note}", file=sys.stderr)
        return summary


class DriverBase:
    """What the online and the batch drivers share: pulling requests (duplicates, ledger hits, requests whose
    unusable answers are used up), the budget, recording results in the ledger and the summary, one result per
    request to `on_result`, and the reconciliation at the end."""

    def __init__(self, requests: Iterable[LLMRequest], llm: LLMSection, budget: BudgetSection, ledger_path: Path,
                 should_send: Callable[[LLMRequest], str | None] | None,
                 on_result: Callable[[LLMResult], None] | None, progress: bool) -> None:
        self.llm, self.should_send, self.on_result = llm, should_send, on_result
        total = len(requests) if hasattr(requests, "__len__") else None  # type: ignore[arg-type]
        self.requests = iter(requests)
        self.ledger = Ledger(ledger_path)
        # one query up front instead of one per request: most requests of a run are not in the ledger yet
        self.ok_keys = self.ledger.ok_keys()
        self.unusable_before = self.ledger.unusable_counts()
        self.budget = Budget(budget, llm, batch=llm.mode == "batch")
        self.s = RunSummary(total=0, model=llm.model, ledger=str(ledger_path), mode=llm.mode)
        self.progress = _Progress(progress, total)
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.seen: set[str] = set()
        self.inflight: dict[str, LLMRequest] = {}
        self.held: tuple[str, LLMRequest, int] | None = None  # next request, waiting for budget room
        self.exhausted = False
        self.stop_skip = "budget"  # the skip reason of what is not sent after a stop
        self.unanswered: Counter[str] = Counter()  # requests left for a re-run, by LEFT_FOR_RERUN reason
        self.unusable_by: dict[str, dict[str, float]] = {}  # outcome -> answers, tokens, USD
        self.wait_spans: list[tuple[float, float]] = []  # (start, end) epoch s of every announced wait
        # online: requests in a batch an earlier batch-mode run left open are not sent (they would be paid twice)
        self.in_open_batch: dict[str, tuple[str, str]] = {}  # key -> (batch id or ref, status)
        self.open_batches_met: set[tuple[str, str]] = set()
        if llm.mode != "batch":
            self.in_open_batch = self.ledger.open_batch_keys(llm.model)
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
            if result.skipped in LEFT_FOR_RERUN:
                self.unanswered[result.skipped] += 1
        else:
            s.failed += 1
            self.failed[(result.error or "unknown").split(":", 2)[-1].strip()[:80]
                        if result.outcome is None else result.outcome] += 1
            if result.outcome == "server_wait" and not result.cached:
                self.unanswered["server_wait"] += 1
        if self.on_result is not None:
            self.on_result(result)

    def _skip(self, key: str, req: LLMRequest, reason: str) -> None:
        self._emit(LLMResult(key=key, ok=False, text=None, finish_reason=None, prompt_tokens=0,
                             completion_tokens=0, latency_s=0.0, attempts=0, error=None, model=self.llm.model,
                             tag=req.tag, skipped=reason))

    def _unsent(self, key: str, req: LLMRequest, reason: str) -> None:
        """A request that will not be sent in this run (the batch driver's retries carry what they cost)."""
        self._skip(key, req, reason)

    def _stop(self, reason: str, skip: str) -> None:
        if self.s.stopped_reason is None:
            self.s.stopped_reason = reason
            self.s.stopped_by = skip
            self.stop_skip = skip

    # -- pulling requests
    def _next(self) -> tuple[str, LLMRequest, int] | None:
        """Next request that needs a call, with the unusable answers it may still take; answers ledger hits
        and duplicates on the way."""
        if self.held is not None:
            item, self.held = self.held, None
            return item
        allowed = 1 + self.llm.content_filter_retries
        for req in self.requests:
            self.s.total += 1
            key = req.key(self.llm.model)
            if key in self.seen:
                self._skip(key, req, "duplicate")
                continue
            self.seen.add(key)
            hit = self.ledger.get_ok(key) if key in self.ok_keys else None
            if hit is None and self.unusable_before.get(key, 0) >= allowed:
                hit = self.ledger.get_failed(key)  # its unusable answers are used up: not paid for again
            if hit is not None:
                hit.tag = req.tag
                self._emit(hit)
                continue
            if key in self.in_open_batch:
                self.open_batches_met.add(self.in_open_batch[key])
                self._skip(key, req, "in_open_batch")
                continue
            return key, req, allowed - self.unusable_before.get(key, 0)
        self.exhausted = True
        return None

    def _admit(self, item: tuple[str, LLMRequest, int], pending: bool, ask: bool = True) -> bool | None:
        """should_send (unless `ask` is False), then the budget. True: dispatch it (reserved, in flight); False:
        skipped; None: no room now (it is held while `pending` requests may free room, else the run stops on the
        budget)."""
        key, req, allowance = item
        if ask and self.should_send is not None:
            reason = self.should_send(req)
            if reason:
                self._unsent(key, req, reason)
                return False
        if not self.budget.take(key, req, allowance):
            if pending:
                self.held = item  # room may free up when in-flight requests report real usage
            else:
                self._stop(self.budget.message(), "budget")
                self._unsent(key, req, "budget")
            return None
        self.inflight[key] = req
        return True

    def _drain_unsent(self) -> None:
        """After a stop: every request not sent is reported (ledger hits still count as they are)."""
        if self.held is not None:
            key, req, _ = self.held
            self.held = None
            self._unsent(key, req, self.stop_skip)
        while (item := self._next()) is not None:
            self._unsent(item[0], item[1], self.stop_skip)

    # -- results
    def _record(self, results: list[LLMResult], requests: dict[str, LLMRequest] | None = None) -> None:
        """Price, record (ledger first), account and emit results of requests in flight (`self.inflight`, or
        `requests` for results the caller tracks itself)."""
        pairs = []
        for r in results:
            req = self.inflight.pop(r.key) if requests is None else requests[r.key]
            r.tag = req.tag
            self.budget.price(r)
            pairs.append((r, req))
        self.ledger.put_many(pairs)  # durable before anyone downstream sees it
        for r, req in pairs:
            self._account(r, req)
            self._emit(r)
        self._check_spend()

    def _account(self, r: LLMResult, req: LLMRequest | None) -> None:
        s = self.s
        self.budget.settle(r.key, req, r)
        s.sent += 1
        s.attempts += r.attempts
        s.retries += max(0, r.attempts - 1)
        s.prompt_tokens += r.billed_prompt_tokens
        s.completion_tokens += r.billed_completion_tokens
        self._add_unusable(r)
        if not r.ok and r.outcome:
            self.outcomes[r.outcome] += 1
        if r.outcome == "server_wait":
            # the client's error: "after N attempt(s): server_wait: <what the server asked>; <the HTTP error>"
            asked = (r.error or "").split("server_wait: ", 1)[-1].split("; ", 1)[0]
            self._stop(asked, "server_wait")
        self.latencies.append(r.latency_s)

    def _add_unusable(self, r: LLMResult) -> None:
        """The summary's billed-but-unusable figures: in all (`unusable`) and by outcome (`unusable_outcomes`)."""
        if not r.unusable_answers:
            return
        u = self.s.unusable
        u["answers"] += r.unusable_answers
        u["prompt_tokens"] += r.unusable_prompt_tokens
        u["completion_tokens"] += r.unusable_completion_tokens
        u["cost_usd"] += r.unusable_cost_usd
        for outcome, (n, p_tok, c_tok) in r.unusable_outcomes.items():
            by = self.unusable_by.setdefault(outcome, {"answers": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                       "cost_usd": 0.0})
            by["answers"] += n
            by["prompt_tokens"] += p_tok
            by["completion_tokens"] += c_tok
            by["cost_usd"] += self.budget.cost(p_tok, c_tok)

    def _check_spend(self) -> None:
        if self.budget.exhausted():
            self._stop(self.budget.message(), "budget")

    def _notices(self, notices: list[tuple]) -> None:
        """Waits and warnings the workers announced: progress line, summary, one line on stderr per warning."""
        for n in notices:
            if n[0] == "wait":
                _, seconds, reason, until = n
                w = self.s.waits
                w["count"] = w.get("count", 0) + 1
                w["total_s"] = round(w.get("total_s", 0.0) + seconds, 3)
                w["longest_s"] = round(max(w.get("longest_s", 0.0), seconds), 3)
                self.wait_spans.append((until - seconds, until))
                self.progress.announce_wait(seconds, reason, until)
            elif n[0] == "warning" and n[1] not in self.s.warnings:
                self.s.warnings.append(n[1])
                print(f"llm: warning: {n[1]}", file=sys.stderr)

    def _open_batch_warning(self) -> None:
        """Online: say which requests were not sent because an earlier batch-mode run left them in open batches."""
        n = self.skipped.get("in_open_batch", 0)
        if not n:
            return
        batches = sorted(self.open_batches_met)
        shown = ", ".join(f"{b} {status}" for b, status in batches[:5]) + (" ..." if len(batches) > 5 else "")
        self._notices([("warning", f"{n} request(s) not sent: they are in {len(batches)} batch(es) an earlier "
                                   f"llm.mode: batch run left open ({shown}); sent online they would be paid for "
                                   "twice. Run once with llm.mode: batch to collect them (it polls open batches "
                                   "first), then this run answers them from the ledger")])

    def _summary(self) -> RunSummary:
        s = self.s
        s.skipped_reasons = dict(self.skipped)
        s.failed_reasons = dict(self.failed)
        s.outcomes = dict(self.outcomes)
        s.unanswered = dict(self.unanswered)
        s.unusable_outcomes = {k: {**v, "cost_usd": round(v["cost_usd"], 6)} for k, v in self.unusable_by.items()}
        if s.stopped_by == "budget":
            s.stopped_reason = self.budget.message()  # the final spend: requests in flight at the stop included
        if s.waits:
            s.waits["wall_s"] = round(_union_s(self.wait_spans), 3)
        # batch mode: an earlier run's results this run did not ask for are counted apart (`unrequested`)
        other = s.unrequested.get("cost_usd", 0.0)
        s.cost_usd = round(self.budget.spent_usd - other, 6)
        if s.unrequested:
            s.unrequested["cost_usd"] = round(other, 6)
        s.unusable["cost_usd"] = round(s.unusable["cost_usd"], 6)
        s.max_inflight_usd = round(self.budget.max_inflight_usd, 6)
        s.elapsed_s = round(time.monotonic() - self.t0, 3)
        s.requests_per_s = round(s.sent / s.elapsed_s, 3) if s.elapsed_s else 0.0
        s.output_tokens_per_s = round(s.completion_tokens / s.elapsed_s, 3) if s.elapsed_s else 0.0
        s.latency_s = _percentiles(self.latencies)
        if not s.reconciled:  # a bug, not a user error: say so loudly
            raise TextbookError(f"LLM run does not reconcile: total {s.total} != ok {s.ok} + failed {s.failed} "
                                f"+ skipped {s.skipped}")
        return s


class _Driver(DriverBase):
    def __init__(self, requests: Iterable[LLMRequest], llm: LLMSection, budget: BudgetSection, ledger_path: Path,
                 should_send: Callable[[LLMRequest], str | None] | None,
                 on_result: Callable[[LLMResult], None] | None, progress: bool, pool: WorkerPool | None) -> None:
        super().__init__(requests, llm, budget, ledger_path, should_send, on_result, progress)
        self.pool = pool

    def _fill(self, capacity: int) -> list[tuple[str, LLMRequest, int]]:
        batch: list[tuple[str, LLMRequest, int]] = []
        while len(batch) < capacity and self.s.stopped_reason is None:
            item = self._next()
            if item is None:
                break
            admitted = self._admit(item, pending=bool(self.inflight or batch))
            if admitted is None:
                break
            if admitted:
                batch.append(item)
        return batch

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
            elif self.s.stopped_reason is not None:
                self._drain_unsent()
            self._open_batch_warning()
            self.progress.update(self.s, self.budget.spent_usd, force=True)
        finally:
            if pool is not None:
                pool.close()
            self.progress.close()
            self.ledger.close()
        return self._summary()

    def _loop(self, handles: list[Any], first: list[tuple[str, LLMRequest, int]]) -> None:
        slots = _slots(self.llm)
        # prefetch: a freed slot never waits on the driver; not under a budget cap, where every request dispatched
        # but not billed yet counts in the overshoot bound (at most `concurrency` of them)
        caps = list(slots) if self.budget.capped else [s + max(2, s // 2) for s in slots]
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
                        self.budget.release(key)
                        self._skip(key, req, self.stop_skip)
                self._drain_unsent()
            if sum(outstanding) == 0 and self.held is None and (self.exhausted or cancelled):
                break
            done, _ = concurrent.futures.wait(list(polls), return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                i = polls.pop(fut)
                try:
                    reply = fut.result()
                except Exception as e:  # worker died: its requests fail (not in the ledger, re-run sends them)
                    raise TextbookError(f"LLM worker {i} died: {type(e).__name__}: {e}") from e
                self._notices(reply["notices"])
                outstanding[i] -= len(reply["results"])
                self._record(reply["results"])
                polls[handles[i].poll()] = i
            self.progress.update(self.s, self.budget.spent_usd)


# --------------------------------------------------------------------------------------------- dry run
def estimate(requests: Iterable[LLMRequest], llm: LLMSection, budget: BudgetSection, *,
             ledger_path: Path | None = None, assumed_latency_s: float | None = None) -> dict:
    """For --dry-run: n requests, estimated tokens, cost (upper bound: every completion hits max_tokens) online
    and through the batch API (`budget.batch_discount`), the batches the batch API would take under
    `llm.batch_max_requests` / `llm.batch_max_bytes`, and time at the configured concurrency (online).
    Requests already answered in the ledger are free and not counted. `est_max_cost_usd` is the configured
    mode's figure."""
    from pipeline.llm.batch import batch_line, plan_chunks

    n = cached = 0
    p_tok = c_tok = 0
    ok_keys: set[str] = set()
    if ledger_path is not None and Path(ledger_path).exists():
        with Ledger(ledger_path) as ledger:  # one query, not a row (with its whole text) per request
            ok_keys = ledger.ok_keys()
    lines: list[tuple[str, int]] = []
    for req in requests:
        n += 1
        key = req.key(llm.model)
        if key in ok_keys:
            cached += 1
            continue
        p_tok += req.estimated_prompt_tokens()
        c_tok += req.max_completion_tokens(llm.max_tokens)
        endpoint, line = batch_line(key, req, llm.model)
        lines.append((endpoint, len(line)))
    to_send = n - cached
    # without a measurement, assume ~50 output tokens/s per stream for the worst-case completion length
    latency = assumed_latency_s if assumed_latency_s is not None else (c_tok / to_send / 50 if to_send else 0.0)
    rate = llm.concurrency / latency if latency > 0 else float("inf")
    if llm.requests_per_minute:
        rate = min(rate, llm.requests_per_minute / 60)
    if llm.tokens_per_minute and to_send:
        rate = min(rate, llm.tokens_per_minute / 60 / ((p_tok + c_tok) / to_send))
    online = round(budget.cost(p_tok, c_tok), 4)
    batch = round(budget.cost(p_tok, c_tok, batch=True), 4)
    return {
        "requests": n,
        "cached": cached,
        "to_send": to_send,
        "est_prompt_tokens": p_tok,
        "max_completion_tokens": c_tok,
        "mode": llm.mode,
        "est_max_cost_usd": batch if llm.mode == "batch" else online,
        "est_max_cost_usd_online": online,
        "est_max_cost_usd_batch": batch,
        "batch_discount": budget.batch_discount,
        "batches": len(plan_chunks(lines, llm.batch_max_requests, llm.batch_max_bytes)),
        "concurrency": llm.concurrency,
        "assumed_latency_s": round(latency, 3),
        "est_time_s": round(to_send / rate, 1) if to_send and rate != float("inf") else 0.0,
        "model": llm.model,
    }
