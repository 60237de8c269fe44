"""`textbook classifier train`: labelled rows → cross-validate → calibrate → refit on all → `classifiers/<name>/`.

Steps (each small, each reported in metrics.json):
1. read every source, count bad rows, merge repeated annotations of one document; `train_only` sources (weak
   labels, other annotators) are fitted on but never measured; `holdout` documents (a hash rule on the text)
   are never fitted on;
2. k-fold cross-validation over the measured documents (folds by hash of the document id, so repeats never
   straddle folds): every document gets a raw score from a model that did not see it;
3. calibrate: the label-share map of `pipeline.classify.calibrate` (raw → rubric scale) fitted on those
   cross-validated scores; the `cv` metrics use maps fitted on the *other* folds only (cross-fitted), so they
   measure the calibration too;
4. refit on every labelled document but the holdout (nothing is held back for good), score the holdout and the
   evaluation-only sets with that shipped model;
5. keep-top percentiles on a calibration sample (default: the cross-validated and holdout scores);
6. write the model directory atomically: model file, classifier.json (with the score map), metrics.json,
   thresholds.{json,md}, confusion_matrix.png, README.md (model card), training_hashes.npz.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classify import metrics as M
from pipeline.classify.backends import Backend, make_backend
from pipeline.classify.calibrate import apply_map, fit_label_share
from pipeline.classify.data import (
    Example,
    LoadReport,
    fold_of,
    is_held_out,
    load_labelled,
    load_source,
    merge,
)
from pipeline.classify.model import FORMAT, META_FILE, EduClassifier, sha256_file
from pipeline.classify.text import prepare
from pipeline.config.classifier import TrainSection
from pipeline.errors import TextbookError


@dataclass
class LabelledData:
    """The documents of a training config, partitioned the way `train_classifier` uses them.

    measured: cross-validated, then fitted on by the final model; train_only: fitted on, never measured;
    holdout: never fitted on, measured by the shipped model. `fitted` = measured + train_only."""

    measured: list[Example]
    train_only: list[Example]
    holdout: list[Example]
    report: LoadReport
    repeats: int
    train_only_dropped: dict[str, int] = field(default_factory=dict)

    @property
    def fitted(self) -> list[Example]:
        return self.measured + self.train_only


def labelled_data(train: TrainSection) -> LabelledData:
    """Read, merge and partition `train.sources` (see `LabelledData`).

    A `train_only` document whose text is also in a measured source, or that falls in the holdout, is dropped
    (counted in `train_only_dropped`). Raises TextbookError when no measured source has a usable row."""
    measured_src = [s for s in train.sources if not s.train_only]
    extra_src = [s for s in train.sources if s.train_only]
    if not measured_src:
        raise TextbookError("classifier.train.sources: at least one source must be measured (not train_only)")
    examples, report, repeats = load_labelled(measured_src, train.score_min, train.score_max, train.strict)
    measured = [e for e in examples if not is_held_out(e, train.holdout)]
    holdout = [e for e in examples if is_held_out(e, train.holdout)]
    extra: list[Example] = []
    dropped: Counter[str] = Counter()
    if extra_src:
        rows: list[Example] = []
        for src in extra_src:
            rows.extend(load_source(src, train.score_min, train.score_max, report, train.strict))
        more, more_repeats = merge(rows)
        repeats += more_repeats
        known_ids = {e.id for e in examples}
        known_texts = {e.text for e in examples}
        for e in more:
            if e.id in known_ids or e.text in known_texts:
                dropped["also_measured"] += 1
            elif is_held_out(e, train.holdout):
                dropped["holdout"] += 1
            else:
                extra.append(e)
    return LabelledData(measured, extra, holdout, report, repeats, dict(dropped))


def labels_for(examples: list[Example], train: TrainSection) -> list[float]:
    """Fit targets (`Example.target`: the source's target_column, else the score): 0/1 at the threshold
    (binary), rounded integers (expected), means (regression)."""
    if train.mode == "binary":
        return [1 if e.target >= train.threshold else 0 for e in examples]
    if train.mode == "regression":
        return [float(e.target) for e in examples]
    return M.to_int([e.target for e in examples], train.score_min, train.score_max).tolist()


def _texts(examples: list[Example], train: TrainSection) -> list[str]:
    return [prepare(e.text, train.max_chars, train.lowercase) for e in examples]


def _raw(backend: Backend, texts: list[str], batch: int = 1024) -> np.ndarray:
    """Raw backend scores of prepared texts (a blank one gets 0, as EduClassifier gives it score_min)."""
    out = np.zeros(len(texts), dtype=np.float32)
    idx = [i for i, t in enumerate(texts) if t]
    for i in range(0, len(idx), batch):
        part = idx[i:i + batch]
        out[part] = backend.predict_scores([texts[j] for j in part])
    return out


def _eval_block(examples: list[Example], pred: np.ndarray, train: TrainSection) -> dict[str, Any]:
    truth = [e.score for e in examples]
    out = M.evaluate(truth, pred, train.threshold, train.score_min, train.score_max)
    by_source: dict[str, Any] = {}
    for src in sorted({e.source for e in examples}):
        idx = [i for i, e in enumerate(examples) if e.source == src]
        p = pred[idx]
        t = np.asarray([truth[i] for i in idx])
        b = M.binary(t, p, train.threshold)
        by_source[src] = {"n": len(idx), "mean_label": float(t.mean()), "mean_score": float(p.mean()),
                          "keep_rate_at_threshold": float(np.mean(p >= train.threshold)),
                          "label_positive_rate": float(np.mean(t >= train.threshold)),
                          "precision": b["precision"], "recall": b["recall"], "f1": b["f1"],
                          "spearman": M.spearman(t, p)}
    out["by_source"] = by_source
    return out


def _new_backend(train: TrainSection, classes: list[int]) -> Backend:
    return make_backend(train.backend, train.mode, classes, train.score_max, train.params)


def _check_classes(labels: list[float], train: TrainSection, what: str) -> None:
    if train.mode != "regression" and len({int(y) for y in labels}) < 2:
        raise TextbookError(f"{what} has a single label ({sorted({int(y) for y in labels})}); need at least two "
                            "(more labelled documents, or fewer cv_folds)")


def train_classifier(train: TrainSection, keep_top: float | None = None, out_dir: str | Path | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Cross-validate, calibrate, refit on all labelled documents (but the holdout) and write
    `<out_dir>/<name>/`; returns metrics.json's content (keys: data, cv, holdout (with a holdout rule),
    eval_sets, annotator_agreement, thresholds, score_map, calibration, timing).

    Raises TextbookError on unusable data: no measured source, fewer than 2 documents per fold, a fold whose
    training part has a single label."""
    keep_top = keep_top if keep_top is not None else train.keep_top
    if train.score_max <= train.score_min:
        raise TextbookError("classifier.train: score_max must be above score_min")
    t0 = time.perf_counter()
    data = labelled_data(train)
    dev, extra, held = data.measured, data.train_only, data.holdout
    k = train.cv_folds
    if len(dev) < 2 * k:
        raise TextbookError(f"too few labelled documents to cross-validate: {len(dev)} measured documents for "
                            f"{k} folds (need at least {2 * k})")
    folds = np.array([fold_of(e.id, k) for e in dev])
    y_dev = labels_for(dev, train)
    y_extra = labels_for(extra, train)
    y_all = y_dev + y_extra
    _check_classes(y_all, train, "the labelled data")
    classes = sorted({int(v) for v in y_all}) if train.mode != "regression" else \
        list(range(int(train.score_min), int(train.score_max) + 1))
    dev_texts, extra_texts = _texts(dev, train), _texts(extra, train)
    truth = np.array([e.score for e in dev], dtype=np.float64)
    log(f"training {train.backend}/{train.mode}: {k}-fold cross-validation over {len(dev):,} documents"
        f"{f' (+{len(extra):,} train-only)' if extra else ''}, then a refit on all of them; holdout "
        f"{len(held):,}; {data.repeats:,} repeated annotations merged; bad rows: "
        f"{dict(data.report.problems) or 'none'}")

    # 2. cross-validation: every measured document scored by a model that did not see it
    oof = np.zeros(len(dev), dtype=np.float64)
    t_cv = time.perf_counter()
    for f in range(k):
        fit_idx = np.flatnonzero(folds != f)
        out_idx = np.flatnonzero(folds == f)
        if not len(out_idx):
            continue
        y_fit = [y_dev[i] for i in fit_idx] + y_extra
        _check_classes(y_fit, train, f"cross-validation fold {f + 1}'s training part")
        b = _new_backend(train, classes)
        b.fit([dev_texts[i] for i in fit_idx] + extra_texts, y_fit, final=False)
        oof[out_idx] = _raw(b, [dev_texts[i] for i in out_idx])
        log(f"  fold {f + 1}/{k}: fitted on {len(fit_idx) + len(extra):,}, scored {len(out_idx):,}")
    cv_s = time.perf_counter() - t_cv

    # 3. calibration: cross-fitted for the cv metrics, on every cross-validated score for the shipped model
    lo, hi = train.score_min, train.score_max

    def fit_map(idx: np.ndarray) -> dict[str, Any] | None:
        if train.calibrate == "none":
            return None
        return fit_label_share(oof[idx], truth[idx], lo, hi, train.threshold)

    cv_scores = np.zeros(len(dev), dtype=np.float32)
    for f in range(k):
        out_idx = np.flatnonzero(folds == f)
        if len(out_idx):
            cv_scores[out_idx] = apply_map(fit_map(np.flatnonzero(folds != f)), oof[out_idx], lo, hi)
    score_map = fit_map(np.arange(len(dev)))
    cv_block = _eval_block(dev, cv_scores, train)
    cv_block["uncalibrated"] = {"binary": M.binary(truth, oof, train.threshold), "spearman": M.spearman(truth, oof)}

    # 4. the shipped model: refit on everything but the holdout
    backend = _new_backend(train, classes)
    t_fit = time.perf_counter()
    backend.fit(dev_texts + extra_texts, y_all, final=True)
    fit_s = time.perf_counter() - t_fit

    def shipped_scores(examples: list[Example]) -> np.ndarray:
        return apply_map(score_map, _raw(backend, _texts(examples, train)), lo, hi)

    results: dict[str, Any] = {"cv": cv_block}
    t_score = time.perf_counter()
    hold_scores = None
    if held:
        hold_scores = shipped_scores(held)
        results["holdout"] = _eval_block(held, hold_scores, train)
        results["holdout"]["rule"] = train.holdout.model_dump() if train.holdout else None
    score_s = time.perf_counter() - t_score
    fitted_ids = {e.id for e in data.fitted}
    fitted_texts = {e.text for e in data.fitted}
    eval_sets = {}
    for src in train.eval_sets:
        rep = LoadReport()
        ex, _ = merge(load_source(src, lo, hi, rep, train.strict))
        unseen = [e for e in ex if e.id not in fitted_ids and e.text not in fitted_texts]
        if unseen:
            block = _eval_block(unseen, shipped_scores(unseen), train)
            block["excluded_fitted"] = len(ex) - len(unseen)
            block["load"] = rep.as_dict()
            eval_sets[src.name or Path(src.path).name] = block

    # 5. keep-top percentiles
    calibration = _keep_top_sample(train, fitted_ids, keep_top, shipped_scores, cv_scores, hold_scores)
    # only real annotations measure an annotator (fixed source labels always "agree")
    agreement = M.agreement([e.scores for e in dev + held if not e.fixed], train.threshold, lo, hi)
    main = "holdout" if held else "cv"
    main_truth = [e.score for e in (held if held else dev)]
    main_pred = hold_scores if held else cv_scores

    metrics = {
        "name": train.name, "backend": train.backend, "mode": backend.mode,
        "params": backend.params, "threshold": train.threshold,
        "score_range": [lo, hi], "max_chars": train.max_chars,
        "data": {"documents": len(dev) + len(held), "cross_validated": len(dev), "holdout": len(held),
                 "train_only": len(extra), "fitted": len(dev) + len(extra), "cv_folds": k,
                 "holdout_rule": train.holdout.model_dump() if train.holdout else None,
                 "repeated_annotations_merged": data.repeats, "train_only_dropped": data.train_only_dropped,
                 "label_counts": dict(sorted(Counter(f"{float(v):g}" for v in y_dev).items(),
                                             key=lambda kv: float(kv[0]))),
                 "sources": sorted({e.source for e in dev + held}),
                 "train_only_sources": sorted({e.source for e in extra}), "load": data.report.as_dict()},
        **results, "eval_sets": eval_sets, "annotator_agreement": agreement,
        "thresholds_from": main,
        "thresholds": M.threshold_table(main_truth, main_pred, train.threshold, lo, hi),
        "score_map": score_map,
        "calibration": {key: v for key, v in calibration.items() if key != "percentiles"},
        "timing": {"cv_fits_s": round(cv_s, 3), "fit_s": round(fit_s, 3),
                   "scoring_docs_per_s": round(len(held) / score_s, 1) if held and score_s else None,
                   "total_s": round(time.perf_counter() - t0, 3)},
    }
    target = Path(out_dir or train.out_dir) / train.name
    # the texts fitted on, hashed beside the model (pipeline.classify.overlap): scoring them later says so
    write_model_dir(target, backend, train, metrics, calibration, classes, score_map=score_map,
                    train_texts=[e.text for e in data.fitted])
    shown = results[main]
    log(f"wrote {target} ({main} binary F1 {shown['binary']['f1']:.3f} at {train.threshold:g}, Spearman "
        f"{M.fmt(shown['spearman'])}, macro-F1 {shown['macro_f1']:.3f})")
    return metrics


def _keep_top_sample(train: TrainSection, fitted_ids: set[str], keep_top: float | None,
                     score: Callable[[list[Example]], np.ndarray], cv_scores: np.ndarray,
                     hold_scores: np.ndarray | None) -> dict[str, Any]:
    if train.calibration:
        rep = LoadReport()
        docs: list[Example] = []
        for src in train.calibration:
            # labels are not needed: a fixed dummy label makes any text file usable
            src = src.model_copy(update={"label": src.label if src.label is not None else train.score_min})
            docs.extend(load_source(src, train.score_min, train.score_max, rep))
        docs = [e for e in merge(docs)[0] if e.id not in fitted_ids]
        where = "calibration sources (documents the model was fitted on excluded)"
        scores = score(docs) if docs else np.zeros(0)
    else:
        parts = [cv_scores] + ([hold_scores] if hold_scores is not None else [])
        scores = np.concatenate(parts)
        where = "cross-validated scores of the labelled documents" + (" and the holdout" if len(parts) > 1 else "")
    if not len(scores):
        return {"sample": where, "documents": 0, "percentiles": []}
    out: dict[str, Any] = {"sample": where, "documents": int(len(scores)), "percentiles": M.percentiles(scores),
                           "keep_top_cutoffs": {f"{f:g}": M.keep_top_cutoff(scores, f)
                                                for f in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)}}
    if keep_top is not None:
        out["keep_top"] = keep_top
        out["keep_top_cutoff"] = M.keep_top_cutoff(scores, keep_top)
    return out


