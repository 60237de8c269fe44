"""run_requests against a real `transformers serve` (provider: local) on a tiny Llama built here: real HTTP,
real openai client, Ray workers, chat and completions APIs, ledger reuse on a re-run."""

from __future__ import annotations

import pytest
from llm_fixtures import build_tiny_llama

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.llm.runner import run_requests
from pipeline.llm.types import LLMRequest, LLMResult


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_local_provider_serves_chat_and_completions_through_ray(tiny_llama, tmp_path, monkeypatch, ray_session):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    llm = LLMSection(provider="local", model=str(tiny_llama), workers=1, concurrency=4, max_tokens=12,
                     timeout_s=60, local_device="cpu", local_startup_timeout_s=180)
    reqs = [LLMRequest(messages=({"role": "user", "content": f"Explain energy {i}"},), params=llm.sampling_params(),
                       sample_index=i % 2, tag={"i": i}) for i in range(4)]
    reqs += [LLMRequest(prompt=f"The plant {i}", params=llm.sampling_params(), tag={"i": 10 + i}) for i in range(2)]
    results: list[LLMResult] = []
    summary = run_requests(reqs, llm, BudgetSection(), tmp_path / "l.sqlite", on_result=results.append,
                           progress=False)
    assert summary.ok == 6 and summary.failed == 0 and summary.sent == 6 and summary.reconciled
    for r in results:
        assert r.ok and isinstance(r.text, str) and r.finish_reason in {"stop", "length"}
        assert 0 < r.completion_tokens <= 12 and r.prompt_tokens > 0 and r.model == str(tiny_llama)
    # the server is gone after the run, and the same requests are now answered from the ledger
    again = run_requests(reqs, llm, BudgetSection(), tmp_path / "l.sqlite", progress=False)
    assert again.cached == 6 and again.sent == 0

