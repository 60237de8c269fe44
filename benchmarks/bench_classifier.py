"""Classifier benchmarks (run by hand, not in tests); results in benchmarks/results/classifier.md.

    .venv/bin/python benchmarks/bench_classifier.py [--parts speed,quality,rotation,selection,agreement]

Held-out documents everywhere: `int(sha256(text)[:8], 16) % 5 == 1` (the `holdout` rule of the shipped
configs; `../shared/data` already removed its own hidden bucket 0). Nothing below is fitted on them.

1. speed: scoring throughput, docs/s in ONE process on the same real documents (Dolma CC, FineWeb sample,
   FineWeb-legal pages), best of N interleaved repeats: datatrove's `FastTextClassifierFilter` vs our
   `EduScoreTagger` on the SAME fastText model file (the scoring machinery), and our shipped default model
   (`classifiers/edu-en`, TF-IDF + ridge) through the tagger with and without the guards.
2. quality: per data set (English edu = Llama-3 labels, legal value, Danish human labels) the CLI retrain of
   the shipped config (`train_classifier` on the YAML as shipped) vs quick baselines (TF-IDF + logistic at
   P >= 0.5, the same with balanced class weights, plain fastText predicting the label) and our pipeline in
   every mode (sklearn binary / expected / regression, fastText expected / binary; all label-share
   calibrated, cut-off = the threshold): binary P/R/F1 at the config's threshold and Spearman on the holdout.
3. rotation: the English default config with each of the four hash buckets 1-4 as the holdout in turn (how
   much of a holdout figure is the draw of the bucket).
4. selection: how the English default was chosen: cross-validated F1/Spearman (dev documents only, never the
   holdout) for prefix lengths and the train-only extras.
5. agreement: Llama-3 vs the human majority on the same pages (the ceiling), on all 414 and on the holdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

HOLDOUT = {"modulo": 5, "remainder": 1}
CONFIGS = {"edu (en, Llama-3)": "configs/classifier/edu-en.yaml",
           "legal (en, mistral)": "configs/classifier/legal-fasttext.yaml",
           "danish (da, human)": "configs/classifier/danish-human.yaml"}


def _train_section(config: str, **update: Any) -> Any:
    from pipeline.config import load_config
    from pipeline.paths import repo_path

    t = load_config(repo_path(config)).classifier.train
    return t.model_copy(update=update) if update else t


# ------------------------------------------------------------------------------------------------ speed
def real_documents(shared: Path) -> list[str]:
    import pyarrow.parquet as pq

    from pipeline.classify.data import LoadReport, load_source
    from pipeline.config.classifier import LabelSource

    srcs = [LabelSource(path=str(shared / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"),
                        label=0),
            LabelSource(path=str(shared / "web/fineweb_sample_300/fineweb_subset.json"), text_column="original_text",
                        label=0)]
    texts = [e.text for s in srcs for e in load_source(s, 0, 5, LoadReport())]
    legal = pq.read_table(shared / "edu_labels/fineweb_legal_mistral/annotations.parquet", columns=["id", "text"])
    seen = set()
    for i, t in zip(legal.column("id").to_pylist(), legal.column("text").to_pylist(), strict=True):
        if i not in seen:
            seen.add(i)
            texts.append(t)
    return texts


def fasttext_model(tmp: Path) -> Path:
    """A fastText model directory of ours (the legal config, fastText binary) for the like-for-like race."""
    from pipeline.classify.train import train_classifier

    t = _train_section(CONFIGS["legal (en, mistral)"], name="ft-speed", backend="fasttext", mode="binary",
                       params={"quantize": True}, cv_folds=2)
    train_classifier(t, out_dir=tmp, log=lambda s: None)
    return tmp / "ft-speed"


def bench_speed(shared: Path, repeats: int) -> list[dict]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import FastTextClassifierFilter

    from pipeline.classify.datatrove_steps import EduScoreTagger
    from pipeline.classify.model import load_classifier
    from pipeline.paths import repo_path

    texts = real_documents(shared)
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    with tempfile.TemporaryDirectory() as tmp:
        ft_dir = fasttext_model(Path(tmp))
        ft = load_classifier(ft_dir)
        model_file = str(ft_dir / ft.meta["model_file"])
        edu = str(repo_path("classifiers", "edu-en"))
        runners = {
            # keep_labels with min score 0 keeps everything (annotate-only); datatrove 0.10.1 crashes when neither
            # keep_labels nor remove_labels is given (`[] + None` in its label check)
            "datatrove FastTextClassifierFilter (fastText model, whole doc)": lambda: FastTextClassifierFilter(
                model_file, keep_labels=("1", 0.0), save_labels_in_metadata=True),
            "ours EduScoreTagger, same fastText model, whole doc, no guards": lambda: EduScoreTagger(
                str(ft_dir), max_chars=0, guards=False),
            f"ours EduScoreTagger, same fastText model, prefix {ft.max_chars}, no guards": lambda: EduScoreTagger(
                str(ft_dir), guards=False),
            "ours EduScoreTagger, same fastText model, prefix, guards": lambda: EduScoreTagger(str(ft_dir)),
            "ours EduScoreTagger, default edu-en (TF-IDF+ridge), prefix 3000, no guards": lambda: EduScoreTagger(
                edu, guards=False),
            "ours EduScoreTagger, default edu-en (TF-IDF+ridge), prefix 3000, guards": lambda: EduScoreTagger(edu),
        }
        steps = {name: make() for name, make in runners.items()}
        for step in steps.values():  # load models and warm up outside the timing
            for _ in step.run(copy.deepcopy(docs[:50])):
                pass
        best: dict[str, float] = {name: float("inf") for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():  # interleaved, so load changes hit every contender alike
                batch = copy.deepcopy(docs)
                t0 = time.perf_counter()
                n = sum(1 for _ in step.run(batch))
                best[name] = min(best[name], time.perf_counter() - t0)
                assert n == len(docs)
    base = len(docs) / best["datatrove FastTextClassifierFilter (fastText model, whole doc)"]
    chars = sum(map(len, texts))
    return [{"step": name, "docs": len(docs), "mchars": round(chars / 1e6, 1), "seconds": round(s, 3),
             "docs_per_s": round(len(docs) / s, 1), "vs_datatrove": round(len(docs) / s / base, 2)}
            for name, s in best.items()]


# ---------------------------------------------------------------------------------------------- quality
def _holdout_split(config: str) -> tuple[list[Any], list[Any], float]:
    """(train examples, holdout examples, threshold) of a config's measured sources, by the holdout rule."""
    from pipeline.classify.train import labelled_data

    t = _train_section(config)
    d = labelled_data(t)
    return d.measured, d.holdout, t.threshold


