"""Issue 16: `textbook generate CONFIG` (and --dry-run) on a config whose web stage has not run plans the topic
prompts and says that the web-seeded share is skipped until web has run; once web has run, a re-run adds the
web-seeded prompts and pays for nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.llm.testserver import FaultyOpenAIServer

PARA = "Glaciers form where more snow falls in winter than melts in summer, and the snow compacts into ice. "


def _config(tmp_path: Path, base_url: str) -> Path:
    topics = tmp_path / "topics.yaml"
    topics.write_text(yaml.safe_dump({"domain": "test", "subjects": {
        "Earth": {"Ice": ["Glaciers", "Sea ice", "Permafrost", "Ice sheets"],
                  "Water": ["Rivers", "Lakes", "Aquifers", "Estuaries"]}}}))
    cfg = {"run": {"name": "t", "out": str(tmp_path / "out"), "stages": ["web", "generate"]},
           "web": {"inputs": [str(tmp_path / "pages")]},
           "llm": {"base_url": base_url, "model": "test-model", "workers": 0, "concurrency": 4,
                   "ledger": str(tmp_path / "ledger.sqlite"), "timeout_s": 5, "max_tokens": 400},
           "generate": {"n": 8, "taxonomy": [str(topics)], "formats": ["textbook_section"],
                        "audiences": ["high school", "college"], "min_tokens": 100, "web_seed_fraction": 0.25}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich wraps long lines


def test_generate_before_web_plans_topic_prompts_and_leaves_the_web_share_for_later(tmp_path):
    with FaultyOpenAIServer(mode="thread") as srv:
        cfg = _config(tmp_path, srv.base_url)
        stage = tmp_path / "out/stages/generate"

        out = _invoke("generate", str(cfg), "--dry-run", "--samples", "0")
        assert "upstream stage" not in out
        assert "6 prompt specs" in out and "0 web-seeded" in out
        assert "web-seeded share (2 of 8 prompts" in out and "skipped until web has run" in out
        assert srv.stats()["answered_total"] == 0

        out = _invoke("generate", str(cfg))
        assert "skipped until web has run" in out
        stats = json.loads((stage / "stats.json").read_text())
        assert stats["prompt_specs"] == 6 and stats["coverage"]["requested"]["web_seeded"] == 0
        assert stats["web_seeds"]["pending"] is True and stats["web_seeds"]["share_skipped"] == 2
        answered = srv.stats()["answered_total"]
        assert answered == stats["kept"] == 6

        # the web stage completes (its kept pages written as the stage writes them): generate re-plans
        kept = tmp_path / "out/stages/web/kept"
        kept.mkdir(parents=True)
        (kept / "pages.jsonl").write_text("".join(
            json.dumps({"id": f"p{i}", "text": PARA * 8, "edu_score": 4.5, "url": f"https://site{i}.org/ice"}) + "\n"
            for i in range(3)))
        (tmp_path / "out/stages/web/_SUCCESS.json").write_text(json.dumps({"hash": "web-done"}))
        out = _invoke("generate", str(cfg))
        assert "skipped until web has run" not in out
        stats = json.loads((stage / "stats.json").read_text())
        assert stats["prompt_specs"] == 8 and stats["coverage"]["requested"]["web_seeded"] == 2
        # the 6 topic prompts are the same requests as before (ledger); only the 2 web-seeded ones are new
        assert srv.stats()["answered_total"] == answered + 2
        assert stats["llm"]["cached"] == 6
