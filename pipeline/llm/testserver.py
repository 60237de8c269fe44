"""A fault-injecting OpenAI-compatible server for tests and benchmarks (no model: answers are derived from the request).

Serves `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /_stats` on 127.0.0.1 with
a configurable latency distribution and rates of 429 (with Retry-After), 500, dropped connections, hangs past
the client's timeout and malformed JSON. The answer to a request is a deterministic function of its body, and
the server COUNTS successful answers per request body (`/_stats`, `.stats()`), which is how tests prove that
nothing was asked twice. A body containing `FAIL_ALWAYS` always gets a 500 (to test exhausted retries).
With `rephrase_tag="passage"`, a prompt holding `<passage>...</passage>` is answered with a rewrite of that
passage (its words swapped in pairs), and `rephrase_faults={"off_topic": 0.1, "invent": 0.1, ...}` replaces a
share of those answers, drawn from the request's hash, by the failures a rephrasing judge must catch (`_rephrase`).
An answer whose client has already gone (closed its connection: timed out, killed) is neither sent nor counted.

A gate lets a test stop the client at a point it can OBSERVE instead of guessing one with a clock:
`GET /_hold?after=N` (`.hold(after=N)`): once N answers have been sent in total, every later completion request
waits at the gate, and `/_stats` reports how many wait (`held`, clients still connected); `GET /_release`
(`.release()`) opens it. So "a request is held" means the client is blocked mid-run on an answer it has not had,
which is where a kill test kills it. A held request whose client goes away is dropped, never answered
(`abandoned`). Both controls are plain HTTP, so they work the same in "thread" and "process" mode.

Billed-but-unusable answers (what providers really send): a body containing `CONTENT_FILTER` (or a share
`rate_filter` of requests) gets HTTP 200 with `finish_reason: "content_filter"`, `content: null` and a `usage` of
`filter_usage` (400 + 700 tokens by default); `NULL_CONTENT` gets `content: null` with `finish_reason: "stop"`.
Both are counted in `answered` (they are billed) and in `faults`; batch lines get the same (`rate_filter` too).

Rate-limit header forms: `first_429=N` answers the first N requests 429 whatever the rates, with the headers
`headers_429` (default `retry-after` + `retry-after-ms` from `retry_after_s`); a value may hold a time relative
to the moment the 429 is sent: `{http_date+90}`, `{epoch+90}`, `{epoch_ms+90}`, `{iso+90}` (seconds from now).

The batch API (OpenAI's): `POST /v1/files` (multipart, purpose batch), `GET /v1/files/{id}` and
`/v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches` (newest first),
`POST /v1/batches/{id}/cancel`. A batch moves one step per status poll: validating → in_progress → finalizing →
completed, its lines answered as online requests are (markers included; `FAIL_ALWAYS` lines go to the error file
with status 500). `batch_fail=N`: the first N batches fail validation; `batch_expire=N`: the first N batches expire
with only their first half answered (the rest in the error file, `batch_expired`). `GET /_batch_hold` keeps every
batch in_progress until `GET /_batch_release`, so a test can kill a client mid-poll. `/_stats` counts
`files_uploaded`, `batches_created`, `batch_polls` and each batch's status.

Written on bare asyncio streams (not a web framework) so that faults are real: a dropped connection is a socket
closed mid-request, a malformed body is bytes on the wire. Runs in a subprocess (default, so it does not share
the client's GIL) or in a thread: `with FaultyOpenAIServer(latency="lognormal", rate_429=0.1) as srv: srv.base_url`.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import random
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

_WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not one "
          "all can their has more been its other when there use into time two may first only number way "
          "energy cell atom force water light system model value example function equation data rate").split()


@dataclass
class FaultConfig:
    latency: str = "fixed"  # fixed | lognormal
    latency_s: float = 0.0  # fixed latency, or the median of the lognormal
    sigma: float = 0.5
    rate_429: float = 0.0
    retry_after_s: float = 0.05
    rate_500: float = 0.0
    rate_drop: float = 0.0
    rate_hang: float = 0.0
    hang_s: float = 30.0
    rate_malformed: float = 0.0
    fail_first: int = 0  # the first N requests received answer 500 whatever the rates: a test's faults are certain
    words: int = 200  # completion length (capped by max_tokens; then finish_reason "length")
    seed: int = 0
    model: str = "test-model"
    ratelimit_headers: bool = False  # send x-ratelimit-* headers (remaining never 0)
    first_429: int = 0  # the first N requests received answer 429 (with headers_429) whatever the rates
    headers_429: dict[str, str] | None = None  # a 429's rate-limit headers (templates: see the module docstring)
    rate_filter: float = 0.0  # share of answers withheld by a "content filter" (HTTP 200, content null, billed)
    # usage of a filtered answer; None: it carries no usage block (the client bills its estimate)
    filter_usage: list[int] | None = field(default_factory=lambda: [400, 700])
    batch_fail: int = 0  # the first N batches fail validation
    batch_expire: int = 0  # the first N batches expire with half their requests answered
    # rephrasing: a prompt holding <tag>passage</tag> is answered with a rewrite of the passage (see `_rephrase`)
    rephrase_tag: str | None = None
    rephrase_faults: dict[str, float] = field(default_factory=dict)  # share of rewrites replaced, by kind
    batch_create_lost: int = 0  # the first N batch creations happen, but their answer is a 500 (as if lost)


def _canonical_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_TIME_TEMPLATE = re.compile(r"\{(http_date|epoch_ms|epoch|iso)([+-]\d+(?:\.\d+)?)\}")


def render_header(value: str, now: float | None = None) -> str:
    """Replace `{http_date+S}`, `{epoch+S}`, `{epoch_ms+S}`, `{iso+S}` by the time S seconds from `now`."""
    now = time.time() if now is None else now

    def sub(m: re.Match[str]) -> str:
        t = now + float(m.group(2))
        form = m.group(1)
        if form == "http_date":
            return email.utils.formatdate(t, usegmt=True)
        if form == "epoch":
            return str(int(math.ceil(t)))
        if form == "epoch_ms":
            return str(int(math.ceil(t * 1000)))
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    return _TIME_TEMPLATE.sub(sub, value)


def _answer_text(key: str, n_words: int) -> str:
    rng = random.Random(key)
    return " ".join(rng.choice(_WORDS) for _ in range(n_words)).capitalize() + "."


REPHRASE_FAULTS = ("off_topic", "invent", "short", "refusal")
INVENTED = "Professor Zorbat Quennick of Vardmoor Institute confirmed this in 1987, and again at Pellucid Bay in 2043."


def _rephrase(key: str, passage: str, faults: dict[str, float]) -> tuple[str, str | None]:
    """(answer, fault kind or None) for a rephrasing prompt: the passage's words swapped in adjacent pairs, line by
    line (the same words, so it stays about its source, but not a copy: its 5-word shingles are new); or, for a
    share `faults[kind]` of requests drawn from the request's hash (the same request always gets the same answer):
    `off_topic` (words unrelated to the passage), `invent` (the rewrite plus a sentence of invented names and
    years), `short` (its first three words), `refusal` (a refusal)."""
    rng = random.Random(f"rephrase-{key}")
    x = rng.random()
    kind = None
    for name in REPHRASE_FAULTS:
        if x < faults.get(name, 0.0):
            kind = name
            break
        x -= faults.get(name, 0.0)
    lines = []
    for line in passage.strip().splitlines():
        w = line.split()
        for i in range(0, len(w) - 1, 2):
            w[i], w[i + 1] = w[i + 1], w[i]
        lines.append(" ".join(w))
    text = "\n".join(lines)
    if kind == "off_topic":
        text = _answer_text(key, max(len(text.split()), 20))
    elif kind == "invent":
        text = f"{text}\n{INVENTED}"
    elif kind == "short":
        text = " ".join(text.split()[:3])
    elif kind == "refusal":
        text = "I'm sorry, but I can't help with rewriting this text."
    return text, kind


class _App:
    def __init__(self, cfg: FaultConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)  # faults: drawn in arrival order, so a seed gives the same fault sequence
        self.latency_rng = random.Random(cfg.seed + 1)  # apart, so timing never reorders the fault draws
        self.answered: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.received = 0
        self.answered_total = 0
        self.hold_after: int | None = None  # the gate: closed to completion requests once this many were answered
        self.gate: asyncio.Event | None = None  # set = open; a fresh one per hold, so a release is never lost
        self.held = 0  # requests waiting at the gate now, their clients still connected
        self.abandoned = 0  # requests never answered because their client went away first
        self.auth: Counter[str] = Counter()  # sha256 of bearer tokens seen: proves a key was sent, never stores it
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_order: list[str] = []
        self.batches_created = 0
        self.files_uploaded = 0
        self.batch_polls = 0
        self.batch_hold = False

    def _latency(self) -> float:
        c = self.cfg
        if c.latency == "lognormal" and c.latency_s > 0:
            return self.latency_rng.lognormvariate(math.log(c.latency_s), c.sigma)
        return c.latency_s

    def _fault(self) -> str | None:
        c = self.cfg
        x = self.rng.random()
        for name, rate in (("429", c.rate_429), ("500", c.rate_500), ("drop", c.rate_drop), ("hang", c.rate_hang),
                           ("malformed", c.rate_malformed), ("content_filter", c.rate_filter)):
            if x < rate:
                return name
            x -= rate
        return None

    def stats(self) -> dict:
        return {"received": self.received, "answered_total": self.answered_total,
                "distinct_answered": len(self.answered), "answered": dict(self.answered),
                "faults": dict(self.faults), "auth_sha256": dict(self.auth), "held": self.held,
                "hold_after": self.hold_after, "abandoned": self.abandoned, "files_uploaded": self.files_uploaded,
                "batches_created": self.batches_created, "batch_polls": self.batch_polls,
                "batch_hold": self.batch_hold, "batches": {k: b["status"] for k, b in self.batches.items()}}

    def hold(self, after: int) -> None:
        if self.gate is None or self.gate.is_set():
            self.gate = asyncio.Event()
        self.hold_after = after

    def release(self) -> None:
        self.hold_after = None
        if self.gate is not None:
            self.gate.set()

    def _closed(self) -> bool:
        return self.hold_after is not None and self.answered_total >= self.hold_after

    async def wait_at_gate(self, reader: asyncio.StreamReader) -> bool:
        """Wait while the gate is closed to this request; False if its client went away meanwhile."""
        if self.gate is None or not self._closed():
            return True
        gate = self.gate  # this hold's gate: a later hold does not re-close it on us
        self.held += 1
        try:
            while not gate.is_set() and self._closed():  # released, or re-held with a higher `after`
                if reader.at_eof():  # the client closed the connection (timed out, was killed)
                    return False
                try:
                    await asyncio.wait_for(gate.wait(), 0.05)  # a poll of the connection, not a synchronisation
                except TimeoutError:
                    pass
            return not reader.at_eof()
        finally:
            self.held -= 1

    def filtered(self, key: str, body: dict, null_only: bool = False) -> dict:
        """HTTP 200, content null: `finish_reason` content_filter (or stop, `null_only`), usage `filter_usage`
        (none when it is None)."""
        finish = "stop" if null_only else "content_filter"
        if "messages" in body:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": None},
                                      "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": None, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        out: dict[str, Any] = {"id": "cmpl-" + key[:24], "object": obj, "created": int(time.time()),
                               "model": body.get("model"), "choices": [choice]}
        if self.cfg.filter_usage is not None:
            p_tok, c_tok = self.cfg.filter_usage
            out["usage"] = {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}
        return out

    def answer(self, key: str, body: dict, raw: bytes, fault: str | None) -> dict:
        """The body of a 200 answer: filtered, null content, or the completion."""
        if fault == "content_filter" or b"CONTENT_FILTER" in raw:
            if fault != "content_filter":  # a drawn fault is already counted where it was drawn
                self.faults["content_filter"] += 1
            return self.filtered(key, body)
        if b"NULL_CONTENT" in raw:
            self.faults["null_content"] += 1
            return self.filtered(key, body, null_only=True)
        return self.completion(key, body)

    def completion(self, key: str, body: dict) -> dict:
        max_tokens = int(body.get("max_tokens") or 10**9)
        n_words = min(self.cfg.words, max_tokens)
        text = _answer_text(key, n_words)
        finish = "length" if self.cfg.words > max_tokens else "stop"
        passage = self._passage(body)
        if passage is not None:
            text, fault = _rephrase(key, passage, self.cfg.rephrase_faults)
            if fault is not None:
                self.faults[f"rephrase_{fault}"] += 1
            pieces = re.findall(r"\S+\s*", text)
            n_words = len(pieces)
            finish = "length" if n_words > max_tokens else "stop"
            if n_words > max_tokens:  # cut off at max_tokens (one word per token here), line breaks kept
                text, n_words = "".join(pieces[:max_tokens]).rstrip(), max_tokens
        if "messages" in body:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in body["messages"])
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            prompt_tokens = len(str(body.get("prompt", "")).split())
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": "cmpl-" + key[:24], "object": obj, "created": int(time.time()), "model": body.get("model"),
                "choices": [choice], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n_words,
                                               "total_tokens": prompt_tokens + n_words}}

    def _passage(self, body: dict) -> str | None:
        """The text between <rephrase_tag> and </rephrase_tag> in the request's (last) prompt, if any."""
        tag = self.cfg.rephrase_tag
        if not tag:
            return None
        prompt = str(body["messages"][-1].get("content", "")) if body.get("messages") else str(body.get("prompt", ""))
        m = re.search(f"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", prompt, re.S)
        return m.group(1) if m else None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in
                           (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                token = headers.get("authorization", "").removeprefix("Bearer ").strip()
                if token and method == "POST":
                    self.auth[hashlib.sha256(token.encode()).hexdigest()] += 1
                if path.startswith(("/v1/files", "/v1/batches")):
                    keep = await self.batch_route(method, path, raw, headers, writer)
                else:
                    keep = await self.route(method, path, raw, reader, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, payload: bytes,
                    headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
                  400: "Bad Request"}.get(status, "Error")
        lines = [f"HTTP/1.1 {status} {reason}", f"content-type: {content_type}",
                 f"content-length: {len(payload)}", "connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await writer.drain()

    async def route(self, method: str, target: str, raw: bytes, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> bool:
        path, _, query = target.partition("?")
        if method == "GET" and path in ("/_stats", "/_hold", "/_release", "/_batch_hold", "/_batch_release"):
            if path in ("/_batch_hold", "/_batch_release"):
                self.batch_hold = path == "/_batch_hold"
            elif path == "/_hold":
                after = urllib.parse.parse_qs(query).get("after", ["0"])[0]
                if not after.isdigit():
                    await self._send(writer, 400, b'{"error": {"message": "after must be an integer >= 0"}}')
                    return True
                self.hold(int(after))
            elif path == "/_release":
                self.release()
            await self._send(writer, 200, json.dumps(self.stats()).encode())
            return True
        if method == "GET" and path in ("/v1/models", "/health"):
            await self._send(writer, 200, json.dumps(
                {"object": "list", "data": [{"id": self.cfg.model, "object": "model", "owned_by": "test"}]}).encode())
            return True
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            await self._send(writer, 404, b'{"error": {"message": "not found"}}')
            return True
        self.received += 1
        arrival = self.received
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            await self._send(writer, 400, b'{"error": {"message": "invalid JSON body"}}')
            return True
        # drawn on arrival, before any wait: the n-th request gets the n-th draw however the waits interleave
        forced = b"FAIL_ALWAYS" in raw or arrival <= self.cfg.fail_first
        fault = "500" if forced else "429" if arrival <= self.cfg.first_429 else self._fault()
        if not await self.wait_at_gate(reader):
            self.abandoned += 1
            return False
        await asyncio.sleep(self._latency())
        if fault is not None:
            self.faults[fault] += 1
        if fault == "429":
            ra = self.cfg.retry_after_s
            if self.cfg.headers_429 is not None:
                limit_headers = {k: render_header(v) for k, v in self.cfg.headers_429.items()}
            else:
                limit_headers = {"retry-after": str(max(1, math.ceil(ra))), "retry-after-ms": str(int(ra * 1000))}
            await self._send(writer, 429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                             limit_headers)
            return True
        if fault == "500":
            await self._send(writer, 500, b'{"error": {"message": "internal error", "type": "server_error"}}')
            return True
        if fault == "drop":
            return False
        if fault == "hang":
            await asyncio.sleep(self.cfg.hang_s)
            return False
        key = _canonical_key(body)  # once: it names both the answer and the per-body count
        payload = json.dumps(self.answer(key, body, raw, fault)).encode()
        if fault == "malformed":
            await self._send(writer, 200, payload[: len(payload) // 2])
            return True
        headers = {}
        if self.cfg.ratelimit_headers:
            headers = {"x-ratelimit-remaining-requests": "1000", "x-ratelimit-reset-requests": "1s",
                       "x-ratelimit-remaining-tokens": "100000", "x-ratelimit-reset-tokens": "1s"}
        if reader.at_eof():  # the client is gone (timed out, killed): it would never see this answer
            self.abandoned += 1
            return False
        await self._send(writer, 200, payload, headers)
        # counted only once the answer is on the wire: a client that sees it will not ask again
        self.answered[key] += 1
        self.answered_total += 1
        return True


    # ------------------------------------------------------------------------------------------ batch API
    async def batch_route(self, method: str, target: str, raw: bytes, headers: dict[str, str],
                          writer: asyncio.StreamWriter) -> bool:
        path, _, _ = target.partition("?")
        parts = path.strip("/").split("/")  # v1, files|batches, [id], [content|cancel]
        try:
            if parts[1] == "files":
                if method == "POST" and len(parts) == 2:
                    return await self._json(writer, 200, self.upload(raw, headers.get("content-type", "")))
                f = self.files.get(parts[2]) if len(parts) > 2 else None
                if f is None:
                    return await self._json(writer, 404, {"error": {"message": "no such file"}})
                if len(parts) == 4 and parts[3] == "content":
                    await self._send(writer, 200, f["data"], content_type="application/octet-stream")
                    return True
                return await self._json(writer, 200, f["meta"])
            if method == "POST" and len(parts) == 2:
                status, created = self.create_batch(json.loads(raw or b"{}"))
                if status == 200 and self.batches_created <= self.cfg.batch_create_lost:
                    return await self._json(writer, 500, {"error": {"message": "upstream timeout",
                                                                    "type": "server_error"}})
                return await self._json(writer, status, created)
            if method == "GET" and len(parts) == 2:
                data = [_public(self.batches[b]) for b in reversed(self.batch_order)]
                return await self._json(writer, 200, {"object": "list", "data": data, "has_more": False,
                                                      "first_id": data[0]["id"] if data else None,
                                                      "last_id": data[-1]["id"] if data else None})
            b = self.batches.get(parts[2]) if len(parts) > 2 else None
            if b is None:
                return await self._json(writer, 404, {"error": {"message": "no such batch"}})
            if method == "POST" and len(parts) == 4 and parts[3] == "cancel":
                if b["status"] not in ("completed", "failed", "expired"):
                    b["status"] = "cancelled"
                    b["cancelled_at"] = int(time.time())
                return await self._json(writer, 200, _public(b))
            if method == "GET" and len(parts) == 3:
                self.batch_polls += 1
                self.advance(b)
                return await self._json(writer, 200, _public(b))
        except (ValueError, KeyError, IndexError) as e:
            return await self._json(writer, 400, {"error": {"message": f"bad request: {e}"}})
        return await self._json(writer, 404, {"error": {"message": "not found"}})

    async def _json(self, writer: asyncio.StreamWriter, status: int, obj: dict) -> bool:
        await self._send(writer, status, json.dumps(obj).encode())
        return True

    def _file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{len(self.files) + 1:06d}"
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        self.files[file_id] = {"meta": meta, "data": data}
        return meta

    def upload(self, raw: bytes, content_type: str) -> dict[str, Any]:
        """multipart/form-data with a `file` part and a `purpose` part, as the openai SDK sends them."""
        m = re.search(r'boundary="?([^";]+)"?', content_type)
        if m is None:
            raise ValueError("expected multipart/form-data")
        fields: dict[str, tuple[str, bytes]] = {}
        for part in raw.split(b"--" + m.group(1).encode())[1:]:
            if part.startswith(b"--"):
                break
            head, _, body = part.partition(b"\r\n\r\n")
            name = re.search(rb'name="([^"]*)"', head)
            filename = re.search(rb'filename="([^"]*)"', head)
            if name is not None:
                fields[name.group(1).decode()] = (filename.group(1).decode() if filename else "",
                                                  body.removesuffix(b"\r\n"))
        if "file" not in fields:
            raise ValueError("no file part")
        self.files_uploaded += 1
        purpose = fields.get("purpose", ("", b""))[1].decode()
        return self._file(fields["file"][1], fields["file"][0] or "upload.jsonl", purpose)

    def create_batch(self, req: dict) -> tuple[int, dict]:
        f = self.files.get(str(req.get("input_file_id")))
        if f is None:
            return 400, {"error": {"message": "input_file_id: no such file"}}
        lines = [json.loads(x) for x in f["data"].decode().splitlines() if x.strip()]
        self.batches_created += 1
        batch_id = f"batch_{self.batches_created:06d}"
        b = {"id": batch_id, "object": "batch", "endpoint": req.get("endpoint"), "errors": None,
             "input_file_id": f["meta"]["id"], "completion_window": req.get("completion_window", "24h"),
             "status": "validating", "output_file_id": None, "error_file_id": None,
             "created_at": int(time.time()), "metadata": req.get("metadata"),
             "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        self.batches[batch_id] = b
        self.batch_order.append(batch_id)
        b["_lines"] = lines
        b["_index"] = self.batches_created
        return 200, _public(b)

    def advance(self, b: dict) -> None:
        """One step per poll; in_progress holds while the batch gate is closed."""
        status = b["status"]
        if status == "validating":
            if b["_index"] <= self.cfg.batch_fail:
                b.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                    {"code": "invalid_request", "message": "this test server fails the first batches", "line": 1}]})
            else:
                b.update(status="in_progress", in_progress_at=int(time.time()))
        elif status == "in_progress" and not self.batch_hold:
            self.run_batch(b)
            b.update(status="finalizing", finalizing_at=int(time.time()))
        elif status == "finalizing":
            b["status"] = b.pop("_final")
            b["completed_at" if b["status"] == "completed" else "expired_at"] = int(time.time())

    def run_batch(self, b: dict) -> None:
        lines = b["_lines"]
        expire = b["_index"] <= self.cfg.batch_expire
        cutoff = (len(lines) + 1) // 2 if expire else len(lines)
        out: list[str] = []
        err: list[str] = []
        for i, line in enumerate(lines):
            cid = line.get("custom_id")
            rid = f"batch_req_{b['_index']}_{i}"
            if i >= cutoff:
                err.append(json.dumps({"id": rid, "custom_id": cid, "response": None, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}}))
                continue
            body = line.get("body") or {}
            raw = json.dumps(body).encode()
            if b"FAIL_ALWAYS" in raw:
                self.faults["500"] += 1
                err.append(json.dumps({"id": rid, "custom_id": cid, "error": None, "response": {
                    "status_code": 500, "request_id": rid,
                    "body": {"error": {"message": "internal error", "type": "server_error"}}}}))
                continue
            key = _canonical_key(body)
            # a share `rate_filter` of lines is content-filtered, as online (drawn in line order)
            fault = "content_filter" if self.cfg.rate_filter and self.rng.random() < self.cfg.rate_filter else None
            if fault is not None:
                self.faults[fault] += 1
            answer = self.answer(key, body, raw, fault)
            out.append(json.dumps({"id": rid, "custom_id": cid, "error": None,
                                   "response": {"status_code": 200, "request_id": rid, "body": answer}}))
            self.answered[key] += 1
            self.answered_total += 1
        if out:
            b["output_file_id"] = self._file("".join(x + "\n" for x in out).encode(), "output.jsonl",
                                             "batch_output")["id"]
        if err:
            b["error_file_id"] = self._file("".join(x + "\n" for x in err).encode(), "errors.jsonl",
                                            "batch_output")["id"]
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        b["_final"] = "expired" if expire else "completed"


def _public(batch: dict) -> dict:
    """A batch object as the API shows it (the server's own bookkeeping, `_`-keys, left out)."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


async def _serve(cfg: FaultConfig, port: int, ready: Any) -> None:
    app = _App(cfg)
    server = await asyncio.start_server(app.handle, "127.0.0.1", port, backlog=1024, limit=2**24)
    ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


class FaultyOpenAIServer:
    """Context manager; `.base_url` (…/v1), `.stats()`, `.hold(after=N)`, `.release()`, `.hold_batches()`,
    `.release_batches()`, `.port`. `mode="process"` (default) or `"thread"`."""

    def __init__(self, mode: str = "process", **config: Any) -> None:
        self.cfg = FaultConfig(**config)
        self.mode = mode
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FaultyOpenAIServer:
        if self.mode == "thread":
            started = threading.Event()

            def ready(port: int) -> None:
                self.port = port
                started.set()

            def main() -> None:
                self._loop = asyncio.new_event_loop()
                self._loop.run_until_complete(self._guard(_serve(self.cfg, 0, ready)))

            self._thread = threading.Thread(target=main, name="faulty-openai", daemon=True)
            self._thread.start()
            if not started.wait(30):
                raise RuntimeError("test server did not start")
        else:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.llm.testserver", json.dumps(asdict(self.cfg))],
                stdout=subprocess.PIPE, text=True)
            line = self._proc.stdout.readline() if self._proc.stdout else ""
            if not line.startswith("PORT "):
                self._proc.kill()
                raise RuntimeError(f"test server did not start: {line!r}")
            self.port = int(line.split()[1])
        return self

    @staticmethod
    async def _guard(coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            pass

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self._get("/_stats")

    def hold(self, after: int = 0) -> dict:
        """From now on, once `after` answers have been sent in total (this server's life), completion requests
        wait at a gate until `release()`; `stats()["held"]` counts those waiting."""
        return self._get(f"/_hold?after={int(after)}")

    def release(self) -> dict:
        """Open the gate: every held request goes on (those whose client went away are dropped)."""
        return self._get("/_release")

    def hold_batches(self) -> dict:
        """From now on every batch stays in_progress (polls see it running) until `release_batches()`."""
        return self._get("/_batch_hold")

    def release_batches(self) -> dict:
        return self._get("/_batch_release")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._loop is not None:
            loop = self._loop

            def stop() -> None:
                for task in asyncio.all_tasks(loop):
                    task.cancel()

            loop.call_soon_threadsafe(stop)
            if self._thread is not None:
                self._thread.join(10)


def main() -> None:
    cfg = FaultConfig(**json.loads(sys.argv[1])) if len(sys.argv) > 1 else FaultConfig()

    def ready(port: int) -> None:
        print(f"PORT {port}", flush=True)

    try:
        asyncio.run(_serve(cfg, 0, ready))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
