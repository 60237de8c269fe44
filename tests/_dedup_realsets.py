"""Real evaluation sets for near-duplicate detection (issue 13), built from ../shared/data only.

Not a test module (no test_ prefix): imported by tests and by benchmarks/bench_dedup_curve.py.

- `gsm8k_pairs`: natural near-duplicates. GSM8K test vs test_socratic, aligned by line: the same question, the
  answer rewritten with a sub-question before every step. A document is what the dedup stage would see for a
  benchmark row: question, newline, answer (calculator annotations `<<...>>` and the `#### n` line kept).
- `sqlite_pages`: natural NON-duplicates that share boilerplate: the 766 pages of the SQLite documentation site,
  either as the web stage extracts them (`main`: the project's `HtmlExtractor`, trafilatura favour_precision) or as
  the whole visible page (`full`: menus, headers, footers and link lists kept; block elements become lines), each
  then through the web stage's default min-length filter (200 characters, 30 words).
- `python_pages`: the Python 3.11 documentation reST sources (497 files; a second site, text as shipped), same
  min-length filter. The package ships no rendered HTML of most pages, so this site has one variant.
- `natural_duplicates`: the pairs of real pages that ARE genuinely the same text (judged on their content, the
  site's boilerplate lines removed; rules and by-eye lists below), neither positives nor negatives.
- `plant_copy`: a near-copy with realistic edits (word substitutions 2-10 %, reordered paragraphs, boilerplate
  header/footer, truncation 10-20 %, whitespace/case), one or two content edits per copy.
- `evaluation_corpus`: one dedup run's worth of documents (both sites in one text variant, ~200 planted copies,
  both GSM8K files, the 4 chain.jsonl documents) with the truth about every pair (`EvalCorpus.classify`).
- `reference_web_documents`: 6,800 English web pages not in the corpus (n-gram frequencies of ordinary text).

Extraction of the SQLite pages (~60 s of CPU) and the natural-duplicate judgement (~30 s) are cached under
`pipeline.paths.cache_dir()`, keyed on their inputs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _dedup_planting import FOOTERS, HEADERS

SQLITE = "web/sqlite_doc_html"
PYDOC = "textbooks/python311_doc/rst_sources"
MIN_CHARS, MIN_WORDS = 200, 30  # the web stage's MinLengthFilter defaults (pipeline/config/web.py)

# --------------------------------------------------------------------------------------------- GSM8K


def gsm8k_text(row: dict) -> str:
    return row["question"] + "\n" + row["answer"]


def gsm8k_pairs(shared: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(test document, test_socratic document) for every line of GSM8K test (1,319 pairs)."""
    rows = []
    for name in ("test", "test_socratic"):
        with open(shared / f"benchmarks/gsm8k/{name}.jsonl", encoding="utf-8") as f:
            rows.append([json.loads(line) for line in f if line.strip()])
    plain, socratic = rows
    if len(plain) != len(socratic):
        raise ValueError(f"gsm8k test ({len(plain)}) and test_socratic ({len(socratic)}) differ in length")
    for a, b in zip(plain, socratic, strict=True):
        if a["question"] != b["question"]:
            raise ValueError("gsm8k test and test_socratic are not aligned by line")
    pairs = [(gsm8k_text(a), gsm8k_text(b)) for a, b in zip(plain, socratic, strict=True)]
    return pairs[:limit] if limit else pairs


# --------------------------------------------------------------------------------------------- HTML to text

_BLOCK = {"p", "div", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "br", "dd", "dt",
          "dl", "blockquote", "section", "article", "header", "footer", "nav", "td", "th", "hr", "form", "title"}


