"""LLM layer pieces without a network: request keys, ledger, header parsing, limiter pacing, config, estimate."""

from __future__ import annotations

import sqlite3

import pytest

from pipeline.config import load_config
from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.llm.client import parse_duration, ratelimit_pause, retry_after
from pipeline.llm.ledger import Ledger
from pipeline.llm.limiter import LocalLimiter
from pipeline.llm.runner import estimate
from pipeline.llm.types import LLMRequest, LLMResult


def _req(content: str = "hi", **kw) -> LLMRequest:
    return LLMRequest(messages=({"role": "user", "content": content},), params=kw.pop("params", {"seed": 1}), **kw)


def test_key_changes_with_what_is_asked_not_with_tag():
    base = _req()
    assert base.key("m") == _req(tag={"x": 1}).key("m")
    assert base == _req(tag={"other": 2}) and hash(base) == hash(_req(tag={"z": 3}))
    different = {
        base.key("other-model"),
        _req("hello").key("m"),
        _req(params={"seed": 2}).key("m"),
        _req(sample_index=1).key("m"),
        _req(template_version="tpl@abc").key("m"),
        LLMRequest(prompt="hi", params={"seed": 1}).key("m"),
    }
    assert base.key("m") not in different and len(different) == 6


def test_request_needs_exactly_one_of_messages_or_prompt():
    with pytest.raises(ValueError):
        LLMRequest(params={})
    with pytest.raises(ValueError):
        LLMRequest(messages=({"role": "user", "content": "a"},), prompt="b")


def test_sample_index_offsets_the_seed_sent():
    assert _req(params={"seed": 10}, sample_index=3).sent_params()["seed"] == 13
    assert "seed" not in _req(params={"temperature": 1.0}, sample_index=3).sent_params()


def _result(key: str, ok: bool, text: str | None = "t") -> LLMResult:
    return LLMResult(key=key, ok=ok, text=text if ok else None, finish_reason="stop" if ok else None,
                     prompt_tokens=3, completion_tokens=5, latency_s=0.1, attempts=2, error=None if ok else "boom",
                     model="m")


def test_ledger_keeps_success_and_never_overwrites_it_with_failure(tmp_path):
    path = tmp_path / "l.sqlite"
    req = _req()
    with Ledger(path) as led:
        led.put_many([(_result("a", False), req)])
        assert led.get_ok("a") is None
        led.put_many([(_result("a", True, "first"), req)])
        led.put_many([(_result("a", False), req), (_result("a", True, "second"), req)])
        hit = led.get_ok("a")
        assert hit is not None and hit.text == "first" and hit.cached and hit.attempts == 4
        assert led.counts() == {"ok": 1, "failed": 0}
    # readable by a plain sqlite client, in WAL mode
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1


def test_header_parsing():
    assert parse_duration("2") == 2.0
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1m30.5s") == 90.5
    assert parse_duration("soon") is None
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"retry-after": "3"}) == 3.0
    assert ratelimit_pause({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}) == 2.0
    assert ratelimit_pause({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "2s"}) is None


def test_limiter_paces_requests_and_tokens_after_the_burst():
    lim = LocalLimiter(requests_per_minute=600, tokens_per_minute=None)  # 10/s, burst of 50
    waits = [lim.reserve(0) for _ in range(60)]
    assert all(w == 0 for w in waits[:50])
    # the k-th request past the burst waits about k/10 s (refill during the loop is negligible)
    assert waits[59] == pytest.approx(1.0, abs=0.05) and waits[50] == pytest.approx(0.1, abs=0.05)

    tok = LocalLimiter(requests_per_minute=None, tokens_per_minute=6000)  # 100 tok/s, burst 500
    assert tok.reserve(400) == 0
    assert tok.reserve(300) == pytest.approx(2.0, abs=0.05)
    tok.settle(300, 100)  # usage came in lower than the estimate: the difference is given back
    assert tok.reserve(0) == pytest.approx(0.0, abs=0.05)


def test_limiter_pause_applies_to_every_request():
    lim = LocalLimiter(None, None)
    assert lim.reserve(0) == 0
    lim.pause(5)
    assert 4.9 < lim.reserve(0) <= 5


def test_llm_config_fields_and_overrides(tmp_path, monkeypatch):
    cfg = load_config(None, ["llm.concurrency=8", "llm.api=completions", "budget.max_usd=2.5"])
    assert cfg.llm.concurrency == 8 and cfg.llm.api == "completions" and cfg.budget.max_usd == 2.5
    monkeypatch.setenv("OPENAI_BASE_URL", "http://example.invalid/v1")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("TEXTBOOK_CACHE", str(tmp_path / "cache"))
    llm = LLMSection()
    assert llm.resolved_base_url() == "http://example.invalid/v1"
    assert llm.resolved_ray_address() == "10.0.0.1:6379"
    assert llm.ledger_path() == tmp_path / "cache" / "ledger" / "llm.sqlite"
    with pytest.raises(Exception, match="provider"):
        load_config(None, ["llm.provider=azure"])
    assert BudgetSection(price_input_per_1m=1.0, price_output_per_1m=2.0).cost(1_000_000, 500_000) == 2.0


def test_estimate_counts_tokens_cost_and_skips_ledger_hits(tmp_path):
    llm = LLMSection(model="m", max_tokens=100, concurrency=10)
    budget = BudgetSection(price_input_per_1m=1.0, price_output_per_1m=10.0)
    reqs = [_req(f"prompt number {i}", params=llm.sampling_params()) for i in range(20)]
    with Ledger(tmp_path / "l.sqlite") as led:
        led.put_many([(_result(reqs[0].key("m"), True), reqs[0])])
    est = estimate(reqs, llm, budget, ledger_path=tmp_path / "l.sqlite", assumed_latency_s=2.0)
    assert est["requests"] == 20 and est["cached"] == 1 and est["to_send"] == 19
    assert est["max_completion_tokens"] == 1900
    assert est["est_max_cost_usd"] == pytest.approx(budget.cost(est["est_prompt_tokens"], 1900), abs=1e-4)
    assert est["est_time_s"] == pytest.approx(19 / (10 / 2.0), rel=0.01)