def baselines(config: str) -> list[dict]:
    """Quick baselines fitted on the measured non-holdout documents, judged on the holdout at the threshold."""
    import fasttext
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from pipeline.classify.text import prepare

    train, held, thr = _holdout_split(config)
    xt = [prepare(e.text, 4000) for e in train]
    xh = [prepare(e.text, 4000) for e in held]
    yt = np.array([e.score >= thr for e in train], dtype=int)
    truth = np.array([e.score for e in held])
    rows = []
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    a, b = vec.fit_transform(xt), vec.transform(xh)
    for name, cw in (("TF-IDF + logistic (P >= 0.5)", None), ("TF-IDF + logistic, balanced (P >= 0.5)", "balanced")):
        p = LogisticRegression(C=4.0, max_iter=3000, class_weight=cw).fit(a, yt).predict_proba(b)[:, 1]
        rows.append(_row(name, truth, p >= 0.5, p, thr))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        path.write_text("".join(f"__label__{y} {x}\n" for x, y in zip(xt, yt, strict=True)), encoding="utf-8")
        ft = fasttext.train_supervised(str(path), epoch=25, lr=0.5, wordNgrams=2, dim=32, thread=1, seed=0,
                                       verbose=0)
        labels, probs = ft.f.multilinePredict(xh, 1, 0.0, "replace")
        pos = np.array([lab[0] == "__label__1" for lab in labels])
        p1 = np.array([pr[0] if lab[0] == "__label__1" else 1 - pr[0] for lab, pr in zip(labels, probs, strict=True)])
        rows.append(_row("plain fastText (predicted label)", truth, pos, p1, thr))
    return rows


def _row(name: str, truth: Any, keep: Any, score: Any, thr: float) -> dict:
    from pipeline.classify import metrics as M

    b = M.binary([float(t >= thr) for t in truth], keep.astype(float), 0.5)  # truth and decision as 0/1
    return {"model": name, "n": len(truth), "positives": b["positives"], "precision": b["precision"],
            "recall": b["recall"], "f1": b["f1"], "spearman": M.spearman(truth, score)}


