"""One request, done properly: `AsyncOpenAI` plus our own retry loop.

The openai client's built-in retries are switched off so that every attempt is counted, server-directed waits
(`waits.server_wait`: Retry-After in any form, x-ratelimit-reset-*, anthropic-ratelimit-*-reset, ...) are
honoured up to `llm.max_wait_s` (above it the request fails at once with outcome `server_wait`, naming the header),
429s pause the whole worker (and, through the limiter, every worker), and a request that exhausts its retries comes
back as a failed `LLMResult` carrying its error.

Every answer is billed (`usage`, else the estimate), usable or not: an answer whose content cannot be used
(`read_answer`: finish_reason content_filter, null content, refusal, no choices) is a named outcome, its tokens
carried on the result as `unusable_*`, and asked again at most `llm.content_filter_retries` times.
Waits of `VISIBLE_WAIT_S` or more and one-time warnings are queued in `notices` for the driver's progress line.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config.llm import LLMSection
from pipeline.llm.limiter import Limiter
from pipeline.llm.types import LLMRequest, LLMResult
from pipeline.llm.waits import (
    ServerWait,
    parse_duration,
    ratelimit_pause,
    retry_after,
    server_wait,
    unreadable_why,
)

__all__ = ["LLMClient", "Secret", "redact", "read_answer", "Answer", "parse_duration", "ratelimit_pause",
           "retry_after", "VISIBLE_WAIT_S", "UNUSABLE_OUTCOMES"]

VISIBLE_WAIT_S = 2.0  # a wait this long or longer is shown in the progress line ("waiting 45 s: ...")
UNUSABLE_OUTCOMES = ("content_filter", "refusal", "null_content", "no_choices")

_RETRYABLE_STATUS = {408, 409, 425, 429}


class Secret:
    """An API key that never prints itself (reprs end up in tracebacks, Ray task specs and logs)."""

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def redact(text: str, secret: Secret | None) -> str:
    if secret is not None and secret.get() and len(secret.get()) >= 4:
        text = text.replace(secret.get(), "***")
    return text


@dataclass(frozen=True)
class Answer:
    """An HTTP 200 completion body, read. `outcome` None: usable (`text` is a string); else the named reason it is
    not (one of `UNUSABLE_OUTCOMES`), `detail` saying what was seen. Tokens are the body's `usage` (None when it
    reports none)."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    outcome: str | None
    detail: str = ""


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def read_answer(chat: bool, body: Any) -> Answer | None:
    """Read a chat (`chat=True`) or completions body as the OpenAI API returns it (and as each line of a batch
    output file carries it in `response.body`). None when it is no answer at all (not an object, or neither
    `choices` nor `usage`): a glitch to retry, not billed. Content filter first: a filtered answer is unusable
    even with partial text (Azure sends some)."""
    if not isinstance(body, dict):
        return None
    usage = body.get("usage")
    choices = body.get("choices")
    if not choices and not isinstance(usage, dict):
        return None
    usage = usage if isinstance(usage, dict) else {}
    p_tok, c_tok = _int_or_none(usage.get("prompt_tokens")), _int_or_none(usage.get("completion_tokens"))
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return Answer(None, None, p_tok, c_tok, "no_choices", "the answer has no choices")
    choice = choices[0]
    finish = choice.get("finish_reason")
    message = choice.get("message") if chat else None
    message = message if isinstance(message, dict) else {}
    text = message.get("content") if chat else choice.get("text")
    refusal = message.get("refusal")
    shown = "null" if text is None else f"{len(text)} characters" if isinstance(text, str) else type(text).__name__
    if finish == "content_filter":
        return Answer(None, finish, p_tok, c_tok, "content_filter", f"finish_reason content_filter, content {shown}")
    if isinstance(refusal, str) and refusal and not (isinstance(text, str) and text.strip()):
        return Answer(None, finish, p_tok, c_tok, "refusal", f"the model refused ({refusal[:80]!r}), content {shown}")
    if not isinstance(text, str):
        return Answer(None, finish, p_tok, c_tok, "null_content", f"content {shown}, finish_reason {finish}")
    return Answer(text, finish, p_tok, c_tok, None)


