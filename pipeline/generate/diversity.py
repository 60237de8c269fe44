"""Diversity guard: notice, while generating, when a grid cell keeps producing the same text, and stop paying for it.

A streaming MinHash LSH index holds every output seen so far; each grid cell counts its outputs that are near
duplicates of an earlier output, or that open with a first sentence already used in that cell. Once a cell has
`min_docs` outputs and its repeat rate exceeds `max_repeat_rate`, the cell is stopped: the guard runs in the
judging process, which reports stopped cells to the driver, and the LLM runner's `should_send`
(`judge.JudgeProcess`) skips the cell's remaining requests (and counts them).
Stats: near-duplicate rate, distinct word-3-gram ratio, most common openings, stopped cells.

Words, word n-gram hashes and MinHash signatures are `pipeline.minhash`'s, as in dedup (vectorised numpy).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config.generate import DiversitySettings
from pipeline.minhash import MinHasher, ngram_hashes, word_hashes, words

_FIRST_SENTENCE = re.compile(r"^(.*?[.!?])(\s|$)", re.S)


def opening(text: str, n_words: int) -> str:
    """The first sentence's first words, lower-cased: 'once upon a time there was a' style openers."""
    body = text.strip().lstrip("#*> ").strip()
    m = _FIRST_SENTENCE.match(body)
    first = m.group(1) if m else body[:300]
    return " ".join(words(first)[:n_words])


@dataclass
class CellState:
    docs: int = 0
    near_dups: int = 0
    repeated_openings: int = 0
    repeats: int = 0
    openings: Counter[str] = field(default_factory=Counter)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives around the threshold (as datasketch does)."""
    integrate = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it
    xs = np.linspace(0, 1, 201)
    best, best_err = (1, num_perm), float("inf")
    for r in range(1, num_perm + 1):
        if num_perm % r:
            continue
        b = num_perm // r
        p = 1 - (1 - xs**r) ** b
        fp = integrate(p[xs < threshold], xs[xs < threshold])
        fn = integrate(1 - p[xs >= threshold], xs[xs >= threshold])
        if fp + fn < best_err:
            best, best_err = (b, r), fp + fn
    return best


class MinHashIndex:
    """Streaming MinHash LSH: add a signature, ask which earlier ones estimate Jaccard >= threshold.
    Signatures come from dedup's `minhash.MinHasher`; the index is a dict per band, since outputs arrive one by
    one (dedup's batch LSH clusters a whole corpus at once)."""

    def __init__(self, threshold: float, num_perm: int, seed: int = 1) -> None:
        self.hasher = MinHasher(num_perm, seed)
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.buckets: list[dict[bytes, list[str]]] = [{} for _ in range(self.bands)]
        self.signatures: dict[str, np.ndarray] = {}

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        return self.hasher.signatures_of(shingles, np.zeros(len(shingles), dtype=np.int64), 1)[0]

    def query(self, sig: np.ndarray) -> list[str]:
        cands: set[str] = set()
        for i, bucket in enumerate(self.buckets):
            cands.update(bucket.get(sig[i * self.rows:(i + 1) * self.rows].tobytes(), ()))
        return sorted(k for k in cands if float(np.mean(self.signatures[k] == sig)) >= self.threshold)

    def add(self, key: str, sig: np.ndarray) -> None:
        if key in self.signatures:
            return
        self.signatures[key] = sig
        for i, bucket in enumerate(self.buckets):
            bucket.setdefault(sig[i * self.rows:(i + 1) * self.rows].tobytes(), []).append(key)


class DiversityGuard:
    def __init__(self, settings: DiversitySettings) -> None:
        self.s = settings
        self.index = MinHashIndex(settings.near_dup_threshold, settings.num_perm)
        self.cells: dict[str, CellState] = {}
        self.stopped: dict[str, dict[str, Any]] = {}
        self.openings: Counter[str] = Counter()
        self.ngrams: set[int] = set()
        self.ngram_total = 0
        self.docs = 0
        self.near_dups = 0

    def observe(self, key: str, cell: str, text: str) -> dict[str, Any]:
        """Index one output; returns whether it repeats an earlier one (for the document's meta)."""
        tokens = words(text)
        if not tokens:
            return {"near_duplicate_of": None, "opening_seen_before": False}
        self.docs += 1
        wh = word_hashes(tokens)
        # a text shorter than the shingle is one shingle of all its words, so it still has a signature
        sig = self.index.signature(ngram_hashes(wh, min(self.s.shingle_words, len(wh))))
        near = [k for k in self.index.query(sig) if k != key]
        self.index.add(key, sig)
        if len(tokens) >= 3:
            self.ngrams.update(ngram_hashes(wh, 3).tolist())
            self.ngram_total += len(tokens) - 2
        op = opening(text, self.s.opening_words)
        self.openings[op] += 1
        state = self.cells.setdefault(cell, CellState())
        state.docs += 1
        seen_opening = state.openings[op] > 0
        state.openings[op] += 1
        state.near_dups += bool(near)
        self.near_dups += bool(near)
        state.repeated_openings += seen_opening
        state.repeats += bool(near) or seen_opening
        if self.s.enabled and cell not in self.stopped and state.docs >= self.s.min_docs:
            rate = state.repeats / state.docs
            if rate > self.s.max_repeat_rate:
                self.stopped[cell] = {"after_outputs": state.docs, "repeat_rate": round(rate, 3),
                                      "near_duplicates": state.near_dups,
                                      "repeated_openings": state.repeated_openings,
                                      "top_opening": state.openings.most_common(1)[0][0]}
        return {"near_duplicate_of": near[0] if near else None, "opening_seen_before": seen_opening}

    def stats(self, top: int = 10) -> dict[str, Any]:
        return {
            "outputs_indexed": self.docs,
            "near_duplicate_rate": round(self.near_dups / self.docs, 4) if self.docs else 0.0,
            "distinct_3gram_ratio": round(len(self.ngrams) / self.ngram_total, 4) if self.ngram_total else 0.0,
            "most_common_openings": [{"opening": o, "count": c} for o, c in self.openings.most_common(top)],
            "cells_observed": len(self.cells),
            "cells_stopped": self.stopped,
        }
