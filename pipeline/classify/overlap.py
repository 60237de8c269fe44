"""Hashes of a classifier's training texts, stored beside the model: scoring or evaluating pages the model was
trained on says so (otherwise a user measures training accuracy and calls it quality), and a paragraph of
training text pasted into another page can be recognised (`pipeline.classify.guards`).

File `<model_dir>/training_hashes.npz` (written by `train_classifier`, or for an already trained model by
`textbook classifier training-hashes CONFIG`), three arrays:

- `documents`: sorted unique uint32, the first 4 bytes of blake2b of each training text's key (`document_key`:
  its first `DOC_KEY_CHARS` characters once normalised, `normalise`: lower case, every run of whitespace one
  space). A bounded key keeps the check cheap on every scored page; two texts that share their first 1,000
  normalised characters are copies of one another for this purpose;
- `paragraphs`: the same for every line of a training text that is at least `MIN_PARAGRAPH_CHARS` long once
  normalised (shorter lines, "Home", "Read more", are shared by unrelated pages);
- `info`: a JSON string (format, counts, the normalisation and paragraph rule).

Four bytes keep the file small (about 4 bytes per training text and per paragraph): with N stored hashes a
foreign text matches by chance with probability N / 2**32 (2e-5 for 100,000 paragraphs). A match therefore
means "almost surely the same normalised text", never "similar text".
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
FORMAT = "textbook-training-hashes/1"
MIN_PARAGRAPH_CHARS = 80
DOC_KEY_CHARS = 1000


def normalise(text: str) -> str:
    """Lower case, every run of whitespace (newlines included) one space, no leading/trailing space."""
    return " ".join(text.lower().split())


def document_key(text: str) -> str:
    """What identifies a document: its first DOC_KEY_CHARS characters, normalised. Reads a bounded prefix of
    the raw text (however long the document)."""
    return normalise(text[: 2 * DOC_KEY_CHARS])[:DOC_KEY_CHARS]


def text_hash(normalised: str) -> int:
    """First 4 bytes of blake2b of the UTF-8 text, as an unsigned int (uint32 range)."""
    return int.from_bytes(hashlib.blake2b(normalised.encode("utf-8", "replace"), digest_size=4).digest(), "big")


def paragraph_spans(text: str, min_chars: int = MIN_PARAGRAPH_CHARS) -> list[tuple[int, int, int]]:
    """(start, end, hash) of every line of `text` whose normalised form has at least `min_chars` characters;
    start/end are character offsets into `text` (the line without its newline)."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    for line in text.split("\n"):
        end = pos + len(line)
        if end - pos >= min_chars:  # normalising never lengthens a line (bar rare case mappings): skip short ones
            norm = normalise(line)
            if len(norm) >= min_chars:
                out.append((pos, end, text_hash(norm)))
        pos = end + 1
    return out


def _sorted_unique(values: Iterable[int]) -> np.ndarray:
    return np.unique(np.fromiter(values, dtype=np.uint32))


