"""Diversity guard: notice, while generating, when a grid cell keeps producing the same text, and stop paying for it.

A streaming MinHash LSH index holds every output seen so far; each grid cell counts its outputs that are near
duplicates of an earlier output, or that open with a first sentence already used in that cell. Once a cell has
`min_docs` outputs and its repeat rate exceeds `max_repeat_rate`, the cell is stopped: the LLM runner asks
`should_send` before each request and the cell's remaining requests are skipped (and reported).
Stats: near-duplicate rate, distinct word-3-gram ratio, most common openings, stopped cells.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.generate import DiversitySettings

_WORD = re.compile(r"\w+", re.UNICODE)
_FIRST_SENTENCE = re.compile(r"^(.*?[.!?])(\s|$)", re.S)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


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


class DiversityGuard:
    def __init__(self, settings: DiversitySettings) -> None:
        from datasketch import MinHashLSH

        self.s = settings
        self.lsh = MinHashLSH(threshold=settings.near_dup_threshold, num_perm=settings.num_perm)
        self.cells: dict[str, CellState] = {}
        self.stopped: dict[str, dict[str, Any]] = {}
        self.openings: Counter[str] = Counter()
        self.ngrams: set[int] = set()
        self.ngram_total = 0
        self.docs = 0
        self.near_dups = 0
        self.skipped: Counter[str] = Counter()

    def cell_of(self, spec: Any) -> str:
        return " × ".join(spec.field(f) for f in self.s.cell_by)

    def _minhash(self, tokens: list[str]) -> Any:
        from datasketch import MinHash

        k = self.s.shingle_words
        shingles = {" ".join(tokens[i:i + k]).encode() for i in range(max(len(tokens) - k + 1, 1))}
        m = MinHash(num_perm=self.s.num_perm)
        m.update_batch(list(shingles))
        return m

    def observe(self, key: str, cell: str, text: str) -> dict[str, Any]:
        """Index one output; returns whether it repeats an earlier one (for the document's meta)."""
        import xxhash

        tokens = words(text)
        if not tokens:
            return {"near_duplicate_of": None, "opening_seen_before": False}
        self.docs += 1
        m = self._minhash(tokens)
        hits = self.lsh.query(m)
        if key not in self.lsh:  # a ledger replay can show the same request twice
            self.lsh.insert(key, m)
        for i in range(len(tokens) - 2):
            self.ngrams.add(xxhash.xxh64_intdigest(" ".join(tokens[i:i + 3])))
        self.ngram_total += max(len(tokens) - 2, 0)
        op = opening(text, self.s.opening_words)
        self.openings[op] += 1
        state = self.cells.setdefault(cell, CellState())
        state.docs += 1
        near = sorted(h for h in hits if h != key)
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

    def should_send(self, cell: str) -> str | None:
        if cell in self.stopped:
            self.skipped[cell] += 1
            return f"diversity_guard: cell '{cell}' repeats itself"
        return None

    def stats(self, top: int = 10) -> dict[str, Any]:
        return {
            "outputs_indexed": self.docs,
            "near_duplicate_rate": round(self.near_dups / self.docs, 4) if self.docs else 0.0,
            "distinct_3gram_ratio": round(len(self.ngrams) / self.ngram_total, 4) if self.ngram_total else 0.0,
            "most_common_openings": [{"opening": o, "count": c} for o, c in self.openings.most_common(top)],
            "cells_observed": len(self.cells),
            "cells_stopped": self.stopped,
            "requests_not_sent_per_cell": dict(self.skipped),
        }
