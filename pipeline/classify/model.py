"""A trained classifier on disk: `classifiers/<name>/` with `classifier.json` describing how to load and use it.

classifier.json (format `textbook-classifier/2`): name, backend, mode, model_file (+ sha256), classes,
score range, max_chars/lowercase (the text the model sees), threshold, `score_map` (the label-share
calibration of `pipeline.classify.calibrate`: raw backend score → rubric scale; absent or null = raw scores),
keep-top calibration (score percentiles and an optional default keep-top cut-off). Format 1 (no score map)
still loads. Anything missing or corrupt is a one-line TextbookError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classify.backends import Backend, make_backend
from pipeline.classify.text import prepare
from pipeline.errors import TextbookError
from pipeline.paths import repo_path

FORMAT = "textbook-classifier/2"
READABLE_FORMATS = ("textbook-classifier/1", FORMAT)
META_FILE = "classifier.json"
REQUIRED = ("format", "name", "backend", "mode", "model_file", "classes", "score_min", "score_max", "max_chars")


def resolve_model_dir(model_dir: str | Path) -> Path:
    """As given, else relative to the repository (so `classifiers/edu-en` works from any directory)."""
    p = Path(model_dir).expanduser()
    if not p.exists() and not p.is_absolute() and repo_path(str(p)).exists():
        p = repo_path(str(p))
    return p


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EduClassifier:
    """A loaded model: `.score(texts)` → float32 scores on the rubric scale."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], backend: Backend) -> None:
        self.model_dir = model_dir
        self.meta = meta
        self.backend = backend
        self.name: str = meta["name"]
        self.max_chars: int = int(meta["max_chars"])
        self.lowercase: bool = bool(meta.get("lowercase", True))
        self.score_min = float(meta["score_min"])
        self.score_max = float(meta["score_max"])

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", (self.score_min + self.score_max) / 2))

    def prepare(self, texts: Iterable[str], max_chars: int | None = None) -> list[str]:
        n = self.max_chars if max_chars is None else max_chars
        return [prepare(t, n, self.lowercase) for t in texts]

    @property
    def score_map(self) -> dict[str, Any] | None:
        """The label-share calibration (raw → rubric scale), or None for a model scoring raw."""
        return self.meta.get("score_map") or None

    def score(self, texts: Sequence[str], max_chars: int | None = None) -> np.ndarray:
        """(n,) float32 calibrated scores on the rubric scale for raw texts; blank texts get score_min."""
        return self._score(texts, max_chars, calibrated=True)

    def raw_score(self, texts: Sequence[str], max_chars: int | None = None) -> np.ndarray:
        """(n,) float32 backend scores before the score map (what the calibration was fitted on)."""
        return self._score(texts, max_chars, calibrated=False)

    def _score(self, texts: Sequence[str], max_chars: int | None, calibrated: bool) -> np.ndarray:
        from pipeline.classify.calibrate import apply_map

        prepared = self.prepare(texts, max_chars)
        out = np.full(len(prepared), self.score_min, dtype=np.float32)
        idx = [i for i, t in enumerate(prepared) if t]
        if idx:
            raw = self.backend.predict_scores([prepared[i] for i in idx])
            out[idx] = apply_map(self.score_map, raw, self.score_min, self.score_max) if calibrated else raw
        return out

    def cutoff_for_keep_top(self, fraction: float) -> float:
        """Score cut-off that keeps `fraction` of the calibration sample (interpolated percentiles)."""
        pct = self.meta.get("calibration", {}).get("percentiles")
        if not pct:
            raise TextbookError(f"{self.model_dir}: model has no keep-top calibration; retrain or use a threshold")
        if not 0 < fraction <= 1:
            raise TextbookError(f"keep_top must be in (0, 1], got {fraction}")
        return float(np.interp((1 - fraction) * 100, np.arange(len(pct)) * (100 / (len(pct) - 1)), pct))

    def selection_cutoff(self, threshold: float | None = None, keep_top: float | None = None) -> tuple[float, str]:
        """(cut-off, how it was chosen): explicit threshold > explicit keep_top > model's keep_top > model's threshold."""
        if threshold is not None:
            return float(threshold), f"threshold {threshold}"
        if keep_top is not None:
            return self.cutoff_for_keep_top(keep_top), f"keep_top {keep_top:.2%}"
        cal = self.meta.get("calibration", {})
        if cal.get("keep_top") is not None and cal.get("keep_top_cutoff") is not None:
            return float(cal["keep_top_cutoff"]), f"model keep_top {cal['keep_top']:.2%}"
        return self.threshold, f"model threshold {self.threshold}"


def load_classifier(model_dir: str | Path) -> EduClassifier:
    d = resolve_model_dir(model_dir)
    if not d.is_dir():
        raise TextbookError(f"{d}: classifier directory not found (train one with `textbook classifier train`)")
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise TextbookError(f"{meta_path}: missing; not a classifier directory")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TextbookError(f"{meta_path}: corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise TextbookError(f"{meta_path}: corrupt (expected a JSON object)")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise TextbookError(f"{meta_path}: corrupt (missing keys: {', '.join(missing)})")
    if meta["format"] not in READABLE_FORMATS:
        raise TextbookError(f"{meta_path}: unsupported format {meta['format']!r} (expected {FORMAT})")
    model_path = d / meta["model_file"]
    if not model_path.is_file():
        raise TextbookError(f"{model_path}: model file missing")
    if meta.get("model_sha256") and sha256_file(model_path) != meta["model_sha256"]:
        raise TextbookError(f"{model_path}: corrupt (sha256 differs from classifier.json)")
    backend = make_backend(meta["backend"], meta["mode"], meta["classes"], meta["score_max"],
                           meta.get("params", {}))
    try:
        backend.load(model_path)
    except Exception as e:  # fastText/joblib raise assorted errors on a damaged file
        raise TextbookError(f"{model_path}: cannot load model ({type(e).__name__}: {e})") from None
    return EduClassifier(d, meta, backend)


def score_texts(model: EduClassifier | str | Path, texts: Iterable[str], batch_size: int = 512,
                max_chars: int | None = None) -> np.ndarray:
    """Scores for any iterable of texts, in batches."""
    from datatrove.utils.batching import batched

    clf = model if isinstance(model, EduClassifier) else load_classifier(model)
    out = [clf.score(batch, max_chars)
           for batch in batched((t if isinstance(t, str) else "" for t in texts), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
