"""`llm.mode: batch`: the same requests through the OpenAI-style batch API, at the batch price.

OpenAI's Batch API (platform.openai.com/docs/guides/batch and the API reference for files and batches; Together
and Groq, among others, serve the same endpoints): write the requests as JSONL, one line each, `{"custom_id", "method": "POST", "url":
"/v1/chat/completions", "body": {...}}`; upload it (`POST /v1/files`, purpose `batch`); create a batch (`POST
/v1/batches` with the file id, the endpoint and `completion_window` "24h"); poll it (`GET /v1/batches/{id}`:
validating → in_progress → finalizing → completed, or failed / expired / cancelled); download the output file
(`GET /v1/files/{output_file_id}/content`: one line per answered request, `{"custom_id", "response":
{"status_code", "body"}, "error"}`) and the error file (requests that failed, or were not run before the window
expired: `error.code` `batch_expired`). A batch holds at most 50,000 requests and 200 MB (`llm.batch_max_requests`,
`llm.batch_max_bytes`); a larger job is split into several batches, one endpoint each.

Everything else is the online driver's (`runner.DriverBase`): ledger hits and duplicates are answered without a
call, `should_send` (the diversity guard) and the budget are asked for each request when its batch is formed
(its worst case reserved at the batch price), every answer is billed whatever its content (`client.read_answer`),
unusable answers are asked again in a later batch at most `llm.content_filter_retries` times, retryable failures
(expired, 429, 5xx, timeouts) at most `llm.max_retries` times, and `on_result` hears once per request.

Crash safety: the ledger records a submission (`ref`, its requests) before the upload, the input file id
before the batch is created, and the batch id as soon as it is; a batch's results and its `done` flag are written
in one transaction. A run killed at any point resumes from the ledger: a batch with an id is polled, never
submitted again; a submission whose create call may have gone out without its id being recorded is looked up
among the provider's batches (`GET /v1/batches`, by input file id or our `metadata.textbook_ref`) before anything
is created. Requests in an open batch are not submitted again, whatever this run asks (and an online run does not
send them either: `runner`, skipped `in_open_batch`). Every batch an earlier run left open is polled at least once
by each batch-mode run, even when this run asks for none of its requests or finds them all answered in the ledger,
and again while this run has batches in flight; a finished one has its results recorded (they are billed either
way). It does not keep this run waiting: one still running at the end is named in a warning.

Under a budget cap the batches go progressively: the first request goes in a batch of its own, and the rest are
formed only once its bill has come back (`runner.Budget`: the estimate learns from it), each within what the cap
leaves after the spend and the reservations of the batches in flight. So a prompt estimate far below what the
provider bills costs at most one request's bill before it is corrected, not the whole job's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.errors import TextbookError
from pipeline.llm.client import Secret, read_answer, redact, request_body
from pipeline.llm.runner import LEFT_FOR_RERUN, DriverBase, api_key
from pipeline.llm.types import LLMRequest, LLMResult, RunSummary

TERMINAL = ("completed", "failed", "expired", "cancelled")
_RETRYABLE_CODES = {"batch_expired", "request_timeout", "rate_limit_exceeded", "server_error"}
_RETRYABLE_STATUS = {408, 409, 425, 429}


def batch_line(key: str, req: LLMRequest, model: str) -> tuple[str, str]:
    """(endpoint, JSONL line) of one request in a batch input file; `custom_id` is the request's ledger key."""
    path, body = request_body(req, model)
    endpoint = "/v1" + path
    return endpoint, json.dumps({"custom_id": key, "method": "POST", "url": endpoint, "body": body},
                                ensure_ascii=False, separators=(",", ":"), default=str)


