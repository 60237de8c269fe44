"""Train → evaluate → score round trip on real labelled rows; bad input; missing/corrupt model directories;
the datatrove tagger/filter under the local executor; the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.classify.model import load_classifier, score_texts
from pipeline.classify.train import train_classifier
from pipeline.config.classifier import LabelSource, TrainSection
from pipeline.errors import TextbookError

FAST_FT = {"epoch": 25, "dim": 32, "bucket": 50_000, "quantize": False, "lr": 0.5}


def _legal_source(shared_data: Path, limit: int = 800) -> LabelSource:
    return LabelSource(path=str(shared_data / "edu_labels/fineweb_legal_mistral/annotations.parquet"),
                       id_column="id", score_column="score", name="legal", limit=limit)


@pytest.fixture(scope="module")
def legal_model(tmp_path_factory, shared_data) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("models")
    train = TrainSection(name="legal-ft", backend="fasttext", mode="expected", params=FAST_FT, max_chars=2000,
                         cv_folds=3, sources=[_legal_source(shared_data)])
    metrics = train_classifier(train, keep_top=0.2, out_dir=out, log=lambda m: None)
    return out / "legal-ft", metrics


def test_round_trip_real_rows(legal_model, shared_data):
    model_dir, metrics = legal_model
    for name in ("classifier.json", "metrics.json", "README.md", "confusion_matrix.png", "thresholds.md",
                 "thresholds.json", "model.bin", "training_hashes.npz"):
        assert (model_dir / name).is_file(), name
    d = metrics["data"]
    # repeated annotations of one document merged; every measured document cross-validated and then fitted on
    assert d["repeated_annotations_merged"] > 0
    assert d["cross_validated"] == d["documents"] == d["fitted"] and d["holdout"] == 0
    # the legal-value signal is learnable from text: clearly better than chance on out-of-fold scores
    t = metrics["cv"]
    assert t["n"] == d["documents"] and t["spearman"] > 0.4 and t["binary"]["f1"] > 0.45
    assert metrics["annotator_agreement"]["documents"] > 0
    # loading is self-describing and scores match what training measured
    clf = load_classifier(model_dir)
    assert clf.name == "legal-ft" and clf.max_chars == 2000
    texts = ["The court held that the statute of limitations barred the plaintiff's claim under section 12.",
             "Buy cheap sunglasses now, free shipping on all orders!!!"]
    s = score_texts(clf, texts)
    assert s.dtype == np.float32 and s.shape == (2,) and 0 <= s.min() and s.max() <= 5
    assert s[0] > s[1]
    # keep-top cut-off recorded with the model and used by default
    cal = clf.meta["calibration"]
    assert cal["keep_top"] == 0.2 and clf.selection_cutoff()[0] == pytest.approx(cal["keep_top_cutoff"])
    assert clf.cutoff_for_keep_top(1.0) == pytest.approx(cal["percentiles"][0])
    card = (model_dir / "README.md").read_text()
    assert "first **2,000 characters**" in card and "legal" in card


def test_sklearn_backends_same_interface(tmp_path, shared_data):
    for params, mode in (({"features": "hashing", "head": "logistic", "hash_features": 2**16}, "binary"),
                         ({"features": "tfidf", "head": "ridge", "max_features": 20000}, "regression")):
        train = TrainSection(name=f"sk-{mode}", backend="sklearn", mode=mode, params=params, max_chars=1500,
                             sources=[_legal_source(shared_data, 300)])
        m = train_classifier(train, out_dir=tmp_path, log=lambda s: None)
        assert m["cv"]["spearman"] is not None and m["cv"]["spearman"] > 0.3
        clf = load_classifier(tmp_path / f"sk-{mode}")
        s = clf.score(["", "a statute and the court", "   "])
        assert s[0] == clf.score_min and s[2] == clf.score_min and 0 <= s[1] <= 5


def test_char_ngram_block_saved_and_loaded(tmp_path, shared_data):
    """Word + character n-gram TF-IDF (`char_ngrams`): a saved and reloaded model scores exactly as the fitted
    one, the feature rows have unit norm, and the char block changes the scores (it is used)."""
    import csv

    from pipeline.classify.backends import SklearnBackend
    from pipeline.classify.text import prepare

    with (shared_data / "edu_labels/fineweb_c_danish_human/labels.csv").open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f)][:300]
    texts = [prepare(r["text"], 2000) for r in rows]
    y = [float(r["float_score"]) for r in rows]
    params = {"head": "ridge", "char_ngrams": [2, 4], "char_max_features": 50_000}
    b = SklearnBackend("regression", list(range(6)), 5.0, params)
    b.fit(texts[:200], y[:200])
    want = b.predict_scores(texts[200:])
    norms = np.sqrt(np.asarray(b._weigh(b._counts(texts[200:]), b._char_counter.transform(texts[200:]))
                               .power(2).sum(axis=1))).ravel()
    assert np.allclose(norms, 1.0, atol=1e-5)
    name = b.save(tmp_path)
    loaded = SklearnBackend("regression", list(range(6)), 5.0, params)
    loaded.load(tmp_path / name)
    assert np.array_equal(loaded.predict_scores(texts[200:]), want)
    words_only = SklearnBackend("regression", list(range(6)), 5.0, {"head": "ridge"})
    words_only.fit(texts[:200], y[:200])
    assert not np.allclose(words_only.predict_scores(texts[200:]), want, atol=1e-3)
    with pytest.raises(TextbookError, match="char_ngrams"):
        SklearnBackend("regression", [0, 1], 5.0, {"head": "ridge", "features": "hashing", "char_ngrams": [2, 4]})


@pytest.mark.parametrize("ngram_max", [1, 2, 3])
def test_fast_ngram_counts_equal_countvectorizer(shared_data, ngram_max):
    """The TF-IDF backend's own n-gram counter gives exactly CountVectorizer.transform's matrix on real pages,
    mixed case included (CountVectorizer lower-cases even when the model's `lowercase` is off), unicode and
    pages with nothing in the vocabulary."""
    from pipeline.classify.backends import SklearnBackend
    from pipeline.classify.text import prepare

    rows = [json.loads(line) for line in
            (shared_data / "edu_labels/fineweb_edu_llama3_sample/llama3_train.jsonl").open(encoding="utf-8")]
    raw = [r["text"] for r in rows[:400]]
    b = SklearnBackend("regression", list(range(6)), 5.0, {"head": "ridge", "ngram_max": ngram_max, "min_df": 2})
    b.fit([prepare(t, 2000, lowercase=False) for t in raw[:300]], [float(r["score"]) for r in rows[:300]])
    texts = [prepare(t, 0, lowercase=False) for t in raw] + ["", "x", "ÀÉÎ Straße İstanbul ΣΑΣ", "qqzx vvkw"]
    want, got = b._counter.transform(texts).tocsr(), b._counts(texts).tocsr()
    want.sum_duplicates()
    got.sum_duplicates()
    assert got.shape == want.shape and got.dtype == want.dtype and want.nnz > 10_000
    for part in ("indptr", "indices", "data"):
        assert np.array_equal(getattr(got, part), getattr(want, part)), part


def test_bad_rows_counted_or_strict_error(tmp_path):
    rows = [("A lesson on fractions: a half is one of two equal parts.", "4"),
            ("", "3"), ("   ", "2"), ("Photosynthesis turns light into chemical energy.", "high"),
            ("Cheap watches for sale.", "9"), ("Prime numbers have exactly two divisors.", "5"),
            ("Click here to win.", "0"), ("The water cycle moves water between sea, air and land.", "4.0"),
            ("Buy now.", "1")] * 3
    import csv

    path = tmp_path / "labels.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "score"])
        w.writerows(rows)
    # an invalid UTF-8 byte in a jsonl file: kept (replaced) and counted
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "Vectors have magnitude and direction \xff.", "score": 4}\n{"text": 1}\nnot json\n')
    from pipeline.classify.data import load_labelled

    ex, rep, repeats = load_labelled([LabelSource(path=str(path)), LabelSource(path=str(bad))], 0, 5)
    p = rep.problems
    assert p["empty_text"] == 6 + 1 and p["non_numeric_label"] == 3 and p["score_out_of_range"] == 3
    assert p["invalid_utf8_replaced"] == 1 and p["malformed_record"] == 1
    assert repeats == 10 and len(ex) == 6  # 5 good csv texts x3 merged + 1 jsonl
    assert any("\ufffd" in e.text for e in ex)
    assert rep.examples_of["non_numeric_label"][0] == f"{path}:row 5"
    with pytest.raises(TextbookError, match=r"labels\.csv:row 3: empty text"):
        load_labelled([LabelSource(path=str(path))], 0, 5, strict=True)
    only = tmp_path / "one.csv"
    only.write_text("text,score\nA lesson on fractions.,4\nPhotosynthesis explained.,high\n", encoding="utf-8")
    with pytest.raises(TextbookError, match=r"one\.csv:row 3: non numeric label: 'high'"):
        load_labelled([LabelSource(path=str(only))], 0, 5, strict=True)
    with pytest.raises(TextbookError, match="no score column 'grade'"):
        load_labelled([LabelSource(path=str(path), score_column="grade")], 0, 5)


def test_missing_or_corrupt_model_dir(legal_model, tmp_path):
    model_dir, _ = legal_model
    with pytest.raises(TextbookError, match="classifier directory not found"):
        load_classifier(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.bin").write_bytes(b"\x00garbage")
    with pytest.raises(TextbookError, match=r"model\.bin: corrupt \(sha256"):
        load_classifier(broken)
    meta = json.loads((broken / "classifier.json").read_text())
    meta.pop("model_sha256")
    (broken / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(TextbookError, match="cannot load model"):
        load_classifier(broken)
    (broken / "model.bin").unlink()
    with pytest.raises(TextbookError, match="model file missing"):
        load_classifier(broken)
    (broken / "classifier.json").write_text("{not json")
    with pytest.raises(TextbookError, match=r"classifier\.json: corrupt"):
        load_classifier(broken)
    (broken / "classifier.json").unlink()
    with pytest.raises(TextbookError, match=r"classifier\.json: missing"):
        load_classifier(broken)


def test_datatrove_tagger_and_filter_local_executor(legal_model, tmp_path, shared_data):
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor

    from pipeline.classify.datatrove_steps import EduScoreFilter, EduScoreTagger

    model_dir, _ = legal_model
    clf = load_classifier(model_dir)
    import pyarrow.parquet as pq

    texts = pq.read_table(shared_data / "edu_labels/fineweb_legal_mistral/annotations.parquet",
                          columns=["text"]).column("text").to_pylist()[:60]
    texts += ["", "x" * 3_000_000]  # empty and a huge document: scored on the prefix
    from pipeline.classify.guards import GuardedScorer

    guarded = GuardedScorer(clf).score(texts)  # the tagger scores through the guards (a gated page: score_min)
    expected = guarded.scores
    kept: list[Document] = []

    def reader(data, rank: int = 0, world_size: int = 1):
        for i, t in enumerate(texts):
            yield Document(text=t, id=str(i))

    def collect(data, rank: int = 0, world_size: int = 1):
        for d in data:
            kept.append(d)
            yield d

    tagger = EduScoreTagger(str(model_dir), batch_size=16)
    flt = EduScoreFilter(threshold=2.5)
    LocalPipelineExecutor(pipeline=[reader, tagger, flt, collect], tasks=1, workers=1,
                          logging_dir=str(tmp_path / "logs")).run()
    want = {str(i) for i, s in enumerate(expected) if s >= 2.5}
    assert {d.id for d in kept} == want and 0 < len(want) < len(texts)
    for d in kept:
        assert d.metadata["edu_score"] == pytest.approx(float(expected[int(d.id)]), abs=1e-6)
        assert d.metadata["edu_model"] == "legal-ft"
    step_stats = {s["name"]: s["stats"] for s in json.loads((tmp_path / "logs" / "stats.json").read_text())}
    tag_stats = next(v for k, v in step_stats.items() if "edu score" in k)
    assert tag_stats["empty_text"] == 1 and tag_stats["prefix_scored"] >= 1
    assert sum(v for k, v in tag_stats.items() if k.startswith("guard_")) == sum(g is not None for g in guarded.gates)
    # keep-top on the model's calibration, and unscored documents are dropped with a reason
    top = EduScoreFilter(keep_top=0.2, model_dir=str(model_dir))
    assert top.cutoff == pytest.approx(clf.cutoff_for_keep_top(0.2))
    assert top.filter(Document(text="t", id="x")) == (False, "unscored")
    with pytest.raises(TextbookError):
        EduScoreFilter(keep_top=0.1)
    import pickle

    assert pickle.loads(pickle.dumps(tagger))._model is None  # picklable for the Ray executor


def test_cli_train_evaluate_score(tmp_path, shared_data):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    cfg = {"classifier": {"train": {
        "name": "cli-model", "out_dir": str(tmp_path / "models"), "backend": "sklearn", "mode": "expected",
        "params": {"features": "hashing", "hash_features": 2**16},
        "sources": [{"path": str(shared_data / "edu_labels/fineweb_edu_llama33_150/training_data.csv"),
                     "score_column": "score"}]}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    r = runner.invoke(app, ["classifier", "train", str(tmp_path / "c.yaml"), "--keep-top", "25%"])
    assert r.exit_code == 0, r.output
    model = tmp_path / "models" / "cli-model"
    assert json.loads((model / "classifier.json").read_text())["calibration"]["keep_top"] == 0.25
    data = str(shared_data / "edu_labels/fineweb_edu_llama33_150/training_data.csv")
    r = runner.invoke(app, ["classifier", "evaluate", str(model), data, "--keep-top", "10%", "--record",
                            "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 150 and m["keep_top"]["recorded"]
    assert json.loads((model / "classifier.json").read_text())["calibration"]["keep_top"] == 0.1
    r = runner.invoke(app, ["classifier", "score", str(model),
                            str(shared_data / "web/dolma_cc/cc_en_head"), "--out", str(tmp_path / "scored")])
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "scored" / "stats.json").read_text())
    assert stats["read"] == 20 and stats["reconciled"]
    from pipeline.documents import iter_documents

    docs = list(iter_documents([tmp_path / "scored"]))
    assert len(docs) == stats["kept"] and all(d["edu_score"] is not None for d in docs)
    r = runner.invoke(app, ["classifier", "evaluate", str(tmp_path / "missing"), data])
    assert r.exit_code == 1 and "classifier directory not found" in r.output
    r = runner.invoke(app, ["classifier", "train", str(tmp_path / "c.yaml"), "--keep-top", "150%"])
    assert r.exit_code == 1
