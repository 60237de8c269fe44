"""datatrove steps: score once (`EduScoreTagger`), filter many ways (`EduScoreFilter`).

    from pipeline.classify.datatrove_steps import EduScoreFilter, EduScoreTagger
    pipeline = [reader, ..., EduScoreTagger("classifiers/edu-fasttext"), writer_all,
                EduScoreFilter(threshold=3), writer_kept]

The tagger writes `metadata["edu_score"]` (float on the rubric scale) and `metadata["edu_model"]`; the
filter only reads the stored score, so changing the cut-off never re-scores. Both are picklable (the model is
loaded lazily in each worker), so they run under datatrove's local and Ray executors.
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


class EduScoreTagger(PipelineStep):
    """Adds `metadata[edu_score]` and `metadata[edu_model]` to every document, scoring batches of documents.

    Args:
        model_dir: a `classifiers/<name>/` directory.
        batch_size: documents per model call.
        max_chars: score this prefix of each document (default: the model's `max_chars`).
    """

    name = "🎓 edu score"
    type = "🏷 - TAGGER"

    def __init__(self, model_dir: str = "classifiers/edu-fasttext", batch_size: int = 512,
                 max_chars: int | None = None, score_key: str = SCORE_KEY) -> None:
        super().__init__()
        self.model_dir = str(model_dir)
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.score_key = score_key
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
        model = self.model
        limit = model.max_chars if self.max_chars is None else self.max_chars
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                texts = [d.text if isinstance(d.text, str) else "" for d in batch]
                scores = model.score(texts, self.max_chars)
            for doc, text, score in zip(batch, texts, scores, strict=True):
                self.stat_update("scored")
                if not text.strip():
                    self.stat_update("empty_text")  # scored as the rubric minimum
                elif limit and len(text) > limit:
                    self.stat_update("prefix_scored")
                doc.metadata[self.score_key] = float(score)
                doc.metadata[MODEL_KEY] = model.name
                self.update_doc_stats(doc)
                yield doc


class EduScoreFilter(BaseFilter):
    """Keeps documents whose stored `edu_score` reaches the cut-off; never re-scores.

    The cut-off is `threshold` if given, else the score keeping the top `keep_top` fraction on the model's
    calibration sample, else the model's recorded default (its keep-top cut-off, then its threshold); with
    no `model_dir` and neither option, 3.0. A document without a stored score is dropped as `unscored`.
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
        if float(score) >= self.cutoff:
            return True
        return False, "edu_below_threshold"