@dataclass
class TrainingHashes:
    """The stored hash sets of one model; `contains_*` answer membership for batches of texts."""

    documents: np.ndarray  # sorted unique uint32
    paragraphs: np.ndarray  # sorted unique uint32
    info: dict[str, Any]

    @classmethod
    def build(cls, texts: Iterable[str], min_paragraph_chars: int = MIN_PARAGRAPH_CHARS) -> TrainingHashes:
        """Hash every text (whole, normalised) and every paragraph of it; texts that are not strings are skipped."""
        docs: list[int] = []
        paras: list[int] = []
        n = 0
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                continue
            n += 1
            docs.append(text_hash(document_key(t)))
            paras.extend(h for _, _, h in paragraph_spans(t, min_paragraph_chars))
        d, p = _sorted_unique(docs), _sorted_unique(paras)
        info = {"format": FORMAT, "texts": n, "documents": int(len(d)), "paragraphs": int(len(p)),
                "hash": "blake2b, first 4 bytes, of the text lower-cased with whitespace runs collapsed",
                "document_key_chars": DOC_KEY_CHARS, "min_paragraph_chars": min_paragraph_chars}
        return cls(d, p, info)

    @property
    def min_paragraph_chars(self) -> int:
        return int(self.info.get("min_paragraph_chars", MIN_PARAGRAPH_CHARS))

    def save(self, model_dir: str | Path) -> Path:
        """Write `<model_dir>/training_hashes.npz` (atomically); returns its path."""
        from pipeline.io import atomic_path

        path = Path(model_dir) / HASH_FILE
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, documents=self.documents, paragraphs=self.paragraphs,
                                info=np.array(json.dumps(self.info, sort_keys=True)))
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> TrainingHashes | None:
        """The model's hashes, or None when the model has none (trained before hashes were stored).
        Raises TextbookError naming the file when it exists but cannot be read."""
        path = Path(model_dir) / HASH_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                info = json.loads(str(z["info"]))
                docs, paras = z["documents"].astype(np.uint32), z["paragraphs"].astype(np.uint32)
        except Exception as e:  # noqa: BLE001 - zip/npy/json errors all mean "corrupt"
            raise TextbookError(f"{path}: corrupt training hashes ({type(e).__name__}: {e})") from None
        if info.get("format") != FORMAT or info.get("document_key_chars") != DOC_KEY_CHARS:
            raise TextbookError(f"{path}: unsupported format {info.get('format')!r} with document keys of "
                                f"{info.get('document_key_chars')} characters (expected {FORMAT}, {DOC_KEY_CHARS})")
        return cls(docs, paras, info)

    def _member(self, table: np.ndarray, hashes: Sequence[int]) -> np.ndarray:
        if not len(hashes) or not len(table):
            return np.zeros(len(hashes), dtype=bool)
        h = np.asarray(hashes, dtype=np.uint32)
        idx = np.minimum(np.searchsorted(table, h), len(table) - 1)
        return table[idx] == h

    def contains_documents(self, texts: Sequence[str]) -> np.ndarray:
        """bool per text: its `document_key` is a training text's (non-strings and blanks: False)."""
        valid = np.array([isinstance(t, str) and bool(t.strip()) for t in texts], dtype=bool)
        hashes = [text_hash(document_key(t)) if ok else 0 for t, ok in zip(texts, valid, strict=True)]
        return self._member(self.documents, hashes) & valid

    def memorised_spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of the lines of `text` that are training paragraphs."""
        spans = paragraph_spans(text, self.min_paragraph_chars)
        hit = self._member(self.paragraphs, [h for _, _, h in spans])
        return [(s, e) for (s, e, _), m in zip(spans, hit, strict=True) if m]


def write_training_hashes(model_dir: str | Path, texts: Iterable[str]) -> dict[str, Any]:
    """Hash the texts a model was fitted on into `<model_dir>/training_hashes.npz`; returns the file's info.

    The hook `train_classifier` calls (with the raw texts of the documents it fitted on)."""
    hashes = TrainingHashes.build(texts)
    hashes.save(model_dir)
    return hashes.info


def hashes_from_config(train: Any, model_dir: str | Path, all_documents: bool = False) -> dict[str, Any]:
    """Write the hashes of an already trained model from its training config (`classifier.train`): the
    documents of the train split (`all_documents`: every labelled document, for a model refitted on all of them).

    The split is recomputed exactly as `train_classifier` does (hash of the document id); when the model's
    metrics.json records split sizes that differ from the recomputed ones, the config is not the one the
    model was trained with and this raises TextbookError instead of writing wrong hashes."""
    from pipeline.classify.data import load_labelled, split_of

    model_dir = Path(model_dir)
    examples, _, _ = load_labelled(train.sources, train.score_min, train.score_max, train.strict)
    sizes = {"train": 0, "validation": 0, "test": 0}
    chosen: list[str] = []
    for e in examples:
        part = split_of(e.id, train.split)
        sizes[part] += 1
        if all_documents or part == "train":
            chosen.append(e.text)
    metrics_path = model_dir / "metrics.json"
    if metrics_path.is_file():
        recorded = json.loads(metrics_path.read_text(encoding="utf-8")).get("data", {}).get("splits")
        if recorded and {k: int(v) for k, v in recorded.items()} != sizes:
            raise TextbookError(f"{model_dir}: the config's data splits {sizes} differ from the model's {recorded} "
                                "(metrics.json): not the config this model was trained with")
    info = write_training_hashes(model_dir, chosen)
    return {**info, "splits": sizes, "hashed": "all documents" if all_documents else "train split"}


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
