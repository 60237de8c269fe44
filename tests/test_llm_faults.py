"""run_requests against the fault-injecting OpenAI-compatible server: real HTTP, the real openai client.

The server counts successful answers per request body, which is how these tests prove nothing is lost and
nothing answered is asked again.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from llm_fixtures import ledger_ok_rows
from waiting import wait_until

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.llm.ledger import Ledger
from pipeline.llm.runner import run_requests
from pipeline.llm.testserver import FaultyOpenAIServer
from pipeline.llm.types import LLMRequest, LLMResult

FAULTS = dict(rate_429=0.08, retry_after_s=0.05, rate_500=0.05, rate_drop=0.05, rate_hang=0.03, hang_s=3.0,
              rate_malformed=0.05)


def _llm(srv: FaultyOpenAIServer, **kw) -> LLMSection:
    base = dict(base_url=srv.base_url, model="test-model", workers=0, concurrency=16, timeout_s=0.6,
                max_retries=10, backoff_base_s=0.02, backoff_max_s=0.2, cooldown_s=0.05, max_tokens=300,
                api_key_env="TEXTBOOK_TEST_NO_KEY")
    base.update(kw)
    return LLMSection(**base)


def _requests(llm: LLMSection, n: int, api: str = "chat") -> list[LLMRequest]:
    if api == "chat":
        return [LLMRequest(messages=({"role": "user", "content": f"write about topic {i}"},),
                           params=llm.sampling_params(), template_version="t@1", tag={"i": i}) for i in range(n)]
    return [LLMRequest(prompt=f"topic {i}:", params=llm.sampling_params(), tag={"i": i}) for i in range(n)]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_every_request_answered_exactly_once_despite_faults(tmp_path, api):
    n = 120
    with FaultyOpenAIServer(mode="thread", latency="lognormal", latency_s=0.02, **FAULTS) as srv:
        llm = _llm(srv)
        results: list[LLMResult] = []
        summary = run_requests(_requests(llm, n, api), llm, BudgetSection(), tmp_path / "l.sqlite",
                               on_result=results.append, progress=False)
        stats = srv.stats()
    assert summary.reconciled and summary.total == n and summary.ok == n and summary.failed == 0
    assert sorted(r.tag["i"] for r in results) == list(range(n))
    assert all(r.ok and r.text and r.completion_tokens == 200 for r in results)
    # the faults really happened, were retried, and no request was answered twice
    assert sum(stats["faults"].values()) > 10 and set(stats["faults"]) >= {"429", "500", "drop", "malformed"}
    assert summary.retries >= sum(stats["faults"].values()) - stats["faults"].get("hang", 0)
    assert stats["distinct_answered"] == n and stats["answered_total"] == n
    assert summary.latency_s["p50"] > 0 and summary.sent == n


def test_exhausted_retries_and_client_errors_are_failures_never_empty_documents(tmp_path):
    with FaultyOpenAIServer(mode="thread") as srv:
        llm = _llm(srv, max_retries=2)
        reqs = _requests(llm, 5) + [LLMRequest(messages=({"role": "user", "content": "FAIL_ALWAYS please"},),
                                               params=llm.sampling_params(), tag={"i": "bad"})]
        results: list[LLMResult] = []
        summary = run_requests(reqs, llm, BudgetSection(), tmp_path / "l.sqlite", on_result=results.append,
                               progress=False)
        bad = [r for r in results if r.tag["i"] == "bad"]
        assert summary.ok == 5 and summary.failed == 1 and summary.reconciled
        assert len(bad) == 1 and not bad[0].ok and bad[0].text is None and bad[0].attempts == 3
        assert "500" in bad[0].error and bad[0].status == "failed"
        assert summary.failed_reasons and sum(summary.failed_reasons.values()) == 1
        # the failure is in the ledger for the record, and a re-run sends only it again
        again = run_requests(reqs, llm, BudgetSection(), tmp_path / "l.sqlite", progress=False)
        assert again.cached == 5 and again.sent == 1 and again.failed == 1
        assert srv.stats()["faults"]["500"] == 6


def test_budget_cap_stops_cleanly_and_a_higher_cap_continues(tmp_path):
    ledger = tmp_path / "l.sqlite"
    with FaultyOpenAIServer(mode="thread", latency_s=0.01, words=100) as srv:
        llm = _llm(srv, max_tokens=100, concurrency=8)
        reqs = _requests(llm, 60)
        budget = BudgetSection(price_input_per_1m=1_000.0, price_output_per_1m=2_000.0, max_usd=5.0)
        results: list[LLMResult] = []
        first = run_requests(reqs, llm, budget, ledger, on_result=results.append, progress=False)
        assert first.stopped_reason and "budget.max_usd" in first.stopped_reason
        assert first.cost_usd <= 5.0 and first.ok > 5
        assert first.skipped_reasons == {"budget": first.skipped} and first.skipped > 0
        assert first.reconciled and len(results) == 60
        assert {r.status for r in results} == {"ok", "skipped"}
        with Ledger(ledger) as led:
            assert led.counts()["ok"] == first.ok
        # same requests, a bigger budget: only the unsent ones go out
        second = run_requests(reqs, llm, BudgetSection(max_tokens=10**6), ledger, progress=False)
        assert second.cached == first.ok and second.sent == 60 - first.ok and second.ok == 60
        assert srv.stats()["answered_total"] == 60


def test_token_cap_and_should_send_and_duplicates(tmp_path):
    with FaultyOpenAIServer(mode="thread", words=50) as srv:
        llm = _llm(srv, max_tokens=50)
        reqs = _requests(llm, 30)
        reqs.append(reqs[3])  # the same content twice in one run is sent once

        def guard(req: LLMRequest) -> str | None:
            return "cell_saturated" if req.tag["i"] % 5 == 0 else None

        results: list[LLMResult] = []
        s = run_requests(reqs, llm, BudgetSection(), tmp_path / "a.sqlite", should_send=guard,
                         on_result=results.append, progress=False)
        assert s.total == 31 and s.reconciled and len(results) == 31 and s.ok == 24
        assert s.skipped_reasons == {"cell_saturated": 6, "duplicate": 1}
        assert srv.stats()["answered_total"] == 24

        capped = run_requests(reqs, llm, BudgetSection(max_tokens=1000), tmp_path / "b.sqlite", progress=False)
        assert capped.reconciled and capped.prompt_tokens + capped.completion_tokens <= 1000
        assert capped.ok >= 10 and capped.skipped_reasons["budget"] == 30 - capped.ok
        assert "budget.max_tokens" in capped.stopped_reason


def test_ray_workers_share_the_load_through_faults(tmp_path, ray_session):
    n = 150
    with FaultyOpenAIServer(mode="process", latency="lognormal", latency_s=0.03, **FAULTS) as srv:
        llm = _llm(srv, workers=2, concurrency=24, requests_per_minute=60_000)
        summary = run_requests(_requests(llm, n), llm, BudgetSection(), tmp_path / "l.sqlite", progress=False)
        stats = srv.stats()
    assert summary.ok == n and summary.reconciled and summary.retries > 0
    assert stats["distinct_answered"] == n and stats["answered_total"] == n


def test_prestarted_pool_serves_one_run(tmp_path, ray_session, monkeypatch):
    from pipeline.errors import TextbookError
    from pipeline.llm.runner import prestart_workers

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)  # else "no key" below would not apply
    with FaultyOpenAIServer(mode="thread", rate_500=0.1) as srv:
        llm = _llm(srv, workers=1, concurrency=8)
        pool = prestart_workers(llm)
        assert pool is not None and len(pool.handles) == 1
        with pytest.raises(TextbookError, match="another llm section"):
            run_requests(_requests(llm, 1), llm.model_copy(update={"concurrency": 4}), BudgetSection(),
                         tmp_path / "x.sqlite", progress=False, pool=pool)
        summary = run_requests(_requests(llm, 20), llm, BudgetSection(), tmp_path / "a.sqlite", progress=False,
                               pool=pool)
        assert summary.ok == 20 and summary.reconciled and srv.stats()["distinct_answered"] == 20
        # the run closed the pool: reusing it could hand this run's results to the last run's pending poll
        assert pool.handles == []
        with pytest.raises(TextbookError, match="serves one run"):
            run_requests(_requests(llm, 20), llm, BudgetSection(), tmp_path / "b.sqlite", progress=False, pool=pool)
    # the in-process worker is prestarted too (its HTTP client imports while the caller plans)
    thread = prestart_workers(llm.model_copy(update={"workers": 0}))
    assert thread is not None and len(thread.handles) == 1 and not hasattr(thread.handles[0], "actor")
    thread.close()
    # nothing to prestart without a key for OpenAI's endpoint (run_requests says what is missing)
    monkeypatch.delenv("TEXTBOOK_TEST_NO_KEY", raising=False)
    assert prestart_workers(LLMSection(model="m", api_key_env="TEXTBOOK_TEST_NO_KEY", workers=1)) is None


def test_api_key_is_sent_but_never_written_or_logged(tmp_path, monkeypatch, capfd):
    secret = "sk-test-" + "9f3c1e7a5b" * 3
    monkeypatch.setenv("TEXTBOOK_TEST_KEY", secret)
    with FaultyOpenAIServer(mode="thread", rate_500=0.2, rate_malformed=0.1) as srv:
        llm = _llm(srv, api_key_env="TEXTBOOK_TEST_KEY", max_retries=1)
        reqs = _requests(llm, 20) + [LLMRequest(messages=({"role": "user", "content": "FAIL_ALWAYS"},),
                                                params=llm.sampling_params())]
        results: list[LLMResult] = []
        s = run_requests(reqs, llm, BudgetSection(), tmp_path / "ledger.sqlite", on_result=results.append)
        stats = srv.stats()
    assert stats["auth_sha256"].get(hashlib.sha256(secret.encode()).hexdigest(), 0) >= 21
    assert s.failed >= 1
    out = capfd.readouterr()
    blobs = [out.out, out.err, repr(s), repr(results)]
    blobs += [p.read_bytes().decode("latin-1") for p in tmp_path.iterdir()]
    assert not any(secret in b for b in blobs)


def test_missing_key_for_openai_default_endpoint_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline.errors import ResourceUnavailable

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("TEXTBOOK_TEST_NO_KEY", raising=False)
    llm = LLMSection(model="m", api_key_env="TEXTBOOK_TEST_NO_KEY", workers=0)
    with pytest.raises(ResourceUnavailable, match="TEXTBOOK_TEST_NO_KEY"):
        run_requests(_requests(llm, 2), llm, BudgetSection(), tmp_path / "l.sqlite", progress=False)


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.config.llm import BudgetSection, LLMSection
    from pipeline.llm.runner import run_requests
    from pipeline.llm.types import LLMRequest
    base_url, ledger, n, workers, ray_address = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    llm = LLMSection(base_url=base_url, model="test-model", workers=workers, concurrency=8, timeout_s=2.0,
                     max_retries=10, backoff_base_s=0.02, backoff_max_s=0.2, api_key_env="TEXTBOOK_TEST_NO_KEY",
                     ray_address=ray_address or None)
    reqs = [LLMRequest(messages=({"role": "user", "content": f"topic {i}"},), params=llm.sampling_params(),
                       tag={"i": i}) for i in range(n)]
    s = run_requests(reqs, llm, BudgetSection(), Path(ledger), progress=False)
    print("DONE", s.ok, s.cached, s.sent)
""")




