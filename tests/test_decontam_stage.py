"""Decontamination on real benchmark copies: planted items (verbatim and reformatted) removed, clean docs kept."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from typer.testing import CliRunner

from pipeline import run as runmod
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.decontam import DecontamIndex, build_index, check_texts
from pipeline.documents import iter_documents

BENCHES = ["gsm8k", "humaneval", "mbpp", "arc_challenge", "hellaswag", "mmlu"]


@pytest.fixture(scope="module")
def index_dir(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("idx") / "bench13"
    build_index(BENCHES, local_dir=str(shared_data / "benchmarks")).save(d)
    return d


def clean_docs(shared_data, n=120):
    with gzip.open(shared_data / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for line in f]
    docs = [d for d in docs if len(d["text"].split()) > 80][:n]
    return [{"id": f"clean-{i}", "text": d["text"], "source": "web"} for i, d in enumerate(docs)]


def benchmark_items(shared_data):
    """A few real items of each kind, as the text a contaminated page would carry."""
    b = shared_data / "benchmarks"
    gsm = [json.loads(x) for x in open(b / "gsm8k/test.jsonl")][100:104]
    with gzip.open(b / "humaneval/HumanEval.jsonl.gz", "rt") as f:
        he = [json.loads(x) for x in f][20:23]
    mbpp = [json.loads(x) for x in open(b / "mbpp/mbpp.jsonl")][50:53]
    arc = [json.loads(x) for x in open(b / "arc/ARC-Challenge-Test.jsonl")][7:10]
    items = [("gsm8k", g["question"]) for g in gsm] + [("humaneval", h["prompt"] + h["canonical_solution"]) for h in he]
    items += [("mbpp", m["text"] + "\n" + m["code"]) for m in mbpp]
    items += [("arc_challenge", a["question"]["stem"] + " " + " ".join(c["text"] for c in a["question"]["choices"]))
              for a in arc]
    return items


def reformat(text, rng):
    """Light reformatting: case, whitespace and punctuation changed."""
    out = text.upper() if rng.random() < 0.5 else text.lower()
    out = out.replace(",", " ;").replace(".", " . ").replace("?", "? ").replace("\n", "\n\n  ")
    return out.replace("(", "[ ").replace(")", " ]")


def test_planted_items_removed_clean_docs_kept(shared_data, index_dir, tmp_path):
    rng = random.Random(0)
    clean = clean_docs(shared_data)
    docs = list(clean)
    planted = {}
    for k, (bench, item) in enumerate(benchmark_items(shared_data)):
        host = clean[k]["text"]
        cut = len(host) // 2
        for variant, text in (("verbatim", item), ("reformatted", reformat(item, rng))):
            did = f"planted-{bench}-{k}-{variant}"
            docs.append({"id": did, "text": host[:cut] + "\n" + text + "\n" + host[cut:], "source": "web"})
            planted[did] = bench
    # GSM8K train questions: same style, disjoint from test -> must not match
    train = [json.loads(x) for x in open(shared_data / "benchmarks/gsm8k/train.jsonl")][:100]
    docs += [{"id": f"train-{i}", "text": t["question"] + "\n" + t["answer"], "source": "synthetic"}
             for i, t in enumerate(train)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs) + "{broken\n")
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", f"decontaminate.inputs=[{src}]",
                             f"decontaminate.index={index_dir}", "run.stages=[decontaminate]"])
    stats = runmod.run_pipeline(cfg, log=lambda m: None)["decontaminate"]
    out = tmp_path / "out/stages/decontaminate"
    removed = {d["id"]: d for d in iter_documents([out / "removed"])}
    assert set(planted) <= set(removed)  # every planted item, verbatim and reformatted
    # Nothing else but one real overlap: GSM8K train #20 re-uses test #632's "stamps at the post office"
    # scenario word for word (a known train/test leak); clean web documents are never removed.
    assert set(removed) - set(planted) == {"train-20"}
    assert removed["train-20"]["meta"]["contamination"]["benchmarks"] == {"gsm8k": ["test:632"]}
    for did, bench in planted.items():
        assert bench in removed[did]["meta"]["contamination"]["benchmarks"]
    assert stats["dropped"] == {"contaminated": len(planted) + 1} and stats["errored"] == {"malformed_json": 1}
    assert stats["matched"]["gsm8k"]["documents"] == 9 and stats["matched"]["gsm8k"]["top_ngrams"]
    assert stats["reconciled"]


def test_flag_mode_keeps_and_marks(shared_data, index_dir, tmp_path):
    gsm = json.loads(open(shared_data / "benchmarks/gsm8k/test.jsonl").readline())
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "x", "text": "Intro.\n" + gsm["question"]}) + "\n"
                   + json.dumps({"id": "y", "text": "A clean sentence about nothing in particular at all."}) + "\n")
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", f"decontaminate.inputs=[{src}]", "run.stages=[decontaminate]",
                             f"decontaminate.index={index_dir}", "decontaminate.mode=flag"])
    stats = runmod.run_pipeline(cfg, log=lambda m: None)["decontaminate"]
    kept = {d["id"]: d for d in iter_documents([tmp_path / "out/stages/decontaminate/kept"])}
    assert stats["kept"] == 2 and stats["flagged"] == 1
    assert kept["x"]["meta"]["contamination"]["benchmarks"]["gsm8k"] == ["test:0"]
    assert "contamination" not in (kept["y"]["meta"] or {})


def test_check_texts_and_short_items(shared_data, index_dir):
    index = DecontamIndex.load(index_dir)
    mmlu_q = "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    res = check_texts(index, [f"Write a lesson. Seed: {mmlu_q.lower()}", "Write a lesson about the water cycle."])
    assert res[0] is not None and "mmlu" in res[0].benchmarks and res[1] is None


def test_broken_benchmark_file_and_cli_index(tmp_path):
    bench = tmp_path / "mybench.jsonl"
    q = "the quick brown fox measured the length of the fence in meters and found it was seventeen long"
    bench.write_text(json.dumps({"q": q}) + "\n{not json\n" + json.dumps({"q": "too short"}) + "\n")
    out = tmp_path / "idx"
    r = CliRunner().invoke(app, ["decontaminate", "index", "--benchmarks", "gsm8k", "--local-dir", str(tmp_path),
                                 "--file", f"mine={bench}:q", "--out", str(out)], env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    index = DecontamIndex.load(out)
    info = index.info["benchmarks"]["mine"]
    assert info["items"] == 2 and info["errors"] == {"malformed_line": 1} and info["too_short"] == 1
    assert "gsm8k" in index.info["unavailable"]
    assert check_texts(index, ["Story: " + q.upper() + "!"])[0].benchmarks == {"mine": ["mybench:0"]}
    # `textbook decontaminate CONFIG` still runs the stage (here: a one-line error for the missing config)
    r = CliRunner().invoke(app, ["decontaminate", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 1 and "config file not found" in r.output
