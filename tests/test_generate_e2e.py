"""`textbook generate` end to end over real HTTP: the project's fault-injecting OpenAI-compatible server, a SIGKILL
mid-run, the budget cap, the diversity guard, web seeds, dry run, and `topics expand`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from llm_fixtures import ledger_ok_rows
from typer.testing import CliRunner
from waiting import wait_until

from pipeline.cli import app
from pipeline.llm.testserver import FaultyOpenAIServer

REPO = Path(__file__).resolve().parents[1]
GOOD = {f"Concept {c}" for c in "ABCDEFGHIJKL"}


def _taxonomy(tmp_path: Path) -> Path:
    p = tmp_path / "topics.yaml"
    p.write_text(yaml.safe_dump({"domain": "test", "subjects": {
        "Good Subject": {"Part One": sorted(GOOD)[:6], "Part Two": sorted(GOOD)[6:]},
        # the test server answers any body containing FAIL_ALWAYS with a 500: retries exhaust, the spec fails
        "Bad Subject": {"Broken": ["FAIL_ALWAYS first", "FAIL_ALWAYS second"]},
    }}))
    return p


def _config(tmp_path: Path, base_url: str, **sections) -> Path:
    cfg = {
        "run": {"name": "t", "out": str(tmp_path / "out"), "stages": ["generate"]},
        "llm": {"base_url": base_url, "model": "test-model", "workers": 0, "concurrency": 4,
                "ledger": str(tmp_path / "ledger.sqlite"), "max_retries": 8, "backoff_base_s": 0.01,
                "backoff_max_s": 0.05, "cooldown_s": 0.01, "timeout_s": 2, "max_tokens": 400},
        "generate": {"n": 20, "taxonomy": [str(_taxonomy(tmp_path))], "formats": ["textbook_section", "exercises"],
                     "audiences": ["high school", "college"], "min_tokens": 150},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stage(tmp_path: Path) -> Path:
    return tmp_path / "out" / "stages" / "generate"


def _stats(tmp_path: Path) -> dict:
    return json.loads((_stage(tmp_path) / "stats.json").read_text())


def _rows(directory: Path) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(directory.glob("*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_generate_through_faults_accounts_for_every_spec_and_reruns_from_the_ledger(tmp_path):
    pages = tmp_path / "web.jsonl"
    para = "Glaciers form where more snow falls in winter than melts in summer, and the snow compacts into ice. "
    pages.write_text("\n".join(json.dumps({"id": f"p{i}", "text": para * 8, "edu_score": 4.0 + i / 10,
                                           "url": f"https://site{i}.org/glaciers"}) for i in range(3)) + "\n")
    with FaultyOpenAIServer(mode="thread", latency="lognormal", latency_s=0.01, rate_429=0.1, retry_after_s=0.01,
                            rate_500=0.08, rate_drop=0.04, rate_malformed=0.04, rate_hang=0.02, hang_s=5) as srv:
        cfg = _config(tmp_path, srv.base_url, generate={"seed_inputs": [str(pages)], "web_seed_fraction": 0.15})
        out = _invoke("generate", str(cfg))
        first = srv.stats()
        stats = _stats(tmp_path)
        kept = _rows(_stage(tmp_path) / "kept")
        failed = _rows(_stage(tmp_path) / "removed")

        # every spec ends in exactly one state; the FAIL_ALWAYS topics fail after retries, nothing else is lost
        assert stats["read"] == stats["requests"] == stats["prompt_specs"] == 20 and stats["reconciled"]
        n_bad = sum(1 for r in kept + failed if r["topic"].startswith("Bad Subject/"))
        assert n_bad >= 2
        assert stats["kept"] == 20 - n_bad and sum(stats["errored"].values()) == n_bad
        assert set(stats["errored"]) == {"failed_internalservererror_500"}
        assert {r["reason"] for r in failed} == {"failed"} and all(r["text"] == "" for r in failed)
        assert all(json.loads(r["meta"])["error"] for r in failed)
        # provenance on every kept document
        seeded = [r for r in kept if r["format"] == "web_seeded_section"]
        assert len(seeded) == 3 and {r["url"] for r in seeded} == {f"https://site{i}.org/glaciers" for i in range(3)}
        for r in kept:
            meta = json.loads(r["meta"])
            assert r["source"] == "synthetic" and r["model"] == "test-model" and r["text"]
            assert r["prompt_id"].startswith(r["format"] + "@")
            assert r["audience"] in ("high school", "college")
            assert meta["usage"]["completion_tokens"] > 0 and meta["params"]["temperature"] == 0.8
            assert meta["words"] >= 150 and meta["finish_reason"] == "stop"
            if r["format"] != "web_seeded_section":
                assert meta["concept"] in GOOD and r["topic"] == f"Good Subject/{meta['subtopic']}/{meta['concept']}"
        # the server answered each kept request exactly once despite the faults
        assert first["distinct_answered"] == len(kept) and first["answered_total"] == len(kept)
        assert sum(first["faults"].values()) > 0
        # stats carry cost, tokens, latency, coverage, diversity
        assert stats["tokens"]["completion"] > 0 and stats["latency_s"]["p50"] > 0
        assert stats["coverage"]["requested"]["cells_filled"] == 4 and stats["coverage"]["kept"]["web_seeded"] == 3
        assert stats["diversity"]["outputs_indexed"] == len(kept)
        assert "requests 20: sent" in out

        # same command again: complete, skipped; --force: rebuilt from the ledger with no new answers
        assert "already complete" in _invoke("generate", str(cfg))
        _invoke("generate", str(cfg), "--force")
        assert srv.stats()["answered_total"] == first["answered_total"]
        again = _rows(_stage(tmp_path) / "kept")
        # same documents, same order, same provenance: how a request went (served from the ledger this time,
        # latency, attempts) is the ledger's, so a rebuilt or resumed run gives the same shards
        assert again == kept
        assert _stats(tmp_path)["llm"]["cached"] == len(kept)  # every kept answer came from the ledger
        # an unrelated setting (concurrency, output dir) re-runs the stage but pays for nothing again
        _invoke("generate", str(cfg), "--set", "llm.concurrency=2", "--set", f"run.out={tmp_path / 'out2'}")
        assert srv.stats()["answered_total"] == first["answered_total"]
        assert json.loads((tmp_path / "out2/stages/generate/stats.json").read_text())["kept"] == len(kept)
        # a different sampling parameter is a different request: the ledger does not answer it
        # (n=4 is the first 4 specs of the n=20 run: the sampler's stream is prefix-stable)
        _invoke("generate", str(cfg), "--set", "llm.temperature=0.5", "--set", "generate.n=4")
        good_in_first_4 = sum(1 for r in kept if json.loads(r["meta"])["spec_index"] < 4)
        assert good_in_first_4 >= 1
        assert srv.stats()["answered_total"] == first["answered_total"] + good_in_first_4


def test_budget_cap_stops_cleanly_with_every_spec_accounted(tmp_path):
    with FaultyOpenAIServer(mode="thread", latency_s=0.01) as srv:
        cfg = _config(tmp_path, srv.base_url, budget={"max_tokens": 3000},
                      generate={"taxonomy": [str(_taxonomy(tmp_path))], "subjects": ["Good Subject"]})
        out = _invoke("generate", str(cfg))
        stats = _stats(tmp_path)
        assert stats["reconciled"] and stats["read"] == 20
        assert 0 < stats["kept"] < 20 and stats["dropped"]["skipped_budget"] == 20 - stats["kept"]
        assert stats["stopped_reason"] and "stopped early" in out
        assert srv.stats()["answered_total"] == stats["kept"]


def test_short_outputs_and_a_repetitive_cell_are_dropped_with_reasons(tmp_path):
    # 60-word answers: too short for min_tokens 150. The test server draws every answer from one ~70-word
    # vocabulary, so on single-word shingles each answer is a near duplicate of the others: the diversity guard
    # sees each cell repeat itself and stops paying for it. 50 ms per answer: the guard's verdict comes back from
    # the judging process in about a millisecond, well before the cell's next request is due.
    with FaultyOpenAIServer(mode="thread", words=60, latency_s=0.05) as srv:
        cfg = _config(tmp_path, srv.base_url, llm={"concurrency": 1},
                      generate={"subjects": ["Good Subject"],
                                "diversity": {"shingle_words": 1, "near_dup_threshold": 0.2, "min_docs": 3,
                                              "max_repeat_rate": 0.5}})
        _invoke("generate", str(cfg))
        stats = _stats(tmp_path)
        assert stats["reconciled"] and stats["read"] == 20 and stats["kept"] == 0
        assert stats["dropped"]["too_short"] > 0 and stats["dropped"].get("skipped_diversity_guard", 0) > 0
        assert set(stats["dropped"]) <= {"too_short", "skipped_diversity_guard"}
        assert stats["diversity"]["cells_stopped"]
        not_sent = stats["diversity"]["requests_not_sent_per_cell"]
        assert set(not_sent) <= set(stats["diversity"]["cells_stopped"])
        assert sum(not_sent.values()) == stats["dropped"]["skipped_diversity_guard"]
        assert srv.stats()["answered_total"] == stats["dropped"]["too_short"]
        assert stats["diversity"]["near_duplicate_rate"] > 0.5
        names = {p.name.split("-")[0] for p in (_stage(tmp_path) / "removed").glob("*.parquet")}
        assert names == {"too_short", "skipped_diversity_guard"}


def test_dry_run_prints_plan_and_estimate_and_sends_nothing(tmp_path):
    with FaultyOpenAIServer(mode="thread") as srv:
        cfg = _config(tmp_path, srv.base_url, budget={"price_input_per_1m": 1.0, "price_output_per_1m": 2.0})
        out = _invoke("generate", str(cfg), "--dry-run", "--n", "7", "--samples", "1")
        assert "7 prompt specs" in out and "7 requests" in out
        assert "est_max_cost_usd" in out and "Write a" in out
        assert srv.stats()["received"] == 0
        assert not (_stage(tmp_path) / "stats.json").exists()




def test_sigkill_mid_generate_then_rerun_finishes_without_repaying(tmp_path):
    n = 40
    with FaultyOpenAIServer(mode="thread", latency_s=0.15) as srv:
        cfg = _config(tmp_path, srv.base_url, generate={"n": n, "subjects": ["Good Subject"],
                                                        "audiences": ["middle school", "high school", "college"]})
        ledger = tmp_path / "ledger.sqlite"
        cmd = [sys.executable, "-m", "pipeline.cli", "generate", str(cfg)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        # the gate closes once 20 answers are out: the kill (at 10 recorded) lands mid-run however fast the run is
        srv.hold(after=20)
        log = tmp_path / "killed.log"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            wait_until(lambda: ledger_ok_rows(ledger) >= 10, "10 recorded answers", proc=proc, log=log)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        # the dead client's connections are seen closed before the gate opens: what it left there is not answered
        wait_until(lambda: srv.stats()["held"] == 0, "the killed run's held requests to be dropped")
        srv.release()
        recorded = ledger_ok_rows(ledger)
        assert 10 <= recorded < n
        assert not (_stage(tmp_path) / "_SUCCESS.json").exists()
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        stats = _stats(tmp_path)
        served = srv.stats()
    assert stats["kept"] == n and stats["reconciled"]
    assert stats["llm"]["cached"] == recorded and stats["llm"]["sent"] == n - recorded
    assert served["distinct_answered"] == n
    # asked twice only if in flight at the kill: 4 slots + a prefetch of 2
    assert served["answered_total"] - n <= 6


def test_topics_expand_parses_outlines_and_fails_clearly_on_gibberish(tmp_path):
    from pipeline.generate.expand import merge_outlines, parse_outline, write_taxonomy
    from pipeline.generate.taxonomy import parse_file

    answer = """Here is an outline:

