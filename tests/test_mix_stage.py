"""The shard stage: weights, validation split, deterministic shuffle, target tokens, manifest accounting."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from pipeline import run as runmod
from pipeline.config import load_config
from pipeline.errors import TextbookError
from pipeline.mix import copies_for, is_validation
from pipeline.shards import open_shards


def make_docs(shared_data, n_web=150, n_syn=60):
    with open(shared_data / "textbooks/openstax_intro_python/modules_plaintext.jsonl") as f:
        book = [json.loads(x)["text"] for x in f]
    fw = json.loads((shared_data / "web/fineweb_sample_300/fineweb_subset.json").read_text())
    docs = [{"id": f"w{i}", "text": r["original_text"], "source": "web", "edu_score": 2.0} for i, r in enumerate(fw[:n_web])]
    docs += [{"id": f"s{i}", "text": t, "source": "synthetic", "edu_score": 4.0} for i, t in enumerate(book[:n_syn])]
    return docs


def run_shard(tmp_path, docs, *sets, name="out", stages="[shard]"):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs) + "{broken json\n")
    cfg = load_config(None, [f"run.out={tmp_path / name}", f"shard.inputs=[{src}]", f"run.stages={stages}",
                             "shard.validation_fraction=0.1", *sets])
    return runmod.run_pipeline(cfg, log=lambda m: None)["shard"], tmp_path / name


def test_mix_weights_split_and_manifest(shared_data, tmp_path):
    docs = make_docs(shared_data) + [{"id": "empty", "text": "  ", "source": "web"},
                                     {"id": "huge", "text": "x " * 60_000, "source": "web"}]
    stats, out = run_shard(tmp_path, docs, "shard.max_chars=100000", "shard.weights.web=0.5",
                           "shard.weights.synthetic=2")
    assert stats["reconciled"] and stats["read"] == len(docs) + 1
    assert stats["errored"] == {"malformed_json": 1}
    assert stats["dropped"]["empty_text"] == 1 and stats["dropped"]["too_long"] == 1
    shards = open_shards(out)
    m = shards.manifest
    df = shards.to_pandas(columns=["id", "source", "meta", "num_tokens", "input_ids"])
    train, val = df[df.split == "train"], df[df.split == "validation"]
    # validation: by id hash, each doc once, never in train
    assert set(val.id) == {d["id"] for d in docs[:-2] if is_validation(d["id"], 0.1)}
    assert not set(val.id) & set(train.id) and val.id.is_unique
    counts = Counter(train.id)
    syn = [d["id"] for d in docs if d["source"] == "synthetic" and not is_validation(d["id"], 0.1)]
    assert all(counts[i] == 2 for i in syn)  # synthetic x2 epochs
    web_train = [d["id"] for d in docs[:150] if not is_validation(d["id"], 0.1)]
    kept_web = [i for i in web_train if counts[i]]
    assert all(counts[i] == 1 for i in kept_web) and 0.3 < len(kept_web) / len(web_train) < 0.7  # x0.5
    assert kept_web == [i for i in web_train if copies_for(0.5, i, 0)]  # deterministic by id
    assert stats["dropped"]["sampled_out"] == len(web_train) - len(kept_web)
    # repeats carry their epoch; token ids decode back to the text
    assert sum(isinstance(x, str) and '"copy": 1' in x for x in train.meta) == len(syn)
    row = shards.iter_documents(split="validation").__next__()
    assert shards.decode(row["input_ids"]) == row["text"]
    # manifest: totals and accounting
    assert m["totals"]["documents"] == len(df) and m["totals"]["tokens"] == int(df.num_tokens.sum())
    acc = m["stages"]["shard"]["accounting"]
    assert acc["adds_up"] and acc["input"] == stats["read"] and acc["kept"] == stats["kept"]
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()


def test_shuffle_is_deterministic_by_seed_and_target_tokens(shared_data, tmp_path):
    docs = make_docs(shared_data, 60, 20)
    _, a = run_shard(tmp_path, docs, name="a")
    _, b = run_shard(tmp_path, docs, name="b")
    _, c = run_shard(tmp_path, docs, "shard.seed=7", name="c")
    order = [pq.read_table(open_shards(x).files("train")[0], columns=["id"]).column("id").to_pylist()
             for x in (a, b, c)]
    assert order[0] == order[1] and order[0] != order[2] and sorted(order[0]) == sorted(order[2])
    assert order[0] != sorted(order[0], key=lambda i: (i[0] != "w", int(i[1:])))  # not input order
    stats, d = run_shard(tmp_path, docs, "shard.target_tokens=20000", name="d")
    train_tokens = open_shards(d).manifest["splits"]["train"]["tokens"]
    assert 0.6 * 20000 < train_tokens < 1.4 * 20000 and stats["weight_scale"] < 1


def test_many_buckets_same_rows(shared_data, tmp_path):
    docs = make_docs(shared_data, 100, 30)
    _, one = run_shard(tmp_path, docs, "shard.weights.synthetic=3", name="one")
    stats, many = run_shard(tmp_path, docs, "shard.weights.synthetic=3", "shard.shuffle_buffer_mb=1", name="many")
    assert stats["shuffle_buckets"] > 1
    a, b = (open_shards(x).to_pandas(columns=["id", "num_tokens"]) for x in (one, many))
    assert Counter(zip(a.split, a.id, strict=True)) == Counter(zip(b.split, b.id, strict=True)) and a.num_tokens.sum() == b.num_tokens.sum()


def test_full_chain_accounting_and_errors(shared_data, tmp_path):
    docs = make_docs(shared_data, 40, 10)
    docs.append({**docs[0], "id": "dup-of-w0"})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = load_config(None, [f"run.out={tmp_path / 'run'}", f"dedup.inputs=[{src}]",
                             "run.stages=[dedup, shard]", "shard.validation_fraction=0"])
    res = runmod.run_pipeline(cfg, log=lambda m: None)
    m = open_shards(tmp_path / "run").manifest
    acc = m["stages"]["shard"]["accounting"]
    assert acc["adds_up"] and acc["input"] == len(docs) and acc["duplicate"] == 1 and acc["chain"] == ["dedup", "shard"]
    assert m["stages"]["dedup"]["kept"] == res["shard"]["read"]
    # a shard stage whose input stage never ran: one-line error, no shard set written
    cfg = load_config(None, [f"run.out={tmp_path / 'run2'}", "run.stages=[dedup, shard]"])
    with pytest.raises(TextbookError, match="dedup"):
        runmod.run_one(cfg, "shard", planned=["dedup", "shard"], log=lambda m: None)
    assert not (tmp_path / "run2/manifest.json").exists()
    # everything filtered: no partial or empty shard set
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "e", "text": " "}) + "\n")
    cfg = load_config(None, [f"run.out={tmp_path / 'run3'}", f"shard.inputs=[{empty}]", "run.stages=[shard]"])
    with pytest.raises(TextbookError, match="no documents"):
        runmod.run_pipeline(cfg, log=lambda m: None)
    assert not (tmp_path / "run3/manifest.json").exists() and not list((tmp_path / "run3").glob("data/*"))


def test_meta_carries_provenance_not_token_ids(shared_data, tmp_path):
    _, out = run_shard(tmp_path, make_docs(shared_data, 10, 5), name="m")
    metas = [json.loads(m) for m in open_shards(out).to_pandas(columns=["meta"]).meta if isinstance(m, str)]
    assert metas and not any("input_ids" in m for m in metas) and all(m.get("copy") == 1 for m in metas)
