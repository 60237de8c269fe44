"""Web-seeded prompts: high-scoring pages from the web stage, cut to an extract, seed a textbook section.

Cosmopedia drew most of its prompts this way: a real page anchors the topic (and its long tail) while the model
writes new, textbook-style text about it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


@dataclass(frozen=True)
class SeedPage:
    id: str
    url: str | None
    extract: str
    edu_score: float

    @property
    def site(self) -> str:
        host = urlparse(self.url).netloc if self.url else ""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", host) or "page"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def make_extract(text: str, max_chars: int) -> str:
    """The page's opening paragraphs up to `max_chars`, cut at a paragraph or sentence end (never mid-word)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    # Very short lines at the top of a page are menus and headers, not content.
    paragraphs = [p for p in paragraphs if len(p) >= 40] or [" ".join(text.split())]
    out: list[str] = []
    size = 0
    for p in paragraphs:
        if size + len(p) <= max_chars:
            out.append(p)
            size += len(p) + 2
            continue
        room = max_chars - size
        if room > 80:
            cut = ""
            for sent in _SENTENCE_END.split(p):
                if len(cut) + len(sent) + 1 > room:
                    break
                cut = f"{cut} {sent}".strip()
            if not cut and not out:
                cut = p[:room].rsplit(" ", 1)[0]
            if cut:
                out.append(cut)
        break
    return "\n\n".join(out)


def load_seeds(paths: Iterable[str | Path], min_score: float, extract_chars: int,
               on_error: Callable[[str, str], None] | None = None) -> tuple[list[SeedPage], dict[str, int]]:
    """Pages scoring >= min_score as seeds (best first, then by id: deterministic), and counts of what was skipped."""
    # here: planning without web seeds needs no pyarrow
    from pipeline.documents import edu_score_of, iter_documents

    seeds: dict[str, SeedPage] = {}
    skipped = {"no_score": 0, "invalid_score": 0, "low_score": 0, "too_short": 0, "duplicate": 0}
    for doc in iter_documents(list(paths), on_error=on_error):
        score, invalid = edu_score_of(doc.get("edu_score"))
        if invalid:  # text, NaN, an infinity: not a score to rank seeds by
            skipped["invalid_score"] += 1
            continue
        if score is None:
            skipped["no_score"] += 1
            continue
        if score < min_score:
            skipped["low_score"] += 1
            continue
        extract = make_extract(doc["text"], extract_chars)
        if len(extract) < 200:
            skipped["too_short"] += 1
            continue
        if doc["id"] in seeds:
            skipped["duplicate"] += 1
            continue
        url = doc.get("url") or (doc.get("meta") or {}).get("url")
        seeds[doc["id"]] = SeedPage(doc["id"], url, extract, float(score))
    ordered = sorted(seeds.values(), key=lambda s: (-s.edu_score, s.id))
    return ordered, skipped