## Plate Tectonics
- Continental drift
- **Seafloor spreading** - how new crust forms
- Subduction zones.
## 2. Volcanoes
1. Shield volcanoes
2. Lava / magma differences
**Earthquakes**
* Seismic waves
* Continental drift
Minerals: quartz; feldspar; mica
"""
    outline = parse_outline(answer)
    assert outline["Plate Tectonics"] == ["Continental drift", "Seafloor spreading", "Subduction zones"]
    assert outline["Volcanoes"] == ["Shield volcanoes", "Lava or magma differences"]
    assert outline["Minerals"] == ["quartz", "feldspar", "mica"]
    merged = merge_outlines([outline, {"plate tectonics": ["Hotspots", "continental drift"]}])
    assert merged["Plate Tectonics"] == ["Continental drift", "Seafloor spreading", "Subduction zones", "Hotspots"]
    assert merged["Earthquakes"] == ["Seismic waves"]  # a concept lives under one subtopic only
    out = tmp_path / "geo.yaml"
    write_taxonomy(out, "Geology / Earth", merged, domain="science")
    [subject] = parse_file(out)
    assert subject.name == "Geology or Earth" and len(subject.leaves) == sum(len(v) for v in merged.values())
    with pytest.raises(Exception, match="exists"):
        write_taxonomy(out, "Geology", merged)

    with FaultyOpenAIServer(mode="thread", words=5) as srv:  # 5 random words: no outline in it
        cfg = _config(tmp_path, srv.base_url)
        result = CliRunner().invoke(app, ["topics", "expand", "Geology", "--config", str(cfg), "--out",
                                          str(tmp_path / "x.yaml")])
        assert result.exit_code == 1 and "no usable subtopics" in result.output
        assert not (tmp_path / "x.yaml").exists()


def test_completions_api_and_samples_per_prompt(tmp_path):
    with FaultyOpenAIServer(mode="thread", latency_s=0.01) as srv:
        cfg = _config(tmp_path, srv.base_url, llm={"api": "completions", "n": 2},
                      generate={"n": 3, "subjects": ["Good Subject"]})
        _invoke("generate", str(cfg))
        stats = _stats(tmp_path)
        served = srv.stats()
    assert stats["prompt_specs"] == 3 and stats["requests"] == stats["read"] == stats["kept"] == 6
    kept = _rows(_stage(tmp_path) / "kept")
    metas = [json.loads(r["meta"]) for r in kept]
    assert sorted((m["spec_index"], m["sample_index"]) for m in metas) == [(i, s) for i in range(3) for s in (0, 1)]
    assert {m["params"]["seed"] for m in metas} == {0, 1}  # each sample is sent its own seed
    assert len({r["text"] for r in kept}) == 6 and served["distinct_answered"] == 6
