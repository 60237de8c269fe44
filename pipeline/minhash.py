"""Text normalisation, word n-gram hashing and MinHash signatures, vectorised with numpy.

Shared by near-duplicate detection (`pipeline.dedup`) and benchmark decontamination (`pipeline.decontam`):
both fold case, punctuation and whitespace the same way, so a lightly reformatted copy hashes the same.

Hashes are deterministic across processes and machines (xxhash with a fixed seed; never Python's `hash`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

import numpy as np
import xxhash

# Bump when words() changes: stored decontamination and dedup indexes record it and refuse a mismatch.
# 1: NFKC + casefold + \w+ runs. 2: punctuation inside a token joins it (U.S. -> us), LaTeX markup dropped.
NORMALIZATION_VERSION = 2
_WORD = re.compile(r"\w+")
# LaTeX commands that are markup, or typeset a symbol whose Unicode/ASCII rendering is punctuation (dropped, so
# `3 \times 4` = `3 × 4`); any other command (\sqrt, \log, \pi, \alpha) becomes its name, as a plain-text
# rendering spells it. `\begin{env}` / `\end{env}` go with their environment name.
_LATEX_DROP = re.compile(
    r"\\(?:begin|end)\{[a-z*]*\}|\\(?:frac|dfrac|tfrac|cfrac|left|right|big|bigl|bigr|bigg|biggl|biggr|"
    r"times|cdot|cdots|ldots|dots|div|pm|mp|le|leq|ge|geq|ne|neq|approx|equiv|sim|simeq|propto|to|rightarrow|"
    r"leftarrow|leftrightarrow|implies|iff|in|notin|cup|cap|subset|subseteq|angle|triangle|perp|parallel|circ|"
    r"degree|prime|infty|text|textbf|textit|textrm|mathrm|mathbf|mathbb|mathcal|mathit|mathsf|mathtt|"
    r"operatorname|displaystyle|textstyle|quad|qquad|hline|boxed|overline|underline|hat|bar|vec|tilde|dot)"
    r"(?![a-z])")
_LATEX_SCRIPT = re.compile(r"([_^])\{([^{}]*)\}")  # x^{2} -> x^2 (then joined: x2, as x² and x^2)
_ELLIPSIS = re.compile(r"\.\.+")
_DASHES = re.compile(r"--+")
_LINE_BREAK_HYPHEN = re.compile(r"-[^\S\n]*\n[^\S\n]*")  # exam-\nple -> exam-ple -> example
_THOUSANDS = re.compile(r",(?=\d\d\d(?!\d))(?<=\d,)")  # 3,000 -> 3000 (the literal first: a fast scan)
_CLOCK = re.compile(r":(?=\d\d(?!\d))(?<=\d:)")  # 10:30 -> 1030
# Deleted wherever they are: inside a token they join it, beside a space or punctuation they were a boundary
# anyway. Apostrophes (and the marks used for them), periods, hyphens and their Unicode forms (en dash, minus,
# soft hyphen), underscore (a word character of \w), ^ and &, and zero-width characters.
_JOINERS = (".-'_\u2019`^&\u2018\u02bc\u00b4\u2032\u2010\u2011\u2012\u2013\u2212\u00ad"
            "\u200b\u200c\u200d\u2060\ufeff")
# Odd 64-bit multipliers for combining word hashes into an n-gram hash (position-dependent, so order matters).
_RNG = np.random.default_rng(0x7E87B00C)
_NGRAM_MULT = (_RNG.integers(1, 2**63 - 1, size=64, dtype=np.int64).astype(np.uint64) << np.uint64(1)) | np.uint64(1)


def normalize(text: str) -> str:
    """The text `words` splits: Unicode compatibility forms and case folded, joining punctuation deleted.

    See `words` for the rules; exposed so a caller can see what a text became (`words` = `\\w+` runs of it).
    """
    t = unicodedata.normalize("NFKC", text).casefold()
    # Each step is gated by a substring test (a fast scan); most texts need only a few of them.
    if "\\" in t:
        t = _LATEX_DROP.sub(" ", t)
    if "{" in t:
        t = _LATEX_SCRIPT.sub(r"\1\2", t)
    if ".." in t:
        t = _ELLIPSIS.sub(" ", t)
    if "-" in t:
        if "--" in t:
            t = _DASHES.sub(" ", t)
        if "\n" in t:
            t = _LINE_BREAK_HYPHEN.sub("-", t)
    if "," in t:
        t = _THOUSANDS.sub("", t)
    if ":" in t:
        t = _CLOCK.sub("", t)
    if "\u221a" in t:  # √2 = \sqrt{2} = sqrt(2)
        t = t.replace("\u221a", " sqrt ")
    for c in _JOINERS:
        if c in t:
            t = t.replace(c, "")
    return t


def words(text: str) -> list[str]:
    """The words of a text, folded so that a reformatted copy gives the same words as the original.

    One normalisation for dedup shingles, the decontamination index and the documents checked against it.
    A reformatter strips punctuation, changes case, re-spaces, swaps Unicode punctuation for ASCII, removes
    LaTeX markup; each must land on the same word sequence:

    - Unicode: NFKC (full-width letters, ligatures `ﬁ`, `x²` -> x2, `…` -> ...), then casefold (`US` = `us`,
      necessarily: a lower-cased copy is a copy). Words are runs of letters and digits; every other character
      is a boundary and whitespace amount never matters.
    - Punctuation INSIDE a token joins it instead of splitting it, as when a stripper deletes it (the
      decontamination Janitor of lm-evaluation-harness, after GPT-3's 13-gram filter, lowercases and deletes
      `string.punctuation`, then splits on whitespace): apostrophes (`don't`, `don’t`, `dont` -> dont), periods (`U.S.` = `US` -> us; `e.g.` -> eg, `Ph.D.` -> phd, `a.m.` -> am), hyphens and
      en dashes (`well-known` = `wellknown`; `1990–2000`), underscores (`foo_bar`; `____` is no word), `^` and
      `&` (`x^2` = `x²` = `$x^{2}$` -> x2; `AT&T` -> att). Beside a space these marks were a boundary anyway.
    - Numbers: digits stay joined: `3.14` -> 314 (as its stripped copy `314`), `$1.50` -> 150, and thousands
      separators and clock colons between digits are deleted (`3,000` = `3000`; `10:30` -> 1030; `1,2,3`
      stays three numbers). So `3.14` and `31.4` collapse: both strip to `314`, no rule can keep them apart
      and still match stripped copies. `3 . 14` (spaces inserted inside a number) stays two words.
    - Line-break hyphenation: `exam-\\nple` -> example (also `well-\\nknown` -> wellknown, as `well-known`).
    - Separators split: `/`, em dash `—`, `--`, ellipsis `...`, brackets, operators, commas, colons, quotes
      (`and/or` -> and or; `cat—a` = `cat -- a` -> cat a; `½` -> 1⁄2 -> 1 2 = `1/2` = `\\frac{1}{2}`).
    - LaTeX: markup and symbol commands dropped, braces and `$` are boundaries, other commands keep their name
      (`$\\frac{1}{2}$` -> 1 2, `3 \\times 4` = `3 × 4` -> 3 4, `\\left( x \\right)` -> x, `\\sqrt{2}` = `√2` =
      `sqrt(2)` -> sqrt 2).

    Unlike the Janitor, separators are not deleted: re-spacing around them (`f(a,b)` vs `f( a, b )`, `x=1`
    vs `x = 1`) changes nothing, and Unicode punctuation is handled. Not equal by design (a space where
    there was none is another word split; no rule can have `US` = `U.S.` = `U S` without erasing word
    boundaries): `well known` vs `well-known`, `U S` vs `U.S.`, `end.Next` (-> endnext) vs `end. Next`. A
    punctuation-to-space or fully stripped copy of a benchmark item is caught anyway: the decontamination
    index also holds those forms of every item (`decontam.index_forms`).
    """
    return _WORD.findall(normalize(text))


def exact_hash(ws: list[str]) -> bytes:
    """16-byte hash of a text's `words` (exact duplicates after case/punctuation/whitespace folding).

    Takes the words, not the text, because callers need them for shingling too: the text is split once.
    """
    return hashlib.blake2b(" ".join(ws).encode("utf-8", "replace"), digest_size=16).digest()


class _WordHashes(dict):
    """word -> 64-bit hash, computed once per distinct word (most words repeat across documents)."""

    def __missing__(self, key: str) -> int:
        if len(self) > 2_000_000:  # bound the cache on very diverse corpora
            self.clear()
        value = xxhash.xxh64_intdigest(key, seed=0x5EED)
        self[key] = value
        return value


_word_hashes = _WordHashes()


def word_hashes(ws: list[str]) -> np.ndarray:
    return np.fromiter(map(_word_hashes.__getitem__, ws), dtype=np.uint64, count=len(ws))


def fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's finaliser: spreads a (multiply-add) combination over all 64 bits. Overflow wraps by design."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every run of `n` consecutive words (empty when fewer than n words)."""
    m = len(wh) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        acc = wh[:m] * _NGRAM_MULT[0]
        for k in range(1, n):
            acc = acc + wh[k:k + m] * _NGRAM_MULT[k % len(_NGRAM_MULT)] + np.uint64(k)
        return fmix64(acc ^ np.uint64(n))


