"""Shard format v1: round trips, manifest totals, atomic writes, refusal of mixed shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.errors import TextbookError
from pipeline.shards import SHARD_SCHEMA, ShardSetWriter, open_shards
from pipeline.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def real_docs(shared_data: Path, n: int = 300) -> list[dict]:
    rows = []
    with open(shared_data / "textbooks/openstax_intro_python/modules_plaintext.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            rec = json.loads(line)
            rows.append({"text": rec["text"], "source": "synthetic" if i % 3 else "web",
                         "edu_score": None if i % 4 == 0 else float(i % 6),  # nulls in the first batch too
                         "topic": rec.get("title"), "url": None if i % 2 else f"https://example.org/{i}"})
    return rows


def write_set(out: Path, tok, docs: list[dict], **kw) -> dict:
    w = ShardSetWriter(out, tok, **kw)
    w.add("train", docs[: int(len(docs) * 0.9)])
    w.add("validation", docs[int(len(docs) * 0.9):])
    return w.finalize(stage_stats={"dedup": {"read": 1, "kept": 1}}, config={"k": 1}, config_hash="abc")


def test_round_trip_open_shards_pandas_datasets(tmp_path, tok, shared_data):
    docs = real_docs(shared_data)
    m = write_set(tmp_path / "out", tok, docs, shard_bytes=200_000, row_group_bytes=50_000, batch_size=16)
    shards = open_shards(tmp_path / "out")
    assert len(shards.files("train")) > 1, "small shard_bytes should cut several shards"
    assert all("-of-" in f.name for f in shards.files())

    df = shards.to_pandas()
    assert len(df) == len(docs)
    by_text = {d["text"] for d in docs}
    assert set(df["text"]) == by_text
    for _, row in df.sample(20, random_state=0).iterrows():
        assert shards.decode(row["input_ids"]) == row["text"]
        assert row["input_ids"][-1] == tok.eos_id
        assert row["num_tokens"] == len(row["input_ids"])

    raw = pd.concat([pd.read_parquet(f) for f in shards.files()], ignore_index=True)
    assert len(raw) == len(docs)
    assert pq.read_schema(shards.files()[0]).remove_metadata().equals(SHARD_SCHEMA)

    from datasets import load_dataset

    ds = load_dataset(str(tmp_path / "out"))
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows + ds["validation"].num_rows == len(docs)
    assert ds["train"].num_rows == m["splits"]["train"]["documents"]
    assert shards.to_dataset()["validation"].num_rows == m["splits"]["validation"]["documents"]


def test_manifest_totals_equal_sums_over_shards(tmp_path, tok, shared_data):
    m = write_set(tmp_path / "out", tok, real_docs(shared_data, 120), shard_bytes=100_000)
    on_disk = json.loads((tmp_path / "out/manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(m, default=str))
    total_docs = total_tokens = 0
    for _split, s in m["splits"].items():
        split_docs = split_tokens = 0
        for f in s["files"]:
            t = pq.read_table(tmp_path / "out" / f["path"], columns=["num_tokens", "source"])
            assert t.num_rows == f["documents"]
            assert sum(t["num_tokens"].to_pylist()) == f["tokens"]
            split_docs += t.num_rows
            split_tokens += f["tokens"]
        assert (split_docs, split_tokens) == (s["documents"], s["tokens"])
        assert sum(c["documents"] for c in s["sources"].values()) == s["documents"]
        assert sum(c["tokens"] for c in s["sources"].values()) == s["tokens"]
        total_docs += split_docs
        total_tokens += split_tokens
    assert m["totals"] == {"documents": total_docs, "tokens": total_tokens}
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["schema_version"] == 1
    assert (tmp_path / "out/tokenizer.json").read_bytes() == tok.path.read_bytes()
    card = (tmp_path / "out/README.md").read_text()
    assert card.startswith("---\nconfigs:") and "path: data/train-*" in card


def test_never_writes_an_empty_shard(tmp_path, tok):
    w = ShardSetWriter(tmp_path / "out", tok)
    w.add("train", [{"text": "only training text", "source": "web"}])
    m = w.finalize()
    assert list(m["splits"]) == ["train"]
    assert not list((tmp_path / "out/data").glob("validation-*"))
    w2 = ShardSetWriter(tmp_path / "empty", tok)
    with pytest.raises(TextbookError, match="no documents"):
        w2.finalize()
    assert not (tmp_path / "empty/data").exists() and not (tmp_path / "empty/manifest.json").exists()


def test_refuses_other_tokenizer_and_mixed_shards(tmp_path, tok):
    out = tmp_path / "out"
    w = ShardSetWriter(out, tok)
    w.add("train", [{"text": "a document", "source": "web"}])
    w.finalize()
    m = json.loads((out / "manifest.json").read_text())
    m["tokenizer"]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TextbookError, match="another tokenizer"):
        ShardSetWriter(out, tok)
    with pytest.raises(TextbookError, match="another tokenizer"):
        open_shards(out)
    m["tokenizer"]["sha256"] = tok.sha256
    (out / "manifest.json").write_text(json.dumps(m))
    stray = out / "data" / "train-00009-of-00010.parquet"
    pq.write_table(pq.read_table(next((out / "data").glob("train-*"))), stray)
    with pytest.raises(TextbookError, match="not listed in the manifest"):
        open_shards(out)


KILL_SCRIPT = r"""
import sys, itertools
from pipeline.shards import ShardSetWriter
from pipeline.tokenizer import load_tokenizer
w = ShardSetWriter(sys.argv[1], load_tokenizer(), shard_bytes=1 << 40, row_group_bytes=20_000)
words = "the quick brown fox jumps over the lazy dog while learning algebra".split()
def docs():
    for i in itertools.count():
        yield {"text": " ".join(words[(i + j) % len(words)] for j in range(200)), "source": "web"}