def _run_child(base_url: str, ledger: Path, n: int, workers: int, ray_address: str = "",
               log: Path | None = None) -> subprocess.Popen | str:
    """Run the child to the end (its stdout), or, with `log`, start it writing there and hand back the process."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", _CHILD, base_url, str(ledger), str(n), str(workers), ray_address]
    if log is not None:
        with log.open("w") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("workers", [0, 1])
def test_sigkill_midway_then_rerun_loses_nothing_and_repays_nothing(tmp_path, workers, request):
    n = 240
    ray_address = ""
    if workers:
        ray = request.getfixturevalue("ray_session")
        ray_address = ray.get_runtime_context().gcs_address
    ledger, log = tmp_path / "ledger.sqlite", tmp_path / "child.log"
    faults = dict(mode="thread", latency="lognormal", latency_s=0.05, rate_500=0.05, rate_drop=0.03)
    # The killed child's server holds every request once 60 answers are out: the child is certainly mid-way at
    # the kill however fast it runs, and nothing it (or its Ray worker, orphaned until Ray reaps it) leaves at the
    # gate is ever answered. The re-run asks a second server; the two servers' counts together are the total.
    with FaultyOpenAIServer(**faults) as first, FaultyOpenAIServer(**faults) as second:
        first.hold(after=60)
        proc = _run_child(first.base_url, ledger, n, workers, ray_address, log=log)
        try:
            wait_until(lambda: first.stats()["held"] >= 1 and ledger_ok_rows(ledger) >= 50,
                       "the child to record 50 answers and block at the gate", proc=proc, log=log)
        finally:
            proc.kill()
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        recorded = ledger_ok_rows(ledger)
        assert 50 <= recorded < n, "the kill must land mid-way"
        out = _run_child(second.base_url, ledger, n, workers, ray_address)
        answered = Counter(first.stats()["answered"]) + Counter(second.stats()["answered"])
    done, ok, cached, sent = out.split()
    assert (int(ok), int(cached), int(sent)) == (n, recorded, n - recorded)
    assert ledger_ok_rows(ledger) == n and len(answered) == n
    # answered more than once only if it was in flight (or queued in a worker) at the kill: 8 slots + prefetch 2
    assert sum(answered.values()) - n <= 8 + 2
    # the final set is the uninterrupted run's: one distinct answer per request (answers are a function of it)
    params = LLMSection().sampling_params()
    with Ledger(ledger) as led:
        hits = [led.get_ok(LLMRequest(messages=({"role": "user", "content": f"topic {i}"},), params=params)
                           .key("test-model")) for i in range(n)]
    assert all(h is not None and h.text for h in hits) and len({h.text for h in hits}) == n


def test_saturating_429s_pause_the_worker_but_scattered_ones_do_not(tmp_path):
    import asyncio

    from pipeline.llm.client import LLMClient, Secret
    from pipeline.llm.limiter import LocalLimiter

    async def run(rate_429: float) -> tuple[float, int]:
        """How far past the calls' start the shared pause reaches (-inf: no pause), and the 429s served."""
        with FaultyOpenAIServer(mode="thread", rate_429=rate_429, retry_after_s=5.0) as srv:
            lim = LocalLimiter(None, None)
            client = LLMClient(_llm(srv, max_retries=0, cooldown_s=30), srv.base_url, Secret(""), lim)
            reqs = _requests(_llm(srv), 20)
            started = time.monotonic()
            await asyncio.gather(*(client.call(r, str(i)) for i, r in enumerate(reqs)))
            await client.close()
            reach = lim.paused_until - started if lim.paused_until else float("-inf")
            return reach, srv.stats()["faults"].get("429", 0)

    # compared with the calls' start, not with "now": how long the calls took under load does not matter
    reach, n_429 = asyncio.run(run(1.0))
    assert reach > 4.99 and n_429 == 20  # every answer a 429: new requests held for Retry-After (5 s)
    reach, n_429 = asyncio.run(run(0.3))
    assert reach == float("-inf") and 0 < n_429 < 10  # a few 429s (3 with seed 0) are below the 50 % share: no pause


