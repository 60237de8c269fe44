"""Score document files outside a run (`textbook classifier score`): documents + `edu_score`, with stats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from datatrove.utils.batching import batched

from pipeline.classify.model import load_classifier
from pipeline.documents import DocumentWriter, iter_documents
from pipeline.stats import StageStats


def score_files(model_dir: str, inputs: list[str], out_dir: str, text_column: str = "text",
                batch_size: int = 512, max_chars: int | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    clf = load_classifier(model_dir)
    stats = StageStats("classifier-score")
    out = Path(out_dir)
    writer = DocumentWriter(out)
    all_scores: list[np.ndarray] = []
    limit = clf.max_chars if max_chars is None else max_chars

    def on_error(reason: str, where: str) -> None:
        stats.read()
        stats.error(reason)

    with tqdm(desc="scoring", unit="doc") as bar:
        for batch in batched(iter_documents(inputs, text_field=text_column, on_error=on_error), batch_size):
            scores = clf.score([d["text"] for d in batch], max_chars)
            for doc, s in zip(batch, scores, strict=True):
                stats.read()
                if not doc["text"].strip():
                    stats.drop("empty_text")
                    continue
                if limit and len(doc["text"]) > limit:
                    stats.extra["prefix_scored"] = stats.extra.get("prefix_scored", 0) + 1
                doc["edu_score"] = float(s)
                doc.setdefault("meta", {})["edu_model"] = clf.name
                writer.write(doc)
                stats.keep()
            all_scores.append(scores)
            bar.update(len(batch))
    writer.close()
    s = np.concatenate(all_scores) if all_scores else np.zeros(0)
    stats.set("model", clf.name)
    stats.set("max_chars", limit)
    if len(s):
        stats.set("score_mean", float(s.mean()))
        stats.set("score_quantiles", {q: float(np.quantile(s, q)) for q in (0.1, 0.5, 0.9)})
        stats.set("above_threshold", int(np.sum(s >= clf.threshold)))
    stats.check()
    stats.write(out / "stats.json")
    return stats.as_dict()