w.add("train", docs())   # never ends: killed mid-shard
"""


def test_writer_killed_mid_shard_leaves_no_visible_partial(tmp_path, tok):
    out = tmp_path / "out"
    # A previous good shard set must survive an interrupted rewrite untouched.
    w = ShardSetWriter(out, tok)
    w.add("train", [{"text": f"earlier document {i}", "source": "web"} for i in range(10)])
    before = w.finalize()
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 120
        partial: list[Path] = []
        while time.monotonic() < deadline and not partial:
            partial = [p for p in out.glob(".tmp-*/data/*.partial") if p.stat().st_size > 100_000]
            if proc.poll() is not None:
                pytest.fail("writer exited before it was killed")
            time.sleep(0.05)
        assert partial, "writer never started a shard"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    visible = sorted(p.name for p in (out / "data").iterdir())
    assert visible == [f["path"].split("/")[1] for f in before["splits"]["train"]["files"]]
    again = open_shards(out)
    assert again.manifest["totals"] == before["totals"]
    assert len(again.to_pandas()) == 10
    # the next successful write replaces the set and clears the leftover
    w = ShardSetWriter(out, tok)
    w.add("train", [{"text": "new", "source": "web"}])
    w.finalize()
    assert open_shards(out).manifest["totals"]["documents"] == 1


def test_datasets_loads_each_folders_own_rows_whatever_its_cache_holds(tmp_path, tok, shared_data, monkeypatch):
    """Issue 16: `datasets` caches a local folder by its name; two shard sets in two folders of the same name (and
    one folder rewritten) must each load their own rows, through load_dataset(dir) and through load_hf."""
    import datasets
    from datasets import load_dataset

    from pipeline.shards import file_sha256, load_hf

    cache = tmp_path / "hf-datasets-cache"  # one cache shared by every load below
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    docs = real_docs(shared_data, 120)
    sets = {tmp_path / "run-a" / "quickstart": docs[:80], tmp_path / "run-b" / "quickstart": docs[80:]}
    for folder, own in sets.items():
        m = write_set(folder, tok, own)
        for f in (f for s in m["splits"].values() for f in s["files"]):
            assert f["sha256"] == file_sha256(folder / f["path"])
    fingerprints = {open_shards(folder).fingerprint for folder in sets}
    assert len(fingerprints) == 2

    def texts(ds) -> list[str]:
        return sorted(t for split in ds for t in ds[split]["text"])

    for folder, own in [*sets.items(), *sets.items()]:  # a, b, then a and b again from a warm cache
        assert texts(load_dataset(str(folder))) == sorted(d["text"] for d in own), folder
        assert texts(load_hf(folder)) == sorted(d["text"] for d in own), folder
    assert load_hf(folder, "validation").num_rows == open_shards(folder).manifest["splits"]["validation"]["documents"]

    # the same folder rewritten by a new run: the new rows, not the cached old ones
    a = tmp_path / "run-a" / "quickstart"
    write_set(a, tok, docs[10:50])
    assert texts(load_dataset(str(a))) == sorted(d["text"] for d in docs[10:50])
    assert texts(load_hf(a)) == sorted(d["text"] for d in docs[10:50])

    # a shard set written before the fingerprint existed: load_hf still keys the cache by the files' content
    old = tmp_path / "run-c" / "quickstart"
    write_set(old, tok, docs[:30])
    manifest = json.loads((old / "manifest.json").read_text())
    fp = manifest.pop("fingerprint")
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert open_shards(old).fingerprint == fp
    assert texts(load_hf(old)) == sorted(d["text"] for d in docs[:30])
