"""Server-directed waits: every rate-limit header form providers send, read as seconds from now.

Forms read (a header value, whatever the header):
- a number: seconds (`Retry-After: 20`, IETF `RateLimit-Reset: 20`, Azure `x-ratelimit-reset-tokens: 6`);
  epoch seconds when it is at least 1e9 (GitHub-style `x-ratelimit-reset: 1767225600`), epoch milliseconds when
  at least 1e12 (OpenRouter `X-RateLimit-Reset: 1767225600000`); a header whose name ends in `-ms`
  (`retry-after-ms`, as the openai SDK reads it) is milliseconds;
- a Go-style duration: `6m0s`, `1m30s`, `2m59.56s`, `250ms`, `1h` (OpenAI and Groq `x-ratelimit-reset-*`);
- an HTTP-date (`Retry-After: Wed, 21 Oct 2026 07:28:00 GMT`, RFC 9110 section 10.2.3);
- an ISO-8601 / RFC 3339 time (Anthropic `anthropic-ratelimit-requests-reset: 2026-10-21T07:28:00Z`).
A time at most `PAST_TOLERANCE_S` in the past (a reset that just happened, a little clock skew) is a wait of 0.
Implausible values are not read as "go now": a negative number, a time further in the past (`Retry-After:
1500000000` is 2017, `1e12` read as epoch milliseconds is 2001), a `-ms` header of 1e9 ms (11.6 days) or more
(a `-ms` value is milliseconds, never reinterpreted as an epoch). Those and anything else are unknown: `None`, and
`on_unknown` is told once per header name (the caller warns once and waits by its own backoff), never read as a
number of some other unit. `unreadable_why` says which it was, for the warning.

Which header decides (`server_wait`), as the openai SDK and Anthropic's docs order them: `retry-after-ms`, then
`retry-after`; else, for a limit the response says is exhausted (`…remaining…: 0`), its reset time (the longest
when several are exhausted); on a 429/503 with reset times but no remaining counts, the soonest reset. A bare
`0` remaining means exhausted; Azure's `-1` (not applicable) does not.
Ambiguity, stated: a bare millisecond count in a header not named `-ms` reads as seconds, 1,000 times too long;
that errs on the side the `llm.max_wait_s` ceiling catches (the request fails, naming the header), never a
silent wait.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_EPOCH_S = 1e9  # 2001-09-09: no server asks for a 31-year wait, so a number this large is a point in time
_EPOCH_MS = 1e12
_MS_MAX = 1e9  # a `-ms` header this large (11.6 days) is no wait a server means
PAST_TOLERANCE_S = 300.0  # an absolute time this far in the past still reads as "now" (reset just passed, skew)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class ServerWait:
    """A wait the server asked for: `seconds` from when the response was read, `header` the header and value it
    came from (`retry-after: 86400`), for messages."""

    seconds: float
    header: str


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _until(when: float, now: float) -> float | None:
    """Seconds from `now` to the absolute time `when` (epoch s): 0 if it passed at most `PAST_TOLERANCE_S` ago,
    None (implausible) if longer ago."""
    left = when - now
    if left < -PAST_TOLERANCE_S:
        return None
    return max(0.0, left)


def parse_wait(value: str | None, *, ms: bool = False, now: float | None = None) -> float | None:
    """Seconds to wait from `value` (any form above; `ms=True`: a bare number is milliseconds, never an epoch),
    measured from `now` (epoch seconds, default the clock). None for an absent, unknown or implausible value
    (negative, a time more than `PAST_TOLERANCE_S` in the past, `ms` of 1e9 or more); never negative."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    now = time.time() if now is None else now
    number = _number(text)
    if number is not None:
        if number < 0:
            return None
        if ms:
            return number / 1000 if number < _MS_MAX else None
        if number >= _EPOCH_MS:
            return _until(number / 1000, now)
        if number >= _EPOCH_S:
            return _until(number, now)
        return max(0.0, number)  # -0 is 0
    compact = text.replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if parts and "".join(n + u for n, u in parts) == compact:
        return sum(float(n) * _UNIT_S[u] for n, u in parts)
    when = _http_date(text) or _iso_time(text)
    if when is not None:
        return _until(when.timestamp(), now)
    return None


