"""One request, done properly: `AsyncOpenAI` plus our own retry loop.

The openai client's built-in retries are switched off so that every attempt is counted, `Retry-After` and
`x-ratelimit-*` are honoured, 429s pause the whole worker (and, through the limiter, every worker), and a
request that exhausts its retries comes back as a failed `LLMResult` carrying its error.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import random
import re
import time
from typing import Any

from pipeline.config.llm import LLMSection
from pipeline.llm.limiter import Limiter
from pipeline.llm.types import LLMRequest, LLMResult

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


def parse_duration(value: str | None) -> float | None:
    """`Retry-After` seconds or HTTP date; `x-ratelimit-reset-*` durations like '1s', '6m0s', '250ms'."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    if parts and "".join(n + u for n, u in parts) == value.replace(" ", ""):
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        return sum(float(n) * scale[u] for n, u in parts)
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    return parse_duration(headers.get("retry-after"))


def ratelimit_pause(headers: Any) -> float | None:
    """When the server says a limit is exhausted (`x-ratelimit-remaining-*: 0`), how long until it resets."""
    if headers is None:
        return None
    waits = []
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if remaining is not None and remaining.strip() in {"0", "0.0"}:
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
            if reset:
                waits.append(reset)
    return max(waits) if waits else None


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

    async def close(self) -> None:
        await self.client.close()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.llm.backoff_max_s, self.llm.backoff_base_s * (2 ** attempt))
        return random.uniform(cap / 2, cap)  # "equal jitter": never zero, never synchronised

    async def _send(self, req: LLMRequest) -> tuple[Any, dict]:
        """One attempt. The body goes through the SDK's documented low-level `post` (same auth, base URL,
        timeouts, error classes) rather than `chat.completions.create`: `create` first walks the body through
        its TypedDict transform and builds pydantic models of the answer, about a third of the client's CPU per
        request, which at a few hundred requests/s is what limits one worker. Our bodies are plain JSON already."""
        body: dict[str, Any] = {"model": self.llm.model}
        if req.messages is not None:
            path, body["messages"] = "/chat/completions", list(req.messages)
        else:
            path, body["prompt"] = "/completions", req.prompt
        body.update((k, v) for k, v in req.sent_params().items() if v is not None)
        response = await self.client.post(path, body=body, cast_to=self._response_cls)
        return self._headers, json.loads(response.content)

    @staticmethod
    def _extract(req: LLMRequest, completion: dict) -> tuple[str, str | None, int | None, int | None]:
        choices = completion.get("choices") if isinstance(completion, dict) else None
        if not choices:
            raise ValueError("response has no choices")
        choice = choices[0]
        text = (choice.get("message") or {}).get("content") if req.messages is not None else choice.get("text")
        if not isinstance(text, str):
            raise ValueError("response choice has no content")
        usage = completion.get("usage") or {}
        p_tok, c_tok = usage.get("prompt_tokens"), usage.get("completion_tokens")
        return (text, choice.get("finish_reason"), int(p_tok) if p_tok is not None else None,
                int(c_tok) if c_tok is not None else None)

    def _error(self, e: BaseException) -> tuple[str, bool, float | None]:
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
            return msg, status in _RETRYABLE_STATUS or (status or 0) >= 500, retry_after(headers)
        # 200 with a body that is not the JSON we expect (truncated, wrong shape): a server glitch, retry
        if isinstance(e, openai.APIResponseValidationError | json.JSONDecodeError | ValueError | KeyError
                      | TypeError | AttributeError):
            return msg, True, None
        return msg, False, None

    async def call(self, req: LLMRequest, key: str) -> LLMResult:
        est_prompt = req.estimated_prompt_tokens()
        est = est_prompt + req.max_completion_tokens(self.llm.max_tokens)
        t0 = time.monotonic()
        error = "not attempted"
        attempts = 0
        for attempt in range(self.llm.max_retries + 1):
            await self.limiter.acquire(est)
            attempts += 1
            try:
                headers, completion = await self._send(req)
                text, finish, p_tok, c_tok = self._extract(req, completion)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes a classified, recorded error
                self.limiter.settle(est, 0)
                error, retryable, wait = self._error(e)
                status = getattr(e, "status_code", None)
                self.recent_429.append(status == 429)
                # scattered 429s only delay their own request; mostly-429s means back off together
                if status == 429 and sum(self.recent_429) >= self.llm.cooldown_429_share * 20:
                    self.recent_429.clear()
                    self.limiter.pause(wait if wait is not None else self.llm.cooldown_s)
                if not retryable or attempt == self.llm.max_retries:
                    break
                delay = self._backoff(attempt)
                if wait is not None:
                    delay = max(wait, min(delay, wait + 1.0))
                await asyncio.sleep(delay)
                continue
            self.recent_429.append(False)
            pause = ratelimit_pause(headers)
            if pause:
                self.limiter.pause(pause)
            # no usage reported: count the estimate so budgets still bind
            p_tok = p_tok if p_tok is not None else est_prompt
            c_tok = c_tok if c_tok is not None else len(text) // 3 + 1
            self.limiter.settle(est, p_tok + c_tok)
            return LLMResult(key=key, ok=True, text=text, finish_reason=finish, prompt_tokens=p_tok,
                             completion_tokens=c_tok, latency_s=time.monotonic() - t0, attempts=attempts,
                             error=None, model=self.llm.model)
        return LLMResult(key=key, ok=False, text=None, finish_reason=None, prompt_tokens=0, completion_tokens=0,
                         latency_s=time.monotonic() - t0, attempts=attempts,
                         error=f"after {attempts} attempt(s): {error}", model=self.llm.model)
