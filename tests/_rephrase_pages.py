"""Real pages for the rephrase tests, from ../shared/data only (not a test module).

`scored_pages` returns pages in the shape the web stage writes them (id, text, url, edu_score): English FineWeb
pages with their Llama-3-70B FineWeb-Edu score (the scale the edu classifier is trained to reproduce), chosen
per score so every bucket has pages, plus real pages that must end with a named reason before any request:
Danish FineWeb-2 pages (source_not_en), a page holding a GSM8K test question (source_contaminated), one without a
score (unscored), one read twice (duplicate_page), one cut to 30 words (source_too_short), the longest page
(source_too_long under a small max_chunks) and one whose URL makes the test server fail every request.
`expected_fate` says which of these each special page is.
"""

from __future__ import annotations

import csv
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

csv.field_size_limit(1 << 24)


@lru_cache(maxsize=2)
def _fineweb(shared: Path) -> list[dict[str, Any]]:  # read once per test session (callers copy what they keep)
    path = shared / "edu_labels/fineweb_edu_llama3_sample/llama3_train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def scored_pages(shared: Path, per_score: int = 5, seed: int = 0, max_words: int = 700) -> list[dict[str, Any]]:
    """`per_score` pages per integer score 0-5 of at most `max_words` words (so chunk counts stay small), then the
    special pages. Deterministic for a given `seed`."""
    rows = _fineweb(shared)
    rng = random.Random(seed)
    by_score: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if 80 <= len(r["text"].split()) <= max_words:
            by_score.setdefault(int(r["score"]), []).append(r)
    pages = []
    for score in range(6):
        for r in rng.sample(by_score[score], per_score):
            pages.append({"id": r["id"], "text": r["text"], "url": f"https://fineweb.example/{r['id']}",
                          "edu_score": float(r["score"])})
    used = {p["id"] for p in pages}
    spare = [r for r in rows if r["id"] not in used and 150 <= len(r["text"].split()) <= max_words]
    with (shared / "edu_labels/fineweb_c_danish_human/labels.csv").open(newline="") as f:
        danish = [row["text"] for row in csv.DictReader(f) if len(row["text"].split()) >= 120][:2]
    question = json.loads((shared / "benchmarks/gsm8k/test.jsonl").read_text().splitlines()[7])["question"]
    longest = max((r for r in rows if r["id"] not in used), key=lambda r: len(r["text"]))
    special = [
        {"id": "danish-high", "text": danish[0], "url": "https://dk.example/a", "edu_score": 3.6},
        {"id": "danish-middle", "text": danish[1], "url": "https://dk.example/b", "edu_score": 2.4},
        {"id": "homework", "text": spare[0]["text"] + "\n" + question + "\n" + spare[1]["text"],
         "url": "https://homework.example/q", "edu_score": 2.7},
        {"id": "no-score", "text": spare[2]["text"], "url": "https://fineweb.example/no-score"},
        {"id": "stub", "text": " ".join(spare[3]["text"].split()[:30]), "url": "https://fineweb.example/stub",
         "edu_score": 2.2},
        {"id": "longest", "text": longest["text"], "url": "https://fineweb.example/longest", "edu_score": 1.5},
        {"id": "broken-site", "text": spare[4]["text"], "url": "https://FAIL_ALWAYS.example/page",
         "edu_score": 2.9},
    ]
    return pages + special + [dict(pages[0])]  # the first page again: duplicate_page


EXPECTED_FATE = {"danish-middle": "source_not_en", "homework": "source_contaminated", "no-score": "unscored",
                 "stub": "source_too_short", "longest": "source_too_long",
                 "broken-site": "rewrite_failed_internalservererror_500"}


def write_jsonl(pages: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pages))
    return path
