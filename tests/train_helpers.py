"""Shard sets and configs shared by the tests/test_train_*.py files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config.pretrain import PretrainSection
from pipeline.shards import ShardSetWriter
from pipeline.tokenizer import load_tokenizer

BOOK = "textbooks/openstax_intro_python/modules_plaintext.jsonl"
WEB = "web/fineweb_sample_300"


def book_texts(shared_data: Path) -> list[str]:
    with open(shared_data / BOOK, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_shards(out: Path, train_docs: list[dict], val_docs: list[dict], row_group_bytes: int = 40_000) -> Path:
    w = ShardSetWriter(out, load_tokenizer(), row_group_bytes=row_group_bytes, batch_size=16)
    w.add("train", train_docs)
    if val_docs:
        w.add("validation", val_docs)
    w.finalize()
    return out


def book_shards(shared_data: Path, out: Path) -> Path:
    """The OpenStax Python book (real text): 105 modules to train on, 10 held out."""
    texts = book_texts(shared_data)
    return write_shards(out, [{"text": t, "source": "book"} for t in texts[:-10]],
                        [{"text": t, "source": "book"} for t in texts[-10:]])


def tiny_cfg(**train: object) -> PretrainSection:
    """The tiny preset at a short context, small batches: seconds on 2 CPU cores."""
    t = {"batch_size": 4, "max_steps": 20, "log_every": 1, "checkpoint_every": 10, "warmup_steps": 5, "lr": 3e-3}
    t.update(train)
    return PretrainSection.model_validate({"preset": "tiny", "model": {"max_seq_len": 64}, "train": t,
                                          "eval": {"every": 10, "tokens": 2048}, "data": {"prefetch": 1}})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Two torch threads on a shared 2-core machine spin against each other (10x slower): use one.
    The trainer sets its threads from train.threads, else $OMP_NUM_THREADS: both say one here.
    Import it into a test module to apply it there."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
