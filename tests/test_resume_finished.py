"""Issue 16: resuming a pretraining run that already finished changes nothing and says so; a run whose final
checkpoint was saved but whose summary.json was lost (or blanked) gets its summary back from its log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import book_shards, one_thread, tiny_cfg  # noqa: F401 - autouse fixture: one torch thread
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.train.trainer import train

TINY = ["--set", "model.max_seq_len=64", "--set", "train.batch_size=2", "--set", "eval.tokens=1024",
        "--set", "train.max_steps=4", "--set", "train.log_every=1", "--set", "eval.every=2",
        "--set", "train.checkpoint_every=2", "--set", "data.prefetch=0"]


@pytest.fixture(scope="module")
def shards(shared_data, tmp_path_factory) -> Path:
    return book_shards(shared_data, tmp_path_factory.mktemp("resume") / "book")


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run directory: its bytes and its modification time (ns)."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_pretrain_resume_of_a_finished_run_changes_nothing_and_says_so(shards, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["pretrain", "tiny", "--shards", str(shards), "--out", str(out), *TINY]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] is not None and summary["final_val_bpb"] is not None
    before = snapshot(out)

    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # rich wraps long lines
    assert "this run already finished" in said and "nothing to train" in said
    loss_row = next(line for line in r.output.splitlines() if "final train loss" in line)
    assert str(summary["final_loss"]) in loss_row  # the finished run's loss, not None
    assert snapshot(out) == before  # summary.json, log.jsonl and the checkpoints: not a byte nor a timestamp


def test_summary_of_a_finished_run_is_rebuilt_from_its_log(shards, tmp_path):
    """Killed between the final checkpoint and summary.json (lost), or a summary.json that an earlier version
    rewrote with null losses (blanked): resume="auto" (the pretrain stage, ablate) and --resume give back the
    summary the run wrote when it finished."""
    out = tmp_path / "run"
    cfg = tiny_cfg(max_steps=4, checkpoint_every=2, log_every=1)
    cfg.eval.every = 2
    whole = train(cfg, out, shards=[str(shards)], progress=False)
    assert whole["final_loss"] is not None and whole["evals"]
    log_before = (out / "log.jsonl").read_bytes()
    for damage, resume in (("lost", "auto"), ("blanked", True)):
        if damage == "lost":
            (out / "summary.json").unlink()
        else:
            (out / "summary.json").write_text(json.dumps({**whole, "final_loss": None, "final_val_loss": None,
                                                          "final_val_bpb": None, "evals": {}}))
        messages: list[str] = []
        again = train(cfg, out, shards=[str(shards)], resume=resume, progress=False, log=messages.append)
        assert again == whole, damage
        assert json.loads((out / "summary.json").read_text()) == whole, damage
        assert (out / "log.jsonl").read_bytes() == log_before, damage
        assert any("nothing to train" in m for m in messages), messages
