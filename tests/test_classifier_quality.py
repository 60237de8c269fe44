"""What the shipped classifiers measurably do on real held-out labels, and the calibration that makes the
default cut-off mean the rubric's scale in every mode.

Held-out everywhere: `int(sha256(text)[:8], 16) % 5 == 1` (the shipped configs' `holdout`), never fitted on.
The CLI retrains of the legal and Danish configs take minutes: their holdout figures against the baselines are
in benchmarks/results/classifier.md (bench_classifier.py); here the Danish config is retrained as shipped
(a small set) and must beat the quick baselines measured on the same holdout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.classify import metrics as M
from pipeline.classify.calibrate import apply_map, fit_label_share
from pipeline.classify.model import load_classifier
from pipeline.classify.train import labelled_data, train_classifier
from pipeline.config import load_config
from pipeline.config.classifier import HoldoutRule, LabelSource, TrainSection
from pipeline.paths import repo_path

# the strongest quick baseline on the same holdout (benchmarks/results/classifier.md): TF-IDF + logistic with
# balanced class weights at P >= 0.5 (plain fastText: 0.471; TF-IDF + logistic unweighted: 0.078)
BASELINE_F1_EN = 0.516


def _config(name: str) -> TrainSection:
    return load_config(repo_path("configs", "classifier", name)).classifier.train


# ------------------------------------------------------------------------------------------ calibration
def test_label_share_map_by_hand():
    raw = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 5])
    m = fit_label_share(raw, labels, 0, 5, 3)
    # shares: >=1 80 %, >=2 50 %, >=3 30 %, >=4 10 %; knots at the raw quantiles that keep those shares
    assert m["shares"] == {"1": 0.8, "2": 0.5, "3": 0.3, "4": 0.1}
    assert m["score"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert m["raw"] == pytest.approx([0.1, 0.28, 0.55, 0.73, 0.91, 1.0])
    cal = apply_map(m, raw, 0, 5)
    # score >= t keeps exactly the labelled share for t = 1..4, order is kept, range is the rubric's
    for t, share in ((1, 0.8), (2, 0.5), (3, 0.3), (4, 0.1)):
        assert np.mean(cal >= t) == pytest.approx(share)
    assert np.all(np.diff(cal) > 0) and cal.min() == 0.0 and cal.max() == 5.0
    # beyond the cross-validated range: clipped to the rubric, order kept inside it
    assert apply_map(m, [-3.0, 7.0], 0, 5).tolist() == [0.0, 5.0]
    # a non-integer threshold is a knot of its own
    assert fit_label_share(raw, labels, 0, 5, 2.5)["shares"]["2.5"] == pytest.approx(0.3)
    # constant raw scores cannot be mapped; no map = raw scores, clipped
    assert fit_label_share(np.ones(5), [0, 1, 2, 3, 4], 0, 5, 3) is None
    assert apply_map(None, [-1.0, 2.5, 9.0], 0, 5).tolist() == [0.0, 2.5, 5.0]


def _llama_small(shared, limit: int) -> LabelSource:
    return LabelSource(path=str(shared / "edu_labels/fineweb_edu_llama3_sample/llama3_train.jsonl"), name="llama3",
                       where={"source": "mlfilter-fwedu-llama3-3k"}, limit=limit)


def test_every_mode_has_recall_at_its_default_cutoff(tmp_path, shared_data):
    """Random FineWeb pages (8 % labelled >= 3): uncalibrated, the expected-value and regression modes put
    almost nothing at >= 3; calibrated, every mode keeps about the labelled share at its default cut-off and
    finds positives on documents it never saw."""
    src = _llama_small(shared_data, 1500)
    modes = [("sklearn", "binary", {"head": "logistic", "max_features": 20_000}),
             ("sklearn", "expected", {"head": "logistic", "max_features": 20_000}),
             ("sklearn", "regression", {"head": "ridge", "max_features": 20_000}),
             ("fasttext", "expected", {"epoch": 20, "dim": 16, "bucket": 50_000, "quantize": False}),
             ("fasttext", "binary", {"epoch": 20, "dim": 16, "bucket": 50_000, "quantize": False})]
    for backend, mode, params in modes:
        # 3 folds of ~380 pages: fewer makes the fold models (whose pooled scores fit the map) too unlike the
        # final model for a weak binary model
        train = TrainSection(name=f"m-{backend}-{mode}", backend=backend, mode=mode, params=params, max_chars=1000,
                             cv_folds=3, holdout=HoldoutRule(), sources=[src])
        m = train_classifier(train, out_dir=tmp_path, log=lambda s: None)
        cv, hold = m["cv"], m["holdout"]
        share = cv["binary"]["positives"] / cv["n"]
        assert 0.04 < share < 0.15 and hold["binary"]["positives"] >= 10
        clf = load_classifier(tmp_path / train.name)
        cutoff, rule = clf.selection_cutoff()
        assert cutoff == 3 and rule == "model threshold 3.0"
        # calibrated: keep rate at the default cut-off near the label share, real recall on unseen pages
        assert abs(cv["binary"]["predicted_positive_rate"] - share) < 0.05, (backend, mode)
        assert cv["binary"]["recall"] > 0.15 and hold["binary"]["recall"] > 0.1, (backend, mode, hold["binary"])
        assert hold["spearman"] > 0.3, (backend, mode)
        if mode in ("expected", "regression"):  # what the calibration fixed: raw scores bunch below 3
            assert cv["uncalibrated"]["binary"]["recall"] < 0.1, (backend, mode)


# ------------------------------------------------------------------------------------- default model
@pytest.fixture(scope="module")
def default_holdout(shared_data):
    train = _config("edu-en.yaml")
    data = labelled_data(train)
    return train, data


def test_default_model_is_the_shipped_config_and_never_saw_its_holdout(default_holdout):
    from pipeline.classify.overlap import TrainingHashes
    from pipeline.config.classifier import ClassifierSection

    train, data = default_holdout
    assert ClassifierSection().model == "classifiers/edu-en" == f"{train.out_dir}/{train.name}"
    model_dir = repo_path("classifiers", "edu-en")
    clf = load_classifier(model_dir)
    assert clf.score_map and clf.threshold == 3 and clf.meta["format"] == "textbook-classifier/2"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["data"]["holdout"] == len(data.holdout) == 706
    assert metrics["data"]["fitted"] == len(data.fitted)  # refit on everything but the holdout
    hashes = TrainingHashes.load(model_dir)
    assert not hashes.contains_documents([e.text for e in data.holdout]).any()
    assert hashes.contains_documents([e.text for e in data.fitted]).all()


def _holdout_scores(default_holdout):
    _, data = default_holdout
    clf = load_classifier(repo_path("classifiers", "edu-en"))
    truth = np.array([e.score for e in data.holdout])
    return truth, clf.score([e.text for e in data.holdout]), clf


def test_default_model_on_the_holdout(default_holdout):
    """Llama-3 labels of 706 pages the model never saw: Spearman >= 0.65 (measured 0.728) and binary F1 at
    the default cut-off above the best quick baseline (measured 0.550 vs 0.516); the calibrated cut-off keeps
    about the labelled share."""
    truth, scores, clf = _holdout_scores(default_holdout)
    assert M.spearman(truth, scores) >= 0.65
    b = M.binary(truth, scores, clf.selection_cutoff()[0])
    assert b["f1"] > BASELINE_F1_EN, b
    assert abs(b["predicted_positive_rate"] - np.mean(truth >= 3)) < 0.03, b


@pytest.mark.xfail(strict=True, reason="issue 14 target not reached on this holdout: F1 0.550 at the default "
                   "cut-off (cross-validated 0.614; 0.550 / 0.621 / 0.646 / 0.593 with hash bucket 1 / 2 / 3 / 4 as "
                   "the holdout, mean 0.603; TF-IDF + MiniLM embeddings, not shipped: 0.583: "
                   "benchmarks/results/classifier.md)")
def test_default_model_reaches_the_issue_f1_target(default_holdout):
    truth, scores, clf = _holdout_scores(default_holdout)
    assert M.binary(truth, scores, clf.selection_cutoff()[0])["f1"] >= 0.60


# -------------------------------------------------------------------------------- retraining configs
def test_shipped_retrain_configs_use_a_holdout_and_calibration():
    for name, thr in (("legal-fasttext.yaml", 3), ("danish-human.yaml", 2), ("edu-en.yaml", 3)):
        t = _config(name)
        assert t.holdout == HoldoutRule(modulo=5, remainder=1) and t.calibrate == "label_share", name
        assert t.threshold == thr and t.cv_folds >= 3, name


def test_danish_config_retrained_as_shipped_beats_the_baselines(tmp_path, shared_data):
    """`textbook classifier train configs/classifier/danish-human.yaml`, as shipped: on the 196 held-out pages
    (86 at >= 2) binary F1 at its default cut-off beats the quick baselines measured on the same pages
    (TF-IDF + logistic 0.711, balanced 0.723, plain fastText 0.708; benchmarks/results/classifier.md; measured
    0.733, short of the issue's 0.76)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["classifier", "train", str(repo_path("configs", "classifier", "danish-human.yaml")),
                                 "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "danish-human" / "metrics.json").read_text())
    h = m["holdout"]
    assert h["n"] == 196 and h["binary"]["positives"] == 86 and h["binary"]["threshold"] == 2
    assert h["binary"]["f1"] > 0.723, h["binary"]
    assert h["spearman"] > 0.6


def test_sklearn_model_file_is_plain_arrays_and_scores_like_scikit_learn(tmp_path, shared_data):
    """model.npz holds no pickle; loaded back it gives the scores of scikit-learn's own TF-IDF + ridge /
    logistic pipeline fitted on the same texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge

    from pipeline.classify.backends import make_backend
    from pipeline.classify.text import prepare

    with open(shared_data / "edu_labels/fineweb_edu_llama3_sample/llama3_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:300]
    texts = [prepare(r["text"], 1500) for r in rows]
    y = np.array([r["score"] for r in rows], dtype=float)
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=5000, sublinear_tf=True)
    x = vec.fit_transform(texts[:200])
    for head, mode, target, want in (
            ("ridge", "regression", y[:200], lambda: np.clip(Ridge(alpha=1.0).fit(x, y[:200]).predict(
                vec.transform(texts[200:])), 0, 5)),
            ("logistic", "binary", (y[:200] >= 2).astype(int), lambda: 5 * LogisticRegression(C=4.0, max_iter=2000).fit(
                x, (y[:200] >= 2).astype(int)).predict_proba(vec.transform(texts[200:]))[:, 1])):
        b = make_backend("sklearn", mode, [0, 1], 5, {"head": head, "max_features": 5000})
        b.fit(texts[:200], list(target))
        b.save(tmp_path)
        again = make_backend("sklearn", mode, [0, 1], 5, {"head": head, "max_features": 5000})
        again.load(tmp_path / "model.npz")
        got = again.predict_scores(texts[200:])
        assert np.allclose(got, want(), atol=1e-3), head
        with np.load(tmp_path / "model.npz", allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)