class LLMClient:
    """Async calls with retries. One per worker; `call` is safe to run concurrently."""

    def __init__(self, llm: LLMSection, base_url: str | None, api_key: Secret, limiter: Limiter,
                 max_connections: int = 128) -> None:
        import httpx
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        self.llm = llm
        self.secret = api_key
        self.limiter = limiter
        self._headers: Any = {}

        async def keep_headers(response: Any) -> None:
            # rate-limit headers describe the server's state, not one request: the latest response's are enough,
            # and reading them here avoids the SDK's slower raw-response wrapper on every call
            if response.status_code < 400:
                self._headers = response.headers

        http = DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=max_connections + 8, max_keepalive_connections=max_connections + 8),
            timeout=httpx.Timeout(llm.timeout_s, connect=min(30.0, llm.timeout_s)),
            event_hooks={"response": [keep_headers]},
        )
        self.client = AsyncOpenAI(api_key=api_key.get() or "EMPTY", base_url=base_url, max_retries=0,
                                  timeout=llm.timeout_s, http_client=http)
        self._response_cls = httpx.Response  # `post` hands back the raw response: we parse the JSON ourselves
        self.recent_429: collections.deque[bool] = collections.deque(maxlen=20)
        # for the driver (drained by the worker's poll): ("wait", seconds, reason, until epoch s) and ("warning", text)
        self.notices: list[tuple] = []
        self._warned: set[str] = set()

    async def close(self) -> None:
        await self.client.close()

    def drain_notices(self) -> list[tuple]:
        out, self.notices = self.notices, []
        return out

    def _unknown_header(self, name: str, value: str) -> None:
        """Once per header name: a rate-limit header in no known form, or with an implausible value (negative, a
        time long past, 1e9 ms or more), is ignored, and said so: the request waits by its own backoff."""
        if name in self._warned:
            return
        self._warned.add(name)
        shown = redact(value, self.secret)[:80]
        why = unreadable_why(value, ms=name.endswith("-ms"))
        self.notices.append(("warning", f"ignored rate-limit header {name}: {shown!r} ({why}; it waits by its "
                                        "own backoff instead)"))

    def _notice_wait(self, seconds: float, reason: str) -> None:
        if seconds >= VISIBLE_WAIT_S:
            self.notices.append(("wait", float(seconds), reason, time.time() + seconds))

    def _exhausted_limit_wait(self, headers: Any) -> float | None:
        """After an answer: seconds until a limit the headers call exhausted (`…remaining…: 0`) resets."""
        if not headers:
            return None
        limits = {k: v for k, v in headers.items() if "ratelimit" in k.lower()}
        wait = server_wait(limits, 200, on_unknown=self._unknown_header) if limits else None
        return wait.seconds if wait is not None and wait.seconds > 0 else None

    def _backoff(self, attempt: int) -> float:
        cap = min(self.llm.backoff_max_s, self.llm.backoff_base_s * (2 ** attempt))
        return random.uniform(cap / 2, cap)  # "equal jitter": never zero, never synchronised

    async def _send(self, req: LLMRequest) -> tuple[Any, Any]:
        """One attempt. The body goes through the SDK's documented low-level `post` (same auth, base URL,
        timeouts, error classes) rather than `chat.completions.create`: `create` first walks the body through
        its TypedDict transform and builds pydantic models of the answer, about a third of the client's CPU per
        request, which at a few hundred requests/s is what limits one worker. Our bodies are plain JSON already."""
        path, body = request_body(req, self.llm.model)
        response = await self.client.post(path, body=body, cast_to=self._response_cls)
        return self._headers, json.loads(response.content)

    def _error(self, e: BaseException) -> tuple[str, bool, ServerWait | None]:
        """(message, retryable, server-requested wait)."""
        import openai

        status = getattr(e, "status_code", None)
        headers = getattr(getattr(e, "response", None), "headers", None)
        msg = f"{type(e).__name__}"
        if status is not None:
            msg += f" {status}"
        detail = str(getattr(e, "message", None) or e)
        msg = redact(f"{msg}: {detail[:300]}", self.secret)
        if isinstance(e, openai.APITimeoutError):
            return msg, True, None
        if isinstance(e, openai.APIConnectionError):
            return msg, True, None
        if isinstance(e, openai.APIStatusError):
            wait = server_wait(headers, status, on_unknown=self._unknown_header)
            retryable = status in _RETRYABLE_STATUS or (status or 0) >= 500
            should = (headers.get("x-should-retry") or "").lower() if headers is not None else ""
            if should in ("true", "false"):  # the server's explicit word, as the openai SDK obeys it
                retryable = should == "true"
            return msg, retryable, wait
        # 200 with a body that is not JSON (truncated, garbage): a server glitch, retry
        if isinstance(e, openai.APIResponseValidationError | json.JSONDecodeError | ValueError | KeyError
                      | TypeError | AttributeError):
            return msg, True, None
        return msg, False, None

    def _failed(self, key: str, t0: float, attempts: int, error: str, unusable: tuple[int, int, int],
                by_outcome: dict[str, list[int]], outcome: str | None = None) -> LLMResult:
        return LLMResult(key=key, ok=False, text=None, finish_reason=None, prompt_tokens=0, completion_tokens=0,
                         latency_s=time.monotonic() - t0, attempts=attempts,
                         error=f"after {attempts} attempt(s): {error}", model=self.llm.model,
                         unusable_prompt_tokens=unusable[0], unusable_completion_tokens=unusable[1],
                         unusable_answers=unusable[2], unusable_outcomes=by_outcome, outcome=outcome)

    async def call(self, req: LLMRequest, key: str, allowance: int | None = None) -> LLMResult:
        """Send `req` until it has a usable answer, a failure that is not retryable, `llm.max_retries` retries of
        failures, or `allowance` unusable answers (default 1 + `llm.content_filter_retries`; the driver passes
        less when the ledger holds unusable answers of earlier runs). Never raises for a request's own failure."""
        llm = self.llm
        allowance = 1 + llm.content_filter_retries if allowance is None else max(1, allowance)
        est_prompt = req.estimated_prompt_tokens()
        est = est_prompt + req.max_completion_tokens(llm.max_tokens)
        t0 = time.monotonic()
        error = "not attempted"
        attempts = failures = 0
        un_p = un_c = un_n = 0
        by_outcome: dict[str, list[int]] = {}  # outcome -> [answers, prompt tokens, completion tokens]
        estimated = False  # an unusable answer without `usage`: its tokens are the estimate
        while True:
            await self.limiter.acquire(est)
            attempts += 1
            try:
                headers, body = await self._send(req)
                answer = read_answer(req.messages is not None, body)
                if answer is None:
                    raise ValueError("the response is not a completion (neither choices nor usage)")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes a classified, recorded error
                self.limiter.settle(est, 0)
                error, retryable, wait = self._error(e)
                status = getattr(e, "status_code", None)
                self.recent_429.append(status == 429)
                if wait is not None and wait.seconds > llm.max_wait_s:
                    # "server_wait: <what was asked>; <the error>": the driver quotes the part before the ";"
                    reason = (f"server_wait: the server asked to wait {wait.seconds:,.0f} s ({wait.header}), above "
                              f"llm.max_wait_s={llm.max_wait_s:g}; {error}")
                    return self._failed(key, t0, attempts, reason, (un_p, un_c, un_n), by_outcome, "server_wait")
                what = "server rate limit" if status == 429 else "server overloaded" if status == 503 else \
                    f"server asked (HTTP {status})"
                # scattered 429s only delay their own request; mostly-429s means back off together
                if status == 429 and sum(self.recent_429) >= llm.cooldown_429_share * 20:
                    self.recent_429.clear()
                    pause = wait.seconds if wait is not None else llm.cooldown_s
                    self.limiter.pause(pause)
                    self._notice_wait(pause, f"{what}, all requests paused")
                if not retryable or failures >= llm.max_retries:
                    break
                delay = self._backoff(failures)
                failures += 1
                if wait is not None:
                    delay = max(wait.seconds, min(delay, wait.seconds + 1.0))
                    self._notice_wait(delay, f"{what} ({wait.header})")
                else:
                    self._notice_wait(delay, "backing off after errors")
                await asyncio.sleep(delay)
                continue
            self.recent_429.append(False)
            pause = self._exhausted_limit_wait(headers)
            if pause:
                pause = min(pause, llm.max_wait_s)  # ours to cap: the answer came; a too-long wait fails later
                self.limiter.pause(pause)
                self._notice_wait(pause, "rate limit exhausted, waiting for its reset")
            # no usage reported: count the estimate so budgets still bind
            p_tok = answer.prompt_tokens if answer.prompt_tokens is not None else est_prompt
            c_tok = answer.completion_tokens if answer.completion_tokens is not None else (
                len(answer.text) // 3 + 1 if answer.text else 0)
            self.limiter.settle(est, p_tok + c_tok)
            if answer.outcome is None:
                return LLMResult(key=key, ok=True, text=answer.text, finish_reason=answer.finish_reason,
                                 prompt_tokens=p_tok, completion_tokens=c_tok, latency_s=time.monotonic() - t0,
                                 attempts=attempts, error=None, model=llm.model, unusable_prompt_tokens=un_p,
                                 unusable_completion_tokens=un_c, unusable_answers=un_n,
                                 unusable_outcomes=by_outcome)
            un_p, un_c, un_n = un_p + p_tok, un_c + c_tok, un_n + 1
            counts = by_outcome.setdefault(answer.outcome, [0, 0, 0])
            counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + p_tok, counts[2] + c_tok
            estimated = estimated or answer.prompt_tokens is None or answer.completion_tokens is None
            if un_n >= allowance:
                how = ", estimated: an answer carried no usage" if estimated else ""
                reason = (f"{answer.outcome}: {answer.detail}; {un_n} unusable answer(s) billed ({un_p} prompt + "
                          f"{un_c} completion tokens{how}), llm.content_filter_retries={llm.content_filter_retries}")
                return self._failed(key, t0, attempts, reason, (un_p, un_c, un_n), by_outcome, answer.outcome)
            error = f"{answer.outcome}: {answer.detail}"  # asked again at once: the limiter paces it
        return self._failed(key, t0, attempts, error, (un_p, un_c, un_n), by_outcome)


def request_body(req: LLMRequest, model: str) -> tuple[str, dict[str, Any]]:
    """(path under the base URL, JSON body) of a request, as sent online and as written in a batch input file.

    A `do_sample` parameter (`LLMSection.sends_generation_config`) goes out inside `generation_config`, a JSON
    string `transformers serve` reads as the request's generation config (the model's own fills what it leaves
    unset); the top-level temperature, top_p and seed are sent as well (seed: the server seeds torch with it)."""
    body: dict[str, Any] = {"model": model}
    if req.messages is not None:
        path, body["messages"] = "/chat/completions", list(req.messages)
    else:
        path, body["prompt"] = "/completions", req.prompt
    params = req.sent_params()
    do_sample = params.pop("do_sample", None)
    body.update((k, v) for k, v in params.items() if v is not None)
    if do_sample is not None:
        gen: dict[str, Any] = {"do_sample": bool(do_sample)}
        if do_sample:
            gen.update((k, params[k]) for k in ("temperature", "top_p") if params.get(k) is not None)
        body["generation_config"] = json.dumps(gen, sort_keys=True)
    return path, body
