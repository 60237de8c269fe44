"""Money (issue 17): every answer with `usage` is billed, whatever its content; unusable answers are a named,
counted outcome asked again at most `llm.content_filter_retries` times (across runs, through the ledger); the
budget counts them and stops within its stated bound."""

from __future__ import annotations

import pytest

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.llm.client import read_answer
from pipeline.llm.ledger import Ledger
from pipeline.llm.runner import run_requests
from pipeline.llm.testserver import FaultyOpenAIServer
from pipeline.llm.types import LLMRequest, LLMResult


def _llm(srv: FaultyOpenAIServer, **kw) -> LLMSection:
    base = dict(base_url=srv.base_url, model="test-model", workers=0, concurrency=4, timeout_s=5.0,
                max_retries=6, backoff_base_s=0.01, backoff_max_s=0.05, max_tokens=100,
                api_key_env="TEXTBOOK_TEST_NO_KEY")
    base.update(kw)
    return LLMSection(**base)


def _requests(llm: LLMSection, n: int, marker=lambda i: "") -> list[LLMRequest]:
    return [LLMRequest(messages=({"role": "user", "content": f"write about topic {i}{marker(i)}"},),
                       params=llm.sampling_params(), tag={"i": i}) for i in range(n)]


def test_read_answer_names_what_cannot_be_used():
    usage = {"prompt_tokens": 400, "completion_tokens": 700}

    def chat(message: dict, finish: str = "stop", **extra) -> dict:
        return {"choices": [{"message": message, "finish_reason": finish}], "usage": usage, **extra}

    ok = read_answer(True, chat({"content": "text"}))
    assert ok.outcome is None and ok.text == "text" and (ok.prompt_tokens, ok.completion_tokens) == (400, 700)
    assert read_answer(True, chat({"content": None}, "content_filter")).outcome == "content_filter"
    assert read_answer(True, chat({"content": "partly"}, "content_filter")).outcome == "content_filter"  # Azure
    assert read_answer(True, chat({"content": None, "refusal": "I can't"})).outcome == "refusal"
    assert read_answer(True, chat({"content": None})).outcome == "null_content"
    assert read_answer(True, {"choices": [], "usage": usage}).outcome == "no_choices"
    assert read_answer(False, {"choices": [{"text": None, "finish_reason": "stop"}], "usage": usage}).outcome \
        == "null_content"
    # a length-truncated answer is usable here (the judge decides); no usage: tokens unknown (estimated later)
    cut = read_answer(True, {"choices": [{"message": {"content": "cut"}, "finish_reason": "length"}]})
    assert cut.outcome is None and cut.prompt_tokens is None
    # not an answer at all: a glitch to retry, never billed
    assert read_answer(True, {"error": {"message": "x"}}) is None and read_answer(True, [1]) is None


def test_case_content_filter_answers_are_billed_counted_and_not_paid_for_twice(tmp_path):
    """../shared/cases: HTTP 200, finish_reason content_filter, content null, usage 400 + 700. It was retried 7
    times per prompt and recorded as 0 tokens and $0.00. Now each is billed once, named, and a re-run answers it
    from the ledger; raising llm.content_filter_retries asks again, once more per step."""
    ledger = tmp_path / "l.sqlite"
    budget = BudgetSection(price_input_per_1m=1.0, price_output_per_1m=2.0)
    with FaultyOpenAIServer(mode="thread", words=60) as srv:
        llm = _llm(srv)
        assert llm.content_filter_retries == 0
        reqs = _requests(llm, 10, lambda i: " CONTENT_FILTER" if i % 2 else "")
        results: list[LLMResult] = []
        s = run_requests(reqs, llm, budget, ledger, on_result=results.append, progress=False)
        filtered = [r for r in results if r.tag["i"] % 2]
        assert s.ok == 5 and s.failed == 5 and s.reconciled and s.retries == 0
        assert all(r.outcome == "content_filter" and r.attempts == 1 and r.text is None for r in filtered)
        assert all((r.unusable_prompt_tokens, r.unusable_completion_tokens, r.unusable_answers) == (400, 700, 1)
                   for r in filtered)
        assert all(r.cost_usd == pytest.approx(budget.cost(400, 700)) for r in filtered)
        assert "content_filter" in filtered[0].error and "billed (400 prompt + 700 completion tokens)" \
            in filtered[0].error
        # the summary bills them (the case recorded 0 tokens and $0.00) and says which part was unusable
        ok_p = sum(r.prompt_tokens for r in results if r.ok)
        assert s.prompt_tokens == ok_p + 5 * 400 and s.completion_tokens == 5 * 60 + 5 * 700
        assert s.unusable == {"answers": 5, "prompt_tokens": 2000, "completion_tokens": 3500,
                              "cost_usd": pytest.approx(5 * budget.cost(400, 700))}
        assert s.outcomes == {"content_filter": 5} and s.failed_reasons == {"content_filter": 5}
        assert s.cost_usd == pytest.approx(budget.cost(s.prompt_tokens, s.completion_tokens))
        assert srv.stats()["received"] == 10 and srv.stats()["faults"]["content_filter"] == 5
        with Ledger(ledger) as led:
            assert led.billed() == {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                                    "unusable_answers": 5}

        # a re-run pays for nothing: the 5 ok from the ledger, the 5 filtered answered from it as failed
        again = run_requests(reqs, llm, budget, ledger, progress=False)
        assert (again.ok, again.cached, again.failed, again.sent, again.cost_usd) == (5, 5, 5, 0, 0.0)
        assert srv.stats()["received"] == 10

        # one more allowed: each filtered request is asked once more (and filtered again: billed, counted)
        more = run_requests(reqs, llm.model_copy(update={"content_filter_retries": 1}), budget, ledger,
                            progress=False)
        assert more.sent == 5 and more.unusable["answers"] == 5 and more.failed == 5
        assert srv.stats()["received"] == 15
        with Ledger(ledger) as led:
            assert led.billed()["unusable_answers"] == 10


