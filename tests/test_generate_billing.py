"""The generate stage's bill (issue 17): every billed token accounted to kept or dropped documents, by reason;
content-filtered answers billed and named; and `llm.mode: batch` giving the same documents at the batch price,
through the same ledger, validation and diversity guard."""

from __future__ import annotations

import json
import re
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


def _invoke(cfg: Path) -> tuple[str, dict]:
    """`textbook generate CFG`: its output (whitespace normalised: rich wraps it to the terminal) and stats."""
    result = CliRunner().invoke(app, ["generate", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stats = json.loads((cfg.parent / cfg.stem / "stages" / "generate" / "stats.json").read_text())
    return " ".join(result.output.split()), stats


def _answered_once(served: dict) -> bool:
    return bool(served["answered"]) and set(served["answered"].values()) == {1}


def test_a_server_wait_stop_is_partial_and_the_same_command_sends_only_what_was_not_answered(tmp_path):
    """The tester's case: the first two requests get a 429 asking for a day. Before: the stage was marked complete
    and the same command said "already complete" and sent nothing. Now the stage is partial, the command says
    what is left and what to do, and running it again sends exactly what was not answered, nothing twice."""
    with FaultyOpenAIServer(mode="thread", first_429=2, headers_429={"retry-after": "86400"}) as srv:
        cfg = _config(tmp_path, srv.base_url, "wait")
        stage = tmp_path / "wait" / "stages" / "generate"
        out1, first = _invoke(cfg)
        left = first["partial"]["unanswered"]
        assert first["partial"]["reasons"] == {"server_wait": left} and left >= 2
        assert first["llm"]["unanswered"] == {"server_wait": left}
        assert (stage / "_PARTIAL.json").is_file() and not (stage / "_SUCCESS.json").exists()
        # the stop said once, what it asked; the unusable spend by outcome, no raw dict, no unbilled reason
        assert "stopped early: the server asked to wait 86,400 s (retry-after: 86400), above llm.max_wait_s=120" \
            in out1 and out1.count("the server asked to wait") == 1
        assert f"not answered: {left} request(s) (server_wait): run the same command again once" in out1
        unusable = re.search(r"billed but unusable: [^;]*?(?= not answered| llm warning| stopped early|$)", out1)
        n_unusable = first["llm"]["unusable"]["answers"]
        if n_unusable:  # 400 + 700 tokens each at $1 / $4 per 1M
            assert f": content_filter {n_unusable} (${n_unusable * 0.0032:.4f})" in unusable.group(0), out1
            assert "{" not in unusable.group(0) and "server_wait" not in unusable.group(0)

        out2, second = _invoke(cfg)  # the same command
        served = srv.stats()
    assert "already complete" not in out2 and "[generate] an earlier attempt stopped early" in out2
    assert second["llm"]["sent"] == left and "partial" not in second
    assert (stage / "_SUCCESS.json").is_file() and not (stage / "_PARTIAL.json").exists()
    n_filtered = second["errored"].get("failed_content_filter", 0)
    assert second["read"] == 16 and second["kept"] == 16 - n_filtered and set(second["errored"]) <= {
        "failed_content_filter"}
    assert _answered_once(served) and served["answered_total"] == 16  # nothing paid twice


def test_a_budget_stop_is_partial_and_plain_reruns_continue_until_complete(tmp_path):
    """max_usd is a cap per run: each run stops at it, partial; the same command, run again, sends only what was
    not answered (the answered ones come from the ledger), until the stage is complete. The one 2 s wait at the
    start shows in the summary: count, longest and wall-clock time waiting."""
    with FaultyOpenAIServer(mode="thread", first_429=1, headers_429={"retry-after": "2"}) as srv:
        cfg = _config(tmp_path, srv.base_url, "cap")
        data = yaml.safe_load(cfg.read_text())
        data["budget"]["max_usd"] = 0.015  # the 16 requests cost about $0.02
        cfg.write_text(yaml.safe_dump(data))
        out, stats = _invoke(cfg)
        assert stats["partial"]["reasons"] == {"budget": stats["partial"]["unanswered"]}
        assert stats["cost_usd"] <= 0.015 and stats["llm"]["stopped_by"] == "budget"
        assert re.search(r"waits: 1 of 2 s or more \(rate limits, backoff\), longest 2 s; [23] s of wall-clock", out)
        # said once: the cap (per run) and the final spend; one hint
        assert out.count("budget.max_usd=0.015: this run spent") == 1
        assert f"this run spent ${stats['cost_usd']:.4f}" in out
        assert out.count("every run may spend up to the cap again") == 1
        runs, sent = 1, [stats["llm"]["sent"]]
        while "partial" in stats:
            left = stats["partial"]["unanswered"]
            out, stats = _invoke(cfg)
            runs += 1
            assert "already complete" not in out and stats["llm"]["sent"] >= 1 and stats["llm"]["cached"] >= 1
            assert stats["llm"]["sent"] + stats["llm"]["cached"] + stats["llm"]["failed"] >= 16 - left
            sent.append(stats["llm"]["sent"])
            assert runs <= 4, "each run must get further"
        served = srv.stats()
    assert runs >= 2 and (tmp_path / "cap" / "stages" / "generate" / "_SUCCESS.json").is_file()
    n_filtered = stats["errored"].get("failed_content_filter", 0)
    assert stats["kept"] == 16 - n_filtered and sum(sent) == 16
    assert _answered_once(served) and served["answered_total"] == 16  # nothing paid twice
