"""The closed loop (issue 20): a model we pretrained, `textbook export-hf`, served by `transformers serve`,
`textbook generate` pointed at it. The export carries a plain-text chat template (said in its README and the
command's output); a model directory without one (an older export, a base model) is sent completions with
plain-text prompts instead of chat requests that would all fail with HTTP 500, and the run says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from train_helpers import book_shards, one_thread, tiny_cfg  # noqa: F401 - one_thread: autouse fixture
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.llm import LLMSection, has_chat_template
from pipeline.train.trainer import train


@pytest.fixture(scope="module")
def exported(shared_data, tmp_path_factory) -> tuple[Path, str]:
    """The tiny preset trained 3 steps on real text (the OpenStax Python book), exported; the command's output."""
    tmp = tmp_path_factory.mktemp("loop")
    shards = book_shards(shared_data, tmp / "book")
    train(tiny_cfg(max_steps=3, checkpoint_every=3), tmp / "run", shards=[str(shards)], progress=False)
    result = CliRunner().invoke(app, ["export-hf", str(tmp / "run"), str(tmp / "hf")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp / "hf", result.output


def test_export_carries_a_plain_text_chat_template_and_says_which(exported):
    from transformers import AutoTokenizer

    hf, output = exported
    assert "chat template: plain text" in " ".join(output.split())
    assert "Chat template: plain text" in (hf / "README.md").read_text()
    assert json.loads((hf / "textbook_export.json").read_text())["chat_template"].startswith("plain text")
    assert has_chat_template(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    text = tok.apply_chat_template([{"role": "system", "content": "You write textbooks."},
                                    {"role": "user", "content": "Write about loops."}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|endoftext|>You write textbooks.\n\nWrite about loops.\n\n"


def _generate(tmp_path: Path, model: Path, name: str) -> tuple[dict, str]:
    cfg = {"run": {"name": name, "out": str(tmp_path / name), "stages": ["generate"]},
           "llm": {"provider": "local", "model": str(model), "workers": 0, "concurrency": 2, "max_tokens": 16,
                   "timeout_s": 120, "max_retries": 1, "local_device": "cpu", "local_startup_timeout_s": 300,
                   "ledger": str(tmp_path / "ledger.sqlite")},
           "generate": {"n": 3, "min_tokens": 1, "web_seed_fraction": 0, "subjects": ["Physics"]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["generate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / name / "stages" / "generate" / "stats.json").read_text())
    return stats, result.output


@pytest.mark.slow
def test_generate_on_our_exported_model_through_transformers_serve(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    hf, _ = exported
    stats, _ = _generate(tmp_path, hf, "chat")
    assert stats["api"]["used"] == "chat" and stats["api"]["note"] is None
    assert stats["errored"] == {} and stats["llm"]["sent"] == 3 and stats["tokens"]["completion"] > 0
    assert stats["kept"] + sum(stats["dropped"].values()) == 3

    # the same model without its template (as exported before): completions, said so, still no error
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in hf.iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).write_bytes(f.read_bytes())
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    assert not has_chat_template(bare)
    assert LLMSection(provider="local", model=str(bare)).request_api() == "completions"
    stats, output = _generate(tmp_path, bare, "bare")
    assert stats["api"]["used"] == "completions" and "has no chat template" in stats["api"]["note"]
    assert "has no chat template" in " ".join(output.split())
    assert stats["errored"] == {} and stats["llm"]["sent"] == 3 and stats["tokens"]["completion"] > 0


def test_the_api_switch_is_only_for_a_local_model_directory_without_a_template(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    (bare / "tokenizer_config.json").write_text("{}")
    assert LLMSection(provider="local", model=str(bare)).request_api() == "completions"
    assert LLMSection(provider="local", model=str(bare), api="completions").api_note() is None
    assert LLMSection(model=str(bare)).request_api() == "chat"  # a remote endpoint: its own business
    assert LLMSection(provider="local", model="HuggingFaceTB/SmolLM2-360M-Instruct").request_api() == "chat"
    (bare / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert LLMSection(provider="local", model=str(bare)).request_api() == "chat"
