"""Classifier backends behind one interface: fit on (text, integer label), predict a float score per text.

Scores live on the rubric's scale (e.g. 0-5) whatever the backend, so thresholds, plots and `keep_top`
cut-offs mean the same thing for every model:

- mode `expected` (multi-class): score = sum_k P(class k) * k, the expectation over label probabilities.
- mode `binary`: labels are 0/1 (1 = educational); score = score_max * P(1), so a binary model's score 3
  on a 0-5 rubric means P(educational) = 0.6.
- mode `regression` (sklearn ridge): the regressor's output, clipped to the score range.

Backends: `fasttext` (supervised, word n-grams; optionally quantized to a small .ftz) and `sklearn`
(TF-IDF or hashing features + logistic or ridge). Each writes its model file into the model directory and
returns the file name; `classifier.json` (written by the caller) records everything needed to load it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TextbookError

MODES = ("expected", "binary", "regression")


class Backend:
    name = "base"
    defaults: dict[str, Any] = {}  # hyperparameters a config may leave out

    def __init__(self, mode: str, classes: Sequence[int], score_max: float, params: dict[str, Any]) -> None:
        if mode not in MODES:
            raise TextbookError(f"unknown classifier mode {mode!r} (choose from {', '.join(MODES)})")
        self.mode = mode
        self.classes = [int(c) for c in classes]
        self.score_max = float(score_max)
        self.params = {**self.defaults, **params}

    def fit(self, texts: list[str], labels: list[int]) -> None:
        raise NotImplementedError

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def save(self, model_dir: Path) -> str:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def _from_proba(self, proba: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        """(n, k) probabilities over `classes` -> scores on the rubric scale."""
        values = np.asarray(classes, dtype=np.float64)
        if self.mode == "binary":
            pos = list(classes).index(1) if 1 in classes else len(classes) - 1
            return (proba[:, pos] * self.score_max).astype(np.float32)
        return (proba @ values).astype(np.float32)


# --------------------------------------------------------------------------------------------- fastText
FASTTEXT_DEFAULTS: dict[str, Any] = {
    "lr": 0.5, "epoch": 20, "wordNgrams": 2, "dim": 32, "minCount": 2, "bucket": 200_000,
    "loss": "softmax", "thread": 1, "seed": 0, "quantize": True, "cutoff": 50_000, "qnorm": True,
}


class FastTextBackend(Backend):
    """fastText supervised classifier (`__label__<k> text` lines). thread=1 keeps training deterministic."""

    name = "fasttext"
    defaults = FASTTEXT_DEFAULTS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model: Any = None
        self._label_values: list[int] = []

    def fit(self, texts: list[str], labels: list[int]) -> None:
        import json
        import subprocess
        import sys

        from fasttext.FastText import _FastText

        p = self.params
        with tempfile.TemporaryDirectory(prefix="textbook-ft-") as tmp:
            path = os.path.join(tmp, "train.txt")
            with open(path, "w", encoding="utf-8") as f:
                for text, label in zip(texts, labels, strict=True):
                    f.write(f"__label__{int(label)} {text}\n")
            job = {"input": path, "out": os.path.join(tmp, "model.bin"),
                   "train_args": {k: p[k] for k in ("lr", "epoch", "wordNgrams", "dim", "minCount", "bucket",
                                                    "loss", "thread", "seed")},
                   "quantize": {"qnorm": bool(p["qnorm"]), "cutoff": int(p["cutoff"])} if p.get("quantize") else None}
            # a fresh interpreter per attempt: see _ft_train.py for the fastText NaN bug this avoids
            for attempt in range(1, 5):
                proc = subprocess.run([sys.executable, "-m", "pipeline.classify._ft_train", json.dumps(job)],
                                      capture_output=True, text=True)
                if proc.returncode == 0:
                    break
                if proc.returncode != 3 or attempt == 4:
                    raise TextbookError(f"fastText training failed: {proc.stderr.strip()[-300:] or proc.returncode}")
                job["train_args"]["seed"] = int(job["train_args"]["seed"]) + 1
            self.params["seed_used"] = job["train_args"]["seed"]
            self.model = _FastText(job["out"])
        self._index_labels()

    def _index_labels(self) -> None:
        self._label_values = [int(lbl.removeprefix("__label__")) for lbl in self.model.get_labels()]
        self._label_pos = {f"__label__{v}": i for i, v in enumerate(self._label_values)}

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        k = len(self._label_values)
        # multilinePredict: one C++ call for the batch (the Python `predict` wraps it with per-row numpy)
        all_labels, all_probs = self.model.f.multilinePredict(texts, k, 0.0, "replace")
        proba = np.zeros((len(texts), k), dtype=np.float64)
        pos = self._label_pos
        for i, (labels, probs) in enumerate(zip(all_labels, all_probs, strict=True)):
            row = proba[i]
            for lbl, pr in zip(labels, probs, strict=True):
                row[pos[lbl]] = pr
        np.clip(proba, 0.0, 1.0, out=proba)  # fastText's probabilities can exceed 1 by 1e-5
        return self._from_proba(proba, self._label_values)

    def save(self, model_dir: Path) -> str:
        name = "model.ftz" if self.params.get("quantize") else "model.bin"
        self.model.save_model(str(model_dir / name))
        return name

    def load(self, path: Path) -> None:
        from fasttext.FastText import _FastText

        self.model = _FastText(str(path))
        self._index_labels()


# --------------------------------------------------------------------------------------------- sklearn
SKLEARN_DEFAULTS: dict[str, Any] = {
    "features": "tfidf", "head": "logistic", "ngram_max": 2, "max_features": 200_000, "min_df": 2,
    "hash_features": 2**20, "C": 4.0, "alpha": 1.0, "class_weight": None, "max_iter": 2000,
}


class SklearnBackend(Backend):
    """TF-IDF (or hashing) word n-grams + logistic regression (classes) or ridge regression (scores)."""

    name = "sklearn"
    defaults = SKLEARN_DEFAULTS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline: Any = None
        if self.params["head"] == "ridge" and self.mode != "regression":
            self.mode = "regression"
        if self.params["head"] == "logistic" and self.mode == "regression":
            raise TextbookError("sklearn head 'logistic' needs mode expected or binary (use head 'ridge')")

    def _features(self) -> Any:
        from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer, TfidfVectorizer
        from sklearn.pipeline import make_pipeline

        p = self.params
        ngrams = (1, int(p["ngram_max"]))
        if p["features"] == "tfidf":
            return TfidfVectorizer(ngram_range=ngrams, max_features=int(p["max_features"]),
                                   min_df=int(p["min_df"]), sublinear_tf=True, dtype=np.float32)
        if p["features"] == "hashing":
            return make_pipeline(
                HashingVectorizer(ngram_range=ngrams, n_features=int(p["hash_features"]), alternate_sign=False,
                                  norm=None, dtype=np.float32),
                TfidfTransformer(sublinear_tf=True),
            )
        raise TextbookError(f"sklearn features must be 'tfidf' or 'hashing', got {p['features']!r}")

    def fit(self, texts: list[str], labels: list[int]) -> None:
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.pipeline import make_pipeline

        p = self.params
        if p["head"] == "ridge":
            head = Ridge(alpha=float(p["alpha"]))
        elif p["head"] == "logistic":
            head = LogisticRegression(C=float(p["C"]), max_iter=int(p["max_iter"]), class_weight=p["class_weight"])
        else:
            raise TextbookError(f"sklearn head must be 'logistic' or 'ridge', got {p['head']!r}")
        self.pipeline = make_pipeline(self._features(), head)
        self.pipeline.fit(texts, np.asarray(labels, dtype=np.float64 if p["head"] == "ridge" else np.int64))

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        if self.mode == "regression":
            out = self.pipeline.predict(texts)
            return np.clip(out, 0.0, self.score_max).astype(np.float32)
        proba = self.pipeline.predict_proba(texts)
        return self._from_proba(proba, [int(c) for c in self.pipeline.classes_])

    def save(self, model_dir: Path) -> str:
        import joblib

        joblib.dump(self.pipeline, model_dir / "model.joblib", compress=3)
        return "model.joblib"

    def load(self, path: Path) -> None:
        import joblib

        self.pipeline = joblib.load(path)


BACKENDS: dict[str, type[Backend]] = {"fasttext": FastTextBackend, "sklearn": SklearnBackend}


def make_backend(name: str, mode: str, classes: Sequence[int], score_max: float,
                 params: dict[str, Any] | None = None) -> Backend:
    if name not in BACKENDS:
        raise TextbookError(f"unknown classifier backend {name!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name](mode, classes, score_max, params or {})