def full_page_text(html: str) -> str:
    """All visible text of a page, menus and link lists included (no boilerplate removal): scripts, styles and
    comments dropped, a line break at every block element, whitespace collapsed within a line."""
    from lxml import etree
    from lxml import html as lxml_html

    try:
        tree = lxml_html.fromstring(html.encode("utf-8", "replace"))
    except (etree.ParserError, ValueError):
        return ""
    for bad in tree.xpath("//script|//style|//noscript|//comment()"):
        bad.drop_tree()
    parts: list[str] = []

    def walk(el) -> None:  # text nodes keep their words; a block element is a line of its own
        block = isinstance(el.tag, str) and el.tag.lower() in _BLOCK
        if block:
            parts.append("\n")
        if el.text:
            parts.append(el.text.replace("\n", " "))
        for child in el:
            walk(child)
            if child.tail:
                parts.append(child.tail.replace("\n", " "))
        if block:
            parts.append("\n")

    walk(tree)
    lines = (" ".join(line.split()) for line in "".join(parts).split("\n"))
    return "\n".join(line for line in lines if line)


def _read_html(path: Path) -> str:
    from pipeline.web.readers import decode_page

    return decode_page(path.read_bytes())[0]


def _extract_chunk(items: list[tuple[str, str]]) -> dict[str, str]:
    """The web stage's extraction (`HtmlExtractor.extract`: trafilatura, favour_precision, deduplicate) on
    (id, html) pairs, without its per-page sandbox process (a timeout guard, not part of the extraction).

    trafilatura's `deduplicate` drops text segments it has already seen a few times in the same process, as the
    web stage does within one task; its caches are reset per chunk so the result does not depend on which worker
    ran which chunk.
    """
    import tempfile

    from trafilatura.meta import reset_caches

    from pipeline.web.steps import HtmlExtractor

    reset_caches()
    with tempfile.TemporaryDirectory() as tmp:
        ext = HtmlExtractor(tmp)
        return {k: ext.extract(h) or "" for k, h in items}


def _extract_all(pages: dict[str, str], jobs: int, chunk: int = 40) -> dict[str, str]:
    import multiprocessing as mp

    keys = sorted(pages)
    chunks = [[(k, pages[k]) for k in keys[i:i + chunk]] for i in range(0, len(keys), chunk)]
    if jobs <= 1:
        return {k: v for part in map(_extract_chunk, chunks) for k, v in part.items()}
    with mp.get_context("spawn").Pool(jobs) as pool:
        return {k: v for part in pool.imap(_extract_chunk, chunks) for k, v in part.items()}


def passes_min_length(text: str) -> bool:
    return len(text.strip()) >= MIN_CHARS and len(text.split()) >= MIN_WORDS


def sqlite_pages(shared: Path, variant: str = "main", jobs: int = 2, cache: Path | None = None) -> list[dict]:
    """The SQLite documentation site as documents {id, text, site}: `main` = the web stage's extraction,
    `full` = all visible text with navigation kept. Pages failing the min-length filter are left out."""
    import trafilatura

    from pipeline.paths import cache_dir

    root = shared / SQLITE
    paths = sorted(root.rglob("*.html"))
    html = {str(p.relative_to(root)): _read_html(p) for p in paths}
    if variant == "full":
        texts = {k: full_page_text(h) for k, h in html.items()}
    elif variant == "main":
        key = hashlib.sha256(("\n".join(f"{k}:{len(h)}" for k, h in sorted(html.items())) + trafilatura.__version__)
                             .encode()).hexdigest()[:12]
        path = (cache or cache_dir() / "dedup_realsets") / f"sqlite-main-{key}.json.gz"
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                texts = json.load(f)
        else:
            texts = _extract_all(html, jobs)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                json.dump(texts, f)
            tmp.replace(path)
    else:
        raise ValueError(f"variant must be 'main' or 'full', not {variant!r}")
    return [{"id": f"sqlite/{k}", "text": texts.get(k) or "", "site": "sqlite"} for k in sorted(html)
            if passes_min_length(texts.get(k) or "")]


def python_pages(shared: Path) -> list[dict]:
    """The Python 3.11 documentation reST sources as documents {id, text, site} (min-length filter applied)."""
    root = shared / PYDOC
    out = []
    for p in sorted(root.rglob("*.rst.txt")):
        text = p.read_text(encoding="utf-8", errors="replace")
        if passes_min_length(text):
            out.append({"id": f"python/{p.relative_to(root)}", "text": text, "site": "python"})
    return out