def plan_chunks(lines: list[tuple[str, int]], max_requests: int, max_bytes: int) -> list[list[int]]:
    """Split lines (endpoint, bytes without its newline) into batches, in order: one endpoint per batch, at most
    `max_requests` lines and `max_bytes` bytes (newlines counted) each. A line larger than `max_bytes` alone
    gets a chunk of its own (the caller fails it: no batch can carry it). Returns the indices of each chunk."""
    chunks: list[list[int]] = []
    open_by_endpoint: dict[str, tuple[list[int], int]] = {}
    for i, (endpoint, size) in enumerate(lines):
        current = open_by_endpoint.get(endpoint)
        if current is not None:
            idx, used = current
            if len(idx) < max_requests and used + size + 1 <= max_bytes:
                idx.append(i)
                open_by_endpoint[endpoint] = (idx, used + size + 1)
                continue
        idx = [i]
        chunks.append(idx)
        open_by_endpoint[endpoint] = (idx, size + 1)
    return chunks


class BatchAPIError(TextbookError):
    """A call to the batch endpoints failed (after the openai client's own retries)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BatchAPI:
    """The batch endpoints through the openai SDK (its retries, which honour Retry-After, on every call but
    `create`)."""

    def __init__(self, llm: LLMSection, secret: Secret) -> None:
        from openai import OpenAI

        self.secret = secret
        self.client = OpenAI(api_key=secret.get() or "EMPTY", base_url=llm.resolved_base_url(),
                             max_retries=min(llm.max_retries, 5), timeout=llm.timeout_s)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        import openai

        try:
            return fn()
        except openai.APIError as e:
            status = getattr(e, "status_code", None)
            detail = redact(str(getattr(e, "message", None) or e), self.secret)[:300]
            raise BatchAPIError(f"{what}: {type(e).__name__}{f' {status}' if status else ''}: {detail}",
                                status) from None

    def upload(self, data: bytes, filename: str) -> str:
        f = self._call("upload", lambda: self.client.files.create(file=(filename, data, "application/jsonl"),
                                                                  purpose="batch"))
        return str(f.id)

    def create(self, file_id: str, endpoint: str, window: str, ref: str) -> dict[str, Any]:
        """One create call, never retried by the SDK: a retry after a lost answer would create a second batch
        (the OpenAI API takes no idempotency key); the caller looks the batch up before trying again."""
        once = self.client.with_options(max_retries=0)
        b = self._call("create batch", lambda: once.batches.create(
            input_file_id=file_id, endpoint=endpoint, completion_window=window,  # type: ignore[arg-type]
            metadata={"textbook_ref": ref}))
        return b.model_dump()

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._call("poll batch", lambda: self.client.batches.retrieve(batch_id)).model_dump()

    def find(self, file_id: str | None, ref: str, limit: int = 1000) -> dict[str, Any] | None:
        """A batch created from `file_id` or tagged with our `ref`, among the provider's newest `limit` batches."""
        def scan() -> dict[str, Any] | None:
            for i, b in enumerate(self.client.batches.list(limit=100)):
                if i >= limit:
                    return None
                if (file_id and b.input_file_id == file_id) or (b.metadata or {}).get("textbook_ref") == ref:
                    return b.model_dump()
            return None

        return self._call("list batches", scan)

    def content(self, file_id: str) -> bytes:
        return self._call("download", lambda: self.client.files.content(file_id)).content

    def close(self) -> None:
        self.client.close()


@dataclass
class _Open:
    """A submission in flight: its requests (key → request), those this run asked for, when it was made."""

    ref: str
    endpoint: str
    requests: dict[str, LLMRequest]
    mine: set[str] = field(default_factory=set)
    batch_id: str | None = None
    input_file_id: str | None = None
    status: str = "preparing"
    counts: dict[str, int] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    lines: dict[str, str] = field(default_factory=dict)  # key → JSONL line, until uploaded
    create_failures: int = 0


@dataclass
class _Carry:
    """What earlier batch rounds of a request cost and tried, added to its final result."""

    attempts: int = 0
    unusable_prompt_tokens: int = 0
    unusable_completion_tokens: int = 0
    unusable_answers: int = 0
    cost_usd: float = 0.0
    unusable_cost_usd: float = 0.0
    latency_s: float = 0.0
    unusable_outcomes: dict[str, list[int]] = field(default_factory=dict)


