"""Classifier backends behind one interface: fit on (text, label), predict a float *raw* score per text.

Raw scores are on the rubric's range (e.g. 0-5) but mean different things per mode:

- mode `expected` (multi-class): raw = sum_k P(class k) * k, the expectation over label probabilities (it
  bunches around the mean label: few documents reach 3 on a skewed rubric).
- mode `binary`: labels are 0/1 (1 = score >= threshold); raw = score_max * P(1).
- mode `regression` (sklearn ridge): the regressor's output, clipped to the score range.

A trained model maps raw scores onto the rubric's scale with the label-share calibration of
`pipeline.classify.calibrate` (recorded in classifier.json), so every mode's "score >= 3" means the same thing.

Backends: `fasttext` (supervised, word n-grams; optionally quantized to a small .ftz) and `sklearn`
(TF-IDF or hashing features + logistic or ridge, saved as plain arrays in model.npz). Each writes its model
file into the model directory and returns the file name; `classifier.json` (written by the caller) records
everything needed to load it.
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

    def fit(self, texts: list[str], labels: list[float], final: bool = True) -> None:
        """Fit on prepared texts; labels are 0/1 (binary), class integers (expected) or floats (regression).
        `final` is False for a cross-validation fold (a backend may skip work only the shipped model needs)."""
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

    def fit(self, texts: list[str], labels: list[float], final: bool = True) -> None:
        """Train in a fresh interpreter; `final=False` (a cross-validation fold) skips quantization."""
        import json
        import subprocess
        import sys

        from fasttext.FastText import _FastText

        p = self.params
        labels = [int(round(float(v))) for v in labels]  # fastText learns classes
        with tempfile.TemporaryDirectory(prefix="textbook-ft-") as tmp:
            path = os.path.join(tmp, "train.txt")
            with open(path, "w", encoding="utf-8") as f:
                for text, label in zip(texts, labels, strict=True):
                    f.write(f"__label__{int(label)} {text}\n")
            job = {"input": path, "out": os.path.join(tmp, "model.bin"),
                   "train_args": {k: p[k] for k in ("lr", "epoch", "wordNgrams", "dim", "minCount", "bucket",
                                                    "loss", "thread", "seed")},
                   "quantize": {"qnorm": bool(p["qnorm"]), "cutoff": int(p["cutoff"])}
                   if p.get("quantize") and final else None}
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
    "char_ngrams": None, "char_max_features": 300_000,
}
_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of two or more word characters


class SklearnBackend(Backend):
    """TF-IDF (or hashing) word n-grams + logistic regression (classes) or ridge regression (scores).

    Saved as `model.npz` (no pickle: loading a model directory never runs code, and a model outlives the
    scikit-learn version that fitted it): the vocabulary (or the hashing size), the IDF weights and the linear
    head's coefficients. Scoring recomputes the same features: n-gram counts, sublinear tf (1 + log), x IDF,
    L2-normalised rows, then `X @ coef.T + intercept` (ridge: the score; logistic: sigmoid/softmax → P).

    `char_ngrams: [lo, hi]` (tfidf only) adds a second block: character n-grams inside word boundaries
    (scikit-learn's `char_wb` analyzer), weighted and normalised the same way; the two L2-normalised blocks are
    concatenated and scaled by 1/sqrt(2), so a row still has unit norm. Character n-grams share evidence
    between inflected and compound forms; on the Danish set they raised cross-validated F1 but not holdout F1
    (benchmarks/results/classifier.md), so no shipped config uses them."""

    name = "sklearn"
    defaults = SKLEARN_DEFAULTS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.params["head"] == "ridge" and self.mode != "regression":
            self.mode = "regression"
        if self.params["head"] == "logistic" and self.mode == "regression":
            raise TextbookError("sklearn head 'logistic' needs mode expected or binary (use head 'ridge')")
        if self.params["features"] not in ("tfidf", "hashing"):
            raise TextbookError(f"sklearn features must be 'tfidf' or 'hashing', got {self.params['features']!r}")
        if self.params["head"] not in ("logistic", "ridge"):
            raise TextbookError(f"sklearn head must be 'logistic' or 'ridge', got {self.params['head']!r}")
        chars = self.params.get("char_ngrams")
        if chars is not None and (self.params["features"] != "tfidf" or len(chars) != 2
                                  or not 1 <= int(chars[0]) <= int(chars[1])):
            raise TextbookError(f"sklearn char_ngrams must be [lo, hi] with 1 <= lo <= hi and features tfidf, "
                                f"got {chars!r}")
        self._counter: Any = None  # CountVectorizer (fixed vocabulary) or HashingVectorizer
        self._char_counter: Any = None  # CountVectorizer(analyzer="char_wb") with a fixed vocabulary, or None
        self.char_idf: np.ndarray | None = None
        self.idf: np.ndarray | None = None
        self.coef: np.ndarray | None = None  # (k, n_features); k = 1 for ridge and binary logistic
        self.intercept: np.ndarray | None = None
        self.head_classes: list[int] = []

    def _ngrams(self) -> tuple[int, int]:
        return 1, int(self.params["ngram_max"])

    def _counter_for(self, vocabulary: dict[str, int] | None = None) -> Any:
        from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer

        if self.params["features"] == "hashing":
            return HashingVectorizer(ngram_range=self._ngrams(), n_features=int(self.params["hash_features"]),
                                     alternate_sign=False, norm=None, token_pattern=_TOKEN_PATTERN,
                                     dtype=np.float32)
        if vocabulary is None:
            return CountVectorizer(ngram_range=self._ngrams(), max_features=int(self.params["max_features"]),
                                   min_df=int(self.params["min_df"]), token_pattern=_TOKEN_PATTERN,
                                   dtype=np.float32)
        return CountVectorizer(ngram_range=self._ngrams(), vocabulary=vocabulary, token_pattern=_TOKEN_PATTERN,
                               dtype=np.float32)

    def _char_counter_for(self, vocabulary: dict[str, int] | None = None) -> Any:
        from sklearn.feature_extraction.text import CountVectorizer

        lo, hi = (int(v) for v in self.params["char_ngrams"])
        if vocabulary is None:
            return CountVectorizer(analyzer="char_wb", ngram_range=(lo, hi), min_df=int(self.params["min_df"]),
                                   max_features=int(self.params["char_max_features"]), dtype=np.float32)
        return CountVectorizer(analyzer="char_wb", ngram_range=(lo, hi), vocabulary=vocabulary, dtype=np.float32)

    @staticmethod
    def _weigh_block(counts: Any, idf: np.ndarray) -> Any:
        """counts (CSR) → sublinear tf x idf, L2-normalised rows (TfidfVectorizer(sublinear_tf=True))."""
        from sklearn.preprocessing import normalize

        x = counts.tocsr().astype(np.float32)
        np.log(x.data, out=x.data)
        x.data += 1.0
        x = x.multiply(idf).tocsr()
        return normalize(x, norm="l2", copy=False)

    def _weigh(self, counts: Any, char_counts: Any = None) -> Any:
        """Word block, or [word block, char block] / sqrt(2) when the model has character n-grams."""
        import scipy.sparse as sp

        x = self._weigh_block(counts, self.idf)
        if char_counts is None:
            return x
        both = sp.hstack([x, self._weigh_block(char_counts, self.char_idf)], format="csr")
        both.data *= np.float32(1 / np.sqrt(2))
        return both

    @staticmethod
    def _idf(counts: Any) -> np.ndarray:
        """Smooth IDF, as scikit-learn: ln((1 + n) / (1 + df)) + 1."""
        n = counts.shape[0]
        df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float64)
        return (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)

    def fit(self, texts: list[str], labels: list[float], final: bool = True) -> None:
        from sklearn.linear_model import LogisticRegression, Ridge

        p = self.params
        counter = self._counter_for()
        counts = counter.fit_transform(texts) if p["features"] == "tfidf" else counter.transform(texts)
        counts = counts.tocsr()
        if p["features"] == "tfidf":
            vocab = counter.vocabulary_
            self._counter = self._counter_for(vocab)
        else:
            self._counter = counter
        self.idf = self._idf(counts)
        char_counts = None
        if p.get("char_ngrams") is not None:
            char_counter = self._char_counter_for()
            char_counts = char_counter.fit_transform(texts).tocsr()
            self._char_counter = self._char_counter_for(char_counter.vocabulary_)
            self.char_idf = self._idf(char_counts)
        x = self._weigh(counts, char_counts)
        if p["head"] == "ridge":
            head = Ridge(alpha=float(p["alpha"]))
            head.fit(x, np.asarray(labels, dtype=np.float64))
            self.coef = np.atleast_2d(head.coef_).astype(np.float32)
            self.intercept = np.atleast_1d(head.intercept_).astype(np.float32)
            self.head_classes = []
        else:
            head = LogisticRegression(C=float(p["C"]), max_iter=int(p["max_iter"]), class_weight=p["class_weight"])
            head.fit(x, np.asarray(labels, dtype=np.int64))
            self.coef = head.coef_.astype(np.float32)
            self.intercept = head.intercept_.astype(np.float32)
            self.head_classes = [int(c) for c in head.classes_]

    def _counts(self, texts: list[str]) -> Any:
        """(n, features) CSR n-gram counts, as `CountVectorizer(vocabulary=...).transform` gives them (same
        lower-casing, tokens and n-grams), about 1.5x faster: one C-level regex and dict lookup per token and
        n-gram. Lower-cased here too, as CountVectorizer does, so a model trained with `lowercase: false`
        (whose vocabulary CountVectorizer still lower-cased) counts the same on mixed-case text."""
        if self.params["features"] != "tfidf":
            return self._counter.transform(texts)
        import re
        from itertools import repeat

        import scipy.sparse as sp

        vocab = self._counter.vocabulary
        get, pattern, nmax = vocab.get, re.compile(_TOKEN_PATTERN), int(self.params["ngram_max"])
        ids: list[int] = []
        lengths = np.zeros(len(texts), dtype=np.int64)
        for row, text in enumerate(texts):
            start = len(ids)
            toks = pattern.findall(text.lower())
            ids.extend(map(get, toks, repeat(-1)))
            for n in range(2, nmax + 1):
                ids.extend(map(get, map(" ".join, zip(*(toks[i:] for i in range(n)), strict=False)), repeat(-1)))
            lengths[row] = len(ids) - start
        found = np.asarray(ids, dtype=np.int64)
        keep = found >= 0
        rows = np.repeat(np.arange(len(texts)), lengths)[keep]
        return sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (rows, found[keep])),
                             shape=(len(texts), len(vocab)))

    def _decision(self, texts: list[str]) -> np.ndarray:
        chars = self._char_counter.transform(texts) if self._char_counter is not None else None
        x = self._weigh(self._counts(texts), chars)
        return np.asarray(x @ self.coef.T, dtype=np.float64) + self.intercept

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        z = self._decision(texts)
        if self.mode == "regression":
            return np.clip(z[:, 0], 0.0, self.score_max).astype(np.float32)
        if z.shape[1] == 1:  # binary logistic: P(classes[1]) = sigmoid(z)
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            proba = np.stack([1.0 - p1, p1], axis=1)
        else:  # multinomial: softmax
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            proba = e / e.sum(axis=1, keepdims=True)
        return self._from_proba(proba, self.head_classes)

    def save(self, model_dir: Path) -> str:
        arrays: dict[str, Any] = {"idf": self.idf, "coef": self.coef, "intercept": self.intercept,
                                  "classes": np.asarray(self.head_classes, dtype=np.int64)}
        if self.params["features"] == "tfidf":
            terms = sorted(self._counter.vocabulary, key=self._counter.vocabulary.get)
            if any("\n" in t for t in terms):
                raise TextbookError("vocabulary term with a newline (cannot happen with the default tokenizer)")
            arrays["vocabulary"] = np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8)
        if self._char_counter is not None:
            terms = sorted(self._char_counter.vocabulary, key=self._char_counter.vocabulary.get)
            if any("\n" in t for t in terms):  # char_wb n-grams lie inside one whitespace-split word
                raise TextbookError("character n-gram with a newline (cannot happen with char_wb)")
            arrays["char_vocabulary"] = np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8)
            arrays["char_idf"] = self.char_idf
        np.savez_compressed(model_dir / "model.npz", **arrays)
        return "model.npz"

    def load(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            self.idf, self.coef, self.intercept = z["idf"], z["coef"], z["intercept"]
            self.head_classes = [int(c) for c in z["classes"]]
            vocab = None
            if self.params["features"] == "tfidf":
                terms = z["vocabulary"].tobytes().decode("utf-8").split("\n")
                vocab = {t: i for i, t in enumerate(terms)}
            if self.params.get("char_ngrams") is not None:
                terms = z["char_vocabulary"].tobytes().decode("utf-8").split("\n")
                self._char_counter = self._char_counter_for({t: i for i, t in enumerate(terms)})
                self.char_idf = z["char_idf"]
        self._counter = self._counter_for(vocab)
        n_features = len(self.idf) + (len(self.char_idf) if self._char_counter is not None else 0)
        if self.coef.shape[1] != n_features:
            raise TextbookError(f"{path}: coefficients and features differ in size")


BACKENDS: dict[str, type[Backend]] = {"fasttext": FastTextBackend, "sklearn": SklearnBackend}


def make_backend(name: str, mode: str, classes: Sequence[int], score_max: float,
                 params: dict[str, Any] | None = None) -> Backend:
    if name not in BACKENDS:
        raise TextbookError(f"unknown classifier backend {name!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name](mode, classes, score_max, params or {})
