"""Score calibration: a monotone map from a backend's raw scores onto the rubric scale ("label share").

Raw scores mean different things per mode (an expectation over class probabilities that bunches around the
mean label, `score_max` x P(positive), a ridge regression's output), so "score >= 3" selected almost nothing
in one mode and a different share in another. The map fixes the meaning for every mode: fitted on
cross-validated raw scores (each document scored by a model that did not see it) and the labels of the same
documents, it sends the raw score that the top `p_t` of documents reach to `t`, where `p_t` is the share of
documents the labels put at `>= t`, for every integer `t` strictly inside the rubric's range and for the
threshold. So on data like the labelled data, `score >= t` keeps as many documents as the annotators put at
`>= t`; in particular the default cut-off (the threshold, 3) selects the share the labels call educational.
Between those knots the map is linear and strictly increasing, so the ranking (Spearman, keep-top) is the
raw model's.

Why a map rather than a recorded cut-off: a user's threshold then means the rubric's scale in every mode and
for every tool that reads scores (`evaluate`, `score`, the web stage's cut, a notebook), with nothing else to
carry around; and base-rate matching is a one-parameter rule per knot, which is stable on a few hundred
labels where an F1-optimal cut-off chosen on the same data is noisy (measured in
`benchmarks/results/classifier.md`). The design follows scikit-learn's `CalibratedClassifierCV(ensemble=False)`:
calibrate on cross-validated predictions, then refit the model on all the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METHOD = "label_share"


def fit_label_share(raw: Any, labels: Any, lo: float, hi: float, threshold: float) -> dict[str, Any] | None:
    """Knots of the label-share map from cross-validated raw scores and the labels of the same documents.

    Args:
        raw: (n,) raw backend scores, each from a model that did not see that document.
        labels: (n,) annotator scores (means of repeated annotations allowed) on the rubric scale [lo, hi].
        threshold: the rubric's binary cut-off; always a knot when some but not all labels reach it.

    Returns:
        {"method", "raw": knot positions (strictly increasing), "score": rubric values (strictly increasing),
        "shares": {t: share of labels >= t}} or None when the raw scores cannot be mapped (fewer than two
        distinct values).
    """
    r = np.asarray(raw, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(r) != len(y):
        raise ValueError(f"raw scores and labels differ in length ({len(r)} vs {len(y)})")
    if len(r) < 2 or np.all(r == r[0]):
        return None
    levels = sorted({float(t) for t in range(int(np.ceil(lo + 1e-9)), int(np.floor(hi - 1e-9)) + 1)
                     if lo < t < hi} | ({float(threshold)} if lo < threshold < hi else set()))
    xs, ys, shares = [float(r.min())], [float(lo)], {}
    for t in levels:
        share = float(np.mean(y >= t))
        shares[f"{t:g}"] = share
        if not 0.0 < share < 1.0:
            continue  # no document (or every document) at >= t: nothing to match
        x = float(np.quantile(r, 1.0 - share))
        if x > xs[-1]:  # ties in raw scores can collapse two knots: keep the lower level
            xs.append(x)
            ys.append(t)
    top = float(r.max())
    if top > xs[-1]:
        xs.append(top)
        ys.append(float(hi))
    if len(xs) < 2:
        return None
    return {"method": METHOD, "raw": xs, "score": ys, "shares": shares}


def apply_map(score_map: dict[str, Any] | None, raw: Any, lo: float, hi: float) -> np.ndarray:
    """Raw scores → calibrated float32 scores in [lo, hi]; identity (clipped) when `score_map` is None.

    Inside the knots: linear interpolation. Beyond them: the end segments' slopes carried on, then clipped to
    the rubric's range (a page ranked above every cross-validated page still ranks above them, up to `hi`)."""
    r = np.asarray(raw, dtype=np.float64)
    if not score_map:
        return np.clip(r, lo, hi).astype(np.float32)
    xs = np.asarray(score_map["raw"], dtype=np.float64)
    ys = np.asarray(score_map["score"], dtype=np.float64)
    out = np.interp(r, xs, ys)
    lo_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    hi_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    below, above = r < xs[0], r > xs[-1]
    out[below] = ys[0] + (r[below] - xs[0]) * lo_slope
    out[above] = ys[-1] + (r[above] - xs[-1]) * hi_slope
    return np.clip(out, lo, hi).astype(np.float32)
