"""Real documents from ../shared/data and planted near-copies, for the dedup quality tests and benchmark.

Not a test module (no test_ prefix): imported by tests/test_dedup_*.py and benchmarks/bench_dedup.py.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

HEADERS = ["Home | About us | Contact | Login | Subscribe", "Skip to main content. Menu. Search this site",
           "Share on Facebook Share on Twitter Email this page"]
FOOTERS = ["Copyright 2024 Example Media Group. All rights reserved. Privacy policy. Terms of use.",
           "Posted in Uncategorized | Leave a comment | Back to top",
           "Related posts: You may also like these articles from our archive."]


def real_documents(shared: Path, min_words: int = 100) -> list[dict]:
    """English-heavy real web and textbook documents (dolma CC, FineWeb sample, OpenStax), ≥ min_words words."""
    docs: list[dict] = []
    with gzip.open(shared / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            docs.append({"id": f"cc-{r['id']}", "text": r["text"], "source": "web"})
    for r in json.loads((shared / "web/fineweb_sample_300/fineweb_subset.json").read_text()):
        docs.append({"id": f"fw-{r['id']}", "text": r["original_text"], "source": "web"})
    with open(shared / "textbooks/openstax_intro_python/modules_plaintext.jsonl") as f:
        for line in f:
            r = json.loads(line)
            docs.append({"id": f"os-{r['module']}", "text": r["text"], "source": "synthetic"})
    return [d for d in docs if len(d["text"].split()) >= min_words]


def without_natural_duplicates(docs: list[dict], shingle: int = 3, max_jaccard: float = 0.2) -> list[dict]:
    """Drop every document whose exact shingle Jaccard with an earlier kept one exceeds max_jaccard.

    The planted-pair measurement needs a base set with no real near-duplicates, so that every detected pair
    that was not planted is a genuine false positive. Exhaustive (n^2/2 set intersections; ~1k docs).
    """
    import numpy as np
    from scipy import sparse

    from pipeline.minhash import shingles

    sets = [np.unique(shingles(d["text"], shingle)) for d in docs]
    vocab, inverse = np.unique(np.concatenate(sets), return_inverse=True)
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    m = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, inverse)), shape=(len(sets), len(vocab)))
    inter = (m @ m.T).toarray()
    sizes = np.array([len(s) for s in sets], dtype=np.float32)
    jac = inter / np.maximum(sizes[:, None] + sizes[None, :] - inter, 1)
    kept: list[int] = []
    for i in range(len(docs)):
        if all(jac[i, j] <= max_jaccard for j in kept):
            kept.append(i)
    return [docs[i] for i in kept]


def perturb(text: str, rng: random.Random, vocab: list[str], rate: float) -> str:
    """A near-copy: `rate` of the words substituted, paragraphs maybe reordered, boilerplate header/footer,
    whitespace changed."""
    paras = [p for p in text.split("\n") if p.strip()]
    if len(paras) > 2 and rng.random() < 0.5:
        rng.shuffle(paras)
    out = []
    for p in paras:
        ws = p.split()
        for i in range(len(ws)):
            if rng.random() < rate:
                ws[i] = rng.choice(vocab)
        out.append(("  " if rng.random() < 0.3 else " ").join(ws))
    t = ("\n\n" if rng.random() < 0.5 else "\n").join(out)
    if rng.random() < 0.5:
        t = f"{rng.choice(HEADERS)}\n{t}\n{rng.choice(FOOTERS)}"
    return t


def planted_corpus(shared: Path, n_planted: int = 200, seed: int = 0, min_rate: float = 0.05,
                   max_rate: float = 0.10) -> tuple[list[dict], set[tuple[str, str]]]:
    """(documents, planted (original id, copy id) pairs): clean real docs plus near-copies of n_planted."""
    rng = random.Random(seed)
    base = without_natural_duplicates(real_documents(shared))
    vocab = [w for d in base[:100] for w in d["text"].split()]
    chosen = rng.sample(range(len(base)), min(n_planted, len(base)))
    docs = list(base)
    pairs = set()
    for k, i in enumerate(chosen):
        orig = base[i]
        copy = {"id": f"copy-{k}-{orig['id']}", "text": perturb(orig["text"], rng, vocab, rng.uniform(min_rate, max_rate)),
                "source": orig["source"]}
        docs.append(copy)
        pairs.add((orig["id"], copy["id"]))
    rng.shuffle(docs)
    return docs, pairs
