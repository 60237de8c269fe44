"""Score document files outside a run (`textbook classifier score`): documents + `edu_score`, with stats.

Scores go through the guards (`pipeline.classify.guards`): a gated page is stored with the rubric minimum and
`meta.edu_guard` / `meta.edu_score_raw`; stats count the gates. When the model has training hashes, documents
that are its training texts are counted (`training_overlap`) and flagged (`meta.edu_in_training`), and a
one-line warning says how many: scores on them measure the model's fit, not quality.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.utils.batching import batched

from pipeline.classify.model import load_classifier
from pipeline.documents import DocumentWriter, iter_documents
from pipeline.stats import StageStats


def score_files(model_dir: str, inputs: list[str], out_dir: str, text_column: str = "text",
                batch_size: int = 512, max_chars: int | None = None, guards: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every document of `inputs` (jsonl/parquet files or folders) into `out_dir` (parquet + stats.json).

    Returns the stats dict: read/kept/dropped (`empty_text`)/errored, score_mean, score_quantiles,
    above_threshold, guards (gated per gate, pages with training text, rescored) and training_overlap
    (None when the model has no training hashes). `log` receives the overlap warning, if any."""
    from tqdm import tqdm

    from pipeline.classify.datatrove_steps import GUARD_KEY, IN_TRAINING_KEY, MEMORISED_KEY, RAW_KEY
    from pipeline.classify.guards import GuardedScorer
    from pipeline.classify.overlap import overlap_summary, overlap_warning

    clf = load_classifier(model_dir)
    scorer = GuardedScorer(clf, enabled=guards)
    stats = StageStats("classifier-score")
    out = Path(out_dir)
    writer = DocumentWriter(out)
    all_scores: list[np.ndarray] = []
    in_training: list[np.ndarray] = []
    gated: dict[str, int] = {}
    with_training = rescored = 0
    limit = clf.max_chars if max_chars is None else max_chars

    def on_error(reason: str, where: str) -> None:
        stats.read()
        stats.error(reason)

    with tqdm(desc="scoring", unit="doc") as bar:
        for batch in batched(iter_documents(inputs, text_field=text_column, on_error=on_error), batch_size):
            res = scorer.score([d["text"] for d in batch], max_chars)
            for i, doc in enumerate(batch):
                stats.read()
                if not doc["text"].strip():
                    stats.drop("empty_text")
                    continue
                if limit and len(doc["text"]) > limit:
                    stats.extra["prefix_scored"] = stats.extra.get("prefix_scored", 0) + 1
                doc["edu_score"] = float(res.scores[i])
                meta = doc.setdefault("meta", {})
                meta["edu_model"] = clf.name
                if res.gates[i]:
                    meta[GUARD_KEY], meta[RAW_KEY] = res.gates[i], float(res.raw[i])
                    gated[res.gates[i]] = gated.get(res.gates[i], 0) + 1
                elif res.memorised_share[i] > 0:
                    meta[RAW_KEY], meta[MEMORISED_KEY] = float(res.raw[i]), round(float(res.memorised_share[i]), 4)
                    with_training += 1
                    rescored += int(res.rescored[i])
                if res.in_training[i]:
                    meta[IN_TRAINING_KEY] = True
                writer.write(doc)
                stats.keep()
            blank = np.array([not d["text"].strip() for d in batch], dtype=bool)
            all_scores.append(res.scores[~blank])
            in_training.append(res.in_training[~blank])
            bar.update(len(batch))
    writer.close()
    s = np.concatenate(all_scores) if all_scores else np.zeros(0)
    stats.set("model", clf.name)
    stats.set("max_chars", limit)
    if len(s):
        stats.set("score_mean", float(s.mean()))
        stats.set("score_quantiles", {q: float(np.quantile(s, q)) for q in (0.1, 0.5, 0.9)})
        stats.set("above_threshold", int(np.sum(s >= clf.threshold)))
    stats.set("guards", {"enabled": guards, "gated": dict(sorted(gated.items())),
                         "with_training_text": with_training,
                         "rescored_without_training_text": rescored})
    overlap = overlap_summary(np.concatenate(in_training) if in_training else np.zeros(0, dtype=bool)) \
        if scorer.hashes is not None else None
    stats.set("training_overlap", overlap)
    warning = overlap_warning(overlap) if overlap else None
    if warning and log:
        log(warning)
    stats.check()
    stats.write(out / "stats.json")
    return stats.as_dict()
