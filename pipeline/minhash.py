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

NORMALIZATION_VERSION = 1  # bump when words() changes: stored indexes record it and refuse a mismatch
_WORD = re.compile(r"\w+")
# Odd 64-bit multipliers for combining word hashes into an n-gram hash (position-dependent, so order matters).
_RNG = np.random.default_rng(0x7E87B00C)
_NGRAM_MULT = (_RNG.integers(1, 2**63 - 1, size=64, dtype=np.int64).astype(np.uint64) << np.uint64(1)) | np.uint64(1)


def words(text: str) -> list[str]:
    """Case, punctuation and whitespace folded: `Hello,  World!` and `hello world` give the same words."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


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
    "NORMALIZATION_VERSION", "words", "exact_hash", "word_hashes", "fmix64", "ngram_hashes", "batch_ngram_hashes",
    "shingles", "MinHasher", "band_hashes", "collision_probability", "implied_threshold", "threshold_curve",
    "format_curve", "memory_per_million",
]