# --------------------------------------------------------------------------------------------- exact Jaccard


def shingle_sets(texts: list[str], k: int) -> list[np.ndarray]:
    """Sorted unique k-word shingle hashes per text, exactly as the dedup stage shingles (pipeline.minhash)."""
    from pipeline.minhash import shingles

    return [np.unique(shingles(t, k)) for t in texts]


def jaccard_matrix(sets: list[np.ndarray]) -> np.ndarray:
    """Exact Jaccard of every pair of shingle sets (dense n x n float32; fine up to a few thousand sets)."""
    from scipy import sparse

    if not sets:
        return np.zeros((0, 0), np.float32)
    vocab, inverse = np.unique(np.concatenate(sets), return_inverse=True)
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    m = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, inverse)), shape=(len(sets), len(vocab)))
    inter = (m @ m.T).toarray()
    sizes = np.array([len(s) for s in sets], dtype=np.float32)
    return inter / np.maximum(sizes[:, None] + sizes[None, :] - inter, 1)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


# --------------------------------------------------------------------------------------------- natural duplicates

# The truth about natural pairs is judged on the pages' CONTENT, with a fixed tokenizer (NFKC, casefold, \w+ runs),
# so that it does not move when the pipeline's own normalisation (`pipeline.minhash.words`) changes.
TRUTH_VERSION = 3  # bump when the rules below change (the cached result is keyed on it)
BOILERPLATE_MIN_PAGES = 20  # a line found on this many pages of a site is boilerplate
NEAR_IDENTICAL_RATIO = 0.8  # difflib ratio of the content words: about a planted copy with <= 10 % substitutions
CONTAINED = 0.9  # share of the smaller page's content 3-shingles found in the larger page

# Checked by eye: syntax-diagram pages whose diagram is another's plus a few tokens (contents of 10-40 words, where
# the ratio rule is too coarse), kept out of the negatives in both text variants.
DUPLICATES_BY_EYE = {
    ("sqlite/syntax/compound-select-stmt.html", "sqlite/syntax/factored-select-stmt.html"):
        "by eye: the same diagram, compound-operator spelled out as UNION/INTERSECT/EXCEPT",
    ("sqlite/syntax/delete-stmt-limited.html", "sqlite/syntax/delete-stmt.html"):
        "by eye: delete-stmt plus ORDER BY/LIMIT",
    ("sqlite/syntax/over-clause.html", "sqlite/syntax/window-defn.html"):
        "by eye: window-defn preceded by OVER window-name",
}
# Pairs the rules would call duplicates that are not, checked by eye (full-page text only): different syntax
# diagrams whose pages share one long "See also" line of 16 file names (one line in the full-page text).
NOT_DUPLICATES = {
    ("sqlite/syntax/join-constraint.html", "sqlite/syntax/join-operator.html"): "different diagrams, shared link list",
    ("sqlite/syntax/join-constraint.html", "sqlite/syntax/result-column.html"): "different diagrams, shared link list",
    ("sqlite/syntax/signed-number.html", "sqlite/syntax/type-name.html"): "different diagrams, shared link list",
}
_TRUTH_WORD = re.compile(r"\w+")


def truth_words(text: str) -> list[str]:
    import unicodedata

    return _TRUTH_WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def release_family(doc_id: str) -> tuple[int, ...] | None:
    """SQLite release-log pages of one release share a family: 3.X.Y.Z patches of 3.X.Y before 3.9, 3.X.Z
    patches of 3.X.0 from 3.9 on. Each patch release's page repeats the release's notes (checked by eye on
    3_8_10*, 3_38_*, 3_7_16*), so two pages of one family are the same text republished."""
    m = re.fullmatch(r"sqlite/releaselog/(\d+(?:_\d+)*)\.html", doc_id)
    if not m:
        return None
    v = tuple(int(x) for x in m.group(1).split("_"))
    if len(v) < 2:
        return None
    return v[:2] if v[:2] >= (3, 9) else v[:3]