def _post(port: int, content: str, timeout: float = 120) -> dict:
    import json
    import urllib.request

    body = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": content}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_gate_holds_requests_until_release_and_drops_those_whose_client_left(mode):
    import socket
    from concurrent.futures import ThreadPoolExecutor

    with FaultyOpenAIServer(mode=mode) as srv, ThreadPoolExecutor(4) as pool:
        assert srv.hold(after=2)["hold_after"] == 2
        # the first two pass (the gate closes only once 2 answers were sent), the third is held
        assert _post(srv.port, "one")["choices"] and _post(srv.port, "two")["choices"]
        held = pool.submit(_post, srv.port, "three")
        s = wait_until(lambda: (x := srv.stats())["held"] == 1 and x, "the third request to be held")
        # observed at the gate: received, not answered, the client still waiting
        assert s["received"] == 3 and s["answered_total"] == 2 and not held.done()
        # a client that gives up while held is dropped, never answered
        raw = socket.create_connection(("127.0.0.1", srv.port))
        payload = b'{"model": "test-model", "prompt": "four"}'
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(payload), payload))
        wait_until(lambda: srv.stats()["held"] == 2, "the fourth request to be held")
        raw.close()
        s = wait_until(lambda: (x := srv.stats())["abandoned"] == 1 and x, "the gone client's request to be dropped")
        assert s["held"] == 1 and s["answered_total"] == 2 and not held.done()
        # release: the held request is answered, and later ones pass
        assert srv.release()["hold_after"] is None
        assert held.result(timeout=120)["choices"]
        assert _post(srv.port, "five")["choices"]
        s = srv.stats()
        assert s["held"] == 0 and s["answered_total"] == 4 and s["distinct_answered"] == 4 and s["abandoned"] == 1
        # a second hold after the release closes the gate again (after=0: at once)
        srv.hold(after=0)
        again = pool.submit(_post, srv.port, "six")
        wait_until(lambda: srv.stats()["held"] == 1, "a request to be held by the second hold")
        assert not again.done()
        srv.release()
        assert again.result(timeout=120)["choices"] and srv.stats()["answered_total"] == 5
