"""A web-seeded share the pages cannot fill (issue 20: 1 of 9 intended web-seeded prompts made, 47 of 48 kept
pages below `seed_min_score`, nothing said so): the dry run and the stage's stats say how many were asked, made
and why not, and topic prompts fill the gap (`generate.seed_shortfall: topics`) or the plan is short (`skip`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.generate.stage import plan
from pipeline.llm.testserver import FaultyOpenAIServer


@pytest.fixture(scope="module")
def pages(shared_data, tmp_path_factory) -> Path:
    """48 real FineWeb pages as the web stage's kept output: one scores 3.5, the other 47 below 3.0."""
    rows = json.loads((shared_data / "web/fineweb_sample_300/fineweb_subset.json").read_text())
    texts = [r["original_text"] for r in rows if len(r.get("original_text") or "") > 1500][:48]
    assert len(texts) == 48
    out = tmp_path_factory.mktemp("pages") / "kept.jsonl"
    out.write_text("".join(json.dumps({"id": f"fw{i}", "text": t, "url": f"https://site{i}.example/page",
                                       "edu_score": 3.5 if i == 0 else 1.0 + (i % 19) / 10}) + "\n"
                           for i, t in enumerate(texts)))
    return out


def _config(tmp_path: Path, pages: Path, base_url: str = "http://127.0.0.1:9/v1", **generate) -> Path:
    cfg = {"run": {"name": "short", "out": str(tmp_path / "out"), "stages": ["generate"]},
           "llm": {"base_url": base_url, "model": "test-model", "workers": 0, "concurrency": 4, "max_tokens": 300,
                   "ledger": str(tmp_path / "ledger.sqlite"), "timeout_s": 10},
           "generate": {"n": 24, "web_seed_fraction": 0.375, "seed_inputs": [str(pages)], "min_tokens": 50,
                        "subjects": ["Physics", "World History"], **generate}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_says_asked_made_and_why_and_topics_fill_the_gap(pages, tmp_path):
    result = CliRunner().invoke(app, ["generate", str(_config(tmp_path, pages)), "--dry-run", "--samples", "0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "24 prompt specs" in text and "1 web-seeded" in text
    assert "web-seeded prompts: 1 of 9 asked were made" in text
    assert "of 48 page(s) read, 1 qualified (47 scored below generate.seed_min_score=3)" in text
    assert "8 topic prompt(s) fill the gap (generate.seed_shortfall: topics)" in text


def test_skip_leaves_the_plan_short_and_a_full_share_says_nothing(pages, tmp_path):
    cfg = load_config(str(_config(tmp_path, pages, seed_shortfall="skip")), [])
    p = plan(cfg, [])
    assert len(p.specs) == 16 and sum(s.seed is not None for s in p.specs) == 1
    assert p.seeds_info["shortfall"] == {
        "asked": 9, "made": 1, "short": 8, "pages_read": 48, "pages_not_seeds": {"low_score": 47},
        "filled_from_topics": 0, "note": p.seeds_info["shortfall"]["note"]}
    assert "the plan is 8 prompt(s) short (generate.seed_shortfall: skip)" in p.seeds_info["shortfall"]["note"]
    # a bar every page clears: the share is filled, no note
    cfg = load_config(str(_config(tmp_path, pages, seed_min_score=0.5)), [])
    p = plan(cfg, [])
    assert p.seeds_info["shortfall"]["short"] == 0 and "note" not in p.seeds_info["shortfall"]
    assert sum(s.seed is not None for s in p.specs) == 9 and len(p.specs) == 24


def test_the_stage_stats_carry_the_shortfall(pages, tmp_path):
    with FaultyOpenAIServer(mode="thread", latency_s=0.0, words=120) as srv:
        cfg = _config(tmp_path, pages, base_url=srv.base_url, n=8)
        result = CliRunner().invoke(app, ["generate", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "out" / "stages" / "generate" / "stats.json").read_text())
    short = stats["web_seeds"]["shortfall"]
    assert (short["asked"], short["made"], short["short"], short["filled_from_topics"]) == (3, 1, 2, 2)
    assert short["pages_not_seeds"] == {"low_score": 47} and stats["web_seeds"]["used"] == 1
    assert stats["prompt_specs"] == 8