def site_content(docs: list[dict], min_pages: int = BOILERPLATE_MIN_PAGES) -> list[list[str]]:
    """Each page's words without its site's boilerplate lines (lines found on >= min_pages pages of the site)."""
    from collections import Counter

    lines = [[" ".join(truth_words(line)) for line in d["text"].split("\n")] for d in docs]
    per_site: dict[str, Counter] = {}
    for d, ls in zip(docs, lines, strict=True):
        per_site.setdefault(d["site"], Counter()).update({line for line in ls if line})
    out = []
    for d, ls in zip(docs, lines, strict=True):
        df = per_site[d["site"]]
        out.append([w for line in ls if line and df[line] < min_pages for w in line.split()])
    return out


def _trigram_set(ws: list[str]) -> np.ndarray:
    import xxhash

    return np.unique(np.fromiter((xxhash.xxh64_intdigest(" ".join(ws[i:i + 3])) for i in range(len(ws) - 2)),
                                 dtype=np.uint64, count=max(len(ws) - 2, 0)))


def natural_duplicates(docs: list[dict], cache: Path | None = None) -> dict[tuple[str, str], str]:
    """Pairs of real pages that are genuinely the same text, judged on their CONTENT (the site's boilerplate lines
    removed), returned as {(id_a, id_b) sorted: reason}. Neither positives nor negatives. A pair is one when:

    - `near-identical`: difflib ratio of the content words >= 0.8 (as close as a planted copy), or
    - `contained`: >= 90 % of the smaller page's content 3-shingles are in the larger page (a page republished
      inside another: a release's notes inside changes.html, a C-API page inside capi3ref.html), or
    - `same release`: two SQLite release-log pages of one release (`release_family`), or
    - listed in DUPLICATES_BY_EYE; and never when listed in NOT_DUPLICATES.
    Pages with no content left (all boilerplate) are not near-identical to anything: they are the boilerplate case.
    """
    import difflib

    from pipeline.paths import cache_dir

    key_src = json.dumps([TRUTH_VERSION, [[d["id"], d["site"], d["text"]] for d in docs]])
    digest = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = (cache or cache_dir() / "dedup_realsets") / f"natural-{digest}.json"
    if path.is_file():
        return {tuple(k.split(" | ")): v for k, v in json.loads(path.read_text()).items()}
    content = site_content(docs)
    sets = [_trigram_set(c) for c in content]
    out: dict[tuple[str, str], str] = {}
    ids = {d["id"] for d in docs}
    for site in sorted({d["site"] for d in docs}):
        idx = [i for i, d in enumerate(docs) if d["site"] == site and len(sets[i])]
        if len(idx) < 2:
            continue
        sub = [sets[i] for i in idx]
        jac = jaccard_matrix(sub)
        sizes = np.array([len(x) for x in sub], dtype=np.float64)
        iu = np.triu_indices(len(idx), 1)
        j = jac[iu].astype(np.float64)
        inter = j * (sizes[iu[0]] + sizes[iu[1]]) / (1 + j)
        contain = inter / np.minimum(sizes[iu[0]], sizes[iu[1]])
        for t in np.nonzero((contain >= 0.5) | (j >= 0.2))[0]:
            a, b = idx[iu[0][t]], idx[iu[1][t]]
            key = tuple(sorted((docs[a]["id"], docs[b]["id"])))
            ca, cb = content[a], content[b]
            ratio = 0.0
            if min(len(ca), len(cb)) >= 0.66 * max(len(ca), len(cb)):  # else the ratio cannot reach 0.8
                ratio = difflib.SequenceMatcher(None, ca, cb, autojunk=len(ca) + len(cb) >= 40_000).ratio()
            if ratio >= NEAR_IDENTICAL_RATIO:
                out[key] = f"near-identical (content ratio {ratio:.2f}, content 3-shingle Jaccard {j[t]:.2f})"
            elif contain[t] >= CONTAINED:
                out[key] = (f"contained ({contain[t]:.2f} of the smaller page's content 3-shingles, content sizes "
                            f"{len(ca)}/{len(cb)} words)")
    families: dict[tuple, list[str]] = {}
    for d in docs:
        fam = release_family(d["id"])
        if fam is not None:
            families.setdefault(fam, []).append(d["id"])
    for fam, members in families.items():
        members.sort()
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                out.setdefault((members[x], members[y]),
                               f"same release {'.'.join(map(str, fam))}: a patch page repeats the release notes")
    for pair, why in DUPLICATES_BY_EYE.items():
        if set(pair) <= ids:
            out[pair] = why
    for pair in NOT_DUPLICATES:
        out.pop(pair, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({" | ".join(k): v for k, v in sorted(out.items())}, indent=0))
    return out