def test_content_filter_retries_within_a_run_and_null_content(tmp_path):
    with FaultyOpenAIServer(mode="thread", words=60) as srv:
        llm = _llm(srv, content_filter_retries=2)
        reqs = _requests(llm, 4, lambda i: [" CONTENT_FILTER", " NULL_CONTENT", "", ""][i])
        results = {r.tag["i"]: r for r in []}
        out: list[LLMResult] = []
        s = run_requests(reqs, llm, BudgetSection(), tmp_path / "l.sqlite", on_result=out.append, progress=False)
        results = {r.tag["i"]: r for r in out}
        answered = srv.stats()["answered"]
    # each unusable answer asked again at most twice: 3 answers billed, then failed with its name
    assert results[0].outcome == "content_filter" and results[0].unusable_answers == 3 and results[0].attempts == 3
    assert results[1].outcome == "null_content" and results[1].unusable_answers == 3
    assert results[1].unusable_prompt_tokens == 3 * 400
    assert sorted(answered.values()) == [1, 1, 3, 3] and s.unusable["answers"] == 6
    assert s.outcomes == {"content_filter": 1, "null_content": 1} and s.ok == 2


def test_budget_stops_on_billed_content_filter_answers_within_the_bound(tmp_path):
    """Every answer is filtered and billed 400 + 700 tokens ($1.10 at $1,000/1M). The case's run never stopped
    (it recorded $0.00). Now the cap binds; it is overshot only because the server bills more prompt tokens
    than the estimate the first reservations used, and by no more than the stated bound."""
    price = 1000.0
    # 4 first reservations ($1.034 each: a 10-token prompt estimate + 1,024) fit under $4.20; billed $1.10 each
    budget = BudgetSection(price_input_per_1m=price, price_output_per_1m=price, max_usd=4.2)
    with FaultyOpenAIServer(mode="thread", rate_filter=1.0) as srv:
        llm = _llm(srv, concurrency=4, max_tokens=1024)
        reqs = _requests(llm, 40)
        results: list[LLMResult] = []
        s = run_requests(reqs, llm, budget, tmp_path / "l.sqlite", on_result=results.append, progress=False)
        answered = srv.stats()["answered_total"]
    per_answer = budget.cost(400, 700)
    assert per_answer == pytest.approx(1.1)
    assert s.stopped_reason and "budget.max_usd=4.2" in s.stopped_reason
    # every answer the server sent is billed, and the bill is exactly what was answered
    assert s.sent == answered and s.cost_usd == pytest.approx(answered * per_answer)
    assert s.outcomes == {"content_filter": answered} and s.skipped_reasons == {"budget": 40 - answered}
    # the bound: each request reserves est_prompt x price + max_tokens x price at dispatch, at least
    # 1024 x $0.001 = $1.024; only an answer billed above its reservation can overshoot, and only those in flight
    # when spend crossed the cap (at most `concurrency`): overshoot <= 4 x ($1.10 - $1.024)
    min_reserved = budget.cost(0, 1024)
    assert s.cost_usd <= 4.2 + llm.concurrency * (per_answer - min_reserved) + 1e-9
    assert s.cost_usd > 4.2 - per_answer  # it spent up to the cap, not a fraction of it
    assert s.max_inflight_usd <= 4.2 + 1e-9 and s.reconciled


