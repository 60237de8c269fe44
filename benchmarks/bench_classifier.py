"""Classifier benchmarks (run by hand, not in tests).

1. Scoring throughput, docs/s on ONE core: our `EduScoreTagger` vs datatrove's `FastTextClassifierFilter`
   (annotate-only: no keep/remove labels) with the SAME fastText model file on the SAME real documents
   (../shared/data: Dolma CC, FineWeb sample, FineWeb-legal pages), in one run, interleaved repeats.
   Ours is shown twice: with its default bounded prefix (max_chars from the model) and with max_chars=0
   (whole document, the same text datatrove scores) so the speed-up from batching alone is visible.
2. Backends on the same splits: training time, scoring docs/s, P/R/F1 at 3, macro-F1, Spearman, for the
   legal-value set (2,235 docs, repeated annotations) and the Danish human-labelled set.

    .venv/bin/python benchmarks/bench_classifier.py [--model classifiers/edu-fasttext] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


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


def bench_scoring(model_dir: Path, texts: list[str], repeats: int) -> list[dict]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import FastTextClassifierFilter

    from pipeline.classify.datatrove_steps import EduScoreTagger
    from pipeline.classify.model import load_classifier

    clf = load_classifier(model_dir)
    model_file = str(model_dir / clf.meta["model_file"])
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    runners = {
        # keep_labels with min score 0 keeps everything (annotate-only); datatrove 0.10.1 crashes when neither
        # keep_labels nor remove_labels is given (`[] + None` in its label check)
        "datatrove FastTextClassifierFilter": lambda: FastTextClassifierFilter(
            model_file, keep_labels=(str(clf.meta["classes"][-1]), 0.0), save_labels_in_metadata=True),
        f"ours EduScoreTagger (prefix {clf.max_chars} chars)": lambda: EduScoreTagger(str(model_dir), batch_size=512),
        "ours EduScoreTagger (whole document)": lambda: EduScoreTagger(str(model_dir), batch_size=512, max_chars=0),
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
    base = len(docs) / best["datatrove FastTextClassifierFilter"]
    return [{"step": name, "docs": len(docs), "seconds": round(s, 3), "docs_per_s": round(len(docs) / s, 1),
             "vs_datatrove": round(len(docs) / s / base, 2)} for name, s in best.items()]


def bench_backends(shared: Path) -> list[dict]:
    from pipeline.classify.train import train_classifier
    from pipeline.config.classifier import LabelSource, TrainSection

    sets = {
        "legal (en, LLM)": [LabelSource(path=str(shared / "edu_labels/fineweb_legal_mistral/annotations.parquet"),
                                        id_column="id", score_column="score")],
        "danish (da, human)": [LabelSource(path=str(shared / "edu_labels/fineweb_c_danish_human/labels.csv"),
                                           score_column="integer_score")],
    }
    backends = [
        ("fasttext expected", "fasttext", "expected", {"quantize": True}),
        ("fasttext binary", "fasttext", "binary", {"quantize": True}),
        ("sklearn tfidf+logistic", "sklearn", "expected", {"features": "tfidf", "head": "logistic"}),
        ("sklearn hashing+ridge", "sklearn", "regression", {"features": "hashing", "head": "ridge"}),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, sources in sets.items():
            for label, backend, mode, params in backends:
                train = TrainSection(name="bench", backend=backend, mode=mode, params=params, sources=sources)
                m = train_classifier(train, out_dir=tmp, log=lambda s: None)
                t = m["test"]
                size = sum(f.stat().st_size for f in (Path(tmp) / "bench").iterdir() if f.name.startswith("model"))
                rows.append({"data": set_name, "backend": label, "train_docs": m["data"]["splits"]["train"],
                             "test_docs": t["n"], "fit_s": m["timing"]["fit_s"],
                             "score_docs_per_s": m["timing"]["scoring_docs_per_s"],
                             "precision": t["binary"]["precision"], "recall": t["binary"]["recall"],
                             "f1": t["binary"]["f1"], "macro_f1": t["macro_f1"], "spearman": t["spearman"],
                             "model_mb": size / 1e6})
    return rows


def main() -> None:
    from pipeline.classify.model import resolve_model_dir
    from pipeline.paths import shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="classifiers/edu-fasttext")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-backends", action="store_true")
    args = ap.parse_args()
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is needed for the real documents")
    texts = real_documents(shared)
    chars = sum(map(len, texts))
    print(f"## Scoring: {len(texts)} real documents, {chars / 1e6:.1f} M chars, 1 process, best of {args.repeats}\n")
    print("| step | docs | seconds | docs/s | vs datatrove |\n|---|---:|---:|---:|---:|")
    for r in bench_scoring(resolve_model_dir(args.model), texts, args.repeats):
        print(f"| {r['step']} | {r['docs']} | {r['seconds']} | {r['docs_per_s']} | {r['vs_datatrove']}x |")
    if args.skip_backends:
        return
    print("\n## Backends on the same hash splits (test split; binary = score >= 3)\n")
    print("| data | backend | train | test | fit s | score docs/s | P | R | F1 | macro-F1 | Spearman | model MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in bench_backends(shared):
        sp = "n/a" if r["spearman"] is None else f"{r['spearman']:.3f}"
        print(f"| {r['data']} | {r['backend']} | {r['train_docs']} | {r['test_docs']} | {r['fit_s']:.1f} | "
              f"{r['score_docs_per_s']:.0f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
              f"{r['macro_f1']:.3f} | {sp} | {r['model_mb']:.2f} |")


if __name__ == "__main__":
    main()