# --------------------------------------------------------------------------------------------- planted copies

CONTENT_EDITS = ("substitute", "reorder", "truncate", "boilerplate")
SUB_RATE = (0.02, 0.10)  # share of words replaced by other words of the same site
TRUNC_RATE = (0.10, 0.20)  # share of words cut from the end
DOUBLE_EDIT = 0.25  # probability of a second content edit on the same copy
WHITESPACE_CASE = 0.5  # probability of a whitespace/case change (invisible to `words`, so to dedup)
PARAGRAPH_WORDS = 40  # reordering moves chunks of at least this many words (consecutive lines merged)


def _paragraphs(text: str) -> tuple[list[str], str]:
    """Paragraph-sized chunks: blank-line blocks (reST) or lines (extracted HTML), consecutive ones merged until a
    chunk has >= PARAGRAPH_WORDS words (a menu of one-word lines is not a list of paragraphs)."""
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    sep = "\n\n"
    if len(blocks) < 3:
        blocks, sep = [line for line in text.split("\n") if line.strip()], "\n"
    chunks: list[str] = []
    cur: list[str] = []
    for b in blocks:
        cur.append(b)
        if sum(len(x.split()) for x in cur) >= PARAGRAPH_WORDS:
            chunks.append(sep.join(cur))
            cur = []
    if cur:
        chunks.append(sep.join(cur))
    return chunks, sep


def plant_copy(text: str, rng: random.Random, vocab: list[str]) -> tuple[str, dict]:
    """A near-copy of `text`: one content edit drawn uniformly from CONTENT_EDITS (a second one with probability
    DOUBLE_EDIT), plus a whitespace/case change with probability WHITESPACE_CASE. Returns (copy, {edit: param})."""
    paras, sep = _paragraphs(text)
    kinds = list(CONTENT_EDITS)
    if len(paras) < 3:
        kinds.remove("reorder")  # nothing to reorder: a copy of a one-paragraph page gets another edit
    first = rng.choice(kinds)
    chosen = [first]
    if rng.random() < DOUBLE_EDIT:
        chosen.append(rng.choice([k for k in kinds if k != first]))
    edits: dict = {}
    if "truncate" in chosen:  # drop the last 10-20 % of the words (whole chunks, then the end of one)
        rate = rng.uniform(*TRUNC_RATE)
        edits["truncate"] = round(rate, 3)
        budget = int(round(rate * sum(len(p.split()) for p in paras)))
        while paras and budget > 0:
            spans = [m.end() for m in re.finditer(r"\S+", paras[-1])]
            if len(spans) <= budget:
                budget -= len(spans)
                paras.pop()
            else:
                paras[-1] = paras[-1][: spans[len(spans) - budget - 1]]
                budget = 0
    if "reorder" in chosen and len(paras) >= 3:
        order = list(range(len(paras)))
        while order == sorted(order):
            rng.shuffle(order)
        paras = [paras[i] for i in order]
        edits["reorder"] = len(paras)
    if "substitute" in chosen:
        rate = rng.uniform(*SUB_RATE)
        edits["substitute"] = round(rate, 3)
        # word-level, as the dedup stage sees words (`\w+`): each word replaced by a word of the same site
        paras = [re.sub(r"\w+", lambda m: rng.choice(vocab) if rng.random() < rate else m.group(0), p) for p in paras]
    copy = sep.join(paras)
    if rng.random() < WHITESPACE_CASE:
        how = rng.choice(["collapse", "double", "lower", "upper_short_lines"])
        edits["whitespace_case"] = how
        if how == "collapse":
            copy = " ".join(copy.split())
        elif how == "double":
            copy = copy.replace(" ", "  ").replace("\n", "\n\n")
        elif how == "lower":
            copy = copy.lower()
        else:
            copy = "\n".join(line.upper() if len(line.split()) <= 8 else line for line in copy.split("\n"))
    if "boilerplate" in chosen:
        copy = f"{rng.choice(HEADERS)}\n{copy}\n{rng.choice(FOOTERS)}"
        edits["boilerplate"] = True
    edits["primary"] = first
    return copy, edits