def test_an_old_ledger_gains_the_bill_columns_and_a_success_is_never_overwritten(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE results (key TEXT PRIMARY KEY, model TEXT NOT NULL, ok INTEGER NOT NULL, text TEXT, "
               "finish_reason TEXT, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
               "latency_s REAL NOT NULL, attempts INTEGER NOT NULL, error TEXT, template_version TEXT, "
               "request TEXT, created REAL NOT NULL)")
    db.execute("INSERT INTO results VALUES ('a', 'm', 1, 'old text', 'stop', 3, 5, 0.1, 1, NULL, '', '{}', 0)")
    db.commit()
    db.close()
    req = LLMRequest(messages=({"role": "user", "content": "x"},))
    filtered = LLMResult(key="a", ok=False, text=None, finish_reason="content_filter", prompt_tokens=0,
                         completion_tokens=0, latency_s=0.1, attempts=1, error="content_filter: ...", model="m",
                         unusable_prompt_tokens=400, unusable_completion_tokens=700, unusable_answers=1,
                         outcome="content_filter")
    with Ledger(path) as led:
        assert led.get_ok("a").text == "old text"
        led.put_many([(filtered, req)])  # an answer billed after the success (a duplicate in flight at a kill)
        hit = led.get_ok("a")
        assert hit is not None and hit.text == "old text" and hit.attempts == 1
        assert led.billed() == {"prompt_tokens": 400, "completion_tokens": 700, "unusable_answers": 1}
        led.put_many([(LLMResult(key="b", ok=False, text=None, finish_reason=None, prompt_tokens=0,
                                 completion_tokens=0, latency_s=0.0, attempts=2, error="boom", model="m"), req)])
        assert led.unusable_counts() == {} and led.get_failed("b").error == "boom"


def test_tight_cap_at_concurrency_16_stays_within_the_stated_bound(tmp_path):
    """The tester's case: concurrency 16, max_usd $0.01, answers billed 2,000 + 100 tokens against a prompt
    estimate of about 10. Before: 24 requests (16 slots + 8 prefetched) were sent before the first bill, $0.0404
    over the cap, above the stated bound. Now, with a cap: no prefetch, the first request goes alone until its bill
    arrives, and a bill that raises the estimate re-reserves what is in flight at the new estimate."""
    budget = BudgetSection(price_input_per_1m=1.0, price_output_per_1m=1.0, max_usd=0.01)
    per_answer = budget.cost(2000, 100)  # $0.0021
    with FaultyOpenAIServer(mode="thread", rate_filter=1.0, filter_usage=[2000, 100]) as srv:
        llm = _llm(srv, concurrency=16)
        s = run_requests(_requests(llm, 200), llm, budget, tmp_path / "a.sqlite", progress=False)
        assert srv.stats()["answered_total"] == s.sent
    # the first bill calibrates: then only what fits is sent (4 x $0.0021 <= $0.01 < 5 x), nothing over the cap
    assert s.sent == 4 and s.cost_usd == pytest.approx(4 * per_answer) and s.cost_usd <= 0.01
    assert s.stopped_by == "budget" and s.unanswered == {"budget": 196}

    # the bound itself: the first answer is cheap (it calibrates the estimate low), every later one is billed
    # 2,000 + 100. At most `concurrency` requests are dispatched and unbilled when the bills jump: 16, not 24;
    # and once one of them is billed, the other 15 are reserved at the new estimate, so nothing more goes out.
    with FaultyOpenAIServer(mode="thread", filter_usage=[2000, 100]) as srv:
        llm = _llm(srv, concurrency=16)
        reqs = _requests(llm, 200, lambda i: " CONTENT_FILTER" if i else "")
        s = run_requests(reqs, llm, budget, tmp_path / "b.sqlite", progress=False)
        answered = srv.stats()["answered_total"]
    assert s.sent == answered == 1 + llm.concurrency
    overshoot = s.cost_usd - 0.01
    assert 0 < overshoot <= llm.concurrency * per_answer  # the stated bound: concurrency x largest bill
    # the stop quotes the final spend (the 16 in flight at the stop included), said once, per run
    assert s.stopped_reason.count("budget.max_usd=0.01: this run spent") == 1
    assert f"${s.cost_usd:.4f}" in s.stopped_reason and "per run" in s.stopped_reason


def test_an_unusable_answer_without_usage_says_its_tokens_are_estimated(tmp_path):
    budget = BudgetSection(price_input_per_1m=1.0, price_output_per_1m=2.0)
    with FaultyOpenAIServer(mode="thread", filter_usage=None) as srv:
        llm = _llm(srv)
        results: list[LLMResult] = []
        s = run_requests(_requests(llm, 2, lambda i: " CONTENT_FILTER" if i == 0 else ""), llm, budget,
                         tmp_path / "l.sqlite", on_result=results.append, progress=False)
    filtered = next(r for r in results if r.tag["i"] == 0)
    est = _requests(llm, 1, lambda i: " CONTENT_FILTER")[0].estimated_prompt_tokens()
    assert filtered.outcome == "content_filter" and filtered.unusable_prompt_tokens == est
    assert f"billed ({est} prompt + 0 completion tokens, estimated: an answer carried no usage)" in filtered.error
    assert s.unusable_outcomes == {"content_filter": {"answers": 1, "prompt_tokens": est, "completion_tokens": 0,
                                                      "cost_usd": pytest.approx(budget.cost(est, 0))}}
