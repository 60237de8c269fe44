"""`llm.mode: batch` against the fault server's batch endpoints (issue 17): split under the limits, expired and
partly failed batches, the batch price, the budget, and a run killed mid-poll that resumes without a second
submission. The server counts files uploaded and batches created, which is how "never submitted twice" is shown.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from waiting import wait_until

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.llm.batch import batch_line, plan_chunks
from pipeline.llm.ledger import Ledger
from pipeline.llm.runner import estimate, run_requests
from pipeline.llm.testserver import FaultyOpenAIServer
from pipeline.llm.types import LLMRequest, LLMResult

PRICES = dict(price_input_per_1m=1.0, price_output_per_1m=2.0)


def _llm(srv: FaultyOpenAIServer, **kw) -> LLMSection:
    base = dict(base_url=srv.base_url, model="test-model", mode="batch", batch_poll_s=0.01, max_tokens=100,
                max_retries=3, timeout_s=10.0, api_key_env="TEXTBOOK_TEST_NO_KEY")
    base.update(kw)
    return LLMSection(**base)


def _requests(llm: LLMSection, n: int, marker=lambda i: "") -> list[LLMRequest]:
    return [LLMRequest(messages=({"role": "user", "content": f"write about topic {i}{marker(i)}"},),
                       params=llm.sampling_params(), tag={"i": i}) for i in range(n)]


def test_plan_chunks_respects_requests_bytes_and_endpoints():
    lines = [("/v1/chat/completions", 100)] * 5 + [("/v1/completions", 100)] * 2 + [("/v1/chat/completions", 5000)]
    # one endpoint per batch: the last chat line joins the open chat batch, not the completions one
    assert plan_chunks(lines, 2, 10_000) == [[0, 1], [2, 3], [4, 7], [5, 6]]
    # bytes: 3 lines of 100 bytes + newline fit in 303, not 4
    assert plan_chunks(lines[:5], 50, 303) == [[0, 1, 2], [3, 4]]
    # a line larger than the limit gets a chunk of its own (the driver fails it, naming the limit)
    assert plan_chunks(lines, 50, 1000)[-1] == [7]
    endpoint, line = batch_line("k1", LLMRequest(prompt="p", params={"seed": 1}, sample_index=2), "m")
    assert endpoint == "/v1/completions" and '"custom_id":"k1"' in line and '"seed":3' in line


def test_batch_run_splits_expires_partly_fails_and_bills_at_half_price(tmp_path):
    """30 requests in batches of at most 12: the first batch expires half-done (its rest goes again in a later
    batch), one request fails in every batch it is in (500 in the error file), one is content-filtered (billed,
    named). Answers are the online answers (a function of the body), at half the online price."""
    budget = BudgetSection(**PRICES)
    marker = {7: " FAIL_ALWAYS", 8: " CONTENT_FILTER"}
    with FaultyOpenAIServer(mode="thread", words=50, batch_expire=1) as srv:
        llm = _llm(srv, batch_max_requests=12)
        reqs = _requests(llm, 30, lambda i: marker.get(i, ""))
        results: list[LLMResult] = []
        s = run_requests(reqs, llm, budget, tmp_path / "l.sqlite", on_result=results.append, progress=False)
        stats = srv.stats()
    by_i = {r.tag["i"]: r for r in results}
    assert s.mode == "batch" and s.reconciled and s.total == 30 and s.ok == 28 and s.failed == 2
    # 3 batches for 30 requests (12 + 12 + 6); the expired one's 6 unanswered go again, then the 500 retries
    assert [b["requests"] for b in s.batches[:3]] == [12, 12, 6] and s.batches[0]["status"] == "expired"
    assert stats["batches_created"] == stats["files_uploaded"] == len(s.batches)
    assert by_i[7].status == "failed" and by_i[7].attempts == 1 + llm.max_retries and "500" in by_i[7].error
    assert by_i[8].outcome == "content_filter" and by_i[8].unusable_prompt_tokens == 400
    # every other request answered exactly once (the expired batch's answered half is never asked again)
    answered = stats["answered"]
    assert stats["distinct_answered"] == 29 and sum(answered.values()) == 29
    # the expired half (6-11) went again: 7 then failed 500 in each later batch, 8 was filtered on its second try
    assert {r.tag["i"] for r in results if r.attempts == 2} == {6, 8, 9, 10, 11}
    assert by_i[8].attempts == 2 and all(r.attempts == 1 for r in results if r.tag["i"] not in range(6, 12))
    # half price: the same tokens cost half what they cost online
    assert s.cost_usd == pytest.approx(budget.cost(s.prompt_tokens, s.completion_tokens) / 2)
    assert s.unusable["answers"] == 1 and s.outcomes == {"content_filter": 1}
    with Ledger(tmp_path / "l.sqlite") as led:
        assert led.counts() == {"ok": 28, "failed": 2} and led.open_batches() == []


def test_batch_answers_equal_online_answers_and_a_rerun_is_free(tmp_path):
    with FaultyOpenAIServer(mode="thread", words=40) as srv:
        batch_llm = _llm(srv)
        online_llm = batch_llm.model_copy(update={"mode": "online", "workers": 0})
        out_b: list[LLMResult] = []
        out_o: list[LLMResult] = []
        run_requests(_requests(batch_llm, 8), batch_llm, BudgetSection(), tmp_path / "b.sqlite",
                     on_result=out_b.append, progress=False)
        run_requests(_requests(online_llm, 8), online_llm, BudgetSection(), tmp_path / "o.sqlite",
                     on_result=out_o.append, progress=False)
        again = run_requests(_requests(batch_llm, 8), batch_llm, BudgetSection(), tmp_path / "b.sqlite",
                             progress=False)
        assert srv.stats()["batches_created"] == 1
    assert sorted((r.tag["i"], r.text) for r in out_b) == sorted((r.tag["i"], r.text) for r in out_o)
    assert (again.cached, again.sent, again.batches) == (8, 0, [])


def test_batch_api_key_is_sent_but_never_written_or_logged(tmp_path, monkeypatch, capfd):
    import hashlib

    secret = "sk-test-" + "7e1d0c9b3a" * 3
    monkeypatch.setenv("TEXTBOOK_TEST_KEY", secret)
    with FaultyOpenAIServer(mode="thread", batch_expire=1) as srv:
        llm = _llm(srv, api_key_env="TEXTBOOK_TEST_KEY")
        results: list[LLMResult] = []
        s = run_requests(_requests(llm, 6, lambda i: " FAIL_ALWAYS" if i == 0 else ""), llm, BudgetSection(),
                         tmp_path / "ledger.sqlite", on_result=results.append)
        stats = srv.stats()
    # every upload and creation carried the key (POSTs are counted by the hash of their bearer token)
    assert stats["auth_sha256"].get(hashlib.sha256(secret.encode()).hexdigest(), 0) >= 2 * stats["batches_created"]
    assert s.failed == 1 and s.ok == 5
    out = capfd.readouterr()
    blobs = [out.out, out.err, repr(s), repr(results)] + [p.read_bytes().decode("latin-1") for p in tmp_path.iterdir()]
    assert not any(secret in b for b in blobs)


def test_a_batch_that_fails_validation_fails_its_requests_and_a_rerun_sends_them(tmp_path):
    with FaultyOpenAIServer(mode="thread", batch_fail=1) as srv:
        llm = _llm(srv)
        results: list[LLMResult] = []
        s = run_requests(_requests(llm, 5), llm, BudgetSection(), tmp_path / "l.sqlite", on_result=results.append,
                         progress=False)
        assert s.failed == 5 and all("batch_failed: invalid_request" in r.error for r in results)
        assert srv.stats()["batches_created"] == 1  # not retried blindly: a validation failure repeats
        again = run_requests(_requests(llm, 5), llm, BudgetSection(), tmp_path / "l.sqlite", progress=False)
        assert again.ok == 5 and srv.stats()["batches_created"] == 2


def test_batch_budget_forms_batches_within_the_cap(tmp_path):
    """Each request's worst case (prompt estimate + max_tokens at the batch price) is reserved when its batch is
    formed: the batches in flight never exceed the cap; the rest wait for room, then stop."""
    budget = BudgetSection(price_input_per_1m=1000.0, price_output_per_1m=1000.0, max_usd=0.5)
    with FaultyOpenAIServer(mode="thread", words=50) as srv:
        llm = _llm(srv, batch_max_requests=4)
        s = run_requests(_requests(llm, 20), llm, budget, tmp_path / "l.sqlite", progress=False)
        stats = srv.stats()
    worst = budget.cost(10, 100, batch=True)  # a 10-token prompt estimate + 100 max_tokens, half price
    assert s.max_inflight_usd <= 0.5 and s.cost_usd <= 0.5
    assert s.stopped_reason and "budget.max_usd" in s.stopped_reason
    assert s.ok == stats["answered_total"] and s.ok >= int(0.5 / worst) and s.skipped_reasons == {"budget": 20 - s.ok}


def test_dry_run_estimate_shows_online_and_batch_cost(tmp_path):
    llm = LLMSection(model="m", max_tokens=100, batch_max_requests=7)
    budget = BudgetSection(**PRICES)
    est = estimate(_requests(llm, 20), llm, budget, ledger_path=tmp_path / "none.sqlite")
    assert est["est_max_cost_usd_online"] == pytest.approx(budget.cost(est["est_prompt_tokens"], 2000), abs=1e-4)
    assert est["est_max_cost_usd_batch"] == pytest.approx(est["est_max_cost_usd_online"] / 2, abs=1e-4)
    assert est["batches"] == 3 and est["mode"] == "online" and est["est_max_cost_usd"] == est["est_max_cost_usd_online"]
    batch = estimate(_requests(llm, 20), llm.model_copy(update={"mode": "batch"}), budget)
    assert batch["est_max_cost_usd"] == batch["est_max_cost_usd_batch"]


def test_a_submission_created_before_its_id_was_recorded_is_adopted_not_created_again(tmp_path):
    """The kill between `POST /v1/batches` and writing its id: the ledger has the uploaded file id only. The
    resumed run finds the batch among the provider's (by input file) instead of creating a second one."""
    from openai import OpenAI

    ledger = tmp_path / "l.sqlite"
    with FaultyOpenAIServer(mode="thread", words=30) as srv:
        llm = _llm(srv)
        reqs = _requests(llm, 6)
        items = [(r.key(llm.model), r) for r in reqs]
        data = "".join(batch_line(k, r, llm.model)[1] + "\n" for k, r in items).encode()
        client = OpenAI(api_key="EMPTY", base_url=srv.base_url)
        file_id = client.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch").id
        with Ledger(ledger) as led:
            led.add_batch("ref-1", "/v1/chat/completions", llm.model, items)
            led.update_batch("ref-1", input_file_id=file_id, status="uploaded")
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        client.close()
        s = run_requests(reqs, llm, BudgetSection(), ledger, progress=False)
        stats = srv.stats()
    assert s.ok == 6 and stats["batches_created"] == 1 and stats["files_uploaded"] == 1
    assert stats["answered_total"] == 6