# --------------------------------------------------------------------------------------------- the evaluation corpus

GROUPS = ("sqlite", "python", "gsm8k", "chain")


@dataclass
class EvalCorpus:
    """One dedup run's worth of documents with the truth about every pair.

    docs: real SQLite pages (one variant), Python reST pages, planted copies of some of them, both GSM8K files
    and the 4 chain.jsonl documents. `partner[i]` is the index of a planted copy's original (and back), or of the
    aligned GSM8K row; -1 otherwise. `excluded` holds index pairs (i < j) of natural duplicates (and of copies of
    them), with reasons by id in `natural`.
    """

    variant: str
    docs: list[dict]
    group: np.ndarray  # index into GROUPS
    is_copy: np.ndarray
    partner: np.ndarray
    excluded: np.ndarray  # int64 keys i * n + j of excluded pairs (i < j), sorted
    natural: dict[tuple[str, str], str]
    sizes: dict = field(default_factory=dict)

    def key(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        return lo.astype(np.int64) * len(self.docs) + hi

    def classify(self, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        """Masks over pairs (a[k], b[k]): planted, gsm8k_aligned, chain, excluded, site_negative (both documents
        from the two sites, incl. copies, not planted, not excluded), other_negative (any other pair)."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        ga, gb = self.group[a], self.group[b]
        linked = self.partner[a] == b
        site = (ga <= 1) & (gb <= 1)
        planted = linked & site
        gsm = linked & (ga == 2)
        chain = (ga == 3) & (gb == 3)
        excl = np.isin(self.key(a, b), self.excluded)
        site_neg = site & ~planted & ~excl
        other = ~(planted | gsm | chain | excl | site_neg)
        return {"planted": planted, "gsm8k_aligned": gsm, "chain": chain, "excluded": excl,
                "site_negative": site_neg, "other_negative": other}

    @property
    def n_planted(self) -> int:
        return int((self.is_copy & (self.group <= 1)).sum())

    @property
    def n_gsm8k(self) -> int:
        return int((self.group == 2).sum() // 2)

    def index(self, doc_id: str) -> int:
        if not hasattr(self, "_index"):
            self._index = {d["id"]: i for i, d in enumerate(self.docs)}
        return self._index[doc_id]


def _choose(pages: list[dict], all_ids: list[str], n: int, rng: random.Random) -> list[dict]:
    """n pages in an order drawn over ALL of the site's page ids (so both variants pick the same pages where the
    page passes the length filter in both)."""
    order = sorted(all_ids)
    rng.shuffle(order)
    have = {d["id"]: d for d in pages}
    return [have[i] for i in order if i in have][:n]


def evaluation_corpus(shared: Path, cases: Path | None, variant: str = "main", n_planted: int = 200, seed: int = 0,
                      jobs: int = 2, with_gsm8k: bool = True) -> EvalCorpus:
    sqlite = sqlite_pages(shared, variant, jobs=jobs)
    python = python_pages(shared)
    natural = natural_duplicates(sqlite + python)
    docs: list[dict] = []
    for d in sqlite + python:
        docs.append({**d, "group": d["site"]})
    n_real = len(docs)
    all_sqlite = [f"sqlite/{p.relative_to(shared / SQLITE)}" for p in (shared / SQLITE).rglob("*.html")]
    all_python = [f"python/{p.relative_to(shared / PYDOC)}" for p in (shared / PYDOC).rglob("*.rst.txt")]
    rng = random.Random(seed)
    for pages, all_ids in ((sqlite, all_sqlite), (python, all_python)):
        vocab = sorted({w for d in pages for w in d["text"].split() if w.isalpha()})
        for orig in _choose(pages, all_ids, n_planted // 2, rng):
            text, edits = plant_copy(orig["text"], random.Random(f"{seed}:{orig['id']}"), vocab)
            docs.append({"id": f"copy:{orig['id']}", "text": text, "site": orig["site"], "group": orig["site"],
                         "copy_of": orig["id"], "edits": edits})
    if with_gsm8k:
        pairs = gsm8k_pairs(shared)
        for name, k in (("test", 0), ("test_socratic", 1)):
            for i, p in enumerate(pairs):
                docs.append({"id": f"gsm8k/{name}/{i}", "text": p[k], "site": "gsm8k", "group": "gsm8k"})
    if cases is not None:
        for r in chain_case(cases):
            docs.append({"id": f"chain/{r['id']}", "text": r["text"], "site": "chain", "group": "chain"})
    n = len(docs)
    pos = {d["id"]: i for i, d in enumerate(docs)}
    group = np.array([GROUPS.index(d["group"]) for d in docs], dtype=np.int8)
    is_copy = np.array(["copy_of" in d for d in docs])
    partner = np.full(n, -1, dtype=np.int64)
    for i, d in enumerate(docs):
        if "copy_of" in d:
            j = pos[d["copy_of"]]
            partner[i], partner[j] = j, i
        elif d["group"] == "gsm8k" and d["id"].startswith("gsm8k/test/"):
            j = pos["gsm8k/test_socratic/" + d["id"].rsplit("/", 1)[1]]
            partner[i], partner[j] = j, i
    # excluded: natural duplicate pairs, and the same pairs with a planted copy in place of its original
    copies_of: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        if "copy_of" in d:
            copies_of.setdefault(d["copy_of"], []).append(i)
    keys = []
    for (x, y) in natural:
        for i in [pos[x], *copies_of.get(x, [])]:
            for j in [pos[y], *copies_of.get(y, [])]:
                keys.append(min(i, j) * n + max(i, j))
    excluded = np.unique(np.asarray(keys, dtype=np.int64))
    sizes = {"sqlite_pages": len(sqlite), "python_pages": len(python), "real_pages": n_real,
             "planted_copies": int(is_copy.sum()), "gsm8k_pairs": int((group == 2).sum() // 2),
             "chain_docs": int((group == 3).sum()), "documents": n, "natural_duplicate_pairs": len(natural),
             "excluded_pairs_incl_copies": int(len(excluded))}
    return EvalCorpus(variant, docs, group, is_copy, partner, excluded, natural, sizes)


def chain_case(cases: Path) -> list[dict]:
    with open(cases / "dedup/chain.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reference_web_documents(shared: Path) -> list[str]:
    """English web pages from ../shared/data that are NOT in the evaluation corpus (FineWeb-Edu annotation samples,
    FineWeb legal annotations, Dolma CC, the FineWeb sample), exact duplicates dropped: a reference for how often
    an n-gram occurs in ordinary web text (to emulate a corpus-level frequency filter at a larger scale)."""
    import gzip as _gzip

    texts: list[str] = []
    edu = shared / "edu_labels"
    for name in ("llama3_train.jsonl", "fwedu_classifier_train.jsonl", "human511_train.jsonl"):
        with open(edu / "fineweb_edu_llama3_sample" / name, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    import pyarrow.parquet as pq

    texts += [t for t in pq.read_table(edu / "fineweb_legal_mistral" / "annotations.parquet", columns=["text"])
              .column("text").to_pylist() if t]
    with _gzip.open(shared / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz", "rt") as f:
        texts += [json.loads(line)["text"] for line in f if line.strip()]
    texts += [r["original_text"] for r in json.loads((shared / "web/fineweb_sample_300/fineweb_subset.json")
                                                     .read_text())]
    seen: set[str] = set()
    out = []
    for t in texts:
        key = " ".join(t.split())
        if key and key not in seen:
            seen.add(key)
            out.append(t)
    return out
