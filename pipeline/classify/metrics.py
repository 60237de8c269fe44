"""Evaluation figures: binary P/R/F1 at a threshold, macro-F1 over integer scores, confusion matrix,
Spearman, a threshold table, and the agreement between repeated annotations (the ceiling a model can reach).

Plain numpy (scipy only for Spearman) so every number can be checked by hand on a tiny case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def to_int(scores: Any, lo: float, hi: float) -> np.ndarray:
    """Round half up and clip to the rubric's integer range (2.5 → 3, as annotators' 'score >= 3' reads)."""
    return np.clip(np.floor(np.asarray(scores, dtype=np.float64) + 0.5), lo, hi).astype(int)


def _prf(t: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, F1) of boolean predictions `p` against boolean truth `t`; 0.0 where undefined."""
    tp = int(np.sum(t & p))
    n_pred, n_true = int(p.sum()), int(t.sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def binary(y_true: Any, y_pred: Any, threshold: float) -> dict[str, Any]:
    t = np.asarray(y_true, dtype=np.float64) >= threshold
    p = np.asarray(y_pred, dtype=np.float64) >= threshold
    tp, fp, fn = int(np.sum(t & p)), int(np.sum(~t & p)), int(np.sum(t & ~p))
    tn = int(len(t) - tp - fp - fn)
    precision, recall, f1 = _prf(t, p)
    return {"threshold": threshold, "precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / len(t) if len(t) else 0.0, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "positives": int(t.sum()), "predicted_positive_rate": float(p.mean()) if len(p) else 0.0}


def confusion(true_int: np.ndarray, pred_int: np.ndarray, labels: Sequence[int]) -> list[list[int]]:
    """rows = annotator's score, columns = model's rounded score."""
    pos = {v: i for i, v in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(true_int, pred_int, strict=True):
        m[pos[int(t)], pos[int(p)]] += 1
    return m.tolist()


def macro_f1(true_int: np.ndarray, pred_int: np.ndarray, labels: Sequence[int]) -> float:
    """Mean F1 over the labels present in either the truth or the predictions."""
    f1s = []
    for lbl in labels:
        t, p = true_int == lbl, pred_int == lbl
        if t.any() or p.any():
            f1s.append(_prf(t, p)[2])
    return float(np.mean(f1s)) if f1s else 0.0


def spearman(a: Any, b: Any) -> float | None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None  # undefined on constant input
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def evaluate(y_true: Any, y_pred: Any, threshold: float, lo: float, hi: float) -> dict[str, Any]:
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    labels = list(range(int(lo), int(hi) + 1))
    ti, pi = to_int(y_true, lo, hi), to_int(y_pred, lo, hi)
    return {
        "n": int(len(y_true)),
        "binary": binary(y_true, y_pred, threshold),
        "macro_f1": macro_f1(ti, pi, labels),
        "accuracy_int": float(np.mean(ti == pi)) if len(ti) else 0.0,
        "mae": float(np.mean(np.abs(y_true - y_pred))) if len(y_true) else 0.0,
        "spearman": spearman(y_true, y_pred),
        "confusion": {"labels": labels, "matrix": confusion(ti, pi, labels)},
    }


def threshold_table(y_true: Any, y_pred: Any, threshold: float, lo: float, hi: float,
                    step: float = 0.5) -> list[dict[str, Any]]:
    """For each model cut-off: how many documents it keeps and P/R/F1 against 'annotator score >= threshold'."""
    t = np.asarray(y_true, dtype=np.float64) >= threshold
    y_pred = np.asarray(y_pred, dtype=np.float64)
    rows = []
    for cut in np.arange(lo, hi + 1e-9, step):
        p = y_pred >= cut
        prec, rec, f1 = _prf(t, p)
        rows.append({"cutoff": round(float(cut), 3), "keep_rate": float(p.mean()) if len(p) else 0.0,
                     "precision": prec, "recall": rec, "f1": f1})
    return rows


def agreement(score_lists: Sequence[Sequence[float]], threshold: float, lo: float, hi: float) -> dict[str, Any]:
    """Annotation 1 vs annotation 2 on documents annotated at least twice: how well the annotator agrees
    with itself, i.e. the best a model trained on its labels can be expected to do."""
    pairs = [(s[0], s[1]) for s in score_lists if len(s) >= 2]
    if not pairs:
        return {"documents": 0, "note": "no document was annotated more than once"}
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    labels = list(range(int(lo), int(hi) + 1))
    ai, bi = to_int(a, lo, hi), to_int(b, lo, hi)
    return {
        "documents": len(pairs),
        "exact": float(np.mean(ai == bi)),
        "binary_agreement": float(np.mean((a >= threshold) == (b >= threshold))),
        "binary_f1": binary(a, b, threshold)["f1"],
        "macro_f1": macro_f1(ai, bi, labels),
        "spearman": spearman(a, b),
    }


def percentiles(scores: Any) -> list[float]:
    """The 0th..100th percentiles (101 values) of a calibration sample's scores."""
    s = np.asarray(scores, dtype=np.float64)
    return [round(float(x), 6) for x in np.percentile(s, np.arange(101))] if len(s) else []


def keep_top_cutoff(scores: Any, fraction: float) -> float:
    """The score at or above which the top `fraction` of `scores` lies."""
    return float(np.percentile(np.asarray(scores, dtype=np.float64), (1 - fraction) * 100))


def fmt(x: float | None, digits: int = 3) -> str:
    """A metric for a log line or a table: 'n/a' for an undefined one (e.g. Spearman on constant input)."""
    return "n/a" if x is None else f"{x:.{digits}f}"
