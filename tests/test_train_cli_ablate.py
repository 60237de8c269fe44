"""`textbook pretrain`, `textbook export-hf` and `textbook ablate` through the CLI: the ablation workflow
(paired statistics, parallel runs and gathering, up-front checks, overlap warnings, controls)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import (
    BOOK,
    WEB,
    book_shards,
    one_thread,  # noqa: F401 - autouse fixture: one torch thread
    train_losses,
    write_shards,
)
from typer.testing import CliRunner

from pipeline.cli import app

TINY = ["--set", "model.max_seq_len=64", "--set", "train.batch_size=2", "--set", "eval.tokens=1024",
        "--set", "train.log_every=1", "--set", "data.prefetch=0"]
LABELS = "edu_labels/fineweb_edu_llama3_sample/llama3_train.jsonl"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(shared_data, tmp_path_factory) -> Path:
    return book_shards(shared_data, tmp_path_factory.mktemp("cli") / "book")


def _web_texts(shared_data: Path) -> list[str]:
    return [r["text"] for r in json.loads((shared_data / WEB / "fineweb_subset.json").read_text())]


@pytest.fixture(scope="module")
def web_sets(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Real FineWeb pages: a web arm (200 pages) and a held-out evaluation shard set (other pages + book)."""
    book = [json.loads(line)["text"] for line in (shared_data / BOOK).read_text().splitlines()]
    web = _web_texts(shared_data)
    root = tmp_path_factory.mktemp("websets")
    web_shards = write_shards(root / "web", [{"text": t, "source": "web"} for t in web[:200]],
                              [{"text": t, "source": "web"} for t in web[200:210]])
    heldout = write_shards(root / "heldout", [{"text": t, "source": "web"} for t in web[210:215]],
                           [{"text": t, "source": "web"} for t in web[250:256]]
                           + [{"text": t, "source": "book"} for t in book[-10:]])
    return {"web": web_shards, "heldout": heldout}


def _ablation(tmp_path: Path, arms: list[dict], eval_sets: list[dict], **extra) -> Path:
    cfg = {
        "name": "abl", "out": str(tmp_path / "abl"), "tokens": 512, "seeds": [0, 1],
        "pretrain": {"preset": "tiny", "model": {"max_seq_len": 64},
                     "train": {"batch_size": 4, "log_every": 2},
                     "eval": {"every": 2, "tokens": 1024}, "data": {"prefetch": 0}},
        "arms": arms, "eval_sets": eval_sets, **extra,
    }
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrain_cli_refuses_overwrite_then_resumes(shards, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["pretrain", "tiny", "--shards", str(shards), "--out", str(out), *TINY]
    r = runner.invoke(app, [*args, "--set", "train.max_steps=2"])
    assert r.exit_code == 0, r.output
    assert "checkpoint:" in r.output and "validation/bpb" in r.output
    r = runner.invoke(app, [*args, "--set", "train.max_steps=4"])
    assert r.exit_code == 1 and "pass --resume" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*args, "--set", "train.max_steps=4", "--resume"])
    assert r.exit_code == 0, r.output
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    r = runner.invoke(app, ["export-hf", str(tmp_path / "nothing"), str(tmp_path / "hf")])
    assert r.exit_code == 1 and "no checkpoint" in r.output
    r = runner.invoke(app, ["pretrain", "enormous", *TINY])
    assert r.exit_code == 1 and "unknown preset 'enormous'" in r.output


def test_ablation_config_overrides_and_errors(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.train.ablate import all_arms, baseline_arm, load_ablation_config

    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"tokens": 100, "arms": [{"name": "x", "shards": ["s1"]},
                                                            {"name": "y", "shards": ["s2"]}],
                                    "eval_sets": [{"name": "e", "path": "s3"}]}))
    cfg = load_ablation_config(path, ["tokens=500", "pretrain.train.lr=0.01"])
    assert (cfg.tokens, cfg.pretrain.train.lr, baseline_arm(cfg)) == (500, 0.01, "x")
    assert baseline_arm(load_ablation_config(path, ["baseline=y"])) == "y"
    with pytest.raises(ConfigError, match=r"a\.yaml: unknown key 'pretrain\.train\.lrr'"):
        load_ablation_config(path, ["pretrain.train.lrr=0.01"])
    with pytest.raises(ConfigError, match=r"a\.yaml: arms: names must be unique"):
        load_ablation_config(path, ["arms=[{name: x, shards: [s1]}, {name: x, shards: [s2]}]"])
    with pytest.raises(ConfigError, match=r"baseline: 'z' is not an arm"):
        load_ablation_config(path, ["baseline=z"])
    with pytest.raises(ConfigError, match=r"two or more arms"):
        load_ablation_config(path, ["arms=[{name: x, shards: [s1]}]"])
    with pytest.raises(ConfigError, match=r"'a b'"):
        load_ablation_config(path, ["arms=[{name: 'a b', shards: [s1]}, {name: y, shards: [s2]}]"])
    # the controls count as two arms and bring their own evaluation set
    cfg = load_ablation_config(path, ["arms=[]", "eval_sets=[]", "controls={labels: l.jsonl}"])
    assert [a.name for a in all_arms(cfg)] == ["control-high", "control-low"]