def write_model_dir(target: Path, backend: Any, train: TrainSection, metrics: dict[str, Any],
                    calibration: dict[str, Any], classes: list[int], score_map: dict[str, Any] | None = None,
                    train_texts: list[str] | None = None) -> None:
    """Build in a temporary sibling directory and swap it in: a crash never leaves half a model."""
    from pipeline.classify.card import confusion_png, model_card, threshold_markdown

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model_file = backend.save(tmp)
        if train_texts is not None:  # training_hashes.npz: the overlap warning of score/evaluate
            from pipeline.classify.overlap import write_training_hashes

            write_training_hashes(tmp, train_texts)
        meta = {
            "format": FORMAT, "name": train.name, "backend": train.backend, "mode": backend.mode,
            "model_file": model_file, "model_sha256": sha256_file(tmp / model_file),
            "classes": classes, "score_min": train.score_min, "score_max": train.score_max,
            "threshold": train.threshold, "max_chars": train.max_chars, "lowercase": train.lowercase,
            "score_map": score_map,
            "params": backend.params, "language": train.language,
            "rubric": train.rubric, "annotator": train.annotator, "calibration": calibration,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
        (tmp / "thresholds.json").write_text(json.dumps(metrics["thresholds"], indent=2) + "\n", encoding="utf-8")
        (tmp / "thresholds.md").write_text(threshold_markdown(metrics), encoding="utf-8")
        main = metrics["thresholds_from"]
        confusion_png(metrics[main]["confusion"], tmp / "confusion_matrix.png", f"{train.name}: {main}")
        (tmp / "README.md").write_text(model_card(meta, metrics, train), encoding="utf-8")
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def evaluate_model(clf: EduClassifier, sources: list[Any], threshold: float | None = None,
                   strict: bool = False, guards: bool = True) -> dict[str, Any]:
    """Metrics of a trained model on labelled sources (all rows; no split), scored through the guards
    (`pipeline.classify.guards`); `guards` and `training_overlap` (documents that are training texts) in the
    result."""
    rep = LoadReport()
    rows: list[Example] = []
    for src in sources:
        rows.extend(load_source(src, clf.score_min, clf.score_max, rep, strict))
    examples, repeats = merge(rows)
    if not examples:
        raise TextbookError(f"no usable labelled documents ({dict(rep.problems)})")
    thr = clf.threshold if threshold is None else threshold
    from pipeline.classify.guards import GuardedScorer  # hook of issue 14 part B: guards + overlap figures

    guarded = GuardedScorer(clf, enabled=guards).score([e.text for e in examples])
    pred = guarded.scores
    truth = [e.score for e in examples]
    out = M.evaluate(truth, pred, thr, clf.score_min, clf.score_max)
    out.update(guarded.metrics_fields(guards))
    out["thresholds"] = M.threshold_table(truth, pred, thr, clf.score_min, clf.score_max)
    out["annotator_agreement"] = M.agreement([e.scores for e in examples], thr, clf.score_min, clf.score_max)
    out["load"] = rep.as_dict()
    out["repeated_annotations_merged"] = repeats
    out["model"] = clf.name
    return out


def record_keep_top(clf: EduClassifier, texts: list[str], keep_top: float, sample: str) -> dict[str, Any]:
    """Calibrate a keep-top cut-off on `texts` and record it in the model's classifier.json."""
    from pipeline.io import atomic_write_text

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise TextbookError("calibration sample is empty")
    scores = clf.score(texts)
    cal = dict(clf.meta.get("calibration", {}))
    cal.update({"sample": sample, "documents": len(texts), "percentiles": M.percentiles(scores),
                "keep_top": keep_top, "keep_top_cutoff": M.keep_top_cutoff(scores, keep_top)})
    clf.meta["calibration"] = cal
    atomic_write_text(clf.model_dir / META_FILE, json.dumps(clf.meta, indent=2) + "\n")
    return cal
