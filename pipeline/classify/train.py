"""`textbook classifier train`: labelled rows → split → fit → evaluate → calibrate → `classifiers/<name>/`.

Steps (each small, each reported in metrics.json):
1. read every source, count bad rows, merge repeated annotations of one document;
2. split by hash of the document id (repeats never straddle train and test);
3. fit the backend on the train split (text = the same bounded prefix used at scoring time);
4. evaluate on validation and test, per source, and on evaluation-only sets;
5. score a calibration sample (never training documents) → percentiles → keep-top cut-offs;
6. write the model directory atomically: model file, classifier.json, metrics.json, thresholds.{json,md},
   confusion_matrix.png, README.md (model card).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classify import metrics as M
from pipeline.classify.backends import make_backend
from pipeline.classify.data import SPLITS, Example, LoadReport, load_labelled, load_source, merge, split_of
from pipeline.classify.model import FORMAT, META_FILE, EduClassifier, sha256_file
from pipeline.classify.text import prepare
from pipeline.config.classifier import TrainSection
from pipeline.errors import TextbookError


def labels_for(examples: list[Example], train: TrainSection) -> list[float]:
    if train.mode == "binary":
        return [1 if e.score >= train.threshold else 0 for e in examples]
    if train.mode == "regression":
        return [float(e.score) for e in examples]
    return M.to_int([e.score for e in examples], train.score_min, train.score_max).tolist()


def _score(backend: Any, examples: list[Example], train: TrainSection, batch: int = 1024) -> np.ndarray:
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(examples), batch), desc="scoring", unit="batch", leave=False,
                  disable=len(examples) < 5 * batch):
        texts = [prepare(e.text, train.max_chars, train.lowercase) for e in examples[i:i + batch]]
        out.append(backend.predict_scores(texts))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _eval_block(examples: list[Example], pred: np.ndarray, train: TrainSection) -> dict[str, Any]:
    truth = [e.score for e in examples]
    out = M.evaluate(truth, pred, train.threshold, train.score_min, train.score_max)
    by_source: dict[str, Any] = {}
    for src in sorted({e.source for e in examples}):
        idx = [i for i, e in enumerate(examples) if e.source == src]
        p = pred[idx]
        t = np.asarray([truth[i] for i in idx])
        by_source[src] = {"n": len(idx), "mean_label": float(t.mean()), "mean_score": float(p.mean()),
                          "keep_rate_at_threshold": float(np.mean(p >= train.threshold)),
                          "label_positive_rate": float(np.mean(t >= train.threshold))}
    out["by_source"] = by_source
    return out


def train_classifier(train: TrainSection, keep_top: float | None = None, out_dir: str | Path | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and write `<out_dir>/<name>/`; returns metrics.json's content."""
    keep_top = keep_top if keep_top is not None else train.keep_top
    if train.score_max <= train.score_min:
        raise TextbookError("classifier.train: score_max must be above score_min")
    t0 = time.perf_counter()
    examples, report, repeats = load_labelled(train.sources, train.score_min, train.score_max, train.strict)
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in examples:
        splits[split_of(ex.id, train.split)].append(ex)
    if len(splits["train"]) < 2 or not splits["test"]:
        raise TextbookError(f"too few labelled documents to train and test ({len(examples)} after merging)")
    y_train = labels_for(splits["train"], train)
    classes = sorted({int(y) for y in y_train}) if train.mode != "regression" else \
        list(range(int(train.score_min), int(train.score_max) + 1))
    if train.mode != "regression" and len(classes) < 2:
        raise TextbookError(f"the train split has a single label ({classes}); need at least two")
    log(f"training {train.backend}/{train.mode} on {len(splits['train']):,} documents "
        f"(validation {len(splits['validation']):,}, test {len(splits['test']):,}; "
        f"{repeats:,} repeated annotations merged; bad rows: {dict(report.problems) or 'none'})")
    backend = make_backend(train.backend, train.mode, classes, train.score_max, train.params)
    t_fit = time.perf_counter()
    backend.fit([prepare(e.text, train.max_chars, train.lowercase) for e in splits["train"]], y_train)
    fit_s = time.perf_counter() - t_fit

    results: dict[str, Any] = {}
    t_score = time.perf_counter()
    n_scored = 0
    test_pred = None
    for name in ("validation", "test"):
        if splits[name]:
            pred = _score(backend, splits[name], train)
            n_scored += len(pred)
            results[name] = _eval_block(splits[name], pred, train)
            if name == "test":
                test_pred = pred
    score_s = time.perf_counter() - t_score
    train_ids = {e.id for e in splits["train"]}
    eval_sets = {}
    for src in train.eval_sets:
        rep = LoadReport()
        ex, _ = merge(load_source(src, train.score_min, train.score_max, rep, train.strict))
        held = [e for e in ex if e.id not in train_ids]
        if held:
            block = _eval_block(held, _score(backend, held, train), train)
            block["excluded_in_train_split"] = len(ex) - len(held)
            block["load"] = rep.as_dict()
            eval_sets[src.name or Path(src.path).name] = block
    calibration = _calibrate(backend, train, splits, train_ids, keep_top)
    # only real annotations measure an annotator (fixed source labels always "agree")
    agreement = M.agreement([e.scores for e in examples if not e.fixed], train.threshold, train.score_min,
                            train.score_max)

    metrics = {
        "name": train.name, "backend": train.backend, "mode": train.mode,
        "params": backend.params, "threshold": train.threshold,
        "score_range": [train.score_min, train.score_max], "max_chars": train.max_chars,
        "data": {"documents": len(examples), "repeated_annotations_merged": repeats,
                 "splits": {k: len(v) for k, v in splits.items()}, "split_fractions": list(train.split),
                 "train_label_counts": dict(sorted(Counter(map(str, y_train)).items())),
                 "sources": sorted({e.source for e in examples}), "load": report.as_dict()},
        **results, "eval_sets": eval_sets, "annotator_agreement": agreement,
        "thresholds": M.threshold_table([e.score for e in splits["test"]], test_pred, train.threshold,
                                        train.score_min, train.score_max),
        "calibration": {k: v for k, v in calibration.items() if k != "percentiles"},
        "timing": {"fit_s": round(fit_s, 3), "scoring_docs_per_s": round(n_scored / score_s, 1) if score_s else None,
                   "total_s": round(time.perf_counter() - t0, 3)},
    }
    target = Path(out_dir or train.out_dir) / train.name
    # the texts fitted on, hashed beside the model (pipeline.classify.overlap): scoring them later says so
    write_model_dir(target, backend, train, metrics, calibration, classes,
                    train_texts=[e.text for e in splits["train"]])
    log(f"wrote {target} (test binary F1 {results['test']['binary']['f1']:.3f}, "
        f"macro-F1 {results['test']['macro_f1']:.3f})")
    return metrics


