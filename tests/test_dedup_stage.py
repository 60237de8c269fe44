"""The dedup stage end to end: exact and near duplicates across sources, survivor rule, bad input, incremental index."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline import run as runmod
from pipeline.config import load_config
from pipeline.documents import iter_documents
from pipeline.errors import TextbookError

BASE = ("Photosynthesis converts light energy into chemical energy stored in glucose. Plants absorb carbon "
        "dioxide through their leaves and water through their roots, and release oxygen as a by-product. "
        "The light reactions take place in the thylakoid membranes, while the Calvin cycle runs in the stroma. "
        "Chlorophyll absorbs mostly blue and red light, which is why leaves look green to us.")
OTHER = ("A binary search halves the search interval at each step, so it needs about log2(n) comparisons on a "
         "sorted list of n items. It keeps two indices, low and high, and compares the target with the middle "
         "element; if the target is smaller it continues in the left half, otherwise in the right half.")


def write_jsonl(path, records):
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


def run_dedup(tmp_path, inputs, *sets, name="out"):
    cfg = load_config(None, [f"run.out={tmp_path / name}", f"dedup.inputs={json.dumps([str(p) for p in inputs])}",
                             "run.stages=[dedup]", *sets])
    stats = runmod.run_pipeline(cfg, log=lambda m: None)["dedup"]
    out = tmp_path / name / "stages/dedup"
    kept = {d["id"]: d for d in iter_documents([out / "kept"])}
    removed = {d["id"]: d for d in iter_documents([out / "removed"])} if (out / "removed").exists() else {}
    return stats, kept, removed, out


def test_exact_near_survivor_and_bad_input(tmp_path):
    near = BASE.replace("absorb", "take in").replace("release", "give off")  # 2 words of ~60 changed
    recs = [
        {"id": "web-low", "text": BASE, "source": "web", "edu_score": 1.0},
        {"id": "syn-high", "text": BASE.upper().replace(".", " !").replace(" ", "   "), "source": "synthetic",
         "edu_score": 3.0},  # exact after folding case/punctuation/whitespace; higher score survives
        {"id": "web-near", "text": near, "source": "web", "edu_score": 5.0},
        {"id": "b-tie", "text": OTHER, "source": "web", "edu_score": 2.0},
        {"id": "a-tie", "text": OTHER + " ", "source": "web", "edu_score": 2.0},  # tie -> smallest id survives
        {"id": "z-syn", "text": "\n" + OTHER, "source": "synthetic", "edu_score": 2.0},  # tie: source priority wins
        {"id": "empty", "text": "   ", "source": "web"},
        {"id": "punct", "text": "!!! ... ---", "source": "web"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    bad = write_jsonl(tmp_path / "bad.jsonl", [b"{not json\n", b'{"id": "latin1", "text": "caf\xe9 au lait '
                                                                 b'is a coffee drink with hot milk"}\n'])
    stats, kept, removed, out = run_dedup(tmp_path, [src, bad])
    assert stats["reconciled"] and stats["read"] == 10
    assert stats["errored"] == {"malformed_json": 1}
    # web-low and syn-high are exact copies of each other but near copies of the survivor web-near
    assert stats["dropped"] == {"empty_text": 2, "exact_duplicate": 2, "near_duplicate": 2}
    # near copy scores higher than the exact group's survivor: it wins the merged cluster
    assert set(kept) == {"web-near", "z-syn", "latin1"}
    assert "\ufffd" in kept["latin1"]["text"]  # invalid UTF-8 replaced, not crashed on
    assert removed["syn-high"]["reason"] == "near_duplicate" and removed["syn-high"]["meta"]["kept_id"] == "web-near"
    assert removed["web-low"]["meta"]["kept_id"] == "web-near" and removed["web-low"]["reason"] == "near_duplicate"
    assert removed["a-tie"]["reason"] == "exact_duplicate" and removed["a-tie"]["meta"]["kept_id"] == "z-syn"
    assert removed["b-tie"]["meta"]["kept_id"] == "z-syn"
    assert stats["removed_per_source"] == {"web": {"near_duplicate": 1, "exact_duplicate": 2},
                                           "synthetic": {"near_duplicate": 1}}
    assert stats["clusters"] == 2 and stats["sample_pairs"]
    assert stats["threshold_curve"][0]["p_candidate"] < stats["threshold_curve"][-1]["p_candidate"]
    files = sorted(p.name for p in (out / "removed").iterdir())
    assert any(f.startswith("exact_duplicate") for f in files) and any(f.startswith("near_duplicate") for f in files)


def test_survivor_ties_break_on_id(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": OTHER, "source": "web"} for i in ("c", "a", "b")])
    stats, kept, removed, _ = run_dedup(tmp_path, [src])
    assert set(kept) == {"a"} and {d["meta"]["kept_id"] for d in removed.values()} == {"a"}


def test_incremental_index_removes_copies_of_earlier_runs(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": "old", "text": BASE, "source": "web", "edu_score": 0.0}])
    run_dedup(tmp_path, [first], name="run1")
    index = tmp_path / "run1/stages/dedup/index"
    assert json.loads((index / "index.json").read_text())["documents"] == 1
    second = write_jsonl(tmp_path / "b.jsonl", [
        {"id": "new-copy", "text": BASE.replace("glucose", "sugar"), "source": "synthetic", "edu_score": 9.0},
        {"id": "new-other", "text": OTHER, "source": "synthetic"}])
    stats, kept, removed, out = run_dedup(tmp_path, [second], f"dedup.index_in=[{index}]", name="run2")
    assert set(kept) == {"new-other"}
    assert removed["new-copy"]["meta"]["kept_id"] == "old" and removed["new-copy"]["meta"]["kept_from_earlier_run"]
    assert stats["prior_index_documents"] == 1
    # the new index holds both runs' emitted documents
    assert pq.read_table(out / "index/docs.parquet").column("id").to_pylist() == ["old", "new-other"]
    with pytest.raises(TextbookError, match="other parameters"):
        run_dedup(tmp_path, [second], f"dedup.index_in=[{index}]", "dedup.shingle_size=5", name="run3")


def test_large_document_and_missing_input(tmp_path):
    big = (OTHER + "\n") * 36_000  # ~10 MB, 1.7 M words: hashed in bounded chunks
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "big", "text": big}, {"id": "small", "text": OTHER}])
    stats, kept, removed, _ = run_dedup(tmp_path, [src])
    # the big one is the short one repeated: 3-word shingle sets nearly equal, a real near-duplicate pair
    # (no scores, same source: the smaller id, "big", survives)
    assert set(kept) == {"big"} and removed["small"]["reason"] == "near_duplicate"
    assert len(kept["big"]["text"]) == len(big)
    cfg = load_config(None, [f"run.out={tmp_path / 'o2'}", "run.stages=[web, dedup]"])
    with pytest.raises(TextbookError, match="has not completed"):
        runmod.run_one(cfg, "dedup", planned=["web", "dedup"], log=lambda m: None)


def test_worker_processes_give_the_same_result(tmp_path):
    recs = [{"id": f"d{i}", "text": (BASE if i % 3 else OTHER) + f" variant {i % 7}", "source": "web",
             "edu_score": float(i % 5)} for i in range(60)]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    one = run_dedup(tmp_path, [src], "dedup.batch_size=8", name="w1")
    two = run_dedup(tmp_path, [src], "dedup.batch_size=8", "dedup.workers=2", name="w2")
    assert set(one[1]) == set(two[1]) and one[0]["dropped"] == two[0]["dropped"]
    assert {k: v["meta"]["kept_id"] for k, v in one[2].items()} == {k: v["meta"]["kept_id"] for k, v in two[2].items()}