def test_a_create_whose_answer_was_lost_is_looked_up_not_created_twice(tmp_path):
    """The create call made the batch but its answer never came (a 500 here; a timeout in life). The openai SDK
    would retry it and make a second batch; the driver looks it up by its input file first and adopts it."""
    with FaultyOpenAIServer(mode="thread", words=30, batch_create_lost=1) as srv:
        llm = _llm(srv)
        s = run_requests(_requests(llm, 5), llm, BudgetSection(), tmp_path / "l.sqlite", progress=False)
        stats = srv.stats()
    assert s.ok == 5 and stats["batches_created"] == 1 and stats["answered_total"] == 5
    assert any("creating a batch" in w and "500" in w for w in s.warnings)


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.config.llm import BudgetSection, LLMSection
    from pipeline.llm.runner import run_requests
    from pipeline.llm.types import LLMRequest
    base_url, ledger, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLMSection(base_url=base_url, model="test-model", mode="batch", batch_poll_s=0.05, batch_max_requests=25,
                     max_tokens=100, api_key_env="TEXTBOOK_TEST_NO_KEY")
    reqs = [LLMRequest(messages=({"role": "user", "content": f"topic {i}"},), params=llm.sampling_params(),
                       tag={"i": i}) for i in range(n)]
    s = run_requests(reqs, llm, BudgetSection(), Path(ledger), progress=False)
    print("DONE", s.ok, s.cached, s.sent, len(s.batches))
