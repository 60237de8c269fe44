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
    lines = [f"# Threshold table ({metrics['name']}, test split)", "",
             f"Positive = annotator score >= {thr}. A document is kept when the model's score >= cut-off.", "",
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
    ax.set_title(f"{title}: test confusion", fontsize=9)
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


def model_card(meta: dict[str, Any], metrics: dict[str, Any], train: TrainSection) -> str:
    d = metrics["data"]
    lines = [
        f"# {meta['name']}", "",
        f"Educational-value classifier of the `textbook` pipeline ({meta['backend']} backend, mode "
        f"`{meta['mode']}`). Scores are on the rubric scale {meta['score_min']:g}-{meta['score_max']:g}; the "
        f"default keep threshold is score >= {meta['threshold']:g}.", "",
    ]
    if train.description:
        lines += [train.description.strip(), ""]
    lines += [
        "## Use", "",
        "```python",
        "from pipeline.classify import load_classifier, score_texts",
        f"scores = score_texts(load_classifier('classifiers/{meta['name']}'), texts)",
        "# datatrove: EduScoreTagger('classifiers/...') then EduScoreFilter(threshold=3 | keep_top=0.1, model_dir=...)",
        "```", "",
        f"Only the first **{meta['max_chars']:,} characters** of a document are scored (whitespace collapsed"
        f"{', lower-cased' if meta['lowercase'] else ''}): cost is bounded on huge pages, and a page whose "
        "educational part starts late is under-scored. Empty documents get the minimum score.", "",
        "## Data", "",
        f"- Language: {meta['language']}. Rubric: {meta.get('rubric') or 'n/a'}. Annotator: "
        f"{meta.get('annotator') or 'n/a'}.",
        f"- {d['documents']:,} documents after merging {d['repeated_annotations_merged']:,} repeated annotations; "
        f"split by hash of the document id {d['split_fractions']} → {d['splits']}.",
        f"- Train label counts: {d['train_label_counts']}.",
        f"- Rows not used (bad, or filtered out by a source's `where`): {d['load']['problems'] or 'none'}.", "",
        "| source | test docs | mean label | mean model score | label >= thr | model >= thr |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for src, b in metrics["test"]["by_source"].items():
        lines.append(f"| {src} | {b['n']} | {b['mean_label']:.2f} | {b['mean_score']:.2f} | "
                     f"{b['label_positive_rate']:.0%} | {b['keep_rate_at_threshold']:.0%} |")
    lines += ["", "## Training", "", f"Backend `{meta['backend']}`, hyperparameters:", "", "```json",
              json.dumps(meta["params"], indent=1, sort_keys=True, default=str), "```", "",
              f"Fit time {metrics['timing']['fit_s']} s; scoring {metrics['timing']['scoring_docs_per_s']} docs/s "
              "(one process, 2-core x86-64 CPU).", "",
              "## Metrics", "",
              f"Binary = annotator score >= {meta['threshold']:g} vs model score >= {meta['threshold']:g}; "
              "macro-F1 over rounded integer scores; Spearman between model score and annotator score.", "",
              "| set | n | precision | recall | F1 | macro-F1 | Spearman |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("validation", "test"):
        if name in metrics:
            lines.append(_block_rows(f"{name} split", metrics[name]))
    for name, b in metrics.get("eval_sets", {}).items():
        lines.append(_block_rows(f"{name} (held out)", b))
    ag = metrics["annotator_agreement"]
    if ag.get("documents"):
        lines += ["", f"Annotator self-agreement (ceiling), on {ag['documents']} documents annotated twice: "
                  f"exact {ag['exact']:.1%}, binary agreement {ag['binary_agreement']:.1%}, binary F1 "
                  f"{_f(ag['binary_f1'])}, macro-F1 {_f(ag['macro_f1'])}, Spearman {_f(ag['spearman'])}."]
    else:
        lines += ["", "No repeated annotations in the data: the annotator-agreement ceiling is not measured."]
    cal = metrics.get("calibration", {})
    lines += ["", "Confusion matrix (test): `confusion_matrix.png`; cut-off table: `thresholds.md`."]
    if cal.get("keep_top") is not None:
        lines += ["", f"Recorded default selection: keep the top {cal['keep_top']:.0%} → cut-off "
                  f"{cal['keep_top_cutoff']:.3f} (calibrated on {cal['documents']} documents, {cal['sample']})."]
    lines += ["", "## Intended use and limits", "",
              "Ranking and filtering pre-training documents by the rubric's notion of value. It is a cheap "
              "bag-of-n-grams model: it rewards the vocabulary and register of its positive examples, not "
              "correctness; check the per-source table above for what it learned. Retrain for another rubric, "
              "domain or language with `textbook classifier train`.", ""]
    return "\n".join(lines)
