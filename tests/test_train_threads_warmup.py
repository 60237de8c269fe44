"""Trainer settings the ablation harness relies on: torch threads set explicitly, a warm-up that scales
with the budget, and the step-0 evaluation (curves that start at 0 tokens)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from train_helpers import (
    book_texts,
    one_thread,  # noqa: F401 - autouse fixture: one torch thread
    read_log,
    tiny_cfg,
    write_shards,
)

from pipeline.train.trainer import cpu_threads, lr_factor, train, warmup_steps


@pytest.fixture(scope="module")
def small_shards(shared_data, tmp_path_factory):
    texts = book_texts(shared_data)
    return write_shards(tmp_path_factory.mktemp("thr") / "s", [{"text": t, "source": "book"} for t in texts[:20]],
                        [{"text": t, "source": "book"} for t in texts[-3:]])


def test_threads_are_set_from_config_env_or_affinity(small_shards, tmp_path, monkeypatch):
    cfg = tiny_cfg(max_steps=1, threads=2)
    s = train(cfg, tmp_path / "a", shards=[str(small_shards)], progress=False, log=lambda m: None)
    assert s["threads"] == 2 and torch.get_num_threads() == 2
    # unset: $OMP_NUM_THREADS (the fixture says 1)
    s = train(tiny_cfg(max_steps=1), tmp_path / "b", shards=[str(small_shards)], progress=False, log=lambda m: None)
    assert s["threads"] == 1 and torch.get_num_threads() == 1
    # no step-0 evaluation unless asked: the first evaluation is after step 1
    assert min(r["step"] for r in read_log(tmp_path / "b") if "eval/validation/bpb" in r) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads() == len(os.sched_getaffinity(0))
    assert cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert cpu_threads() == len(os.sched_getaffinity(0))


def test_step0_evaluation(small_shards, tmp_path):
    cfg = tiny_cfg(max_steps=2)
    cfg.eval.initial = True
    train(cfg, tmp_path / "r", shards=[str(small_shards)], progress=False, log=lambda m: None)
    evals = [r for r in read_log(tmp_path / "r") if "eval/validation/bpb" in r]
    assert [(r["step"], r["tokens"]) for r in evals][0] == (0, 0)
    assert evals[0]["eval/validation/bpb"] > evals[-1]["eval/validation/bpb"]  # the untrained model is worse


def test_warmup_scales_with_the_ablation_budget(tmp_path):
    from pipeline.train.ablate import ArmSection, load_ablation_config, run_config

    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({
        "tokens": 100, "pretrain": {"preset": "tiny", "model": {"max_seq_len": 64}, "train": {"batch_size": 4}},
        "arms": [{"name": "x", "shards": ["s1"]}, {"name": "y", "shards": ["s2"]}],
        "eval_sets": [{"name": "e", "path": "s3"}]}))
    arm = ArmSection(name="x", shards=["s1"])
    per_step = 4 * 64
    got = {}
    for steps in (40, 400):
        t = run_config(load_ablation_config(path, [f"tokens={steps * per_step}"]), arm, 0).train
        assert t.max_steps == steps and t.warmup_fraction == pytest.approx(0.1)  # tiny: 20 of its 200 steps
        got[steps] = warmup_steps(t)
        assert lr_factor(got[steps] - 1, t) == pytest.approx(1.0) and lr_factor(0, t) == pytest.approx(1 / got[steps])
    assert got == {40: 4, 400: 40}
    # a warm-up the ablation sets itself is kept as it is
    t = run_config(load_ablation_config(path, [f"tokens={400 * per_step}", "pretrain.train.warmup_steps=7"]),
                   arm, 0).train
    assert (t.warmup_fraction, warmup_steps(t)) == (None, 7)