""")


def _ledger_batch_ids(ledger: Path) -> list[str]:
    if not ledger.exists():
        return []
    try:
        db = sqlite3.connect(ledger, timeout=5)
        try:
            return [b for (b,) in db.execute("SELECT batch_id FROM batches WHERE batch_id IS NOT NULL")]
        finally:
            db.close()
    except sqlite3.OperationalError:  # not created yet
        return []


def test_batch_run_killed_mid_poll_resumes_by_polling_never_submitting_again(tmp_path):
    n = 60
    ledger, log = tmp_path / "ledger.sqlite", tmp_path / "child.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with FaultyOpenAIServer(mode="thread", words=30) as srv:
        srv.hold_batches()  # every batch stays in_progress: the child is certainly polling when it is killed
        with log.open("w") as f:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, srv.base_url, str(ledger), str(n)], stdout=f,
                                    stderr=subprocess.STDOUT, env=env)
        try:
            # observed: all three batch ids in the ledger, and the child polling them (in_progress seen)
            wait_until(lambda: len(_ledger_batch_ids(ledger)) == 3 and srv.stats()["batch_polls"] >= 6,
                       "the child to record its batch ids and poll them", proc=proc, log=log)
        finally:
            proc.kill()
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        killed = srv.stats()
        assert killed["batches_created"] == 3 and killed["answered_total"] == 0
        assert set(killed["batches"].values()) == {"in_progress"}
        srv.release_batches()
        out = subprocess.run([sys.executable, "-c", _CHILD, srv.base_url, str(ledger), str(n)], capture_output=True,
                             text=True, env=env, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        stats = srv.stats()
    done, ok, cached, sent, batches = out.stdout.split()
    # resumed by polling: no second upload or creation, every request answered once, all in the ledger
    assert (int(ok), int(cached), int(sent), int(batches)) == (n, 0, n, 3)
    assert stats["batches_created"] == 3 and stats["files_uploaded"] == 3
    assert stats["answered_total"] == n and stats["distinct_answered"] == n
    with Ledger(ledger) as led:
        assert led.counts() == {"ok": n, "failed": 0} and led.open_batches() == []


def test_an_earlier_runs_batch_for_requests_not_asked_now_is_recorded_and_billed_without_waiting_for_it(tmp_path):
    """A batch left open by an earlier run with 6 requests; this run asks for 3 of them. The 3 come from the
    batch (not submitted again); the other 3 are recorded in the ledger (billed) as `unrequested`, and a later
    run of all 6 pays for nothing."""
    from openai import OpenAI

    ledger = tmp_path / "l.sqlite"
    with FaultyOpenAIServer(mode="thread", words=30) as srv:
        llm = _llm(srv)
        reqs = _requests(llm, 6)
        items = [(r.key(llm.model), r) for r in reqs]
        data = "".join(batch_line(k, r, llm.model)[1] + "\n" for k, r in items).encode()
        client = OpenAI(api_key="EMPTY", base_url=srv.base_url)
        file_id = client.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        client.close()
        with Ledger(ledger) as led:
            led.add_batch("ref-1", "/v1/chat/completions", llm.model, items)
            led.update_batch("ref-1", input_file_id=file_id, batch_id=batch.id, status=batch.status)
        budget = BudgetSection(**PRICES)
        s = run_requests(reqs[:3], llm, budget, ledger, progress=False)
        assert s.ok == 3 and s.sent == 3 and s.unrequested["requests"] == 3
        assert s.cost_usd + s.unrequested["cost_usd"] == pytest.approx(
            budget.cost(s.prompt_tokens + s.unrequested["prompt_tokens"],
                        s.completion_tokens + s.unrequested["completion_tokens"], batch=True))
        again = run_requests(reqs, llm, budget, ledger, progress=False)
        stats = srv.stats()
    assert again.cached == 6 and again.sent == 0
    assert stats["batches_created"] == 1 and stats["answered_total"] == 6


def test_batch_under_a_tight_cap_submits_progressively(tmp_path):
    """The tester's case: max_usd $0.01, 100 requests billed 2,000 + 100 tokens each against a prompt estimate of
    about 10, batches of at most 5. Before: every reservation fit on the estimate, all 20 batches went at once,
    $0.105 spent (10.5 x the cap). Now the first request goes in a batch of its own; its bill corrects the
    estimate before anything else is reserved, and the rest go within what the cap leaves."""
    budget = BudgetSection(price_input_per_1m=1.0, price_output_per_1m=1.0, max_usd=0.01)
    per_answer = budget.cost(2000, 100, batch=True)  # $0.00105 at the batch price
    with FaultyOpenAIServer(mode="thread", rate_filter=1.0, filter_usage=[2000, 100]) as srv:
        llm = _llm(srv, batch_max_requests=5)
        s = run_requests(_requests(llm, 100), llm, budget, tmp_path / "l.sqlite", progress=False)
        stats = srv.stats()
    assert stats["faults"] == {"content_filter": 9}  # the server's rate_filter applies to batch lines too
    assert s.batches[0]["requests"] == 1  # the calibration batch
    # then 8 more fit ($0.00105 + 8 x $0.00105 <= $0.01 < + 9 x): two batches of 5 and 3
    assert sorted(b["requests"] for b in s.batches[1:]) == [3, 5] and stats["batches_created"] == 3
    assert s.sent == stats["answered_total"] == 9 and s.cost_usd == pytest.approx(9 * per_answer)
    assert s.cost_usd <= 0.01 and s.unanswered == {"budget": 91} and s.stopped_by == "budget"


def test_a_batch_killed_mid_poll_is_not_sent_again_online_and_a_later_batch_run_collects_it(tmp_path):
    """Kill a batch run while its batch is in progress (observed: the batch id in the ledger, the child polling
    it); an online run then sends none of its requests (they are in an open batch: paid twice otherwise), says
    so and leaves them for a re-run; a batch-mode run collects the batch, without submitting it again, and the
    online run finds them all in the ledger."""
    n = 6
    ledger, log = tmp_path / "ledger.sqlite", tmp_path / "child.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with FaultyOpenAIServer(mode="thread", words=30) as srv:
        srv.hold_batches()
        with log.open("w") as f:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, srv.base_url, str(ledger), str(n)], stdout=f,
                                    stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(lambda: len(_ledger_batch_ids(ledger)) == 1 and srv.stats()["batch_polls"] >= 2,
                       "the child to record its batch id and poll it", proc=proc, log=log)
        finally:
            proc.kill()
            proc.wait(30)
        # the child's requests, online (same model and sampling parameters: the same ledger keys)
        online = LLMSection(base_url=srv.base_url, model="test-model", max_tokens=100, workers=0,
                            api_key_env="TEXTBOOK_TEST_NO_KEY")
        reqs = [LLMRequest(messages=({"role": "user", "content": f"topic {i}"},), params=online.sampling_params(),
                           tag={"i": i}) for i in range(n)]
        s = run_requests(reqs, online, BudgetSection(), ledger, progress=False)
        assert srv.stats()["received"] == 0  # not one completion sent online
        assert s.skipped_reasons == {"in_open_batch": n} and s.unanswered == {"in_open_batch": n}
        assert len(s.warnings) == 1 and "(batch_000001 in_progress)" in s.warnings[0]

        srv.release_batches()
        out = subprocess.run([sys.executable, "-c", _CHILD, srv.base_url, str(ledger), str(n)], capture_output=True,
                             text=True, env=env, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        again = run_requests(reqs, online, BudgetSection(), ledger, progress=False)
        stats = srv.stats()
    assert out.stdout.split() == ["DONE", str(n), "0", str(n), "1"]  # ok, cached, sent, batches: polled, collected
    assert stats["batches_created"] == 1 and stats["answered_total"] == n and stats["received"] == 0
    assert (again.cached, again.sent) == (n, 0)
    with Ledger(ledger) as led:
        assert led.open_batches() == []


def test_a_leftover_batch_whose_requests_look_answered_is_still_polled_and_collected(tmp_path):
    """An open batch whose requests the ledger already answers (answered online before this check existed):
    each batch-mode run polls it anyway; still running, it is named in a warning; finished, its results are
    recorded (billed, `unrequested`) and it is closed, where before it stayed open in the ledger forever."""
    from openai import OpenAI

    ledger = tmp_path / "l.sqlite"
    with FaultyOpenAIServer(mode="thread", words=30) as srv:
        llm = _llm(srv)
        reqs = _requests(llm, 6)
        run_requests(reqs, llm.model_copy(update={"mode": "online", "workers": 0}), BudgetSection(), ledger,
                     progress=False)
        items = [(r.key(llm.model), r) for r in reqs]
        data = "".join(batch_line(k, r, llm.model)[1] + "\n" for k, r in items).encode()
        client = OpenAI(api_key="EMPTY", base_url=srv.base_url)
        file_id = client.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        with Ledger(ledger) as led:
            led.add_batch("ref-1", "/v1/chat/completions", llm.model, items)
            led.update_batch("ref-1", input_file_id=file_id, batch_id=batch.id, status=batch.status)
        srv.hold_batches()
        polls = srv.stats()["batch_polls"]
        first = run_requests(reqs, llm, BudgetSection(**PRICES), ledger, progress=False)
        assert first.cached == 6 and srv.stats()["batch_polls"] == polls + 1
        assert any(f"{batch.id} (in_progress, 6 requests)" in w for w in first.warnings)
        srv.release_batches()
        while client.batches.retrieve(batch.id).status != "completed":  # the provider finishes it meanwhile
            pass
        client.close()
        second = run_requests(reqs, llm, BudgetSection(**PRICES), ledger, progress=False)
    assert second.cached == 6 and second.unrequested["requests"] == 6 and second.unrequested["cost_usd"] > 0
    assert not second.warnings
    with Ledger(ledger) as led:
        assert led.open_batches() == []
