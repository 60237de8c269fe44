"""Human-readable outputs of a training run: model card (README.md), threshold table, confusion-matrix PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config.classifier import TrainSection


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def threshold_markdown(metrics: dict[str, Any]) -> str:
    thr = metrics["threshold"]
    where = {"holdout": "holdout documents, shipped model",
             "cv": "cross-validated scores, cross-fitted calibration"}[metrics["thresholds_from"]]
    lines = [f"# Threshold table ({metrics['name']}, {where})", "",
             f"Positive = annotator score >= {thr:g}. A document is kept when the model's (calibrated) score >= "
             "cut-off.", "",
             "| cut-off | keep rate | precision | recall | F1 |", "|---:|---:|---:|---:|---:|"]
    for r in metrics["thresholds"]:
        lines.append(f"| {r['cutoff']:g} | {r['keep_rate']:.1%} | {_f(r['precision'])} | {_f(r['recall'])} "
                     f"| {_f(r['f1'])} |")
    cal = metrics.get("calibration", {})
    if cal.get("keep_top_cutoffs"):
        lines += ["", f"Keep-top cut-offs calibrated on {cal['documents']} documents ({cal['sample']}):", "",
                  "| keep top | cut-off |", "|---:|---:|"]
        lines += [f"| {float(k):.0%} | {v:.3f} |" for k, v in cal["keep_top_cutoffs"].items()]
    return "\n".join(lines) + "\n"


def confusion_png(confusion: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, m = confusion["labels"], confusion["matrix"]
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=110)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("model score (rounded)")
    ax.set_ylabel("annotator score")
    ax.set_title(f"{title} confusion", fontsize=9)
    top = max((max(r) for r in m), default=0) or 1
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _block_rows(name: str, b: dict[str, Any]) -> str:
    bi = b["binary"]
    return (f"| {name} | {b['n']} | {_f(bi['precision'])} | {_f(bi['recall'])} | {_f(bi['f1'])} | "
            f"{_f(b['macro_f1'])} | {_f(b['spearman'])} |")


def _source_rows(blocks: dict[str, Any], thr: float) -> list[str]:
    lines = [f"| set | source | n | labels >= {thr:g} | kept at {thr:g} | precision | recall | F1 | Spearman |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for set_name, block in blocks.items():
        for src, b in block["by_source"].items():
            lines.append(f"| {set_name} | {src} | {b['n']} | {b['label_positive_rate']:.1%} | "
                         f"{b['keep_rate_at_threshold']:.1%} | {_f(b.get('precision'))} | {_f(b.get('recall'))} | "
                         f"{_f(b.get('f1'))} | {_f(b.get('spearman'))} |")
    return lines


def model_card(meta: dict[str, Any], metrics: dict[str, Any], train: TrainSection) -> str:
    """README.md of a model directory: use, data, calibration, metrics per set and source, limits.

    Sections a config can extend: `train.description` (a paragraph after the summary)."""
    d = metrics["data"]
    thr = meta["threshold"]
    lines = [
        f"# {meta['name']}", "",
        f"Educational-value classifier of the `textbook` pipeline ({meta['backend']} backend, mode "
        f"`{meta['mode']}`). Scores are on the rubric scale {meta['score_min']:g}-{meta['score_max']:g} and "
        f"calibrated ({'label share' if meta.get('score_map') else 'none: raw backend scores'}); the default "
        f"keep threshold is score >= {thr:g}.", "",
    ]
    if train.description:
        lines += [train.description.strip(), ""]
    lines += [
        "## Use", "",
        "```python",
        "from pipeline.classify import load_classifier, score_texts",
        f"scores = score_texts(load_classifier('classifiers/{meta['name']}'), texts)",
        "```", "",
        f"`textbook classifier score classifiers/{meta['name']} DOCS --out scored/` and the web stage "
        f"(`web.edu`) score through the guards of `pipeline.classify.guards`; their default cut-off is {thr:g}.", "",
        f"Only the first **{meta['max_chars']:,} characters** of a document are scored (whitespace collapsed"
        f"{', lower-cased' if meta['lowercase'] else ''}): cost is bounded on huge pages, and a page whose "
        "educational part starts late is under-scored. Empty documents get the minimum score.", "",
        "## Data", "",
        f"- Language: {meta['language']}. Rubric: {meta.get('rubric') or 'n/a'}. Annotator: "
        f"{meta.get('annotator') or 'n/a'}.",
        f"- {d['documents']:,} measured documents after merging {d['repeated_annotations_merged']:,} repeated "
        f"annotations: {d['cross_validated']:,} cross-validated ({d['cv_folds']} folds by hash of the document "
        f"id) and {d['holdout']:,} held out"
        + (f" (`int(sha256(text)[:8], 16) % {d['holdout_rule']['modulo']} == {d['holdout_rule']['remainder']}`:"
           " never fitted on, not even by the final refit)" if d.get("holdout_rule") else "") + ".",
        f"- Train-only documents (fitted on, never measured): {d['train_only']:,} from "
        f"{', '.join(d['train_only_sources']) or 'none'}; dropped as also measured or held out: "
        f"{d['train_only_dropped'] or 'none'}.",
        f"- The shipped model is fitted on all {d['fitted']:,} cross-validated and train-only documents.",
        f"- Label counts (cross-validated documents, as fitted): {d['label_counts']}.",
        f"- Rows not used (bad, or filtered out by a source's `where`): {d['load']['problems'] or 'none'}.", "",
        "## Calibration", "",
    ]
    sm = meta.get("score_map")
    if sm:
        knots = ", ".join(f"{x:.3f} → {y:g}" for x, y in zip(sm["raw"], sm["score"], strict=True))
        lines += [
            "Raw backend scores are mapped onto the rubric scale by a monotone piecewise-linear map fitted on the "
            "cross-validated raw scores (`pipeline.classify.calibrate`, label share): score >= t keeps the share "
            "of documents the labels put at >= t, for each integer t and the threshold. So the default cut-off "
            f"({thr:g}) selects, on data like the labelled data, as many pages as the annotators scored >= {thr:g}; "
            "ranking (Spearman, keep-top) is the raw model's.", "",
            f"Knots (raw → score): {knots}. Label shares: "
            + ", ".join(f">= {t}: {v:.1%}" for t, v in sm["shares"].items()) + ".", "",
        ]
        un = metrics["cv"]["uncalibrated"]["binary"]
        lines += [f"Without the map, the raw scores at {thr:g} would keep {un['predicted_positive_rate']:.1%} of the "
                  f"cross-validated documents (recall {un['recall']:.3f}, F1 {un['f1']:.3f}).", ""]
    else:
        lines += ["None: scores are the backend's raw scores.", ""]
    lines += ["## Metrics", "",
              f"Binary = annotator score >= {thr:g} vs model score >= {thr:g} (the default cut-off); macro-F1 over "
              "rounded integer scores; Spearman between model score and annotator score. `cv`: each document "
              "scored by a model fitted without its fold, calibrated by a map fitted without its fold. "
              "`holdout`: the shipped model on documents it never saw.", "",
              "| set | n | precision | recall | F1 | macro-F1 | Spearman |", "|---|---:|---:|---:|---:|---:|---:|"]
    blocks = {"cv": metrics["cv"]}
    if "holdout" in metrics:
        blocks["holdout"] = metrics["holdout"]
    for name, b in blocks.items():
        lines.append(_block_rows(name, b))
    for name, b in metrics.get("eval_sets", {}).items():
        lines.append(_block_rows(f"{name} (evaluation only)", b))
        blocks[name] = b
    lines += ["", "Per source:", ""] + _source_rows(blocks, thr)
    ag = metrics["annotator_agreement"]
    if ag.get("documents"):
        lines += ["", f"Annotator self-agreement (ceiling), on {ag['documents']} documents annotated twice: "
                  f"exact {ag['exact']:.1%}, binary agreement {ag['binary_agreement']:.1%}, binary F1 "
                  f"{_f(ag['binary_f1'])}, macro-F1 {_f(ag['macro_f1'])}, Spearman {_f(ag['spearman'])}."]
    else:
        lines += ["", "No repeated annotations in the data: the annotator-agreement ceiling is not measured here."]
    t = metrics["timing"]
    lines += ["", f"Confusion matrix ({metrics['thresholds_from']}): `confusion_matrix.png`; cut-off table: "
              "`thresholds.md`.", "",
              "## Training", "", f"Backend `{meta['backend']}`, hyperparameters:", "", "```json",
              json.dumps(meta["params"], indent=1, sort_keys=True, default=str), "```", "",
              f"Cross-validation fits {t['cv_fits_s']} s, final fit {t['fit_s']} s (one process, shared 2-core "
              "x86-64 CPU).", ""]
    cal = metrics.get("calibration", {})
    if cal.get("keep_top") is not None:
        lines += [f"Recorded default selection: keep the top {cal['keep_top']:.0%} → cut-off "
                  f"{cal['keep_top_cutoff']:.3f} (calibrated on {cal['documents']} documents, {cal['sample']}).", ""]
    lines += ["## Intended use and limits", "",
              "Ranking and filtering pre-training documents by the rubric's notion of value. It is a cheap "
              "bag-of-n-grams model: it rewards the vocabulary and register of its positive examples, not "
              "correctness; check the per-source table above for what it learned. Retrain for another rubric, "
              "domain or language with `textbook classifier train`.", ""]
    if train.limits:
        lines += [train.limits.strip(), ""]
    return "\n".join(lines)
