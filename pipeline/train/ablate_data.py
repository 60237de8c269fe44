"""What `textbook ablate` builds and checks around its runs: the positive/negative control arms from a
labelled page set, document overlap between evaluation sets and training data, and the unigram baseline.

- **Controls** (`build_controls`): pages of a labelled file whose score passes `high` (e.g. ">=3") become one
  arm, those passing `low` (e.g. "<=1") another; a hash-chosen share of the pages is held out of both and the
  held-out `high` pages become an evaluation set. Shards are written with the project's own
  `pipeline.shards.ShardSetWriter` and the arms' tokenizer, so the controls train exactly like any arm.
- **Overlap** (`overlap_checks`): every text evaluation set is hashed (whole document, lower-cased, whitespace
  collapsed: `pipeline.classify.overlap.normalise`) and looked up in every arm's training split and in a
  classifier's `training_hashes.npz` when one is found.
- **Unigram baseline** (`unigram_bpb`): bits per byte of a model that knows only the token frequencies of an
  arm's training split (add-1/2 smoothing over the vocabulary), on the very evaluation sequences the
  trainer scores. A trained model that does not beat it learned nothing but token frequencies.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TextbookError

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_RULE = re.compile(r"^\s*(>=|<=|==|>|<)\s*(-?\d+(?:\.\d+)?)\s*$")


def parse_rule(rule: str) -> Callable[[float], bool]:
    """A score predicate from ">=3", "<= 1", ">2.5", "==5". Raises TextbookError on anything else."""
    m = _RULE.match(rule)
    if not m:
        raise TextbookError(f"controls: rule {rule!r} is not a comparison like '>=3' or '<=1'")
    op, value = _OPS[m.group(1)], float(m.group(2))
    return lambda score: op(score, value)


def doc_hash(text: str) -> int:
    """64-bit hash (blake2b, 8 bytes) of the text lower-cased with whitespace runs collapsed: equal for the
    same page however it was re-wrapped; a chance collision among N pages has probability ~N^2 / 2^65."""
    from pipeline.classify.overlap import normalise

    return int.from_bytes(hashlib.blake2b(normalise(text).encode("utf-8", "replace"), digest_size=8).digest(), "big")


def _unit(text: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the normalised text and a salt (held-out choice, subsampling)."""
    from pipeline.classify.overlap import normalise

    h = hashlib.blake2b(f"{salt}\0{normalise(text)}".encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


# --- texts of evaluation sets and arms ---------------------------------------------------------------------
def shard_texts(paths: Iterable[str | Path], split: str) -> Iterator[str]:
    """The `text` of every document of one split of shard directories, one row group at a time."""
    from pipeline.scale.storage import open_shards_any

    for p in paths:
        yield from (r["text"] for r in open_shards_any(p).iter_documents(split, columns=["text"]))


def eval_set_texts(section: Any) -> Iterator[str] | None:
    """Texts of a text evaluation set (`EvalSetSection`: a shard directory's split or jsonl/parquet documents);
    None for a multiple-choice set (`task:`; benchmark items are the decontaminate stage's business)."""
    if getattr(section, "task", None) is not None:
        return None
    p = Path(section.path)
    if p.is_dir() and (p / "manifest.json").is_file():
        return shard_texts([p], section.split)
    from pipeline.documents import iter_documents

    return (d["text"] for d in iter_documents([p], text_field=getattr(section, "text_field", "text")))


# --- overlap -------------------------------------------------------------------------------------------------
@dataclass
class Overlap:
    """`shared` of the `documents` of evaluation set `eval_set` are also in `other` (an arm or a classifier)."""

    eval_set: str
    other: str
    kind: str  # "arm" or "classifier"
    documents: int
    shared: int

    def warning(self) -> str:
        what = (f"arm {self.other}'s training split" if self.kind == "arm"
                else f"the training data of classifier {self.other}")
        why = ("the arm is scored on text it trained on" if self.kind == "arm"
               else "the classifier chose or rejected pages like these having seen them")
        return (f"warning: eval set {self.eval_set} shares {self.shared:,} of its {self.documents:,} documents "
                f"({self.shared / max(self.documents, 1):.1%}) with {what}: {why}")


def overlap_checks(eval_sets: list[Any], arms: dict[str, list[str]], classifiers: list[str],
                   log: Callable[[str], None] = print) -> list[Overlap]:
    """Hash each text evaluation set's documents and count how many appear in each arm's training split
    and in each classifier's `training_hashes.npz` (pipeline/classify/overlap.py; a model without one is
    noted in the log). Arms are read once, streaming. Returns every pair with at least one shared document."""
    found: list[Overlap] = []
    hashes: dict[str, np.ndarray] = {}
    texts: dict[str, list[str]] = {}
    for e in eval_sets:
        it = eval_set_texts(e)
        if it is None:
            continue
        texts[e.name] = [t for t in it if isinstance(t, str) and t.strip()]
        hashes[e.name] = np.unique(np.array([doc_hash(t) for t in texts[e.name]], dtype=np.uint64))
    if not hashes:
        return found
    for arm, paths in arms.items():
        seen = {name: np.zeros(len(h), dtype=bool) for name, h in hashes.items()}
        batch: list[int] = []
        for t in shard_texts(paths, "train"):
            batch.append(doc_hash(t))
            if len(batch) >= 50_000:
                _mark(seen, hashes, batch)
                batch = []
        _mark(seen, hashes, batch)
        for name, hit in seen.items():
            if hit.any():
                found.append(Overlap(name, arm, "arm", len(hashes[name]), int(hit.sum())))
    from pipeline.classify.overlap import TrainingHashes

    for model_dir in classifiers:
        th = TrainingHashes.load(model_dir)
        if th is None:
            log(f"note: classifier {model_dir} has no training_hashes.npz: overlap of the eval sets with its "
                "training data not checked")
            continue
        for name, docs in texts.items():
            k = int(np.unique(np.array([doc_hash(t) for t, m in zip(docs, th.contains_documents(docs), strict=True)
                                        if m], dtype=np.uint64)).size)
            if k:
                found.append(Overlap(name, model_dir, "classifier", len(hashes[name]), k))
    return found


def _mark(seen: dict[str, np.ndarray], hashes: dict[str, np.ndarray], batch: list[int]) -> None:
    """Flag, per evaluation set, its hashes that occur in `batch` (hashes of training documents)."""
    b = np.array(batch, dtype=np.uint64)
    for name, h in hashes.items():
        seen[name] |= np.isin(h, b)


def classifier_dirs(shard_paths: Iterable[str | Path], extra: str | None) -> list[str]:
    """Classifier model directories to check: `extra` (the ablation's `classifier:`), and the edu model an arm's
    shards recorded in their manifest (run config `web.edu.model`, else `classifier.model`, when `web.edu`
    was enabled). A relative path that is not a directory here is looked up in the checkout (as the web stage
    does). Only directories that exist."""
    from pipeline.paths import repo_path

    out: list[str] = [extra] if extra else []
    for p in shard_paths:
        m = Path(p) / "manifest.json"
        if not m.is_file():
            continue
        cfg = json.loads(m.read_text()).get("config") or {}
        edu = (cfg.get("web") or {}).get("edu") or {}
        if edu.get("enabled"):
            model = edu.get("model") or (cfg.get("classifier") or {}).get("model")
            if model and model not in out:
                out.append(model)
    found = []
    for d in out:
        p = Path(d) if Path(d).is_dir() or Path(d).is_absolute() else repo_path(d)
        if p.is_dir() and str(p) not in found:
            found.append(str(p))
    return found


# --- unigram baseline ------------------------------------------------------------------------------------------
def token_counts(paths: Iterable[str | Path], split: str, vocab_size: int,
                 source_weights: dict[str, float] | None = None) -> np.ndarray:
    """Occurrences of every token id in one split of shard directories (EOS included), shape (vocab_size,).
    With `source_weights` (an arm's `data.source_weights`), each document's tokens count `weight` times (1 for a
    source not named), as the loader repeats or drops them: an arm that trains on one source of a shard set gets
    the frequencies of what it trains on (float counts)."""
    import pyarrow.parquet as pq

    from pipeline.scale.storage import open_shards_any

    weights = dict(source_weights or {})
    counts = np.zeros(vocab_size, dtype=np.float64 if weights else np.int64)
    for p in paths:
        for f in open_shards_any(p).files(split):
            pf = pq.ParquetFile(f)
            for i in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(i, columns=["input_ids", "source"] if weights else ["input_ids"])
                col = table.column("input_ids").combine_chunks()
                ids = np.asarray(col.values, dtype=np.int64)
                if not weights:
                    counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
                    continue
                per_doc = np.array([weights.get(s or "unknown", 1.0) for s in table.column("source").to_pylist()])
                per_token = np.repeat(per_doc, np.diff(np.asarray(col.offsets)))
                counts += np.bincount(ids, weights=per_token, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_bpb(counts: np.ndarray, targets: np.ndarray, tokens_per_byte: float, alpha: float = 0.5) -> float:
    """Bits per byte of the unigram model p(t) = (count[t] + alpha) / (N + alpha * V) on `targets` (token ids,
    any shape), with the evaluation set's tokens per UTF-8 byte (as the trainer's bits per byte)."""
    v = len(counts)
    logp = np.log(counts + alpha) - math.log(float(counts.sum()) + alpha * v)
    nats = -float(logp[np.asarray(targets, dtype=np.int64).ravel()].mean())
    return nats / math.log(2) * tokens_per_byte


def eval_targets(section: Any, tokenizer_file: Path, tokens: int, seq_len: int) -> Any:
    """The `EvalData` (targets `y`, tokens per byte) the trainer scores for a text eval set, or None (a task set,
    or too few tokens). Uses the trainer's own builders, so the baseline sees the same tokens."""
    from pipeline.train.data import eval_data
    from pipeline.train.evals import check_eval_set, document_eval_data

    spec = check_eval_set(section)
    budget = section.tokens or tokens
    if spec.kind == "task":
        return None
    if spec.kind == "shards":
        return eval_data(spec.name, spec.sets, section.split, budget, seq_len)
    from pipeline.tokenizer import load_tokenizer

    return document_eval_data(spec.name, spec.files, load_tokenizer(tokenizer_file), budget, seq_len,
                              section.text_field)


# --- controls ------------------------------------------------------------------------------------------------
@dataclass
class ControlPages:
    """The labelled pages sorted into the control arms and the held-out set (texts only)."""

    high: list[str]
    low: list[str]
    heldout: list[str]  # held-out pages chosen for the evaluation set (see `heldout_eval`)
    counts: dict[str, int]


def split_controls(records: Iterable[dict[str, Any]], *, score_field: str, high: str, low: str,
                   heldout_fraction: float, heldout_eval: str, exclude: set[int], balance: bool,
                   heldout_pages: set[int] | None = None, salt: str = "textbook-controls") -> ControlPages:
    """Sort labelled records into high / low / held out.

    A record is skipped when its text is empty or its score is missing or not a number. A page whose hash is
    in `exclude` (an evaluation set's page) goes to no arm. Of the others, those with `_unit(text, salt) <
    heldout_fraction` (or, given `heldout_pages`, those whose `doc_hash` is in it: e.g. the pages a classifier
    was not trained on) are held out of both arms; held-out pages passing `high` (or all of them:
    heldout_eval="all") form the evaluation set. With `balance`, the larger arm keeps pages in hash order until
    it has as many characters as the smaller one (the two then differ in kind, not in amount of unique text).
    """
    is_high, is_low = parse_rule(high), parse_rule(low)
    hi: list[tuple[float, str]] = []
    lo: list[tuple[float, str]] = []
    held: list[tuple[float, str]] = []
    counts = {"records": 0, "unlabelled": 0, "in_eval_sets": 0, "held_out": 0, "middle": 0}
    seen: set[int] = set()
    for r in records:
        counts["records"] += 1
        text, score = r.get("text"), r.get(score_field)
        try:
            score = float(score)
        except (TypeError, ValueError):
            score = math.nan
        if not isinstance(text, str) or not text.strip() or math.isnan(score):
            counts["unlabelled"] += 1
            continue
        h = doc_hash(text)
        if h in exclude:
            counts["in_eval_sets"] += 1
            continue
        if h in seen:  # the same page twice (a labelled set merged from several sources)
            continue
        seen.add(h)
        u = _unit(text, salt)
        if (h in heldout_pages) if heldout_pages is not None else (u < heldout_fraction):
            counts["held_out"] += 1
            if heldout_eval == "all" or (heldout_eval == "high" and is_high(score)):
                held.append((u, text))
            continue
        if is_high(score):
            hi.append((u, text))
        elif is_low(score):
            lo.append((u, text))
        else:
            counts["middle"] += 1
    hi.sort()
    lo.sort()
    held.sort()
    if balance and hi and lo:
        target = min(sum(len(t) for _, t in hi), sum(len(t) for _, t in lo))
        hi, lo = _take_chars(hi, target), _take_chars(lo, target)
    return ControlPages([t for _, t in hi], [t for _, t in lo], [t for _, t in held], counts)


def _take_chars(pages: list[tuple[float, str]], target: int) -> list[tuple[float, str]]:
    out, n = [], 0
    for u, t in pages:
        if n >= target:
            break
        out.append((u, t))
        n += len(t)
    return out


def write_shard_set(out: Path, tokenizer: Any, train: list[str], validation: list[str], source: str) -> dict[str, Any]:
    """A v1 shard set (pipeline/shards.py) of plain texts; returns its manifest."""
    from pipeline.shards import ShardSetWriter

    w = ShardSetWriter(out, tokenizer, row_group_bytes=1 << 20)
    try:
        if train:
            w.add("train", ({"text": t, "source": source} for t in train))
        if validation:
            w.add("validation", ({"text": t, "source": source} for t in validation))
        return w.finalize(description=f"textbook ablate control: {source}")
    except BaseException:
        w.abort()
        raise