class BatchDriver(DriverBase):
    """Runs `run_requests` for `llm.mode: batch` (see the module docstring)."""

    def __init__(self, requests: Iterable[LLMRequest], llm: LLMSection, budget: BudgetSection, ledger_path: Path,
                 should_send: Callable[[LLMRequest], str | None] | None,
                 on_result: Callable[[LLMResult], None] | None, progress: bool) -> None:
        super().__init__(requests, llm, budget, ledger_path, should_send, on_result, progress)
        self.api: BatchAPI | None = None
        self.open: dict[str, _Open] = {}
        self.pending: deque[tuple[str, LLMRequest, int]] = deque()
        self.carry: dict[str, _Carry] = {}
        self.failures: Counter[str] = Counter()  # retryable failures per key (bounded by llm.max_retries)
        self.finished: list[dict[str, Any]] = []
        self.s.unrequested = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> RunSummary:
        try:
            self.api = BatchAPI(self.llm, api_key(self.llm))
            self._resume()
            self._collect()
            polled = False
            while True:
                if self.s.stopped_reason is None:
                    self._submit_pending()
                if self.s.stopped_reason is not None:
                    self._drop_pending()
                # every open batch is polled at least once, even one this run needs nothing from
                if not any(o.mine for o in self.open.values()) and (polled or not self.open):
                    break
                finished = self._poll_all()
                polled = True
                self._update_progress()
                if not finished and any(o.mine for o in self.open.values()):
                    time.sleep(self.llm.batch_poll_s)  # the provider's pace: a batch takes minutes to hours
            self._leftover_warning()
            self._update_progress(force=True)
        finally:
            if self.api is not None:
                self.api.close()
            self.progress.close()
            self.ledger.close()
        self.s.batches = self.finished + [self._batch_info(o) for o in self.open.values()]
        return self._summary()

    def _leftover_warning(self) -> None:
        """Batches of earlier runs still open at the end (this run needs none of their requests)."""
        left = [o for o in self.open.values() if not o.mine]
        if left:
            shown = ", ".join(f"{o.batch_id or o.ref} ({o.status}, {len(o.requests)} requests)" for o in left[:5])
            self._notices([("warning", f"{len(left)} batch(es) an earlier run submitted are still open at the "
                                       f"provider: {shown}. This run needs none of their requests (answered "
                                       "already, or not asked); a later batch-mode run records their results, "
                                       "which the provider bills. Cancel them at the provider if they are not "
                                       "wanted")])

    def _update_progress(self, force: bool = False) -> None:
        statuses = Counter(o.status for o in self.open.values() if o.mine)
        done = sum(o.counts.get("completed", 0) + o.counts.get("failed", 0) for o in self.open.values() if o.mine)
        total = sum(len(o.mine) for o in self.open.values())
        extra = ""
        if statuses:
            extra = (f"batches in flight {sum(statuses.values())} ({', '.join(f'{k} {v}' for k, v in statuses.items())})"
                     f", {done}/{total} answered by the provider, polling every {self.llm.batch_poll_s:g} s")
        self.progress.update(self.s, self.budget.spent_usd, force=force, extra=extra)

    @staticmethod
    def _batch_info(o: _Open) -> dict[str, Any]:
        return {"ref": o.ref, "batch_id": o.batch_id, "endpoint": o.endpoint, "requests": len(o.requests),
                "this_run": len(o.mine), "status": o.status, "counts": o.counts}

    # ------------------------------------------------------------------------------------------ resume
    def _resume(self) -> None:
        """Submissions an earlier run left open: adopt each (its requests are in flight, reserved at their worst
        case whatever the cap: they are at the provider already)."""
        assert self.api is not None
        for row in self.ledger.open_batches():
            if row["model"] != self.llm.model:  # another model's submission (maybe another provider's): left open
                continue
            requests = {k: LLMRequest.from_json(json.loads(v)) for k, v in row["requests"].items()}
            o = _Open(ref=row["ref"], endpoint=row["endpoint"], requests=requests, batch_id=row["batch_id"],
                      input_file_id=row["input_file_id"], status=row["status"], created=row["created"])
            self.open[o.ref] = o
            for key, req in requests.items():
                self.budget.take(key, req, force=True)
            if o.batch_id is None:
                o.lines = {k: batch_line(k, r, self.llm.model)[1] for k, r in requests.items()}
                if o.input_file_id is None:  # killed before the upload was recorded: nothing was created
                    self._send(o)
                else:  # killed around the create call: adopt the batch if it exists, never create a second
                    found = self.api.find(o.input_file_id, o.ref)
                    if found is not None:
                        self._created(o, found)
                    else:
                        self._send(o)

    def _collect(self) -> None:
        """Pull every request: answered ones are emitted now, those in an open batch wait for it, the rest queue."""
        in_open = {key: o for o in self.open.values() for key in o.requests}
        while (item := self._next()) is not None:
            key, req, _ = item
            o = in_open.get(key)
            if o is not None:
                o.mine.add(key)
                o.requests[key] = req  # this run's request object: its tag goes back to the caller
            else:
                self.pending.append(item)

    # ------------------------------------------------------------------------------------------ submit
    def _submit_pending(self) -> None:
        admitted: list[tuple[str, LLMRequest, int, str, str]] = []
        while self.pending and self.s.stopped_reason is None:
            item = self.pending.popleft()
            # a request asked again (expired, unusable) was already admitted by should_send: only the budget
            got = self._admit(item, pending=bool(admitted) or any(o.mine for o in self.open.values()),
                              ask=item[0] not in self.carry)
            if got is None:
                if self.held is not None:  # no room until a batch in flight settles: keep it for later
                    self.pending.appendleft(self.held)
                    self.held = None
                break
            if got:
                key, req, allowance = item
                endpoint, line = batch_line(key, req, self.llm.model)
                admitted.append((key, req, allowance, endpoint, line))
        if not admitted:
            return
        chunks = plan_chunks([(a[3], len(a[4].encode())) for a in admitted], self.llm.batch_max_requests,
                             self.llm.batch_max_bytes)
        for chunk in chunks:
            items = [admitted[i] for i in chunk]
            if len(items) == 1 and len(items[0][4].encode()) + 1 > self.llm.batch_max_bytes:
                key, req = items[0][0], items[0][1]
                self._final(self._failure(key, f"request_too_large: {len(items[0][4].encode()):,} bytes, above "
                                          f"llm.batch_max_bytes={self.llm.batch_max_bytes:,}", 0), req)
                continue
            ref = uuid.uuid4().hex
            o = _Open(ref=ref, endpoint=items[0][3], requests={a[0]: a[1] for a in items},
                      mine={a[0] for a in items}, lines={a[0]: a[4] for a in items})
            self.ledger.add_batch(ref, o.endpoint, self.llm.model, [(a[0], a[1]) for a in items])
            self.open[ref] = o
            self._send(o)

    def _send(self, o: _Open) -> None:
        """Upload (unless the ledger has the file id) and create; each id recorded as soon as it exists.

        A create call that fails without a clear refusal (a timeout, a 5xx, a dropped connection: the batch may
        exist) leaves the submission open; the next poll looks it up among the provider's batches and creates it
        only if it is not there, at most `llm.max_retries` more times. A refusal (4xx) fails its requests."""
        assert self.api is not None
        try:
            if o.input_file_id is None:
                data = "".join(o.lines[k] + "\n" for k in o.requests).encode()
                o.input_file_id = self.api.upload(data, f"textbook-{o.ref}.jsonl")
                o.status = "uploaded"
                self.ledger.update_batch(o.ref, input_file_id=o.input_file_id, status=o.status)
        except BatchAPIError as e:  # nothing was created: failing is safe (a re-run sends them)
            self._finish(o, "failed", f"batch_submit_failed: {e}", {}, retryable=False)
            return
        try:
            created = self.api.create(o.input_file_id, o.endpoint, self.llm.batch_completion_window, o.ref)
        except BatchAPIError as e:
            o.create_failures += 1
            refused = e.status is not None and 400 <= e.status < 500 and e.status not in (408, 409, 429)
            if refused or o.create_failures > self.llm.max_retries:
                self._finish(o, "failed", f"batch_submit_failed: {e}", {}, retryable=False)
            else:
                self._notices([("warning", f"creating a batch: {e}; it is looked up before it is created again")])
            return
        o.lines = {}
        self._created(o, created)

    def _look_up(self, o: _Open) -> None:
        """A submission whose create call may or may not have gone through: adopt it if the provider has it,
        else create it (now certainly not a second one)."""
        assert self.api is not None
        try:
            found = self.api.find(o.input_file_id, o.ref)
        except BatchAPIError as e:
            self._notices([("warning", f"looking up a batch: {e} (again at the next poll)")])
            return
        if found is not None:
            self._created(o, found)
        else:
            self._send(o)

    def _created(self, o: _Open, batch: dict[str, Any]) -> None:
        o.batch_id = str(batch["id"])
        o.status = str(batch.get("status") or "validating")
        self.ledger.update_batch(o.ref, batch_id=o.batch_id, status=o.status)

    # ------------------------------------------------------------------------------------------ poll
    def _poll_all(self) -> bool:
        """One poll of every open batch; True if any finished."""
        assert self.api is not None
        finished = False
        for o in list(self.open.values()):
            if o.batch_id is None:
                self._look_up(o)
                if o.batch_id is None:
                    finished = finished or o.ref not in self.open
                    continue
            try:
                b = self.api.retrieve(o.batch_id)
            except BatchAPIError as e:
                if e.status == 404:
                    self._finish(o, "failed", f"batch_lost: the provider does not know batch {o.batch_id}", {},
                                 retryable=True)
                    finished = True
                else:
                    self._notices([("warning", f"polling batch {o.batch_id}: {e} (polling again)")])
                continue
            counts = b.get("request_counts") or {}
            o.counts = {k: int(v) for k, v in counts.items() if isinstance(v, int | float)}
            status = str(b.get("status"))
            if status != o.status:
                o.status = status
                self.ledger.update_batch(o.ref, status=status)
            if status in TERMINAL:
                finished = self._collect_results(o, b) or finished
        return finished

    def _collect_results(self, o: _Open, b: dict[str, Any]) -> bool:
        """Download a finished batch's files and record its results; False if a download failed (next poll
        tries again)."""
        assert self.api is not None
        lines: dict[str, dict[str, Any]] = {}
        try:
            for file_id in (b.get("output_file_id"), b.get("error_file_id")):
                if file_id:
                    for raw in self.api.content(str(file_id)).decode("utf-8", errors="replace").splitlines():
                        if raw.strip():
                            try:
                                line = json.loads(raw)
                            except json.JSONDecodeError:
                                continue  # a torn line: its request gets "no result" below
                            if isinstance(line, dict) and line.get("custom_id") in o.requests:
                                lines.setdefault(str(line["custom_id"]), line)
        except BatchAPIError as e:
            self._notices([("warning", f"downloading the results of batch {o.batch_id}: {e} (polling again)")])
            return False
        status = str(b.get("status"))
        detail = None
        if status == "failed":
            errs = ((b.get("errors") or {}).get("data") or [])
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs if isinstance(e, dict))[:300]
        # expired: what did not run goes again; cancelled (by someone, on purpose): not re-sent by this run
        self._finish(o, status, detail, lines, retryable=status == "expired")
        return True

    # ------------------------------------------------------------------------------------------ results
    def _finish(self, o: _Open, status: str, detail: str | None, lines: dict[str, dict[str, Any]],
                retryable: bool) -> None:
        """Turn a finished submission into one round result per request: recorded with the `done` flag in one
        transaction, billed; then each of this run's requests is final (emitted) or queued for another round."""
        latency = max(0.0, time.time() - o.created)
        chat = o.endpoint.endswith("/chat/completions")
        rounds: list[tuple[LLMResult, bool]] = []
        for key in o.requests:
            line = lines.get(key)
            if line is None:
                code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status, "batch_failed")
                why = detail or ("the batch ended before this request ran" if status != "completed"
                                 else "no line for this request in the output or error file")
                rounds.append((self._failure(key, f"{code}: {why}", latency), retryable))
            else:
                rounds.append(self._read_line(key, o.requests[key], line, chat, latency))
        pairs = []
        for r, _ in rounds:
            r.tag = o.requests[r.key].tag
            self.budget.price(r)
            pairs.append((r, o.requests[r.key]))
        self.ledger.finish_batch(o.ref, status, detail, pairs)
        for r, again in rounds:
            self._round(o, r, again)
        del self.open[o.ref]
        self.finished.append(self._batch_info(o))
        self._check_spend()

    def _read_line(self, key: str, req: LLMRequest, line: dict[str, Any], chat: bool,
                   latency: float) -> tuple[LLMResult, bool]:
        """One output/error file line as a round result, and whether a failure may be asked again."""
        response = line.get("response") if isinstance(line.get("response"), dict) else None
        error = line.get("error") if isinstance(line.get("error"), dict) else None
        status = response.get("status_code") if response else None
        if response is not None and status == 200:
            answer = read_answer(chat, response.get("body"))
            if answer is None:
                return self._failure(key, "ValueError: the batch line's body is not a completion", latency), True
            # no usage reported: the estimate counts, as online
            p = answer.prompt_tokens if answer.prompt_tokens is not None else req.estimated_prompt_tokens()
            c = answer.completion_tokens if answer.completion_tokens is not None else (
                len(answer.text) // 3 + 1 if answer.text else 0)
            if answer.outcome is None:
                return LLMResult(key=key, ok=True, text=answer.text, finish_reason=answer.finish_reason,
                                 prompt_tokens=p, completion_tokens=c, latency_s=latency, attempts=1, error=None,
                                 model=self.llm.model), False
            return LLMResult(key=key, ok=False, text=None, finish_reason=answer.finish_reason, prompt_tokens=0,
                             completion_tokens=0, latency_s=latency, attempts=1,
                             error=f"{answer.outcome}: {answer.detail}", model=self.llm.model,
                             unusable_prompt_tokens=p, unusable_completion_tokens=c, unusable_answers=1,
                             unusable_outcomes={answer.outcome: [1, p, c]}, outcome=answer.outcome), True
        body_error = ((response or {}).get("body") or {}).get("error") if response else None
        err = error or (body_error if isinstance(body_error, dict) else {}) or {}
        code = str(err.get("code") or (f"http_{status}" if status else "batch_error"))
        message = str(err.get("message") or "")[:200]
        again = code in _RETRYABLE_CODES or status in _RETRYABLE_STATUS or (status or 0) >= 500
        return self._failure(key, f"{code}{f' {status}' if status else ''}: {message}", latency), again

    def _failure(self, key: str, error: str, latency: float) -> LLMResult:
        return LLMResult(key=key, ok=False, text=None, finish_reason=None, prompt_tokens=0, completion_tokens=0,
                         latency_s=latency, attempts=1, error=error, model=self.llm.model)

    def _round(self, o: _Open, r: LLMResult, again: bool) -> None:
        """One request's result from one batch: billed; final, or queued for another batch."""
        req = o.requests[r.key]
        if r.key not in o.mine:  # an earlier run's request that this run does not ask for: recorded, billed
            self.budget.settle(r.key, req, r)
            u = self.s.unrequested
            u["requests"] += 1
            u["prompt_tokens"] += r.billed_prompt_tokens
            u["completion_tokens"] += r.billed_completion_tokens
            u["cost_usd"] += r.cost_usd
            return
        self._bill(r, req)
        carry = self.carry.setdefault(r.key, _Carry())
        carry.attempts += 1
        carry.latency_s += r.latency_s
        allowed = 1 + self.llm.content_filter_retries - self.unusable_before.get(r.key, 0)
        if not r.ok and again and self.s.stopped_reason is None:
            if r.unusable_answers:
                if carry.unusable_answers + r.unusable_answers < allowed:
                    self._carry(carry, r)
                    self.pending.append((r.key, req, allowed - carry.unusable_answers))
                    return
            elif self.failures[r.key] < self.llm.max_retries:
                self.failures[r.key] += 1
                self._carry(carry, r)
                self.pending.append((r.key, req, allowed - carry.unusable_answers))
                return
        if r.unusable_answers and not r.ok:
            r.error = (f"{r.error}; {carry.unusable_answers + r.unusable_answers} unusable answer(s) billed, "
                       f"llm.content_filter_retries={self.llm.content_filter_retries}")
        final = r  # recorded in the ledger as this round's; emitted with what earlier rounds cost
        final.attempts = carry.attempts
        final.latency_s = carry.latency_s
        final.unusable_prompt_tokens += carry.unusable_prompt_tokens
        final.unusable_completion_tokens += carry.unusable_completion_tokens
        final.unusable_answers += carry.unusable_answers
        final.unusable_outcomes = _merge_outcomes(final.unusable_outcomes, carry.unusable_outcomes)
        final.cost_usd += carry.cost_usd
        final.unusable_cost_usd += carry.unusable_cost_usd
        if not final.ok and not (final.error or "").startswith("after "):
            final.error = f"after {final.attempts} attempt(s): {final.error}"
        self._final(final, req, billed=True)

    @staticmethod
    def _carry(carry: _Carry, r: LLMResult) -> None:
        carry.unusable_prompt_tokens += r.unusable_prompt_tokens
        carry.unusable_completion_tokens += r.unusable_completion_tokens
        carry.unusable_answers += r.unusable_answers
        carry.unusable_outcomes = _merge_outcomes(carry.unusable_outcomes, r.unusable_outcomes)
        carry.cost_usd += r.cost_usd
        carry.unusable_cost_usd += r.unusable_cost_usd

    def _bill(self, r: LLMResult, req: LLMRequest) -> None:
        s = self.s
        self.budget.settle(r.key, req, r)
        s.prompt_tokens += r.billed_prompt_tokens
        s.completion_tokens += r.billed_completion_tokens
        self._add_unusable(r)

    def _final(self, r: LLMResult, req: LLMRequest, billed: bool = False) -> None:
        """A request's one result for the caller (its rounds already billed when `billed`)."""
        s = self.s
        r.tag = req.tag
        if not billed:
            self.budget.price(r)
            self.ledger.put_many([(r, req)])
            self._bill(r, req)
        s.sent += 1
        s.attempts += r.attempts
        s.retries += max(0, r.attempts - 1)
        if not r.ok and r.outcome:
            self.outcomes[r.outcome] += 1
        self.latencies.append(r.latency_s)
        self._emit(r)

    def _drop_pending(self) -> None:
        while self.pending:
            key, req, _ = self.pending.popleft()
            self._unsent(key, req, self.stop_skip)
        self._drain_unsent()

    def _unsent(self, key: str, req: LLMRequest, reason: str) -> None:
        carry = self.carry.get(key)
        if carry is None or not carry.attempts:
            self._skip(key, req, reason)
            return
        # billed in earlier rounds: a failure that carries what it cost, not a skip
        r = self._failure(key, f"after {carry.attempts} attempt(s): not sent again ({reason}) after "
                               f"{carry.unusable_answers} unusable answer(s) and retryable failures", carry.latency_s)
        r.attempts = carry.attempts
        r.unusable_prompt_tokens = carry.unusable_prompt_tokens
        r.unusable_completion_tokens = carry.unusable_completion_tokens
        r.unusable_answers = carry.unusable_answers
        r.unusable_outcomes = dict(carry.unusable_outcomes)
        r.cost_usd, r.unusable_cost_usd = carry.cost_usd, carry.unusable_cost_usd
        r.tag = req.tag
        if reason in LEFT_FOR_RERUN:
            self.unanswered[reason] += 1
        s = self.s
        s.sent += 1
        s.attempts += r.attempts
        s.retries += max(0, r.attempts - 1)
        self.latencies.append(r.latency_s)
        self._emit(r)


def _merge_outcomes(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, list[int]]:
    """{outcome: [answers, prompt tokens, completion tokens]} of both."""
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        have = out.setdefault(k, [0, 0, 0])
        out[k] = [x + y for x, y in zip(have, v, strict=True)]
    return out