def test_paired_stats_on_known_numbers():
    from pipeline.train.ablate_report import NO_SPREAD, fmt_cell, fmt_paired, paired_difference

    base = {0: 1.0, 1: 2.0, 2: 3.0}
    # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, t(0.975, 2) = 4.302653 -> half width 0.248414
    p = paired_difference(base, {0: 1.1, 1: 2.3, 2: 3.2, 7: 9.0}, "lower")
    assert p["n"] == 3 and p["seeds"] == [0, 1, 2]
    assert p["mean"] == pytest.approx(0.2) and p["sd"] == pytest.approx(0.1)
    assert p["ci"] == pytest.approx([0.2 - 0.248414, 0.2 + 0.248414], abs=1e-5)
    assert p["verdict"] == "no difference beyond the interval"
    # differences -0.10, -0.11, -0.09: interval [-0.1248, -0.0752] excludes 0
    lower = {0: 0.9, 1: 1.89, 2: 2.91}
    assert paired_difference(base, lower, "lower")["verdict"] == "better"
    assert paired_difference(base, lower, "higher")["verdict"] == "worse"  # accuracy went down
    assert paired_difference(base, lower, "lower")["ci"] == pytest.approx([-0.124841, -0.075159], abs=1e-5)
    # one seed: a difference but no spread, never a zero-width interval
    one = paired_difference({0: 1.0}, {0: 1.25}, "lower")
    assert one["mean"] == pytest.approx(0.25) and one["ci"] is None and one["sd"] is None
    assert one["verdict"] == NO_SPREAD
    assert fmt_paired(one, "web") == ("+0.2500 (no interval)", NO_SPREAD)
    assert fmt_cell({"mean": 2.5, "std": None}) == "2.5000 (1 seed: no spread measured)"
    assert fmt_paired(paired_difference(base, lower, "lower"), "web")[1] == "better than web"
    assert paired_difference({0: 1.0}, {1: 1.0})["verdict"] == "no common seeds"


