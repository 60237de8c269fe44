"""Educational-value classifier: annotate with an LLM, train (fastText / scikit-learn), evaluate, score.

Light on import: the heavy pieces (fasttext, sklearn, datatrove, matplotlib) are imported where used.

- `load_classifier(model_dir)` -> `EduClassifier` with `.score(texts)`; `score_texts(model, texts)`.
- `pipeline.classify.datatrove_steps`: `EduScoreTagger` (adds metadata["edu_score"]) and `EduScoreFilter`.
- `pipeline.classify.train.train_classifier(section)`, `pipeline.classify.annotate.annotate(cfg)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.classify.model import EduClassifier

__all__ = ["load_classifier", "score_texts"]


def load_classifier(model_dir: Any) -> EduClassifier:
    from pipeline.classify.model import load_classifier as _load

    return _load(model_dir)


def score_texts(model: Any, texts: Any, batch_size: int = 512) -> Any:
    """Scores (float32 numpy array) for `texts` with a loaded classifier or a model directory."""
    from pipeline.classify.model import score_texts as _score

    return _score(model, texts, batch_size=batch_size)
