"""datatrove steps: score once (`EduScoreTagger`), filter many ways (`EduScoreFilter`).

    from pipeline.classify.datatrove_steps import EduScoreFilter, EduScoreTagger
    pipeline = [reader, ..., EduScoreTagger("classifiers/edu-en"), writer_all,
                EduScoreFilter(threshold=3), writer_kept]

The tagger writes `metadata["edu_score"]` (float on the rubric scale) and `metadata["edu_model"]`, through the
guards of `pipeline.classify.guards`: a page a gate stops scores the rubric minimum and carries
`metadata["edu_guard"]` (the gate) and `metadata["edu_score_raw"]` (the model's own score); a page scored
without pasted training text carries `edu_score_raw` and `edu_memorised_share`; a page that is a training
text of the model carries `edu_in_training: true`. The filter only reads the stored score, so changing the
cut-off never re-scores. Both are picklable (the model is loaded lazily in each worker), so they run under
datatrove's local and Ray executors.
"""

from __future__ import annotations

from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.batching import batched

from pipeline.errors import TextbookError

SCORE_KEY = "edu_score"
MODEL_KEY = "edu_model"
GUARD_KEY = "edu_guard"
RAW_KEY = "edu_score_raw"
MEMORISED_KEY = "edu_memorised_share"
IN_TRAINING_KEY = "edu_in_training"


class EduScoreTagger(PipelineStep):
    """Adds `metadata[edu_score]` and `metadata[edu_model]` to every document, scoring batches of documents
    through the guards (`pipeline.classify.guards.GuardedScorer`; the module doc lists the metadata they add).

    Args:
        model_dir: a `classifiers/<name>/` directory (default: `classifier.model`'s default, the shipped model).
        batch_size: documents per model call.
        max_chars: score this prefix of each document (default: the model's `max_chars`).
        guards: False stores the model's own score (training-overlap flags are still set).
        summary_dir: if set, each task writes `<summary_dir>/r<rank>.json` when it ends: documents scored,
            empty, prefix-scored, gated per gate, with training text, rescored, in_training (the web stage
            sums them into its stats).
    """

    name = "🎓 edu score"
    type = "🏷 - TAGGER"

    def __init__(self, model_dir: str | None = None, batch_size: int = 512,
                 max_chars: int | None = None, score_key: str = SCORE_KEY, guards: bool = True,
                 summary_dir: str | None = None) -> None:
        super().__init__()
        if model_dir is None:
            from pipeline.config.classifier import ClassifierSection

            model_dir = ClassifierSection().model
        self.model_dir = str(model_dir)
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.score_key = score_key
        self.guards = guards
        self.summary_dir = summary_dir
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from pipeline.classify.model import load_classifier

            self._model = load_classifier(self.model_dir)
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # fastText models do not pickle; each worker loads its own
        return state

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data is None:
            return
        from collections import Counter

        from pipeline.classify.guards import GuardedScorer

        model = self.model
        scorer = GuardedScorer(model, enabled=self.guards)
        limit = model.max_chars if self.max_chars is None else self.max_chars
        counts: Counter[str] = Counter()
        gated: Counter[str] = Counter()
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                texts = [d.text if isinstance(d.text, str) else "" for d in batch]
                res = scorer.score(texts, self.max_chars)
            for i, (doc, text) in enumerate(zip(batch, texts, strict=True)):
                self.stat_update("scored")
                counts["scored"] += 1
                if not text.strip():
                    self.stat_update("empty_text")  # scored as the rubric minimum
                    counts["empty_text"] += 1
                elif limit and len(text) > limit:
                    self.stat_update("prefix_scored")
                    counts["prefix_scored"] += 1
                md = doc.metadata
                md[self.score_key] = float(res.scores[i])
                md[MODEL_KEY] = model.name
                if res.gates[i]:
                    md[GUARD_KEY] = res.gates[i]
                    md[RAW_KEY] = float(res.raw[i])
                    self.stat_update(f"guard_{res.gates[i]}")
                    gated[res.gates[i]] += 1
                elif res.memorised_share[i] > 0:
                    md[RAW_KEY] = float(res.raw[i])
                    md[MEMORISED_KEY] = round(float(res.memorised_share[i]), 4)
                    counts["with_training_text"] += 1
                    if res.rescored[i]:
                        self.stat_update("rescored_without_training_text")
                        counts["rescored_without_training_text"] += 1
                if res.in_training[i]:
                    md[IN_TRAINING_KEY] = True
                    self.stat_update("in_training")
                    counts["in_training"] += 1
                self.update_doc_stats(doc)
                yield doc
        if self.summary_dir:
            self._write_summary(rank, counts, gated, scorer.hashes is not None)

    def _write_summary(self, rank: int, counts: Any, gated: Any, has_hashes: bool) -> None:
        import json
        from pathlib import Path

        from pipeline.io import atomic_write_text

        summary = {"model": self.model.name, **{k: int(counts.get(k, 0)) for k in SUMMARY_COUNTS},
                   "gated": dict(sorted(gated.items())), "guards": self.guards, "has_training_hashes": has_hashes}
        atomic_write_text(Path(self.summary_dir, f"r{rank:05d}.json"), json.dumps(summary) + "\n")


SUMMARY_COUNTS = ("scored", "empty_text", "prefix_scored", "with_training_text",
                  "rescored_without_training_text", "in_training")


class EduScoreFilter(BaseFilter):
    """Keeps documents whose stored `edu_score` reaches the cut-off; never re-scores.

    The cut-off is `threshold` if given, else the score keeping the top `keep_top` fraction on the model's
    calibration sample, else the model's recorded default (its keep-top cut-off, then its threshold); with
    no `model_dir` and neither option, 3.0. A document without a stored score is dropped as `unscored`, one a
    guard stopped as `guard_<gate>` (whatever the cut-off). To keep the top fraction of the documents a run
    scored, see the web stage's `edu.keep_top_of: run` (a second pass over the scored output).
    """

    name = "🎓 edu filter"

    def __init__(self, threshold: float | None = None, keep_top: float | None = None,
                 model_dir: str | None = None, exclusion_writer: Any = None, score_key: str = SCORE_KEY) -> None:
        super().__init__(exclusion_writer)
        self.score_key = score_key
        self.cutoff, self.rule = self._cutoff(threshold, keep_top, model_dir)

    @staticmethod
    def _cutoff(threshold: float | None, keep_top: float | None, model_dir: str | None) -> tuple[float, str]:
        if threshold is not None and keep_top is not None:
            raise TextbookError("EduScoreFilter: give threshold or keep_top, not both")
        if model_dir is None:
            if keep_top is not None:
                raise TextbookError("EduScoreFilter: keep_top needs model_dir (the cut-off is calibrated per model)")
            cutoff = 3.0 if threshold is None else float(threshold)
            return cutoff, f"threshold {cutoff}"
        from pipeline.classify.model import load_classifier

        return load_classifier(model_dir).selection_cutoff(threshold, keep_top)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        score = doc.metadata.get(self.score_key)
        if score is None:
            return False, "unscored"
        if doc.metadata.get(GUARD_KEY):  # stopped by a guard: never kept as educational, whatever the cut-off
            return False, f"guard_{doc.metadata[GUARD_KEY]}"
        if float(score) >= self.cutoff:
            return True
        return False, "edu_below_threshold"