def test_parallel_processes_then_gather(shards, web_sets, tmp_path):
    """Processes train different seeds of one ablation at the same time (one by hand, the others through
    --jobs); every result survives and --gather writes the paired table (step-0 points, unigram baseline, plot). A finished run is not trained
    again; a run whose lock another process holds is skipped, not trained twice."""
    from pipeline.train.ablate import collect, file_lock, load_ablation_config, run_dir

    path = _ablation(tmp_path, [{"name": "web", "shards": [str(web_sets["web"])]},
                                {"name": "book", "shards": [str(shards)]}],
                     [{"name": "heldout", "path": str(web_sets["heldout"])}])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # seed 0 in another process, seed 1 here with --jobs 2 (each of its two runs in a process of its own)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ablate", str(path), "--seed", "0", "--no-gather"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = CliRunner().invoke(app, ["ablate", str(path), "--seed", "1", "--jobs", "2", "--no-gather"])
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert r.exit_code == 0, r.output
    out = tmp_path / "abl"
    for arm in ("web", "book"):
        assert f"[{arm} seed 1] process ended (ok)" in r.output
        assert f"[{arm} seed 1] 2 steps ->" in (out / "runs" / arm / "seed1.console.log").read_text()
        assert f"[{arm} seed 0] 2 steps ->" in output
    assert not (out / "results.json").exists()  # --no-gather: nothing gathered yet
    for run in (out / "runs").glob("*/seed*/"):  # equal budgets: 512 tokens = 2 steps of 4 x 64
        assert json.loads((run / "summary.json").read_text())["tokens"] == 512
        first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
        assert first["step"] == 0 and first["tokens"] == 0 and "eval/heldout/bpb" in first  # step-0 point
    assert len(list((out / "runs").glob("*/seed*/summary.json"))) == 4
    r = CliRunner().invoke(app, ["ablate", str(path), "--gather"])
    assert r.exit_code == 0, r.output
    assert "steps ->" not in r.output  # gathering trains nothing
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == {"expected": 4, "finished": 4, "missing": [], "stale": []}
    assert res["baseline"] == "web" and set(res["arms"]) == {"book", "web"} and res["metrics"] == ["eval/heldout/bpb"]
    for arm in res["arms"].values():
        cell = arm["metrics"]["eval/heldout/bpb"]
        assert len(cell["seeds"]) == 2 and cell["std"] > 0 and cell["min"] <= cell["mean"] <= cell["max"]
        assert 0.5 < cell["mean"] < 10
        assert 0.5 < arm["unigram"]["heldout"] < 20  # the unigram baseline of this arm's token frequencies
    p = res["paired"]["eval/heldout/bpb"]["book"]
    book = res["arms"]["book"]["metrics"]["eval/heldout/bpb"]["seeds"]
    web = res["arms"]["web"]["metrics"]["eval/heldout/bpb"]["seeds"]
    assert p["n"] == 2 and p["diffs"] == pytest.approx([book[s] - web[s] for s in ("0", "1")])
    assert p["ci"][0] < p["mean"] < p["ci"][1]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| web | " in md and "| book | " in md and "(baseline)" in md and "Δ vs web" in md
    assert "unigram bpb" in md and "± 0.0000" not in md
    assert "heldout bpb" in r.output and "Δ vs web" in r.output and "2 seeds" in r.output
    # a plain invocation reuses the finished runs
    r = CliRunner().invoke(app, ["ablate", str(path)])
    assert r.exit_code == 0 and r.output.count("already trained") == 4
    # another process holds seed 2's lock: this one skips it and says so
    path2 = _ablation(tmp_path, [{"name": "web", "shards": [str(web_sets["web"])]},
                                 {"name": "book", "shards": [str(shards)]}],
                      [{"name": "heldout", "path": str(web_sets["heldout"])}], seeds=[0, 1, 2])
    cfg = load_ablation_config(path2)
    with file_lock(run_dir(cfg, "web", 2).parent / "seed2.lock") as got:
        assert got
        r = CliRunner().invoke(app, ["ablate", str(path2), "--arm", "web", "--seed", "2", "--no-gather"])
    assert r.exit_code == 0, r.output
    assert f"being trained by pid {os.getpid()}: skipped" in r.output
    assert not (run_dir(cfg, "web", 2) / "summary.json").exists()
    runs, status = collect(cfg)
    assert len(runs) == 4 and status["missing"] == [{"arm": "web", "seed": 2}, {"arm": "book", "seed": 2}]
    r = CliRunner().invoke(app, ["ablate", str(path2), "--arm", "nope"])
    assert r.exit_code == 1 and "--arm nope: no such arm" in r.output
    # a run whose data changed under the same paths (a shard set rebuilt) is stale, not reused
    inputs = run_dir(cfg, "book", 0) / "inputs.json"
    inputs.write_text(json.dumps({"key": "another shard set"}))
    runs, status = collect(cfg)
    assert {"arm": "book", "seed": 0} in status["stale"] and len(runs) == 3


