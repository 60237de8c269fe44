"""Hashes of a classifier's training texts, stored beside the model: scoring or evaluating pages the model was
trained on says so (otherwise a user measures training accuracy and calls it quality), and training text pasted
into another page can be recognised (`pipeline.classify.guards`).

File `<model_dir>/training_hashes.npz` (written by `train_classifier`, or for an already trained model by
`textbook classifier training-hashes CONFIG`), three arrays:

- `documents`: sorted unique uint32 hashes of each training text's key (`document_key`: its first
  `DOC_KEY_CHARS` characters once normalised, `normalise`: lower case, every run of whitespace one space). A
  bounded key keeps the check cheap on every scored page; two texts that share their first 1,000 normalised
  characters are copies of one another for this purpose;
- `shingles`: sorted unique uint32 hashes of runs of `SHINGLE_WORDS` consecutive words of the normalised
  training texts, one in `SHINGLE_SAMPLE` kept (those whose hash is divisible by it, the same on both sides).
  Word runs, not lines: text pasted with other line breaks (or none) is still recognised; a pasted passage
  of 60 words (53 shingles) is missed with probability (7/8) ** 53, under 0.1 %;
- `info`: a JSON string (format, counts, the rules above).

Four bytes a hash keep the file small: with N stored hashes a foreign run of words matches by chance with
probability N / 2**32 (4e-5 for 170,000 shingles), so a match means "almost surely the same words".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TextbookError

HASH_FILE = "training_hashes.npz"
FORMAT = "textbook-training-hashes/2"
DOC_KEY_CHARS = 1000
SHINGLE_WORDS = 8
SHINGLE_SAMPLE = 8
_PRIME = np.uint64(1_099_511_628_211)  # FNV-64 prime: the rolling combination of word hashes


def normalise(text: str) -> str:
    """Lower case, every run of whitespace (newlines included) one space, no leading/trailing space."""
    return " ".join(text.lower().split())


def document_key(text: str) -> str:
    """What identifies a document: its first DOC_KEY_CHARS + 25 % raw characters, normalised, cut to
    DOC_KEY_CHARS (the slack lets a copy re-wrapped with some more whitespace keep its key). Reads a bounded
    prefix of the raw text however long the document, so it costs little on every scored page."""
    return normalise(text[: DOC_KEY_CHARS + DOC_KEY_CHARS // 4])[:DOC_KEY_CHARS]


def text_hash(normalised: str) -> int:
    """First 4 bytes of blake2b of the UTF-8 text, as an unsigned int (uint32 range)."""
    return int.from_bytes(hashlib.blake2b(normalised.encode("utf-8", "replace"), digest_size=4).digest(), "big")


_INV_PRIME = np.uint64(pow(int(_PRIME), -1, 2**64))


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64."""
    p = np.full(n, base, dtype=np.uint64)
    p[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(p, dtype=np.uint64)


def shingle_hashes(normalised: str) -> np.ndarray:
    """uint32 hash of every run of SHINGLE_WORDS consecutive words of a `normalise`d text (words - SHINGLE_WORDS
    + 1 of them, none for fewer words).

    The hash of a run is a polynomial hash of its UTF-8 bytes (the words and the single spaces between them),
    taken from prefix sums modulo 2**64 in a few vectorised passes (no Python loop over words), then mixed;
    the top 32 bits are kept."""
    raw = normalised.encode("utf-8", "surrogatepass")
    b = np.frombuffer(raw, dtype=np.uint8).astype(np.uint64)
    spaces = np.flatnonzero(b == 32)
    words = len(spaces) + 1 if len(b) else 0
    n = words - SHINGLE_WORDS + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint32)
    starts = np.concatenate(([0], spaces + 1))[:n]
    ends = np.concatenate((spaces, [len(b)]))[SHINGLE_WORDS - 1:]
    with np.errstate(over="ignore"):
        prefix = np.concatenate(([np.uint64(0)], np.cumsum((b + np.uint64(1)) * _powers(_PRIME, len(b)),
                                                           dtype=np.uint64)))
        h = (prefix[ends] - prefix[starts]) * _powers(_INV_PRIME, len(b) + 1)[starts]
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x9E3779B97F4A7C15)
    return (h >> np.uint64(32)).astype(np.uint32)


