"""What goes to the model and what comes back. Nothing here knows about textbooks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class LLMRequest:
    """One call to the model. Exactly one of `messages` (chat API) or `prompt` (completions API).

    `params` are the sampling parameters (temperature, top_p, max_tokens, seed, ...); `n` samples of one prompt
    are n requests with `sample_index` 0..n-1 (the seed actually sent is `seed + sample_index`).
    `template_version` is the prompt id (template name + content hash) so a template edit changes the key.
    `tag` is opaque caller data handed back on the result; it is not part of the key.
    """

    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    params: dict = field(default_factory=dict)
    sample_index: int = 0
    template_version: str = ""
    tag: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("LLMRequest needs exactly one of messages (chat) or prompt (completions)")
        if self.messages is not None and not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(self.messages))

    @classmethod
    def for_api(cls, api: str, text: str, *, system: str | None = None, **fields: Any) -> LLMRequest:
        """`text` as a chat request (optional system message + user message) or, for `api: completions`, as a
        prompt with the system text in front: callers build their requests the same way whatever `llm.api` is."""
        if api == "chat":
            system_msg = ({"role": "system", "content": system},) if system else ()
            return cls(messages=(*system_msg, {"role": "user", "content": text}), **fields)
        return cls(prompt=f"{system}\n\n{text}" if system else text, **fields)

    @property
    def api(self) -> str:
        return "chat" if self.messages is not None else "completions"

    def key(self, model: str) -> str:
        """Content address: same model + rendered prompt + params + sample + template -> same key."""
        cached = self.__dict__.get("_key")
        if cached is not None and cached[0] == model:  # the stage and the driver both ask, once per request each
            return cached[1]
        body = {
            "model": model,
            "api": self.api,
            "messages": list(self.messages) if self.messages is not None else None,
            "prompt": self.prompt,
            "params": self.params,
            "sample_index": self.sample_index,
            "template_version": self.template_version,
        }
        key = hashlib.sha256(_canonical(body).encode()).hexdigest()
        object.__setattr__(self, "_key", (model, key))
        return key

    def sent_params(self) -> dict:
        """Parameters as sent on the wire: the seed is offset by the sample index so samples differ."""
        params = dict(self.params)
        if params.get("seed") is not None:
            params["seed"] = int(params["seed"]) + self.sample_index
        return params

    def estimated_prompt_tokens(self) -> int:
        """Rough upper estimate (about 3 characters per token) for budgeting and tokens/min before usage is known."""
        if self.messages is not None:
            chars = sum(len(str(m.get("content", ""))) + 8 for m in self.messages)
        else:
            chars = len(self.prompt or "")
        return chars // 3 + 1

    def max_completion_tokens(self, default: int) -> int:
        """The completion cap sent (`params["max_tokens"]`, else the section's `default`): the worst case."""
        return int(self.params.get("max_tokens") or default)

    def to_json(self) -> dict:
        return {
            "messages": list(self.messages) if self.messages is not None else None,
            "prompt": self.prompt,
            "params": self.params,
            "sample_index": self.sample_index,
            "template_version": self.template_version,
            "tag": self.tag,
        }

    @classmethod
    def from_json(cls, d: dict) -> LLMRequest:
        msgs = d.get("messages")
        return cls(
            messages=tuple(msgs) if msgs is not None else None,
            prompt=d.get("prompt"),
            params=d.get("params") or {},
            sample_index=int(d.get("sample_index", 0)),
            template_version=d.get("template_version", ""),
            tag=d.get("tag") or {},
        )

    def __hash__(self) -> int:  # dict fields are unhashable; the content key is the identity
        return hash(self.key(""))


@dataclass
class LLMResult:
    """The outcome of one request. `on_result` receives exactly one per request:

    - ok: `ok=True`, `text` is the completion (may still be filtered by the caller);
    - failed: `ok=False`, `error` says why (retries exhausted, 4xx, ...); never an empty document;
    - skipped: `ok=False`, `skipped` names why it was never sent (`should_send` reason, `budget`, `duplicate`,
      `server_wait`); skipped and failed requests have no successful ledger entry, so a re-run sends them
      (except a request whose unusable answers used up `llm.content_filter_retries`: it comes back failed, cached).
    `cached=True` when the result came from the ledger without a call.

    Billing (tokens as the provider's `usage` reports them; an answer without `usage` counts its estimate):
    `prompt_tokens` / `completion_tokens` are the answer this result carries (0 for a failure);
    `unusable_*` are answers that were billed but not usable (content filter, null content, refusal, no
    choices), `unusable_answers` of them, including those retried before an ok answer; `unusable_outcomes` splits
    them by outcome: {outcome: [answers, prompt tokens, completion tokens]}. `outcome` names why a
    failure failed when it is one of those (`content_filter`, `null_content`, `refusal`, `no_choices`) or
    `server_wait` (the server asked to wait longer than `llm.max_wait_s`). `cost_usd` / `unusable_cost_usd`
    (USD, this run's prices and mode; 0 when cached) are set by the driver: `cost_usd` is all this request
    cost in this run, `unusable_cost_usd` the part of it spent on unusable answers.
    """

    key: str
    ok: bool
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int
    error: str | None
    model: str
    tag: dict = field(default_factory=dict)
    cached: bool = False
    skipped: str | None = None
    unusable_prompt_tokens: int = 0
    unusable_completion_tokens: int = 0
    unusable_answers: int = 0
    outcome: str | None = None
    cost_usd: float = 0.0
    unusable_cost_usd: float = 0.0
    unusable_outcomes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def billed_prompt_tokens(self) -> int:
        return self.prompt_tokens + self.unusable_prompt_tokens

    @property
    def billed_completion_tokens(self) -> int:
        return self.completion_tokens + self.unusable_completion_tokens

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return "skipped" if self.skipped else "failed"

    def to_json(self) -> dict:
        return {
            "key": self.key, "ok": self.ok, "text": self.text, "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "latency_s": self.latency_s, "attempts": self.attempts, "error": self.error, "model": self.model,
            "tag": self.tag, "cached": self.cached, "skipped": self.skipped,
            "unusable_prompt_tokens": self.unusable_prompt_tokens,
            "unusable_completion_tokens": self.unusable_completion_tokens, "unusable_answers": self.unusable_answers,
            "outcome": self.outcome, "cost_usd": self.cost_usd, "unusable_cost_usd": self.unusable_cost_usd,
            "unusable_outcomes": self.unusable_outcomes,
        }

    @classmethod
    def from_json(cls, d: dict) -> LLMResult:
        return cls(**d)


@dataclass
class RunSummary:
    """What `run_requests` did: every request is exactly one of ok (sent or cached), failed or skipped."""

    total: int = 0
    ok: int = 0  # includes cached
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    failed_reasons: dict[str, int] = field(default_factory=dict)
    sent: int = 0  # requests dispatched to the endpoint in this run
    attempts: int = 0
    retries: int = 0  # attempts beyond each sent request's first (= attempts - sent)
    prompt_tokens: int = 0  # billed in this run, usable or not (cached results are free)
    completion_tokens: int = 0
    cost_usd: float = 0.0
    # billed but unusable (content filter, null content, refusal, no choices): part of the three figures above
    unusable: dict[str, float] = field(default_factory=lambda: {"answers": 0, "prompt_tokens": 0,
                                                                "completion_tokens": 0, "cost_usd": 0.0})
    # billed-but-unusable answers by outcome: {outcome: {answers, prompt_tokens, completion_tokens, cost_usd}}
    unusable_outcomes: dict[str, dict[str, float]] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # failed requests by named outcome (unusable, server_wait)
    # waits of 2 s or more (server-directed, and backoff after errors): count, longest_s, total_s (the sum over
    # requests, which overlap) and wall_s (wall-clock time during which at least one request was waiting)
    waits: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # one-time warnings (an unknown rate-limit header form)
    max_inflight_usd: float = 0.0  # the largest reserved worst-case cost in flight at once (budget bound)
    mode: str = "online"
    batches: list[dict[str, Any]] = field(default_factory=list)  # batch mode: each batch's id, status, counts
    # batch mode: results of an earlier run's batch for requests this run did not ask for (recorded in the
    # ledger, counted in the budget, not in the figures above)
    unrequested: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    startup_s: float = 0.0  # one-time cost inside elapsed_s: starting Ray (if needed), worker actors, the client
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    latency_s: dict[str, float] = field(default_factory=dict)  # p50/p90/p99/max of sent requests
    stopped_reason: str | None = None  # e.g. the budget cap; None when everything was processed
    stopped_by: str | None = None  # what stopped the run: "budget" or "server_wait"
    # requests left for a re-run (not answered, not final), by why: budget / server_wait (the run stopped before
    # them, or on them), in_open_batch (online: in a batch an earlier batch-mode run left open). A re-run of the
    # same requests sends them; what was answered comes from the ledger.
    unanswered: dict[str, int] = field(default_factory=dict)
    model: str = ""
    ledger: str = ""

    @property
    def reconciled(self) -> bool:
        return self.total == self.ok + self.failed + self.skipped

    def partial(self) -> dict[str, Any] | None:
        """For a stage's stats (`pipeline.run`: a partial stage is run again by the same command): None when no
        request was left for a re-run, else {"unanswered": n, "reasons": {reason: n}, "message": why}."""
        n = sum(self.unanswered.values())
        if not n:
            return None
        message = self.stopped_reason or (
            f"{self.unanswered.get('in_open_batch', 0):,} request(s) are in batches an earlier llm.mode: batch run "
            "left open: run once with llm.mode: batch to collect them")
        return {"unanswered": n, "reasons": dict(self.unanswered), "message": message}

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