def test_check_arms_rejects_a_missing_eval_path(shards, tmp_path):
    path = _ablation(tmp_path, [{"name": "a", "shards": [str(shards)]}, {"name": "b", "shards": [str(shards)]}],
                     [{"name": "heldout", "path": str(tmp_path / "no-such.jsonl")}])
    r = CliRunner().invoke(app, ["ablate", str(path)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "eval set heldout" in r.output and "does not exist" in r.output
    assert not (tmp_path / "abl" / "runs").exists()  # refused before any training
    path = _ablation(tmp_path, [{"name": "a", "shards": [str(shards)]}, {"name": "b", "shards": [str(tmp_path)]}],
                     [{"name": "heldout", "path": str(shards)}])
    r = CliRunner().invoke(app, ["ablate", str(path)])
    assert r.exit_code == 1 and "arm b:" in r.output and "not a shard directory" in r.output


def test_an_arm_is_checked_and_gathered_while_another_is_still_being_built(shards, web_sets, tmp_path):
    """--arm a checks only arm a (arm b's shards are not built yet); the table names b as not overlap-checked;
    with controls, the first arm (whose tokenizer they use) is checked even when only a control arm is chosen."""
    from pipeline.errors import TextbookError
    from pipeline.train.ablate import check_arms, gather, load_ablation_config, prepare

    later = tmp_path / "b-shards"  # not built yet
    path = _ablation(tmp_path, [{"name": "a", "shards": [str(shards)]}, {"name": "b", "shards": [str(later)]}],
                     [{"name": "heldout", "path": str(web_sets["heldout"])}])
    cfg = load_ablation_config(path)
    with pytest.raises(TextbookError, match="arm b:.*not a shard directory"):
        check_arms(cfg)
    prepare(cfg, print, ["a"])
    assert json.loads((tmp_path / "abl" / "checks.json").read_text())["arms"] == ["a"]
    results = gather(cfg, print)
    assert "overlap with evaluation sets not checked for arm(s) b: their shards are not built" in results["checks"]
    first_missing = _ablation(tmp_path, [{"name": "a", "shards": [str(later)]}, {"name": "b", "shards": [str(shards)]}],
                              [], controls={"labels": str(tmp_path / "l.jsonl")})
    with pytest.raises(TextbookError, match="arm a:.*not a shard directory"):
        check_arms(load_ablation_config(first_missing), ["control-high"])


def test_overlap_warnings_eval_doc_in_an_arm_and_in_classifier_training(shared_data, web_sets, tmp_path):
    from pipeline.classify.overlap import write_training_hashes
    from pipeline.train.ablate import load_ablation_config, prepare

    web = _web_texts(shared_data)
    # an evaluation set of documents read directly: two pages an arm trains on (re-wrapped), three it does not
    docs = tmp_path / "eval.jsonl"
    picked = ["  " + web[3].upper(), web[7].replace(" ", "\n"), web[260], web[261], web[262]]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in picked))
    model = tmp_path / "clf"
    model.mkdir()
    write_training_hashes(model, [web[261], "unrelated page"])
    path = _ablation(tmp_path, [{"name": "web", "shards": [str(web_sets["web"])]},
                                {"name": "other", "shards": [str(web_sets["heldout"])]}],
                     [{"name": "docs", "path": str(docs)}, {"name": "heldout", "path": str(web_sets["heldout"])}],
                     classifier=str(model))
    logged: list[str] = []
    warnings = prepare(load_ablation_config(path), logged.append)
    assert "warning: eval set docs shares 2 of its 5 documents (40.0%) with arm web's training split" in warnings[0]
    assert any("eval set docs shares 1 of its 5 documents" in w and "classifier" in w for w in warnings)
    # heldout's validation split is not in any arm's training split (its train split is: not evaluated)
    assert not any("eval set heldout" in w for w in warnings)
    assert all(w in logged for w in warnings)
    assert json.loads((tmp_path / "abl" / "checks.json").read_text())["warnings"] == warnings


