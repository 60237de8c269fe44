"""Classifier metrics on hand-checked tiny cases; strict score parsing; split, merge and chunk rules."""

from __future__ import annotations

import pytest

from pipeline.classify import metrics as M
from pipeline.classify.annotate import parse_score
from pipeline.classify.data import Example, chunk, fold_of, is_held_out, merge, text_bucket
from pipeline.classify.text import prepare
from pipeline.config.classifier import HoldoutRule

TRUTH = [0, 1, 3, 4, 5, 2]
PRED = [0.4, 2.6, 3.2, 1.0, 4.6, 2.4]


def test_binary_prf_by_hand():
    b = M.binary(TRUTH, PRED, 3)
    # truth>=3: docs 2,3,4; pred>=3: docs 2,4 -> tp 2, fp 0, fn 1, tn 3
    assert (b["tp"], b["fp"], b["fn"], b["tn"]) == (2, 0, 1, 3)
    assert b["precision"] == 1.0
    assert b["recall"] == pytest.approx(2 / 3)
    assert b["f1"] == pytest.approx(0.8)


def test_macro_f1_confusion_spearman_by_hand():
    e = M.evaluate(TRUTH, PRED, 3, 0, 5)
    # rounded predictions 0,3,3,1,5,2; per-label F1: 0:1, 1:0, 2:1, 3:2/3, 4:0, 5:1
    assert e["macro_f1"] == pytest.approx((1 + 0 + 1 + 2 / 3 + 0 + 1) / 6)
    m = e["confusion"]["matrix"]
    assert m[1][3] == 1 and m[4][1] == 1 and m[3][3] == 1 and sum(map(sum, m)) == 6
    # ranks truth 1,2,4,5,6,3 vs pred 1,4,5,2,6,3: sum d^2 = 14 -> 1 - 6*14/(6*35) = 0.6
    assert e["spearman"] == pytest.approx(0.6)
    assert e["accuracy_int"] == pytest.approx(4 / 6)  # labels 0, 3, 5, 2 match


def test_round_half_up_and_threshold_table():
    assert M.to_int([2.5, 2.49, -1, 7], 0, 5).tolist() == [3, 2, 0, 5]
    rows = {r["cutoff"]: r for r in M.threshold_table(TRUTH, PRED, 3, 0, 5, step=1)}
    assert rows[0.0]["keep_rate"] == 1.0 and rows[0.0]["recall"] == 1.0
    assert rows[3.0]["keep_rate"] == pytest.approx(2 / 6) and rows[3.0]["precision"] == 1.0


def test_agreement_ceiling_and_constant_spearman():
    ag = M.agreement([[3, 3], [2, 4], [5, 5], [1]], 3, 0, 5)
    assert ag["documents"] == 3
    assert ag["exact"] == pytest.approx(2 / 3)
    assert ag["binary_agreement"] == pytest.approx(2 / 3)
    assert M.agreement([[1], [2]], 3, 0, 5)["documents"] == 0
    assert M.spearman([1, 1, 1], [1, 2, 3]) is None


def test_percentiles_monotone():
    p = M.percentiles([5, 1, 3, 2, 4])
    assert len(p) == 101 and p[0] == 1 and p[-1] == 5 and p == sorted(p)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Good structure.\nEducational score: 4", (4.0, None)),
        ("educational score: **3**", (3.0, None)),
        ("Educational score: 3 ... final answer Educational score: 3", (3.0, None)),
        ("Educational score: 2 then Educational score: 4", (None, "conflicting_scores")),
        ("I would give it four points.", (None, "unparseable")),
        ("Educational score: 7", (None, "score_out_of_range")),
        ("", (None, "empty_response")),
        (None, (None, "empty_response")),
    ],
)
def test_parse_score_is_strict(raw, expected):
    from pipeline.config.classifier import AnnotateSection

    a = AnnotateSection()
    assert parse_score(raw, a.score_pattern, a.score_min, a.score_max) == expected


def test_folds_and_holdout_are_deterministic_and_repeats_merge():
    folds = [fold_of(f"doc-{i}", 5) for i in range(2000)]
    assert folds == [fold_of(f"doc-{i}", 5) for i in range(2000)]
    assert set(folds) == {0, 1, 2, 3, 4} and all(330 < folds.count(f) < 470 for f in range(5))
    # the shared data's hash rule, checked by hand: sha256("hello") starts 2cf24dba -> 754077114 % 5 == 4
    assert text_bucket("hello", 5) == int("2cf24dba", 16) % 5 == 4
    assert is_held_out(Example("x", "hello", "s", [1]), HoldoutRule(modulo=5, remainder=4))
    assert not is_held_out(Example("x", "hello", "s", [1]), HoldoutRule(modulo=5, remainder=1))
    assert not is_held_out(Example("x", "hello", "s", [1]), None)
    merged, repeats = merge([Example("a", "t", "s", [2], targets=[1.5]), Example("b", "u", "s", [5]),
                             Example("a", "t", "s", [4], targets=[3.5])])
    assert repeats == 1 and len(merged) == 2
    a = next(e for e in merged if e.id == "a")
    b = next(e for e in merged if e.id == "b")
    assert a.scores == [2, 4] and a.score == 3 and a.target == 2.5 and b.target == 5


def test_chunk_and_prepare():
    text = "\n\n".join(f"paragraph {i} " + "word " * 60 for i in range(20))
    parts = chunk(text, 1000)
    assert all(len(p) <= 1000 for p in parts) and len(parts) >= 6
    assert "".join(parts).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert prepare("A  b\n\nC", 0) == "a b c"
    assert prepare("x" * 10_000_000, 100) == "x" * 100