def batch_ngram_hashes(wh_list: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n-gram hashes of many texts at once: (hashes, owner text of each, position in its text).

    The word hashes are concatenated and hashed in one vectorised pass; n-grams crossing a boundary between
    texts are dropped. Texts shorter than n words contribute nothing (callers treat them separately).
    """
    lengths = np.fromiter((len(w) for w in wh_list), dtype=np.int64, count=len(wh_list))
    if not len(wh_list) or lengths.sum() < n:
        e = np.empty(0, dtype=np.int64)
        return np.empty(0, dtype=np.uint64), e, e
    starts = np.zeros(len(wh_list), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    allw = np.concatenate(wh_list)
    h = ngram_hashes(allw, n)
    owner = np.repeat(np.arange(len(wh_list)), lengths)[: len(h)]
    pos = np.arange(len(h)) - starts[owner]
    ok = pos + n <= lengths[owner]
    return h[ok], owner[ok], pos[ok]


def shingles(text: str, n: int) -> np.ndarray:
    """Hashes of the word n-grams of a text; a text shorter than n words is one shingle of all its words."""
    wh = word_hashes(words(text))
    if len(wh) == 0:
        return wh
    return ngram_hashes(wh, min(n, len(wh)))


class MinHasher:
    """MinHash over 32-bit shingle hashes with `num_perm` multiply-shift hash functions.

    h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 with random odd a_i: a strongly universal family that needs no
    modulo, so one numpy multiply-add per (shingle, permutation).
    """

    def __init__(self, num_perm: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = (rng.integers(0, 2**63 - 1, size=num_perm, dtype=np.int64).astype(np.uint64) << np.uint64(1)) \
            | np.uint64(1)
        self.b = rng.integers(0, 2**63 - 1, size=num_perm, dtype=np.int64).astype(np.uint64)

    def signatures_of(self, x: np.ndarray, owner: np.ndarray, count: int, chunk: int = 8192) -> np.ndarray:
        """Signatures of `count` documents at once from 64-bit shingle hashes `x` and their (sorted) owners."""
        sigs = np.full((count, self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        x32 = x >> np.uint64(32)
        with np.errstate(over="ignore"):
            for start in range(0, len(x32), chunk):
                part, own = x32[start:start + chunk, None], owner[start:start + chunk]
                v = ((part * self.a + self.b) >> np.uint64(32)).astype(np.uint32)
                seg = np.nonzero(np.concatenate([[True], own[1:] != own[:-1]]))[0]
                mins = np.minimum.reduceat(v, seg, axis=0)
                who = own[seg]
                sigs[who] = np.minimum(sigs[who], mins)
        return sigs


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[n, bands]: one hash per band of `rows` signature values (LSH buckets)."""
    n = sigs.shape[0]
    s = sigs[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        acc = np.zeros((n, bands), dtype=np.uint64)
        for r in range(rows):
            acc = acc * np.uint64(0x100000001B3) + s[:, :, r] + np.uint64(r + 1)
        # The band number is mixed in so equal values in different bands never collide across bands.
        acc = acc + np.arange(bands, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
        return fmix64(acc)


def collision_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(two documents with this Jaccard similarity share at least one LSH band)."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def implied_threshold(bands: int, rows: int) -> float:
    """The usual LSH threshold estimate (1/b)^(1/r): where the S-curve is steepest."""
    return (1.0 / bands) ** (1.0 / rows)


def threshold_curve(bands: int, rows: int, points: Iterable[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
                    ) -> list[tuple[float, float]]:
    return [(j, round(collision_probability(j, bands, rows), 4)) for j in points]


def format_curve(bands: int, rows: int, verify: float | None = None) -> str:
    """A small text table of the S-curve, printed when the stage starts (the meaning of the parameters)."""
    lines = [f"MinHash-LSH: {bands} bands x {rows} rows = {bands * rows} permutations; "
             f"implied threshold ~{implied_threshold(bands, rows):.2f} Jaccard"
             + (f"; candidate pairs verified at estimated Jaccard >= {verify:.2f}" if verify else "")]
    for j, p in threshold_curve(bands, rows):
        bar = "#" * int(round(40 * p))
        lines.append(f"  J={j:.1f}  P(candidate)={p:6.3f}  {bar}")
    return "\n".join(lines)


def memory_per_million(num_perm: int, bands: int) -> dict[str, float]:
    """What the dedup stage needs per million documents (MB): RAM during clustering and scratch on disk."""
    # band step: column of representatives + argsort + sorted copy + index arrays (~48 B); per-document
    # score/priority (8 B); survivor/reason/similarity results (13 B). Duplicate pairs come on top (16 B each).
    ram = 48 + 8 + 13
    disk = 4 * num_perm + 8 * bands + 16
    return {"ram_mb": round(ram * 1e6 / 2**20, 1), "disk_mb": round(disk * 1e6 / 2**20, 1)}


__all__ = [
    "NORMALIZATION_VERSION", "normalize", "words", "exact_hash", "word_hashes", "fmix64", "ngram_hashes",
    "batch_ngram_hashes", "shingles", "MinHasher", "band_hashes", "collision_probability", "implied_threshold", "threshold_curve",
    "format_curve", "memory_per_million",
]