OUR_MODES = [
    ("ours sklearn regression (TF-IDF + ridge)", {"backend": "sklearn", "mode": "regression",
                                                 "params": {"features": "tfidf", "head": "ridge"}}),
    ("ours sklearn expected (TF-IDF + multinomial logistic)", {"backend": "sklearn", "mode": "expected",
                                                               "params": {"features": "tfidf", "head": "logistic"}}),
    ("ours sklearn binary (TF-IDF + logistic)", {"backend": "sklearn", "mode": "binary",
                                                 "params": {"features": "tfidf", "head": "logistic"}}),
    ("ours fastText expected", {"backend": "fasttext", "mode": "expected", "params": {"quantize": False}}),
    ("ours fastText binary", {"backend": "fasttext", "mode": "binary", "params": {"quantize": False}}),
]


def ours(config: str, modes: bool, tmp: Path) -> list[dict]:
    from pipeline.classify.train import train_classifier

    variants = [("ours: shipped config (CLI retrain)", {})]
    if modes:
        variants += OUR_MODES
    rows = []
    for name, update in variants:
        t = _train_section(config, name="bench", **update)
        t0 = time.perf_counter()
        m = train_classifier(t, out_dir=tmp, log=lambda s: None)
        h, u = m["holdout"], m["cv"]["uncalibrated"]["binary"]
        rows.append({"model": name, "n": h["n"], "positives": h["binary"]["positives"],
                     "precision": h["binary"]["precision"], "recall": h["binary"]["recall"], "f1": h["binary"]["f1"],
                     "spearman": h["spearman"], "cv_f1": m["cv"]["binary"]["f1"], "uncalibrated_cv_recall": u["recall"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {name}: holdout F1 {rows[-1]['f1']:.3f}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- rotation
def rotation(tmp: Path) -> list[dict]:
    from pipeline.classify.train import train_classifier
    from pipeline.config.classifier import HoldoutRule

    rows = []
    for r in (1, 2, 3, 4):
        t = _train_section(CONFIGS["edu (en, Llama-3)"], name="rot", holdout=HoldoutRule(modulo=5, remainder=r),
                           calibration=[], eval_sets=[])
        m = train_classifier(t, out_dir=tmp, log=lambda s: None)
        h = m["holdout"]
        rows.append({"bucket": r, "n": h["n"], "positives": h["binary"]["positives"], "f1": h["binary"]["f1"],
                     "precision": h["binary"]["precision"], "recall": h["binary"]["recall"],
                     "spearman": h["spearman"], "cv_f1": m["cv"]["binary"]["f1"],
                     "best_cutoff_f1": max(x["f1"] for x in m["thresholds"])})
        print(f"  bucket {r}: F1 {rows[-1]['f1']:.3f}", flush=True)
    return rows


# -------------------------------------------------------------------------------------------- selection
def selection() -> list[dict]:
    """Cross-validated (dev only) F1 at 3 after cross-fitted label-share calibration, 3 fold seeds."""
    import numpy as np
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    from pipeline.classify import metrics as M
    from pipeline.classify.calibrate import apply_map, fit_label_share
    from pipeline.classify.data import _hash01
    from pipeline.classify.text import prepare
    from pipeline.classify.train import labelled_data

    d = labelled_data(_train_section(CONFIGS["edu (en, Llama-3)"]))
    y = np.array([e.score for e in d.measured])
    extra = {"fineweb-edu-classifier": [e for e in d.train_only if e.source == "fineweb-edu-classifier"],
             "fineweb-edu-llama33": [e for e in d.train_only if e.source == "fineweb-edu-llama33"]}
    rows = []
    for n_chars in (2000, 3000, 4000):
        texts = [prepare(e.text, n_chars) for e in d.measured]
        ex_texts = {k: [prepare(e.text, n_chars) for e in v] for k, v in extra.items()}
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True)
        x_all = vec.fit_transform(texts + ex_texts["fineweb-edu-classifier"] + ex_texts["fineweb-edu-llama33"])
        x = x_all[:len(texts)]
        n1 = len(texts) + len(ex_texts["fineweb-edu-classifier"])
        xe = {"fineweb-edu-classifier": x_all[len(texts):n1], "fineweb-edu-llama33": x_all[n1:]}
        ye = {k: np.array([e.score for e in v]) for k, v in extra.items()}
        for use in ((), ("fineweb-edu-classifier",), ("fineweb-edu-llama33",),
                    ("fineweb-edu-classifier", "fineweb-edu-llama33")):
            f1s, sps = [], []
            for seed in range(3):
                folds = np.array([min(int(_hash01(f"{e.id}|{seed}") * 5), 4) for e in d.measured])
                oof = np.zeros(len(y))
                for f in range(5):
                    tr, te = folds != f, folds == f
                    xs = sp.vstack([x[tr]] + [xe[k] for k in use])
                    ys = np.concatenate([y[tr]] + [ye[k] for k in use])
                    oof[te] = Ridge(alpha=1.0).fit(xs, ys).predict(x[te])
                cal = np.zeros(len(y))
                for f in range(5):
                    tr, te = folds != f, folds == f
                    cal[te] = apply_map(fit_label_share(oof[tr], y[tr], 0, 5, 3), oof[te], 0, 5)
                f1s.append(M.binary(y, cal, 3)["f1"])
                sps.append(M.spearman(y, oof))
            rows.append({"max_chars": n_chars, "train_only": "+".join(use) or "none",
                         "cv_f1": float(np.mean(f1s)), "cv_f1_sd": float(np.std(f1s)), "cv_spearman": float(np.mean(sps))})
            print(f"  {rows[-1]}", flush=True)
    return rows


# -------------------------------------------------------------------------------------------- agreement
def agreement(shared: Path) -> list[dict]:
    import numpy as np

    from pipeline.classify import metrics as M
    from pipeline.classify.data import text_bucket

    rows = [json.loads(line) for line in
            open(shared / "edu_labels/fineweb_edu_llama3_sample/human511_train.jsonl", encoding="utf-8")]
    out = []
    for name, sel in (("all 414 pages", rows), ("holdout pages (% 5 == 1)",
                                                [r for r in rows if text_bucket(r["text"], 5) == 1])):
        h = np.array([r["score"] for r in sel], dtype=float)
        lm = np.array([r["llama3_score"] for r in sel], dtype=float)
        out.append({"pages": name, "n": len(sel), "human_positive": int((h >= 3).sum()),
                    "llama_vs_human_f1": M.binary(h, lm, 3)["f1"], "spearman": M.spearman(h, lm)})
    return out


# ------------------------------------------------------------------------------------------------- main
def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "n/a" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    from pipeline.paths import shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="speed,quality,rotation,selection,agreement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-modes", action="store_true", help="quality: only the shipped configs and baselines")
    ap.add_argument("--json", default=None, help="also write every row here")
    args = ap.parse_args()
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is needed (real labelled documents)")
    parts = args.parts.split(",")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "agreement" in parts:
            results["agreement"] = agreement(shared)
            print("## Llama-3 vs human majority (same pages)\n")
            print(_table(results["agreement"], ["pages", "n", "human_positive", "llama_vs_human_f1", "spearman"]))
        if "speed" in parts:
            results["speed"] = bench_speed(shared, args.repeats)
            print("\n## Scoring speed (one process)\n")
            print(_table(results["speed"], ["step", "docs", "mchars", "seconds", "docs_per_s", "vs_datatrove"]))
        if "quality" in parts:
            results["quality"] = {}
            for name, config in CONFIGS.items():
                print(f"\n## {name}: holdout ({config})\n", flush=True)
                rows = baselines(config) + ours(config, not args.no_modes, Path(tmp))
                results["quality"][name] = rows
                print(_table(rows, ["model", "n", "positives", "precision", "recall", "f1", "spearman", "cv_f1",
                                    "uncalibrated_cv_recall", "seconds"]))
        if "rotation" in parts:
            results["rotation"] = rotation(Path(tmp))
            print("\n## English default: each hash bucket as the holdout\n")
            print(_table(results["rotation"], ["bucket", "n", "positives", "precision", "recall", "f1", "spearman",
                                               "cv_f1", "best_cutoff_f1"]))
        if "selection" in parts:
            results["selection"] = selection()
            print("\n## English default: selection by cross-validation (dev documents only)\n")
            print(_table(results["selection"], ["max_chars", "train_only", "cv_f1", "cv_f1_sd", "cv_spearman"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
