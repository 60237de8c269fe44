"""The generate stage's bill (issue 17): every billed token accounted to kept or dropped documents, by reason;
content-filtered answers billed and named; and `llm.mode: batch` giving the same documents at the batch price,
through the same ledger, validation and diversity guard."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.llm.testserver import FaultyOpenAIServer

GOOD = [f"Concept {c}" for c in "ABCDEFGH"]


def _config(tmp_path: Path, base_url: str, name: str, **llm) -> Path:
    topics = tmp_path / "topics.yaml"
    topics.write_text(yaml.safe_dump({"domain": "test", "subjects": {
        "Good Subject": {"Part One": GOOD},
        # the test server answers a body containing CONTENT_FILTER with HTTP 200, content null, usage 400 + 700
        "Filtered Subject": {"Withheld": ["CONTENT_FILTER first", "CONTENT_FILTER second"]},
    }}))
    cfg = {
        "run": {"name": name, "out": str(tmp_path / name), "stages": ["generate"]},
        "llm": {"base_url": base_url, "model": "test-model", "workers": 0, "concurrency": 4, "max_retries": 2,
                "ledger": str(tmp_path / f"{name}.sqlite"), "timeout_s": 5, "max_tokens": 400,
                "batch_poll_s": 0.02, **llm},
        "budget": {"price_input_per_1m": 1.0, "price_output_per_1m": 4.0},
        "generate": {"n": 16, "taxonomy": [str(topics)], "formats": ["textbook_section"],
                     "audiences": ["high school", "college"], "min_tokens": 150, "web_seed_fraction": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: Path) -> dict:
    result = CliRunner().invoke(app, ["generate", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stage = cfg.parent / cfg.stem / "stages" / "generate"
    stats = json.loads((stage / "stats.json").read_text())
    kept = [r for f in sorted((stage / "kept").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return {"stats": stats, "kept": kept}


def test_every_billed_token_is_accounted_and_batch_mode_gives_the_same_documents_at_half_price(tmp_path):
    with FaultyOpenAIServer(mode="thread") as srv:
        online = _run(_config(tmp_path, srv.base_url, "online"))
        after_online = srv.stats()
        batch = _run(_config(tmp_path, srv.base_url, "batch", mode="batch"))
        served = srv.stats()

    stats = online["stats"]
    n_filtered = stats["errored"].get("failed_content_filter", 0)
    assert stats["reconciled"] and stats["read"] == 16 and n_filtered >= 1
    assert stats["kept"] == 16 - n_filtered and set(stats["errored"]) == {"failed_content_filter"}
    # billed, named, counted: 400 + 700 tokens per filtered answer, in the dropped part of the bill
    bill = stats["billed"]
    assert bill["reconciled"]
    assert bill["dropped_by_reason"]["failed_content_filter"]["prompt_tokens"] == 400 * n_filtered
    assert bill["dropped_by_reason"]["failed_content_filter"]["completion_tokens"] == 700 * n_filtered
    assert bill["dropped"]["usd"] == pytest.approx(n_filtered * (400 * 1.0 + 700 * 4.0) / 1e6)
    assert bill["kept"]["completion_tokens"] == 200 * stats["kept"]  # 200-word answers, one per kept document
    assert bill["kept"]["usd"] + bill["dropped"]["usd"] == pytest.approx(stats["cost_usd"])
    llm = stats["llm"]
    assert llm["unusable"]["answers"] == n_filtered and llm["outcomes"] == {"content_filter": n_filtered}
    assert after_online["answered_total"] == 16  # each filtered prompt answered (and billed) once, not 7 times

    # batch mode: one batch, the same documents (answers are a function of the request), half the price
    b = batch["stats"]
    assert b["llm"]["mode"] == "batch" and len(b["llm"]["batches"]) == 1 and served["batches_created"] == 1
    assert [(r["text"], r["topic"]) for r in batch["kept"]] == [(r["text"], r["topic"]) for r in online["kept"]]
    assert b["errored"] == stats["errored"] and b["billed"]["reconciled"]
    assert b["cost_usd"] == pytest.approx(stats["cost_usd"] / 2)
    assert b["billed"]["dropped"]["usd"] == pytest.approx(bill["dropped"]["usd"] / 2)
    assert served["answered_total"] == 32