def unreadable_why(value: str, *, ms: bool = False, now: float | None = None) -> str:
    """Why `parse_wait` read nothing from `value` (for the one-time warning): 'negative', 'a time ... in the
    past', 'above 1e9 ms', or 'a form this client does not know'."""
    now = time.time() if now is None else now
    text = value.strip()
    number = _number(text)
    if number is not None:
        if number < 0:
            return "a negative wait"
        if ms:
            return f"{number:,.0f} ms is no plausible wait (1e9 ms or more; a -ms header is never an epoch)"
        when = number / 1000 if number >= _EPOCH_MS else number
        return f"read as a time, it is {_ago(now - when)} in the past"
    when_dt = _http_date(text) or _iso_time(text)
    if when_dt is not None:
        return f"a time {_ago(now - when_dt.timestamp())} in the past"
    return "a form this client does not know"


def _ago(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:,.0f} days" if days >= 2 else f"{seconds:,.0f} s"


def _http_date(text: str) -> datetime | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _iso_time(text: str) -> datetime | None:
    if not re.match(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}", text):
        return None
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _limits(headers: Mapping[str, str]) -> list[tuple[str, str, str | None]]:
    """(reset header name, its value, the matching remaining value or None) for every reset header present."""
    lower = {k.lower(): v for k, v in headers.items()}
    out = []
    for name, value in lower.items():
        base = name.removesuffix("-ms")
        remaining: str | None = None
        if base.startswith("x-ratelimit-reset"):  # x-ratelimit-reset-<kind>, x-ratelimit-reset
            remaining = lower.get(base.replace("x-ratelimit-reset", "x-ratelimit-remaining", 1))
        elif base.startswith("anthropic-ratelimit-") and base.endswith("-reset"):
            remaining = lower.get(base.removesuffix("-reset") + "-remaining")
        elif base == "ratelimit-reset":  # IETF draft RateLimit-Reset (delta seconds)
            remaining = lower.get("ratelimit-remaining")
        else:
            continue
        out.append((name, value, remaining))
    return out


def _exhausted(remaining: str | None) -> bool | None:
    if remaining is None:
        return None
    number = _number(remaining.strip())
    return None if number is None else number == 0


def server_wait(headers: Mapping[str, str] | Any, status: int | None = None, *, now: float | None = None,
                on_unknown: Callable[[str, str], None] | None = None) -> ServerWait | None:
    """The wait a response asks for, or None. `headers`: any mapping with case-insensitive or lower-case names
    (httpx.Headers, dict); `status`: the HTTP status (429/503 also honour reset times without remaining counts);
    `on_unknown(name, value)` hears of each header whose value is in no known form (it is then ignored)."""
    if headers is None:
        return None
    items = {str(k).lower(): str(v) for k, v in headers.items()}

    def read(name: str) -> float | None:
        value = items.get(name)
        if value is None:
            return None
        seconds = parse_wait(value, ms=name.endswith("-ms"), now=now)
        if seconds is None and on_unknown is not None:
            on_unknown(name, value)
        return seconds

    for name in ("retry-after-ms", "retry-after"):
        seconds = read(name)
        if seconds is not None:
            return ServerWait(seconds, f"{name}: {items[name]}")
    exhausted: list[ServerWait] = []
    unknown_state: list[ServerWait] = []
    for name, value, remaining in _limits(items):
        state = _exhausted(remaining)
        if state is False:
            continue
        seconds = read(name)
        if seconds is None:
            continue
        (exhausted if state else unknown_state).append(ServerWait(seconds, f"{name}: {value}"))
    if exhausted:
        return max(exhausted, key=lambda w: w.seconds)
    if unknown_state and status in (429, 503):
        return min(unknown_state, key=lambda w: w.seconds)
    return None


# kept for callers of the first version (seconds, durations and HTTP-dates of one header)
def parse_duration(value: str | None) -> float | None:
    """`parse_wait` of one header value (seconds, duration, HTTP-date, ISO time, epoch)."""
    return parse_wait(value)


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after`, whichever form; None if neither is readable."""
    if headers is None:
        return None
    wait = server_wait({k: v for k, v in headers.items() if k.lower() in ("retry-after", "retry-after-ms")})
    return wait.seconds if wait is not None else None


def ratelimit_pause(headers: Mapping[str, str] | None) -> float | None:
    """After a success: how long until an exhausted limit (`…remaining…: 0`) resets; None if none is exhausted."""
    if headers is None:
        return None
    items = {k: v for k, v in headers.items() if not k.lower().startswith("retry-after")}
    wait = server_wait(items, 200)
    return wait.seconds if wait is not None and wait.seconds > 0 else None
