"""What the edu-classifier guards buy and cost, and what `web.edu.keep_top` keeps (issue 14 part B).

    .venv/bin/python benchmarks/bench_edu_guards.py                      # default model, prints markdown
    .venv/bin/python benchmarks/bench_edu_guards.py --model DIR --web    # + the web stage's keep_top, ~3 min

1. Adversarial pages written for this project (tests/_edu_adversarial.py): the model's own score vs the
   guarded score, against the model's default cut-off.
2. Spam pages pasting a passage of the model's own training text: candidate passages from the shared data
   that the model's training_hashes.npz recognises, each pasted into spam (60 % of the characters).
3. Cost on real pages: every page of the labelled English sets (Llama-3 sample, human majority, FineWeb-Edu
   classifier, Llama-3.3 150) that a label puts at >= 3, how many a gate stops, and on the pages that are not
   training texts of the model how many the guards move from above the cut-off to below it; P/R/F1 at the
   cut-off with and without guards (labels >= 3 positive).
4. Scoring throughput: model alone vs model + guards, best of 3 interleaved, one process.
5. (--web) the web stage on real pages (FineWeb 300, Dolma CC, CCNet head; default filters) with keep_top 0.3:
   the share kept with `keep_top_of: calibration` (the old meaning) and `run`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def labelled(shared: Path) -> list[tuple[str, float, str]]:
    rows = []
    d = shared / "edu_labels"
    for name in ("llama3_train", "human511_train", "fwedu_classifier_train"):
        with open(d / "fineweb_edu_llama3_sample" / f"{name}.jsonl", encoding="utf-8") as f:
            rows += [(name, float(r["score"]), r["text"]) for r in map(json.loads, f)]
    with open(d / "fineweb_edu_llama33_150" / "training_data.csv", encoding="utf-8", newline="") as f:
        rows += [("llama33_150", float(r["score"]), r["text"]) for r in csv.DictReader(f)]
    return rows


def adversarial(scorer: Any, cutoff: float) -> list[str]:
    from _edu_adversarial import adversarial_pages, control_pages

    pages = {**adversarial_pages(), **control_pages()}
    res = scorer.score(list(pages.values()))
    out = ["| page | model score | guarded | gate | >= cut-off before | after |", "|---|---:|---:|---|---|---|"]
    for (name, _), raw, s, g in zip(pages.items(), res.raw, res.scores, res.gates, strict=True):
        out.append(f"| {name} | {raw:.3f} | {s:.3f} | {g or ''} | {'yes' if raw >= cutoff else 'no'} | "
                   f"{'yes' if s >= cutoff else 'no'} |")
    return out


def pasted(scorer: Any, cutoff: float, shared: Path, rows: list[tuple[str, float, str]]) -> list[str]:
    from _edu_adversarial import spam_page

    if scorer.hashes is None:
        return ["(the model has no training_hashes.npz)"]
    candidates = [p for _, _, t in rows for p in t.split("\n") if 200 <= len(p) <= 1500]
    with open(shared / "textbooks/openstax_intro_python/modules_plaintext.jsonl", encoding="utf-8") as f:
        for rec in map(json.loads, f):
            candidates += [p.strip() for p in rec["text"].split("\n\n") if 200 <= len(p.strip()) <= 1500]
    memorised = [p for p in candidates if scorer.hashes.memorised(p)[0] > 0.9]
    pages = [spam_page(p, 0.6, i) for i, p in enumerate(memorised)]
    res = scorer.score(pages)
    worst = np.argsort(-res.raw)[:10]
    return [f"{len(pages)} spam pages, each pasting one passage of the model's training text (60 % spam by "
            f"characters): {int(np.sum(res.raw >= cutoff))} at or above the cut-off {cutoff:.3f} by the model "
            f"alone, {int(np.sum(res.scores >= cutoff))} with the guards ({int(res.rescored.sum())} rescored "
            "without the passage). The ten the model rates highest:", "",
            "| model score | guarded | memorised share |", "|---:|---:|---:|",
            *[f"| {res.raw[i]:.3f} | {res.scores[i]:.3f} | {res.memorised_share[i]:.2f} |" for i in worst]]


def real_cost(scorer: Any, cutoff: float, rows: list[tuple[str, float, str]]) -> list[str]:
    from pipeline.classify import metrics as M
    from pipeline.classify.guards import GuardConfig, GuardedScorer

    texts = [t for _, _, t in rows]
    y = np.array([s for _, s, _ in rows])
    res = scorer.score(texts)
    every = GuardedScorer(scorer.clf, config=GuardConfig(check_above=0)).score(texts)  # gates on every page
    pos = y >= 3
    out = [f"{len(rows):,} labelled English pages, {int(pos.sum()):,} labelled >= 3; "
           f"{int(res.in_training.sum()):,} are training texts of the model (left out of the figures below).",
           "", "| set | pages >= 3 | gated (any score) | moved below the cut-off by the guards |", "|---|---:|---:|---:|"]
    fresh = ~res.in_training
    for src in sorted({s for s, _, _ in rows}):
        m = np.array([s == src for s, _, _ in rows]) & pos & fresh
        gated = sum(1 for i in np.flatnonzero(m) if every.gates[i])
        moved = int(np.sum(m & (res.raw >= cutoff) & (res.scores < cutoff)))
        out.append(f"| {src} | {int(m.sum()):,} | {gated} | {moved} |")
    gates: dict[str, int] = {}
    for i in np.flatnonzero(fresh):
        if every.gates[i]:
            gates[every.gates[i]] = gates.get(every.gates[i], 0) + 1
    out += ["", f"Gates on all {int(fresh.sum()):,} pages (any label, any score): {gates or 'none'}; pages rescored "
            f"without training text: {int(res.rescored[fresh].sum())}.", "",
            "| scores | precision | recall | F1 at the cut-off |", "|---|---:|---:|---:|"]
    for name, s in (("model alone", res.raw), ("guarded", res.scores)):
        b = M.binary((y[fresh] >= 3).astype(float), (s[fresh] >= cutoff).astype(float), 0.5)
        out.append(f"| {name} | {b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} |")
    return out


def throughput(scorer: Any, rows: list[tuple[str, float, str]]) -> list[str]:
    texts = [t for _, _, t in rows]
    best = {"model alone": 1e9, "model + guards": 1e9}
    for _ in range(3):
        for name, fn in (("model alone", lambda: scorer.clf.score(texts)), ("model + guards", lambda: scorer.score(texts))):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    base = best["model alone"]
    return ["| scoring | docs/s | time vs model |", "|---|---:|---:|",
            *[f"| {k} | {len(texts) / v:,.0f} | {v / base:.2f}x |" for k, v in best.items()]]


def web_keep_top(model: str, shared: Path) -> list[str]:
    from pipeline.config import load_config
    from pipeline.run import run_one

    web = shared / "web"
    out = ["| keep_top 0.3 of | pages scored | kept | realised keep rate | cut-off |", "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="bench-edu-") as tmp:
        for of in ("calibration", "run"):
            cfg = {"run": {"name": "b", "out": f"{tmp}/run", "stages": ["web"]},
                   "web": {"sources": [{"path": str(web / "fineweb_sample_300/fineweb_subset.json"),
                                        "text_key": "original_text"},
                                       {"path": str(web / "dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz")},
                                       {"path": str(web / "dolma_cc/cc_en_head")}],
                           "tasks": 2, "edu": {"enabled": True, "filter": True, "keep_top": 0.3, "keep_top_of": of,
                                               "model": model}}}
            Path(tmp, "cfg.yaml").write_text(json.dumps(cfg))
            c = run_one(load_config(f"{tmp}/cfg.yaml", []), "web", log=lambda m: None)["edu"]["filter"]
            out.append(f"| {of} | {c['scored']} | {c['kept']} | {c['keep_rate']:.1%} | {c['cutoff']:.4f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from pipeline.config.classifier import ClassifierSection

    ap.add_argument("--model", default=ClassifierSection().model, help="default: the configured default model")
    ap.add_argument("--web", action="store_true", help="also run the web stage twice (keep_top of calibration/run)")
    args = ap.parse_args()
    from pipeline.classify.guards import GuardedScorer
    from pipeline.classify.model import load_classifier
    from pipeline.paths import shared_data_dir

    shared = shared_data_dir()
    if shared is None:
        sys.exit("../shared/data is needed")
    clf = load_classifier(args.model)
    scorer = GuardedScorer(clf)
    cutoff, how = clf.selection_cutoff()
    rows = labelled(shared)
    print(f"# Edu guards: model {clf.name} ({args.model}), default cut-off {cutoff:.3f} ({how}); "
          f"guards check pages scored >= {scorer.floor:.3f}\n")
    for title, lines in (("Adversarial pages", adversarial(scorer, cutoff)),
                         ("Spam pasting the model's training text", pasted(scorer, cutoff, shared, rows)),
                         ("Cost on real labelled pages", real_cost(scorer, cutoff, rows)),
                         ("Throughput", throughput(scorer, rows))):
        print(f"## {title}\n")
        print("\n".join(lines) + "\n")
    if args.web:
        print("## web.edu.keep_top\n")
        print("\n".join(web_keep_top(str(clf.model_dir), shared)) + "\n")


if __name__ == "__main__":
    main()