def sampled(hashes: np.ndarray) -> np.ndarray:
    """The hashes kept in the store (divisible by SHINGLE_SAMPLE)."""
    return hashes[hashes % SHINGLE_SAMPLE == 0]


def _sorted_unique(values: Iterable[int]) -> np.ndarray:
    return np.unique(np.fromiter(values, dtype=np.uint32))


@dataclass
class TrainingHashes:
    """The stored hash sets of one model; `contains_documents` and `memorised` answer for texts."""

    documents: np.ndarray  # sorted unique uint32
    shingles: np.ndarray  # sorted unique uint32 (sampled)
    info: dict[str, Any]

    @classmethod
    def build(cls, texts: Iterable[str]) -> TrainingHashes:
        """Hash every text (its document key) and its sampled word shingles; non-strings and blanks skipped."""
        docs: list[int] = []
        parts: list[np.ndarray] = []
        n = 0
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                continue
            n += 1
            docs.append(text_hash(document_key(t)))
            parts.append(sampled(shingle_hashes(normalise(t))))
        d = _sorted_unique(docs)
        sh = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint32)
        info = {"format": FORMAT, "texts": n, "documents": int(len(d)), "shingles": int(len(sh)),
                "normalise": "lower case, whitespace runs collapsed", "document_key_chars": DOC_KEY_CHARS,
                "shingle_words": SHINGLE_WORDS, "shingle_sample": SHINGLE_SAMPLE}
        return cls(d, sh.astype(np.uint32), info)

    def save(self, model_dir: str | Path) -> Path:
        """Write `<model_dir>/training_hashes.npz` (atomically); returns its path."""
        from pipeline.io import atomic_path

        path = Path(model_dir) / HASH_FILE
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, documents=self.documents, shingles=self.shingles,
                                info=np.array(json.dumps(self.info, sort_keys=True)))
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> TrainingHashes | None:
        """The model's hashes, or None when the model has none (trained before hashes were stored).
        Raises TextbookError naming the file when it exists but cannot be read or has another format."""
        path = Path(model_dir) / HASH_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                info = json.loads(str(z["info"]))
                docs, sh = z["documents"].astype(np.uint32), z["shingles"].astype(np.uint32)
        except Exception as e:  # noqa: BLE001 - zip/npy/json/missing-array errors all mean "corrupt"
            raise TextbookError(f"{path}: corrupt training hashes ({type(e).__name__}: {e})") from None
        expected = {"format": FORMAT, "document_key_chars": DOC_KEY_CHARS, "shingle_words": SHINGLE_WORDS,
                    "shingle_sample": SHINGLE_SAMPLE}
        if any(info.get(k) != v for k, v in expected.items()):
            raise TextbookError(f"{path}: written with other rules ({ {k: info.get(k) for k in expected} }, "
                                f"expected {expected}): rewrite it with `textbook classifier training-hashes`")
        return cls(docs, sh, info)

    @staticmethod
    def _member(table: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        if not len(hashes) or not len(table):
            return np.zeros(len(hashes), dtype=bool)
        idx = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
        return table[idx] == hashes

    def contains_documents(self, texts: Sequence[str]) -> np.ndarray:
        """bool per text: its `document_key` is a training text's (non-strings and blanks: False)."""
        valid = np.array([isinstance(t, str) and bool(t.strip()) for t in texts], dtype=bool)
        hashes = np.array([text_hash(document_key(t)) if ok else 0 for t, ok in zip(texts, valid, strict=True)],
                          dtype=np.uint32)
        return self._member(self.documents, hashes) & valid

    def memorised(self, text: str) -> tuple[float, str]:
        """(share of the words of `text` in runs of training text, `text` without those words).

        A word is memorised when a stored shingle covers it. Only one shingle in SHINGLE_SAMPLE is stored, so
        words between two stored hits less than 3 x SHINGLE_WORDS apart are taken as one run, and a run's first
        and last shingles are usually unsampled: the share counts each run widened by SHINGLE_SAMPLE - 1 words
        on each side (the expected gap), the remainder leaves out 2 x SHINGLE_WORDS words on each side (a few
        words of the page's own text next to a pasted passage may go with it). The remainder's words are
        joined by single spaces (the classifier collapses whitespace anyway)."""
        h = shingle_hashes(normalise(text))
        candidates = np.flatnonzero(h % SHINGLE_SAMPLE == 0)
        hit = candidates[self._member(self.shingles, h[candidates])]
        if not len(hit):
            return 0.0, text
        tokens = text.split()  # the same words as normalise(text), in their own case
        core = np.zeros(len(tokens), dtype=bool)
        cut = np.zeros(len(tokens), dtype=bool)
        pad = 2 * SHINGLE_WORDS
        runs: list[tuple[int, int]] = []
        start = int(hit[0])
        for a, b in zip(hit[:-1], hit[1:], strict=True):
            if b - a > 3 * SHINGLE_WORDS:  # a new run
                runs.append((start, int(a) + SHINGLE_WORDS))
                start = int(b)
        runs.append((start, int(hit[-1]) + SHINGLE_WORDS))
        for a, b in runs:
            core[max(0, a - SHINGLE_SAMPLE + 1):b + SHINGLE_SAMPLE - 1] = True
            cut[max(0, a - pad):b + pad] = True
        return float(core.mean()), " ".join(t for t, m in zip(tokens, cut, strict=True) if not m)


def write_training_hashes(model_dir: str | Path, texts: Iterable[str]) -> dict[str, Any]:
    """Hash the texts a model was fitted on into `<model_dir>/training_hashes.npz`; returns the file's info.

    The hook `train_classifier` calls (with the raw texts of the documents it fitted on)."""
    hashes = TrainingHashes.build(texts)
    hashes.save(model_dir)
    return hashes.info


def hashes_from_config(train: Any, model_dir: str | Path) -> dict[str, Any]:
    """Write the hashes of an already trained model from its training config (`classifier.train`): the
    documents `train_classifier`'s final fit sees (`labelled_data(train).fitted`: every labelled document but
    the holdout, train_only sources included). When the model's metrics.json records another number of fitted
    documents, the config is not the one the model was trained with: TextbookError, nothing written."""
    from pipeline.classify.train import labelled_data

    model_dir = Path(model_dir)
    data = labelled_data(train)
    fitted = [e.text for e in data.fitted]
    metrics_path = model_dir / "metrics.json"
    if metrics_path.is_file():
        recorded = json.loads(metrics_path.read_text(encoding="utf-8")).get("data", {}).get("fitted")
        if recorded is not None and int(recorded) != len(fitted):
            raise TextbookError(f"{model_dir}: the config gives {len(fitted):,} documents to fit on, the model's "
                                f"metrics.json records {int(recorded):,}: not the config this model was trained with")
    info = write_training_hashes(model_dir, fitted)
    return {**info, "labelled": len(data.fitted) + len(data.holdout), "held_out": len(data.holdout)}


def overlap_summary(in_training: np.ndarray) -> dict[str, Any]:
    """{'documents', 'in_training', 'fraction'} from a bool per document."""
    n = int(len(in_training))
    k = int(np.sum(in_training))
    return {"documents": n, "in_training": k, "fraction": k / n if n else 0.0}


def overlap_warning(summary: dict[str, Any], what: str = "documents") -> str | None:
    """A one-line warning when some documents are training texts of the model, else None."""
    k = summary.get("in_training", 0)
    if not k:
        return None
    return (f"warning: {k:,} of {summary['documents']:,} {what} ({summary['fraction']:.1%}) are texts the classifier "
            "was trained on: scores on them measure training fit, not quality")