def _calibrate(backend: Any, train: TrainSection, splits: dict[str, list[Example]], train_ids: set[str],
               keep_top: float | None) -> dict[str, Any]:
    if train.calibration:
        rep = LoadReport()
        docs: list[Example] = []
        for src in train.calibration:
            # labels are not needed: a fixed dummy label makes any text file usable
            src = src.model_copy(update={"label": src.label if src.label is not None else train.score_min})
            docs.extend(load_source(src, train.score_min, train.score_max, rep))
        docs = [e for e in merge(docs)[0] if e.id not in train_ids]
        where = "calibration sources (train-split documents excluded)"
    else:
        docs = splits["validation"] + splits["test"]
        where = "validation + test splits"
    if not docs:
        return {"sample": where, "documents": 0, "percentiles": []}
    scores = _score(backend, docs, train)
    pct = M.percentiles(scores)
    out: dict[str, Any] = {"sample": where, "documents": len(docs), "percentiles": pct,
                           "keep_top_cutoffs": {f"{f:g}": M.keep_top_cutoff(scores, f)
                                                for f in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)}}
    if keep_top is not None:
        out["keep_top"] = keep_top
        out["keep_top_cutoff"] = M.keep_top_cutoff(scores, keep_top)
    return out


def write_model_dir(target: Path, backend: Any, train: TrainSection, metrics: dict[str, Any],
                    calibration: dict[str, Any], classes: list[int], train_texts: list[str] | None = None) -> None:
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
            "params": backend.params, "language": train.language,
            "rubric": train.rubric, "annotator": train.annotator, "calibration": calibration,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
        (tmp / "thresholds.json").write_text(json.dumps(metrics["thresholds"], indent=2) + "\n", encoding="utf-8")
        (tmp / "thresholds.md").write_text(threshold_markdown(metrics), encoding="utf-8")
        confusion_png(metrics["test"]["confusion"], tmp / "confusion_matrix.png", train.name)
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
