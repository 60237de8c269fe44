"""Coverage-driven prompt specs: fill the grid topic × audience × format to weighted quotas, deterministically.

Specs come as a stream whose every prefix is balanced, so `n=100` gives the first 100 specs of `n=1000` (a run
grown later re-uses the LLM ledger for the first 100). Quotas are kept by smooth weighted round robin:
  1. pick the (audience, format) cell, in proportion to weight(audience) × weight(format);
  2. pick the subject (among those the format suits) furthest behind its weighted share of the run;
  3. take the subject's next leaf topic (one seeded permutation per subject, so leaves are covered evenly
     before any repeats) that this cell has not used yet.
Web-seeded specs (a page extract as the seed) are interleaved at `web_seed_fraction`, each page once.
No two specs are identical; a grid too small for `n` is an error that says how big it is.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TextbookError
from pipeline.generate.seeds import SeedPage
from pipeline.generate.taxonomy import Leaf, Subject, Taxonomy
from pipeline.generate.templates import Format, audience_guidance


@dataclass(frozen=True)
class PromptSpec:
    index: int
    audience: str
    format: str
    leaf: Leaf | None = None
    seed: SeedPage | None = None

    @property
    def topic(self) -> str:
        if self.leaf is not None:
            return self.leaf.path
        assert self.seed is not None
        return f"web/{self.seed.site}/{self.seed.id}"

    @property
    def subject(self) -> str:
        return self.leaf.subject if self.leaf is not None else "web"

    def identity(self) -> tuple[str, str, str]:
        return (self.topic, self.audience, self.format)

    def variables(self) -> dict[str, Any]:
        v: dict[str, Any] = {"audience": self.audience, "audience_guidance": audience_guidance(self.audience),
                             "topic": self.topic}
        if self.leaf is not None:
            v.update(subject=self.leaf.subject, subtopic=self.leaf.subtopic, concept=self.leaf.concept)
        if self.seed is not None:
            v.update(extract=self.seed.extract, url=self.seed.url or "", subject="web", subtopic="", concept="")
        return v

    def field(self, name: str) -> str:
        return {"audience": self.audience, "format": self.format, "subject": self.subject}[name]


class RoundRobin:
    """Smooth weighted round robin: every prefix of the picks is as close to the weights as integers allow."""

    def __init__(self, items: list[Any], weights: list[float]) -> None:
        self.items = [i for i, w in zip(items, weights, strict=True) if w > 0]
        self.weights = [w for w in weights if w > 0]
        self.current = [0.0] * len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def pick(self) -> Any:
        total = sum(self.weights)
        for i, w in enumerate(self.weights):
            self.current[i] += w
        best = max(range(len(self.items)), key=lambda i: (self.current[i], -i))
        self.current[best] -= total
        return self.items[best]

    def remove(self, item: Any) -> None:
        i = self.items.index(item)
        del self.items[i], self.weights[i], self.current[i]


def _rng(seed: int, *parts: str) -> random.Random:
    h = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


class SpecSampler:
    def __init__(self, taxonomy: Taxonomy, formats: dict[str, Format], audiences: list[str], *, seed: int = 0,
                 audience_weights: dict[str, float] | None = None, format_weights: dict[str, float] | None = None,
                 subject_weights: dict[str, float] | None = None, seeds: list[SeedPage] | None = None,
                 seed_format: Format | None = None, web_seed_fraction: float = 0.0) -> None:
        aw, fw, sw = audience_weights or {}, format_weights or {}, subject_weights or {}
        for name, weights, known in (("audience", aw, audiences), ("format", fw, list(formats)),
                                     ("subject", sw, list(taxonomy.subjects))):
            unknown = sorted(set(weights) - set(known))
            if unknown:
                raise TextbookError(f"generate.weights.{name}: unknown {name}(s) {', '.join(unknown)}")
        self.subjects = taxonomy.subjects
        plain = [f for f in formats.values() if not f.seeded]
        self.subject_weight = {s: sw.get(s, 1.0) for s in self.subjects}
        # Ties between equally served subjects go by a seeded order, not by file order.
        order = sorted(self.subjects)
        _rng(seed, "subjects").shuffle(order)
        self.subject_rank = {s: i for i, s in enumerate(order)}
        self.subject_picks: Counter[str] = Counter()
        self.cell_subjects: dict[tuple[str, str], list[str]] = {}
        cells: list[tuple[str, str]] = []
        for f in plain:
            eligible = [s.name for s in self.subjects.values()
                        if f.suits_subject(s.tags) and self.subject_weight[s.name] > 0]
            for a in audiences:
                if f.suits_audience(a) and eligible and aw.get(a, 1.0) * fw.get(f.name, 1.0) > 0:
                    cells.append((a, f.name))
                    self.cell_subjects[(a, f.name)] = list(eligible)
        # Shuffled once so a small n spreads over audiences and formats instead of following file order.
        _rng(seed, "cells").shuffle(cells)
        self.cells = RoundRobin(cells, [aw.get(a, 1.0) * fw.get(f, 1.0) for a, f in cells])
        self.grid_cells = list(cells)
        self.perm: dict[str, list[Leaf]] = {}
        for s in self.subjects.values():
            leaves = s.leaves
            _rng(seed, "leaves", s.name).shuffle(leaves)
            self.perm[s.name] = leaves
        self.cursor: Counter[str] = Counter()
        self.used: dict[tuple[str, str], set[tuple[str, int]]] = {}
        self.seeds = list(seeds or [])
        self.seed_format = seed_format
        self.web_fraction = web_seed_fraction if (self.seeds and seed_format is not None) else 0.0
        if self.web_fraction:
            suited = [a for a in audiences if seed_format.suits_audience(a)]
            self.seed_audiences = RoundRobin(suited, [aw.get(a, 1.0) for a in suited])
        if not cells and not self.web_fraction:
            raise TextbookError("generate: the grid is empty: no format suits the audiences and subjects chosen")

    def _next_leaf(self, cell: tuple[str, str], subject: Subject) -> Leaf | None:
        leaves = self.perm[subject.name]
        used = self.used.setdefault(cell, set())
        start = self.cursor[subject.name]
        for step in range(len(leaves)):
            pos = (start + step) % len(leaves)
            if (subject.name, pos) not in used:
                used.add((subject.name, pos))
                self.cursor[subject.name] = start + step + 1
                return leaves[pos]
        return None

    def _pick_subject(self, names: list[str]) -> str:
        """The subject furthest behind its weighted share across the whole run (global balance of subjects)."""
        return min(names, key=lambda n: ((self.subject_picks[n] + 1) / self.subject_weight[n], self.subject_rank[n]))

    def _next_grid(self, index: int) -> PromptSpec | None:
        while self.cells:
            cell = self.cells.pick()
            subjects = self.cell_subjects[cell]
            while subjects:
                name = self._pick_subject(subjects)
                leaf = self._next_leaf(cell, self.subjects[name])
                if leaf is not None:
                    self.subject_picks[name] += 1
                    return PromptSpec(index, cell[0], cell[1], leaf=leaf)
                subjects.remove(name)  # every leaf of this subject used in this cell
            self.cells.remove(cell)
        return None

    def __iter__(self) -> Iterator[PromptSpec]:
        index, seeds_used = 0, 0
        while True:
            spec = None
            seeds_left = self.web_fraction > 0 and seeds_used < len(self.seeds)
            # Interleave: spec i is web-seeded when the running share of seeded specs falls behind the fraction.
            if not (seeds_left and seeds_used < (index + 1) * self.web_fraction):
                spec = self._next_grid(index)
            if spec is None and seeds_left:
                assert self.seed_format is not None
                spec = PromptSpec(index, self.seed_audiences.pick(), self.seed_format.name,
                                  seed=self.seeds[seeds_used])
                seeds_used += 1
            if spec is None:
                return
            yield spec
            index += 1

    def sample(self, n: int) -> list[PromptSpec]:
        out = []
        for spec in self:
            out.append(spec)
            if len(out) == n:
                return out
        raise TextbookError(
            f"generate.n={n} is more than the grid holds ({len(out)} distinct topic × audience × format specs "
            f"from {len(self.subjects)} subjects and {len(self.grid_cells)} audience × format cells"
            f"{f' plus {len(self.seeds)} web seeds' if self.web_fraction else ''}): add taxonomy files, "
            "formats or audiences, or ask for more samples per prompt with llm.n")


def coverage(specs: list[PromptSpec], grid_cells: list[tuple[str, str]] | None = None,
             taxonomy: Taxonomy | None = None) -> dict[str, Any]:
    """Which parts of the grid a list of specs (or of kept documents' specs) reaches."""
    cells = Counter((s.audience, s.format) for s in specs)
    out: dict[str, Any] = {
        "specs": len(specs),
        "cells_filled": len(cells),
        "per_audience": dict(Counter(s.audience for s in specs).most_common()),
        "per_format": dict(Counter(s.format for s in specs).most_common()),
        "per_subject": dict(Counter(s.subject for s in specs).most_common()),
        "web_seeded": sum(1 for s in specs if s.seed is not None),
        "leaves_covered": len({s.leaf for s in specs if s.leaf is not None}),
    }
    if grid_cells is not None:
        out["cells_total"] = len(grid_cells)
        out["cells_filled"] = len(set(grid_cells) & set(cells))
        empty = sorted(set(grid_cells) - set(cells))
        out["cells_empty"] = [f"{a} × {f}" for a, f in empty[:50]]
    if taxonomy is not None:
        out["leaves_total"] = len(taxonomy.leaves)
        out["subjects_covered"] = len({s.subject for s in specs if s.leaf is not None})
        out["subjects_total"] = len(taxonomy.subjects)
    if cells:
        out["per_cell_min"], out["per_cell_max"] = min(cells.values()), max(cells.values())
    return out
