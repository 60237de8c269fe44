"""Scale-out (issue 18): the Ray task versions of dedup, decontaminate and shard give what one process gives.

Every comparison runs the same stage twice on the same inputs, once with `run.executor: local` (the
single-process code) and once as Ray tasks on the session's shared local Ray (2 CPUs), and checks the outputs
row by row and the stats figure by figure (timings and the engine description aside).
"""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from pipeline import run as runmod
from pipeline.config import load_config
from pipeline.documents import iter_documents

TIMING = {"seconds", "seconds_hash", "seconds_exact", "seconds_buckets", "seconds_cluster", "docs_per_second",
          "engine", "pairs_file", "tokens_per_second", "seconds_tokenize", "output_dir"}


def corpus_files(shared_data, tmp_path, n_files=4, n_copies=80, seed=3):
    """Real documents (dolma CC, FineWeb, OpenStax) with near copies, exact copies and a broken line, over
    several input files (jsonl and parquet)."""
    from _dedup_planting import perturb, real_documents

    rng = random.Random(seed)
    base = real_documents(shared_data)[:400]
    vocab = [w for d in base[:50] for w in d["text"].split()]
    docs = [dict(d, edu_score=round(rng.uniform(0, 5), 1)) for d in base]
    for k in range(n_copies):
        d = rng.choice(base)
        text = d["text"] if k % 4 == 0 else perturb(d["text"], rng, vocab, rng.uniform(0.0, 0.08))
        docs.append({"id": f"copy-{k}", "text": text, "source": rng.choice(["web", "synthetic"]),
                     "edu_score": round(rng.uniform(0, 5), 1)})
    docs.append({"id": "blank", "text": "  \n", "source": "web"})
    rng.shuffle(docs)
    paths = []
    per = len(docs) // n_files + 1
    for i in range(n_files):
        part = docs[i * per:(i + 1) * per]
        if i == 1:
            import pyarrow as pa

            path = tmp_path / f"in-{i}.parquet"
            pq.write_table(pa.Table.from_pylist(part), path)
        else:
            path = tmp_path / f"in-{i}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in part) + ("{broken\n" if i == 0 else ""))
        paths.append(path)
    return paths, docs


def run_stage(tmp_path, name, stage, inputs, *sets):
    cfg = load_config(None, [f"run.out={tmp_path / name}", f"{stage}.inputs={json.dumps([str(p) for p in inputs])}",
                             f"run.stages=[{stage}]", *sets])
    stats = runmod.run_pipeline(cfg, log=lambda m: None)[stage]
    return stats, tmp_path / name / "stages" / stage


def comparable(stats):
    return {k: v for k, v in stats.items() if k not in TIMING}


def docs_of(path):
    return [(d["id"], d["text"], d.get("meta")) for d in iter_documents([path])] if path.exists() else []


def test_dedup_on_ray_equals_local(shared_data, tmp_path, ray_session, monkeypatch):
    from pipeline import dedup_dist

    monkeypatch.setattr(dedup_dist, "ROWS_PER_TASK", 150)  # several hash ranges per band: buckets split over tasks
    monkeypatch.setattr(dedup_dist, "CLUSTER_ROWS", 30)  # and components over several cluster tasks
    inputs, _ = corpus_files(shared_data, tmp_path)
    local, out_l = run_stage(tmp_path, "local", "dedup", inputs)
    dist, out_r = run_stage(tmp_path, "ray", "dedup", inputs, "run.executor=ray")
    assert dist["engine"]["executor"] == "ray" and dist["engine"]["band_tasks"] > 22
    assert local["dropped"].get("near_duplicate", 0) > 10 and local["dropped"].get("exact_duplicate", 0) > 5
    assert comparable(dist) == comparable(local)
    assert docs_of(out_r / "kept") == docs_of(out_l / "kept")  # same survivors, in the same order
    for reason in ("exact_duplicate", "near_duplicate", "empty_text"):
        assert sorted(docs_of_glob(out_r, reason)) == sorted(docs_of_glob(out_l, reason))
    assert pq.read_table(out_r / "pairs.parquet").equals(pq.read_table(out_l / "pairs.parquet"))
    # clustering ran as several tasks over whole components, not in the driver
    assert dist["engine"]["cluster_tasks"] > 1 and dist["engine"]["component_rounds"] >= 1
    assert_same_index(out_r / "index", out_l / "index")


def assert_same_index(a, b):
    """The dedup index a later run reads (dedup.index_in): the same rows, bytes and ids."""
    for name in ("sig.u32", "band.u64", "exact.u64"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert pq.read_table(a / "docs.parquet").column("id").to_pylist() == \
        pq.read_table(b / "docs.parquet").column("id").to_pylist()
    meta_a, meta_b = (json.loads((d / "index.json").read_text()) for d in (a, b))
    assert {k: v for k, v in meta_a.items() if k != "created"} == {k: v for k, v in meta_b.items() if k != "created"}


def test_dedup_on_ray_against_an_earlier_index_equals_local(shared_data, tmp_path, ray_session, monkeypatch):
    """A second run deduplicated against the first run's index (dedup.index_in): documents that copy the
    earlier run are removed with kept_from_earlier_run, the earlier rows never are, the new index holds both."""
    from pipeline import dedup_dist

    monkeypatch.setattr(dedup_dist, "ROWS_PER_TASK", 150)
    monkeypatch.setattr(dedup_dist, "CLUSTER_ROWS", 30)
    inputs, _ = corpus_files(shared_data, tmp_path)
    run_stage(tmp_path, "first", "dedup", inputs[:2])
    earlier = tmp_path / "earlier-index"
    (tmp_path / "first/stages/dedup/index").rename(earlier)
    sets = [f"dedup.index_in=[{earlier}]"]
    local, out_l = run_stage(tmp_path, "local", "dedup", inputs[2:], *sets)
    dist, out_r = run_stage(tmp_path, "ray", "dedup", inputs[2:], *sets, "run.executor=ray")
    assert local["prior_index_documents"] > 100
    from_earlier = [m for _, m in docs_of_glob(out_l, "near_duplicate") + docs_of_glob(out_l, "exact_duplicate")
                    if m["kept_from_earlier_run"]]
    assert len(from_earlier) > 3
    assert comparable(dist) == comparable(local)
    assert docs_of(out_r / "kept") == docs_of(out_l / "kept")
    for reason in ("exact_duplicate", "near_duplicate"):
        assert sorted(docs_of_glob(out_r, reason)) == sorted(docs_of_glob(out_l, reason))
    assert pq.read_table(out_r / "pairs.parquet").equals(pq.read_table(out_l / "pairs.parquet"))
    assert_same_index(out_r / "index", out_l / "index")


def survivor_order_corpus(shared_data, tmp_path):
    """Where only the survivor order decides: no edu scores or equal ones (the id breaks the tie), ids not in
    row order, exact groups whose first row is not their best member and that have near copies of their own,
    and one family of 60 near copies (buckets larger than the pairing window)."""
    from _dedup_planting import perturb, real_documents

    rng = random.Random(11)
    base = real_documents(shared_data)[:40]
    vocab = [w for d in base for w in d["text"].split()][:5000]
    docs = []
    for i, d in enumerate(base[:30]):
        score = None if i % 3 else 2.5
        for _ in range(3):  # an exact group
            docs.append({"text": d["text"], "edu_score": score, "source": "web"})
        for c in range(3):  # near copies of it, some above the group in survivor order
            docs.append({"text": perturb(d["text"], rng, vocab, 0.03), "edu_score": score if c else 4.0,
                         "source": rng.choice(["web", "synthetic"])})
    for k in range(60):
        text = perturb(base[35]["text"], rng, vocab, rng.uniform(0.002, 0.01))
        docs += [{"text": text, "source": "web"}] * (3 if k % 6 == 0 else 1)  # exact groups inside the family
    docs += [{"text": d["text"], "source": "web"} for d in base[30:35]]
    rng.shuffle(docs)
    names = [f"id-{rng.getrandbits(40):012x}" for _ in docs]  # random ids: their order is not the rows'
    paths = []
    for k in range(3):
        path = tmp_path / f"order-{k}.jsonl"
        path.write_text("".join(json.dumps({**d, "id": names[i]}) + "\n" for i, d in enumerate(docs) if i % 3 == k))
        paths.append(path)
    return paths


def test_dedup_on_ray_survivor_order_equals_local(shared_data, tmp_path, ray_session, monkeypatch):
    from pipeline import dedup_dist

    monkeypatch.setattr(dedup_dist, "ROWS_PER_TASK", 100)
    monkeypatch.setattr(dedup_dist, "CLUSTER_ROWS", 20)
    inputs = survivor_order_corpus(shared_data, tmp_path)
    local, out_l = run_stage(tmp_path, "local", "dedup", inputs)
    dist, out_r = run_stage(tmp_path, "ray", "dedup", inputs, "run.executor=ray")
    assert local["dropped"]["exact_duplicate"] >= 10 and local["dropped"]["near_duplicate"] >= 100
    assert dist["engine"]["cluster_tasks"] > 1
    assert comparable(dist) == comparable(local)
    assert docs_of(out_r / "kept") == docs_of(out_l / "kept")
    for reason in ("exact_duplicate", "near_duplicate"):
        assert sorted(docs_of_glob(out_r, reason)) == sorted(docs_of_glob(out_l, reason))
    assert pq.read_table(out_r / "pairs.parquet").equals(pq.read_table(out_l / "pairs.parquet"))


def test_dedup_invalid_edu_scores_cost_no_document_on_either_path(shared_data, tmp_path, ray_session):
    """A score that is text, an infinity, NaN or a boolean (an upstream bug) stopped dedup on both paths
    (`float('high')`), and an infinity won every survivor choice and reached the shards. Now it ranks as
    unscored, is counted as the repair invalid_edu_score, and the document keeps the value as read in meta."""
    from _dedup_planting import real_documents

    base = real_documents(shared_data)[:12]
    bad = ["high", float("inf"), float("nan"), True]
    docs = []
    for i, d in enumerate(base):
        docs.append({"id": f"bad-{i}", "text": d["text"], "edu_score": bad[i % 4], "source": "web"})
        docs.append({"id": f"ok-{i}", "text": d["text"], "edu_score": 1.0, "source": "web"})  # an exact copy
    inputs = [tmp_path / "scores-0.jsonl", tmp_path / "scores-1.jsonl"]
    for k, path in enumerate(inputs):
        path.write_text("".join(json.dumps(d) + "\n" for d in docs[k::2]))  # Infinity and NaN as Python writes them
    local, out_l = run_stage(tmp_path, "local", "dedup", inputs)
    dist, out_r = run_stage(tmp_path, "ray", "dedup", inputs, "run.executor=ray")
    assert comparable(dist) == comparable(local)
    assert local["repaired"] == {"invalid_edu_score": 12} and local["dropped"]["exact_duplicate"] >= 11
    kept = [d["id"] for d in iter_documents([out_l / "kept"])]
    assert kept and all(i.startswith("ok-") for i in kept)  # the valid score survives every group
    assert docs_of(out_r / "kept") == docs_of(out_l / "kept")
    removed = {d["id"]: d for d in iter_documents(sorted((out_l / "removed").glob("*.parquet")))}
    assert {f"bad-{i}" for i in range(12)} <= set(removed)
    assert removed["bad-0"]["edu_score"] is None and removed["bad-0"]["meta"]["edu_score_as_read"] == "'high'"
    assert removed["bad-1"]["meta"]["edu_score_as_read"] == "inf"


@pytest.mark.parametrize("only", ["dedup.near=false", "dedup.exact=false"])
def test_dedup_on_ray_exact_only_or_near_only_equals_local(shared_data, tmp_path, ray_session, monkeypatch, only):
    from pipeline import dedup_dist

    monkeypatch.setattr(dedup_dist, "ROWS_PER_TASK", 150)
    monkeypatch.setattr(dedup_dist, "CLUSTER_ROWS", 30)
    inputs, _ = corpus_files(shared_data, tmp_path)
    local, out_l = run_stage(tmp_path, "local", "dedup", inputs, only)
    dist, out_r = run_stage(tmp_path, "ray", "dedup", inputs, only, "run.executor=ray")
    assert sum(local["dropped"].get(r, 0) for r in ("exact_duplicate", "near_duplicate")) > 5
    assert comparable(dist) == comparable(local)
    assert docs_of(out_r / "kept") == docs_of(out_l / "kept")
    assert pq.read_table(out_r / "pairs.parquet").equals(pq.read_table(out_l / "pairs.parquet"))


def docs_of_glob(out, reason):
    files = sorted((out / "removed").glob(f"{reason}*.parquet"))
    return [(d["id"], d["meta"]) for d in iter_documents(files)] if files else []


def test_decontaminate_on_ray_equals_local(shared_data, tmp_path, ray_session):
    import gzip

    from pipeline.decontam import build_index

    index = tmp_path / "gsm8k-index"
    build_index(["gsm8k"], local_dir=str(shared_data / "benchmarks")).save(index)
    with gzip.open(shared_data / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz", "rt") as f:
        clean = [json.loads(line)["text"] for line in f][:150]
    tests = [json.loads(x)["question"] for x in open(shared_data / "benchmarks/gsm8k/test.jsonl")][:12]
    docs = [{"id": f"c{i}", "text": t, "source": "web"} for i, t in enumerate(clean)]
    docs += [{"id": f"p{i}", "text": clean[i][:300] + "\n" + q.upper(), "source": "web"} for i, q in enumerate(tests)]
    docs.append({"id": "blank", "text": " ", "source": "web"})
    random.Random(1).shuffle(docs)
    inputs = []
    for i in range(3):
        p = tmp_path / f"in-{i}.jsonl"
        p.write_text("".join(json.dumps(d) + "\n" for d in docs[i::3]) + ("{broken\n" if i == 2 else ""))
        inputs.append(p)
    sets = [f"decontaminate.index={index}"]
    local, out_l = run_stage(tmp_path, "local", "decontaminate", inputs, *sets)
    dist, out_r = run_stage(tmp_path, "ray", "decontaminate", inputs, *sets, "run.executor=ray")
    assert local["dropped"]["contaminated"] == 12 and local["dropped"]["empty_text"] >= 1 and local["errored"] == {"malformed_json": 1}
    assert dist["engine"]["tasks"] == 3
    assert comparable(dist) == comparable(local)
    assert docs_of(out_r / "kept") == docs_of(out_l / "kept")
    assert sorted(docs_of(out_r / "removed")) == sorted(docs_of(out_l / "removed"))


def shard_inputs(shared_data, tmp_path, n_files=3):
    from test_mix_stage import make_docs

    docs = make_docs(shared_data) + [{"id": "empty", "text": " ", "source": "web"},
                                     {"id": "huge", "text": "x " * 60_000, "source": "web"}]
    random.Random(2).shuffle(docs)
    paths = []
    for i in range(n_files):
        p = tmp_path / f"shard-in-{i}.jsonl"
        p.write_text("".join(json.dumps(d) + "\n" for d in docs[i::n_files]) + ("{broken\n" if i == 0 else ""))
        paths.append(p)
    return paths


def shard_rows(out):
    from pipeline.shards import open_shards

    s = open_shards(out)
    return {split: [(r["id"], r["meta"], list(r["input_ids"])) for r in s.iter_documents(split=split)]
            for split in s.splits}, s


SHARD_SETS = ["shard.max_chars=100000", "shard.weights.web=0.5", "shard.validation_fraction=0.1"]


def test_shard_on_ray_equals_local_one_bucket(shared_data, tmp_path, ray_session):
    inputs = shard_inputs(shared_data, tmp_path)
    local, _ = run_stage(tmp_path, "local", "shard", inputs, *SHARD_SETS)
    dist, _ = run_stage(tmp_path, "ray", "shard", inputs, *SHARD_SETS, "run.executor=ray")
    assert local["shuffle_buckets"] == 1 and dist["engine"]["tokenize_tasks"] == 3
    assert comparable(dist) == comparable(local)
    rows_l, set_l = shard_rows(tmp_path / "local")
    rows_r, set_r = shard_rows(tmp_path / "ray")
    assert rows_r == rows_l and len(rows_l["train"]) > 100
    assert set_r.fingerprint == set_l.fingerprint  # one bucket: the same files, byte for byte


def test_shard_many_buckets_same_rows_and_same_files_for_1_or_n_workers(shared_data, tmp_path, ray_session):
    inputs = shard_inputs(shared_data, tmp_path)
    sets = [*SHARD_SETS, "shard.shuffle_buffer_mb=1", "shard.shard_mb=1", "shard.weights.synthetic=3"]
    local, _ = run_stage(tmp_path, "local", "shard", inputs, *sets)
    one, _ = run_stage(tmp_path, "inline", "shard", inputs, *sets, "run.executor=inline")
    dist, _ = run_stage(tmp_path, "ray", "shard", inputs, *sets, "run.executor=ray")
    assert local["shuffle_buckets"] > 1 and dist["engine"]["write_tasks"] > 2
    assert comparable(dist) == comparable(local) == comparable(one)
    rows_l, _ = shard_rows(tmp_path / "local")
    rows_1, set_1 = shard_rows(tmp_path / "inline")
    rows_r, set_r = shard_rows(tmp_path / "ray")
    assert rows_r == rows_1 == rows_l  # the same rows in the same order as one process
    assert set_r.fingerprint == set_1.fingerprint  # 1 worker or 2: the same files