def test_controls_from_a_real_labelled_file(shared_data, web_sets, tmp_path):
    """High-label and low-label arms from real Llama-3-labelled FineWeb pages, built through the shard code;
    the held-out pages and the configured eval set's pages stay out of both arms; then a short ablation of
    the two controls runs end to end."""
    from pipeline.errors import TextbookError
    from pipeline.shards import open_shards
    from pipeline.train.ablate import build_controls, load_ablation_config
    from pipeline.train.ablate_data import doc_hash

    labels = shared_data / LABELS
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    score = {doc_hash(r["text"]): r["score"] for r in rows}
    eval_docs = tmp_path / "edu-eval.jsonl"  # a user eval set made of labelled pages: must stay out of the arms
    eval_docs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:40]))
    path = _ablation(tmp_path, [], [{"name": "edu-eval", "path": str(eval_docs)}], seeds=[0],
                     controls={"labels": str(labels), "high": ">=4", "low": "<1"})
    cfg = load_ablation_config(path)
    rec = build_controls(cfg, log=lambda m: None)
    root = tmp_path / "abl" / "controls"
    texts = {n: [d["text"] for d in open_shards(root / n).iter_documents(columns=["text"])]
             for n in ("high", "low", "heldout")}
    assert all(score[doc_hash(t)] >= 4 for t in texts["high"]) and len(texts["high"]) > 80
    assert all(score[doc_hash(t)] == 0 for t in texts["low"]) and len(texts["low"]) > 80
    assert all(score[doc_hash(t)] >= 4 for t in texts["heldout"]) and len(texts["heldout"]) > 15
    held = {doc_hash(t) for t in texts["heldout"]}
    in_eval = {doc_hash(r["text"]) for r in rows[:40]}
    for arm in ("high", "low"):
        hashes = {doc_hash(t) for t in texts[arm]}
        assert not hashes & held and not hashes & in_eval
    assert rec["counts"]["in_eval_sets"] == len(in_eval)
    chars = [sum(map(len, texts[a])) for a in ("high", "low")]  # balanced: equal unique text, to a page
    assert abs(chars[0] - chars[1]) < max(map(len, texts["low"] + texts["high"]))
    assert open_shards(root / "high").manifest["splits"]["train"]["sources"] == {
        "control-high": {"documents": len(texts["high"]), "tokens": rec["sets"]["high"]["train"]["tokens"]}}
    assert build_controls(cfg, log=lambda m: pytest.fail(m)) == rec  # built once, then reused
    # heldout: classifier holds out exactly the labelled pages the classifier was not trained on
    from pipeline.classify.overlap import write_training_hashes
    from pipeline.train.ablate import _unseen_by_classifier
    from pipeline.train.ablate_data import split_controls

    model = tmp_path / "clf"
    model.mkdir()
    write_training_hashes(model, [r["text"] for r in rows[::2]])  # "trained" on every other page
    cfg2 = load_ablation_config(path, [f"classifier={model}", "controls.heldout=classifier"])
    unseen = _unseen_by_classifier(cfg2, rows)
    assert unseen == {doc_hash(r["text"]) for r in rows[1::2]}
    pages = split_controls(rows, score_field="score", high=">=4", low="<1", heldout_fraction=0.2,
                           heldout_eval="high", exclude=set(), balance=False, heldout_pages=unseen)
    assert {doc_hash(t) for t in pages.heldout} == {doc_hash(r["text"]) for r in rows[1::2] if r["score"] >= 4}
    assert not {doc_hash(t) for t in pages.high + pages.low} & unseen
    with pytest.raises(TextbookError, match="training_hashes.npz"):
        _unseen_by_classifier(load_ablation_config(path, ["controls.heldout=classifier"]), rows)
    r = CliRunner().invoke(app, ["ablate", str(path)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert res["baseline"] == "control-high" and set(res["arms"]) == {"control-high", "control-low"}
    assert res["metrics"] == ["eval/edu-eval/bpb", "eval/heldout-labelled/bpb"]
    assert res["paired"]["eval/heldout-labelled/bpb"]["control-low"]["verdict"] == "no spread measured (1 seed)"
    md = (tmp_path / "abl" / "results.md").read_text()
    assert "(1 seed: no spread measured)" in md and "± 0.0000" not in md
    assert all(math.isfinite(a["unigram"]["heldout-labelled"]) for a in res["arms"].values())


def test_controls_section_says_whether_the_harness_separates(tmp_path):
    """Whatever the baseline arm, results carry the controls' own comparison (high minus low, paired by seed) and
    results.md says in words whether they separate on the held-out set; unknown until two common seeds."""
    from pipeline.train.ablate import _controls_comparison, load_ablation_config
    from pipeline.train.ablate_report import controls_markdown

    path = _ablation(tmp_path, [{"name": "web", "shards": ["s"]}], [], controls={"labels": "l.jsonl", "eval_name": "heldout"})
    cfg = load_ablation_config(path)
    held, arc = "eval/heldout/bpb", "eval/arc_easy/acc_norm"
    low = {held: {0: 2.60, 1: 2.62, 2: 2.61}, arc: {0: 0.25, 1: 0.27, 2: 0.26}}
    high = {held: {0: 2.50, 1: 2.53, 2: 2.51}, arc: {0: 0.26, 1: 0.25, 2: 0.28}}
    c = _controls_comparison(cfg, [held, arc], {"control-low": low, "control-high": high, "web": {}})
    assert c["separated"] is True and c["paired"][held]["verdict"] == "better"
    assert c["paired"][held]["mean"] == pytest.approx(-0.0967, abs=1e-4)
    md = "\n".join(controls_markdown({"controls": c}, 95))
    assert "**Yes**: control-high beats control-low beyond the 95 % interval on heldout" in md
    assert "| heldout bpb (lower is better) | -0.0967 [" in md and "better than control-low" in md
    mixed = {held: {0: 2.58, 1: 2.64, 2: 2.61}, arc: high[arc]}  # -0.02, +0.02, 0.00: no separation
    c = _controls_comparison(cfg, [held, arc], {"control-low": low, "control-high": mixed})
    assert c["separated"] is False
    assert "**No**" in "\n".join(controls_markdown({"controls": c}, 95))
    one = {held: {0: 2.50}, arc: {0: 0.3}}
    c = _controls_comparison(cfg, [held, arc], {"control-low": low, "control-high": one})
    assert c["separated"] is None and "Not known yet" in "\n".join(controls_markdown({"controls": c}, 95))
    assert controls_markdown({"controls": None}, 95) == []
