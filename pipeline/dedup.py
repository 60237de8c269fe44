"""The `dedup` stage: exact and MinHash-LSH near-duplicate removal across all sources together.

Steps (datatrove style, each with its own figures in the stats):

1. hash      stream the documents once; per document write its MinHash signature, LSH band hashes and the
             hash of its normalised text to scratch files (nothing per document stays in RAM but a float
             score and a priority).
2. exact     sort the 128-bit text hashes: equal hashes are exact duplicates.
3. buckets   for one band at a time, sort the band hashes (and, inside a bucket, the documents in survivor
             order): each document is a candidate of its bucket's first and of the 16 documents just before
             it, so a huge bucket (shared boilerplate) costs O(size), not O(size^2).
4. verify    a candidate pair's estimated Jaccard (share of equal MinHash values over the whole signature).
5. cluster   survivor-verified star clustering: documents are visited in survivor order (an earlier run's
             index first, then the highest edu_score, the earliest source in `source_priority`, the smallest
             id: never the input order); a document not yet removed is kept, and removes each undecided
             candidate whose own similarity to it is >= verify_threshold. Exact copies follow the best member
             of their exact group.
6. filter    stream the documents again: survivors to kept/, the others to removed/ with reason
             exact_duplicate or near_duplicate and meta.kept_id + meta.similarity (the verified similarity to
             that kept document, measured before the decision); every removal also in `pairs.parquet`; the
             pairs nearest the threshold on both sides in stats["audit"] and the report.

Why not connected components: datatrove (union-find over bucket pairs), text-dedup (union-find) and NeMo
Curator (connected components over LSH edges, with an optional Jaccard check of each edge against anchor
documents) keep one document per connected component. Components are transitive: A~B and B~C put C in A's
component although C may share nothing with A, and on real sites shared navigation chains unrelated pages
into one component. Star clustering against the survivor only removes a document that is itself similar to a
document that stays, is deterministic, and is independent of the input order; it can keep two documents that
a chain would have merged (B removed as a copy of A; C, far from A, kept), which is the intended trade.

Memory: ~70 MB per million documents during clustering (see `minhash.memory_per_million`) plus 16 bytes
per duplicate pair; signatures stay on disk (memory-mapped): 4*num_perm + 8*bands + 16 bytes per document
of scratch (~770 MB per million with the defaults).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.utils.batching import batched

from pipeline.documents import edu_score_of
from pipeline.errors import NoInputDocuments, TextbookError
from pipeline.minhash import (
    NORMALIZATION_VERSION,
    MinHasher,
    band_hashes,
    batch_ngram_hashes,
    exact_hash,
    format_curve,
    memory_per_million,
    ngram_hashes,
    threshold_curve,
    word_hashes,
    words,
)
from pipeline.stats import StageStats

INDEX_FORMAT = "textbook-dedup-index"
KEEP, EXACT, NEAR = 0, 1, 2
WINDOW = 16  # a member of a large bucket is paired with the bucket's first and this many predecessors
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}


@dataclass(frozen=True)
class DedupParams:
    shingle_size: int = 2
    num_perm: int = 112
    bands: int = 22
    rows: int = 5
    seed: int = 1
    exact: bool = True
    near: bool = True
    verify_threshold: float | None = 0.8

    @classmethod
    def from_section(cls, s: Any) -> DedupParams:
        return cls(shingle_size=s.shingle_size, num_perm=s.num_perm, bands=s.bands, rows=s.rows, seed=s.seed,
                   exact=s.exact, near=s.near, verify_threshold=s.verify_threshold)

    def fingerprint(self) -> dict[str, Any]:
        """What an index must share with this run to be comparable."""
        return {"normalization": NORMALIZATION_VERSION, "shingle_size": self.shingle_size,
                "num_perm": self.num_perm, "bands": self.bands, "rows": self.rows, "seed": self.seed}


@lru_cache(maxsize=4)
def _hasher(num_perm: int, seed: int) -> MinHasher:
    return MinHasher(num_perm, seed)


def hash_batch(texts: list[str], p: DedupParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signatures uint32[m, P], band hashes uint64[m, B], exact hashes uint64[m, 2]) of a batch of texts.

    Shingles of the whole batch are hashed and min-reduced in one vectorised pass (batch_ngram_hashes +
    reduceat); a text shorter than the shingle size is one shingle of all its words.
    """
    mh = _hasher(p.num_perm, p.seed)
    exact = np.empty((len(texts), 2), dtype=np.uint64)
    whs: list[np.ndarray] = []
    for i, text in enumerate(texts):
        ws = words(text)
        exact[i] = np.frombuffer(exact_hash(ws), dtype=np.uint64)
        whs.append(word_hashes(ws))
    x, owner, _ = batch_ngram_hashes(whs, p.shingle_size)
    short = [i for i, w in enumerate(whs) if 0 < len(w) < p.shingle_size]
    if short:  # rare: add their one whole-text shingle, keeping owners sorted
        x = np.concatenate([x, *[ngram_hashes(whs[i], len(whs[i])) for i in short]])
        owner = np.concatenate([owner, np.asarray(short, dtype=np.int64)])
        order = np.argsort(owner, kind="stable")
        x, owner = x[order], owner[order]
    sigs = mh.signatures_of(x, owner, len(texts))
    return sigs, band_hashes(sigs, p.bands, p.rows), exact


def _hash_task(args: tuple[list[str], DedupParams]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return hash_batch(*args)


class Rows:
    """Per-document arrays (signatures, bands, exact hashes) over several on-disk segments, indexed globally."""

    def __init__(self) -> None:
        self.segments: list[dict[str, np.ndarray]] = []
        self.offsets: list[int] = [0]

    def add(self, sig: np.ndarray, band: np.ndarray, exact: np.ndarray) -> None:
        self.segments.append({"sig": sig, "band": band, "exact": exact})
        self.offsets.append(self.offsets[-1] + len(sig))

    def __len__(self) -> int:
        return self.offsets[-1]

    def column(self, name: str, j: int) -> np.ndarray:
        parts = [np.ascontiguousarray(s[name][:, j]) for s in self.segments]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)

    def take(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (any order) of array `name`."""
        idx = np.asarray(idx, dtype=np.int64)
        width = self.segments[0][name].shape[1]
        out = np.empty((len(idx), width), dtype=self.segments[0][name].dtype)
        seg = np.searchsorted(np.asarray(self.offsets[1:]), idx, side="right")
        for k, s in enumerate(self.segments):
            m = seg == k
            if m.any():
                local = idx[m] - self.offsets[k]
                order = np.argsort(local)  # sorted reads are much faster on a memmap
                vals = s[name][local[order]]
                tmp = np.empty_like(vals)
                tmp[order] = vals
                out[m] = tmp
        return out


def _memmap(path: Path, dtype: Any, width: int) -> np.ndarray:
    n = path.stat().st_size // (np.dtype(dtype).itemsize * width) if path.exists() else 0
    if n == 0:
        return np.empty((0, width), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n, width))


# ---------------------------------------------------------------------------------------------- index


def load_index(path: str | Path, p: DedupParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
    d = Path(path)
    meta_path = d / "index.json"
    if not meta_path.is_file():
        raise TextbookError(f"{d}: not a dedup index (no index.json); point dedup.index_in at <run>/stages/dedup/index")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise TextbookError(f"{d}: not a {INDEX_FORMAT}")
    want = p.fingerprint()
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if "normalization" in diff:
        raise TextbookError(f"{d}: dedup index made with text normalisation v{meta.get('normalization')}, this "
                            f"version normalises with v{NORMALIZATION_VERSION}: its signatures cannot be compared; "
                            "rebuild it by re-running the dedup stage of the run that made it (with --force)")
    if diff:
        detail = ", ".join(f"{k}: index {a} vs config {b}" for k, (a, b) in diff.items())
        raise TextbookError(f"{d}: dedup index made with other parameters ({detail}); use the same dedup "
                            "settings or rebuild the index")
    return (_memmap(d / "sig.u32", np.uint32, p.num_perm), _memmap(d / "band.u64", np.uint64, p.bands),
            _memmap(d / "exact.u64", np.uint64, 2), d / "docs.parquet")


def _read_index_ids(docs_path: Path, local: np.ndarray) -> list[str]:
    if not len(local):
        return []
    ids = pq.read_table(docs_path, columns=["id"]).column("id")
    return [str(x) for x in ids.take(pa.array(local)).to_pylist()]


# ---------------------------------------------------------------------------------------------- clustering


def _runs(sorted_vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every run of >= 2 equal values in a sorted array."""
    if len(sorted_vals) < 2:
        e = np.empty(0, dtype=np.int64)
        return e, e
    new = np.concatenate([[True], sorted_vals[1:] != sorted_vals[:-1]])
    starts = np.nonzero(new)[0]
    lengths = np.diff(np.concatenate([starts, [len(sorted_vals)]]))
    multi = lengths >= 2
    return starts[multi], lengths[multi]


def _window_pairs(members: np.ndarray, starts: np.ndarray, lengths: np.ndarray, window: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs inside each run of `members` (runs already in survivor order): every member with the first of
    its run and with the `window` members just before it. Small buckets give all their pairs; a huge bucket
    (shared boilerplate) gives O(size * window) pairs, not O(size^2)."""
    pos = np.concatenate([np.arange(n) for n in lengths.tolist()]) if len(lengths) else np.empty(0, np.int64)
    at = np.repeat(starts, lengths) + pos  # index in `members` of each run element
    a_parts, b_parts = [], []
    later = pos >= 1
    a_parts.append(members[np.repeat(starts, lengths)][later])  # the run's first
    b_parts.append(members[at][later])
    for d in range(1, window + 1):
        ok = pos >= d + 1  # d == pos is the run's first, already paired
        if not ok.any():
            break
        a_parts.append(members[at[ok] - d])
        b_parts.append(members[at[ok]])
    return np.concatenate(a_parts), np.concatenate(b_parts)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if not len(lo):
        return lo, hi
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


@dataclass
class Clustering:
    survivor: np.ndarray  # int64[n_total]: index of the kept document it duplicates (itself when kept)
    reason: np.ndarray  # int8[n_total]: KEEP / EXACT / NEAR
    similarity: np.ndarray  # float32[n_total]: verified estimated Jaccard with that survivor (1 for kept)
    figures: dict[str, Any]
    near_misses: list[tuple[int, int, float]] = field(default_factory=list)  # (a, b, sim) just under the bar


def _exact_groups(rows: Rows, n: int, figures: dict[str, Any]) -> np.ndarray:
    """group[i] = the first row (in row order) with the same exact hash as row i (itself when unique)."""
    group = np.arange(n, dtype=np.int64)
    if not n:
        return group
    ex = np.concatenate([s["exact"] for s in rows.segments])
    order = np.lexsort((np.arange(n), ex[:, 1], ex[:, 0]))  # ties by row: the group's first row leads it
    sv = ex[order]
    same = np.concatenate([[False], (sv[1:] == sv[:-1]).all(axis=1)])
    del sv
    run_start = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
    group[order] = order[run_start]
    figures["exact_duplicates"] = int(same.sum())
    return group


def _survivor_rank(n: int, n_prior: int, involved: np.ndarray, score: np.ndarray, priority: np.ndarray,
                   ids_of: Callable[[np.ndarray], list[str]]) -> np.ndarray:
    """Rank (0 = survives first) of each involved row: an earlier index's rows, then the highest edu_score,
    then the earliest source in source_priority, then the smallest id. Content and metadata only, never the
    input order, so the result does not depend on how the inputs are ordered."""
    rank = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    prior = involved[involved < n_prior]
    new = involved[involved >= n_prior]
    ids = ids_of(new - n_prior)
    keys = sorted(range(len(new)), key=lambda k: (-float(score[new[k] - n_prior]),
                                                  int(priority[new[k] - n_prior]), ids[k], int(new[k])))
    rank[prior] = np.arange(len(prior))
    rank[new[np.asarray(keys, dtype=np.int64)]] = len(prior) + np.arange(len(new))
    return rank


def minhash_jaccard(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of signature pairs (rows of `sa`, `sb`: (pairs, num_perm)): the share of equal MinHash
    values, float32 (pairs,) (Broder 1997)."""
    return (sa == sb).mean(axis=1).astype(np.float32)


def _similarity(rows: Rows, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of row pairs, in chunks."""
    if not len(a):
        return np.empty(0, dtype=np.float32)
    return np.concatenate([minhash_jaccard(rows.take("sig", a[i:i + 65536]), rows.take("sig", b[i:i + 65536]))
                           for i in range(0, len(a), 65536)])


def band_buckets(col: np.ndarray, members: np.ndarray, member_rank: np.ndarray | None, window: int
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray] | None:
    """One band's bucket table over `members` (rows, ascending) with band values `col`.

    Without `member_rank`: the members that share a bucket with another. With it (rank of each member):
    the bucket's candidate pairs, members of a bucket in survivor order (see `_window_pairs`), unique.
    None when no bucket holds two members. Any subset of rows that keeps whole buckets gives the pairs of
    exactly those buckets.
    """
    order = np.lexsort((member_rank, col)) if member_rank is not None else np.argsort(col, kind="stable")
    starts, lengths = _runs(col[order])
    members = members[order]
    del order
    if not len(starts):
        return None
    if member_rank is None:
        return members[np.repeat(starts, lengths) + np.concatenate([np.arange(k) for k in lengths.tolist()])]
    a, b = _window_pairs(members, starts, lengths, window)
    return _unique_pairs(a, b)


def _candidates(rows: Rows, reps: np.ndarray, rank: np.ndarray | None, p: DedupParams, window: int
                ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """Without `rank`: the rows that share any LSH bucket. With it: candidate pairs, bucket by bucket."""
    involved = np.zeros(0, dtype=np.int64)
    pa_, pb_ = [], []
    for band in range(p.bands):
        found = band_buckets(rows.column("band", band)[reps], reps, rank[reps] if rank is not None else None,
                             window)
        if found is None:
            continue
        if rank is None:
            involved = np.union1d(involved, found)
            continue
        pa_.append(found[0])
        pb_.append(found[1])
    if rank is None:
        return involved
    return merge_pairs(pa_, pb_)


def merge_pairs(pa_: list[np.ndarray], pb_: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The unique (lo, hi) pairs of several bands' pair lists, sorted (so independent of their order)."""
    if not pa_:
        e = np.empty(0, dtype=np.int64)
        return e, e
    return _unique_pairs(np.concatenate(pa_), np.concatenate(pb_))


def _greedy(nodes_in_order: np.ndarray, a: np.ndarray, b: np.ndarray, sims: np.ndarray, n: int, n_prior: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Star clustering over verified edges: in survivor order, an undecided node is kept and removes its
    undecided neighbours. (survivor, similarity) per row; survivor = -1 where undecided (no edge)."""
    survivor = np.full(n, -1, dtype=np.int64)
    similarity = np.ones(n, dtype=np.float32)
    if not len(a):
        return survivor, similarity
    src = np.concatenate([a, b])
    dst = np.concatenate([b, a])
    w = np.concatenate([sims, sims])
    order = np.argsort(src, kind="stable")
    src, dst, w = src[order], dst[order], w[order]
    bounds = np.searchsorted(src, nodes_in_order), np.searchsorted(src, nodes_in_order, side="right")
    surv = survivor  # local alias: the loop is the hot part
    for u, lo, hi in zip(nodes_in_order.tolist(), bounds[0].tolist(), bounds[1].tolist(), strict=True):
        if surv[u] != -1 and surv[u] != u:
            continue  # removed: a removed document never removes another
        surv[u] = u
        for v, sim in zip(dst[lo:hi].tolist(), w[lo:hi].tolist(), strict=True):
            if surv[v] == -1 and v >= n_prior:  # an earlier index's rows were emitted: never removed
                surv[v] = u
                similarity[v] = sim
    return survivor, similarity


def find_duplicates(rows: Rows, n_prior: int, score: np.ndarray, priority: np.ndarray,
                    ids_of: Callable[[np.ndarray], list[str]], p: DedupParams,
                    log: Callable[[str], None] = lambda m: None, window: int = WINDOW,
                    near_misses: int = 20) -> Clustering:
    """Decide every row (the first `n_prior` are an earlier index and always survive).

    Survivor-verified star clustering, not connected components: rows are visited in survivor order (see
    `_survivor_rank`); a row not yet removed is kept and removes each undecided candidate whose own estimated
    Jaccard with it is >= verify_threshold. So a document is removed only as a copy of a document that is
    kept, with the similarity to that document recorded before the decision; A~B and B~C never remove C for
    A's sake. Exact copies (same folded text) are grouped first and follow their group's best member.

    Decisions never look across a connected component of the graph of shared buckets and exact hashes, so
    running it on a union of whole components decides those rows as one run over all rows would
    (`pipeline.dedup_dist` runs it so, one task per partition of the components).
    """
    n = len(rows)
    figures: dict[str, Any] = {}
    t0 = time.time()
    group = _exact_groups(rows, n, figures) if p.exact else np.arange(n, dtype=np.int64)
    figures["seconds_exact"] = round(time.time() - t0, 3)
    t0 = time.time()
    reps = np.nonzero(group == np.arange(n))[0]
    in_exact = np.nonzero(np.bincount(group, minlength=n)[group] > 1)[0] if n else np.empty(0, np.int64)
    involved = np.union1d(in_exact, _candidates(rows, reps, None, p, window) if p.near and n else in_exact)
    rank = _survivor_rank(n, n_prior, involved, score, priority, ids_of)
    # an exact group is as good as its best member, who will be the one kept
    best = np.full(n, -1, dtype=np.int64)
    if len(in_exact):
        by_rank = in_exact[np.argsort(rank[in_exact], kind="stable")]
        first_seen = np.unique(group[by_rank], return_index=True)
        best[first_seen[0]] = by_rank[first_seen[1]]
        rank[first_seen[0]] = rank[by_rank[first_seen[1]]]
    a = b = np.empty(0, dtype=np.int64)
    sims = np.empty(0, dtype=np.float32)
    misses: list[tuple[int, int, float]] = []
    if p.near and n:
        a, b = _candidates(rows, reps, rank, p, window)
        sims = _similarity(rows, a, b)
        figures["candidate_pairs"] = int(len(a))
        threshold = p.verify_threshold if p.verify_threshold is not None else 0.0
        under = np.nonzero(sims < threshold)[0]
        for k in under[np.argsort(-sims[under], kind="stable")][:near_misses].tolist():
            misses.append((int(a[k]), int(b[k]), float(sims[k])))
        ok = sims >= threshold
        a, b, sims = a[ok], b[ok], sims[ok]
    figures["verified_pairs"] = int(len(a))
    figures["seconds_buckets"] = round(time.time() - t0, 3)
    t0 = time.time()
    nodes = np.unique(np.concatenate([a, b]))
    nodes = nodes[np.argsort(rank[nodes], kind="stable")]
    star, similarity = _greedy(nodes, a, b, sims, n, n_prior)
    survivor, reason = _assign(group, best, star, n, n_prior)
    similarity[reason == KEEP] = 1.0
    similarity[reason == EXACT] = 1.0
    near = np.nonzero(reason == NEAR)[0]
    similarity[near] = similarity[group[near]]  # an exact copy of a removed representative shares its similarity
    sizes = Counter(Counter(survivor[survivor != np.arange(n)].tolist()).values())
    figures["clusters"] = int(sum(sizes.values()))
    figures["cluster_sizes"] = {str(k + 1): v for k, v in sorted(sizes.items())}
    figures["seconds_cluster"] = round(time.time() - t0, 3)
    log(f"dedup: {figures['clusters']} clusters, {figures.get('candidate_pairs', 0)} candidate pairs, "
        f"{figures['verified_pairs']} verified")
    return Clustering(survivor, reason, similarity, figures, misses)


def _assign(group: np.ndarray, best: np.ndarray, star: np.ndarray, n: int, n_prior: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (survivor, reason) from the exact groups and the representatives' star clustering."""
    idx = np.arange(n, dtype=np.int64)
    survivor = idx.copy()
    reason = np.zeros(n, dtype=np.int8)
    rep_star = star[group]  # each row follows its exact group's representative
    removed_rep = (rep_star != -1) & (rep_star != group)
    group_best = np.where(best[group] >= 0, best[group], group)
    # kept groups: the best member stays, the other members are exact copies of it (an index row stays too)
    copy = ~removed_rep & (idx != group_best) & (idx >= n_prior)
    survivor[copy] = group_best[copy]
    reason[copy] = EXACT
    # removed groups: every member is a near copy of the survivor group's best member
    target = rep_star[removed_rep]
    target_best = np.where(best[target] >= 0, best[target], target)
    survivor[removed_rep] = target_best
    reason[removed_rep] = NEAR
    return survivor, reason


# ---------------------------------------------------------------------------------------------- in memory


def dedup_texts(texts: list[str], scores: list[float | None] | None = None, sources: list[str] | None = None,
                ids: list[str] | None = None, params: DedupParams | None = None,
                source_priority: tuple[str, ...] = ("synthetic", "web")) -> Clustering:
    """Cluster a list of texts in memory (tests, notebooks, benchmarks). Indices are list positions."""
    p = params or DedupParams()
    sig, band, exact = hash_batch(texts, p) if texts else (
        np.empty((0, p.num_perm), np.uint32), np.empty((0, p.bands), np.uint64), np.empty((0, 2), np.uint64))
    rows = Rows()
    rows.add(sig, band, exact)
    score = _scores(scores or [None] * len(texts))
    prio = _priorities(sources or [None] * len(texts), list(source_priority))
    ids = ids or [str(i) for i in range(len(texts))]
    return find_duplicates(rows, 0, score, prio, lambda idx: [ids[i] for i in idx.tolist()], p)


def _scores(values: list[Any], stats: StageStats | None = None) -> np.ndarray:
    """float32 survivor scores; no score or an invalid one (`documents.edu_score_of`) ranks lowest (-inf), an
    invalid one counted in `stats` as the repair `invalid_edu_score`."""
    out = np.empty(len(values), dtype=np.float32)
    for i, v in enumerate(values):
        score, invalid = edu_score_of(v)
        if invalid and stats is not None:
            stats.repair("invalid_edu_score")
        out[i] = -math.inf if score is None else score
    return out


def _priorities(sources: list[str | None], order: list[str]) -> np.ndarray:
    rank = _priority_rank(order)
    return np.array([rank(s) for s in sources], dtype=np.int32)


def _priority_rank(order: list[str]) -> Callable[[str | None], int]:
    known = {s: i for i, s in enumerate(order)}
    seen: dict[str, int] = {}

    def rank(source: str | None) -> int:
        s = source or ""
        if s in known:
            return known[s]
        # unlisted sources after the listed ones, by name: a stable order from the name's first bytes
        if s not in seen:
            seen[s] = len(order) + int.from_bytes(s.encode()[:3].ljust(3, b"\0"), "big")
        return seen[s]

    return rank


# ---------------------------------------------------------------------------------------------- the stage


def _progress(desc: str, total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", mininterval=1.0, file=sys.stderr, dynamic_ncols=True)


def _count_inputs(paths: list[Path]) -> int | None:
    from pipeline.documents import count_rows

    if paths and all(isinstance(p, Path) and p.suffix == ".parquet" for p in paths):
        return count_rows(paths)
    return None


_HAS_WORD = re.compile(r"\w")


def _usable(doc: dict[str, Any]) -> bool:
    """A document with at least one word character (else it is dropped as empty_text)."""
    return _HAS_WORD.search(doc["text"]) is not None


def _hash_inputs(ctx: Any, p: DedupParams, work: Path, stats: StageStats, section: Any
                 ) -> tuple[np.ndarray, np.ndarray, Counter[str]]:
    """Step 1: one pass over the inputs, writing signatures/bands/exact hashes and ids to `work`."""
    from pipeline.documents import iter_documents

    rank = _priority_rank(list(section.source_priority))
    scores: list[np.ndarray] = []
    prios: list[np.ndarray] = []
    per_source: Counter[str] = Counter()

    def unreadable(reason: str, where: str) -> None:
        stats.read()
        stats.error_at(reason, where)

    files = {k: open(work / f"{k}", "wb") for k in ("sig.u32", "band.u64", "exact.u64", "ids.txt")}
    pool = None
    try:
        def hashed(batches: Iterator[list[dict[str, Any]]]) -> Iterator[tuple[list[dict], tuple]]:
            if section.workers <= 1:
                for b in batches:
                    yield b, hash_batch([d["text"] for d in b], p)
                return
            import multiprocessing as mp

            nonlocal pool
            pool = mp.get_context("spawn").Pool(section.workers)
            pending: list[tuple[list[dict], Any]] = []
            for b in batches:
                pending.append((b, pool.apply_async(_hash_task, (([d["text"] for d in b], p),))))
                if len(pending) >= 2 * section.workers:
                    doc_batch, res = pending.pop(0)
                    yield doc_batch, res.get()
            for doc_batch, res in pending:
                yield doc_batch, res.get()

        def usable_docs() -> Iterator[dict[str, Any]]:
            for doc in iter_documents(ctx.inputs, on_error=unreadable, on_repair=stats.on_repair):
                stats.read()
                if not _usable(doc):
                    stats.drop("empty_text")
                    continue
                yield doc

        with _progress("dedup: hashing", _count_inputs(ctx.inputs)) as bar:
            for docs, (sig, band, exact) in hashed(batched(usable_docs(), section.batch_size)):
                files["sig.u32"].write(sig.tobytes())
                files["band.u64"].write(band.tobytes())
                files["exact.u64"].write(exact.tobytes())
                files["ids.txt"].write(("\n".join(json.dumps(d["id"]) for d in docs) + "\n").encode())
                scores.append(_scores([d.get("edu_score") for d in docs], stats))
                prios.append(np.array([rank(d.get("source")) for d in docs], dtype=np.int32))
                per_source.update(d.get("source") or "unknown" for d in docs)
                bar.update(len(docs))
    finally:
        for f in files.values():
            f.close()
        if pool is not None:
            pool.close()
            pool.join()
    return _cat(scores, np.float32), _cat(prios, np.int32), per_source


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def _ids_reader(path: Path) -> Callable[[np.ndarray], list[str]]:
    def ids_of(idx: np.ndarray) -> list[str]:
        want = {int(i): k for k, i in enumerate(idx.tolist())}
        out: list[str] = [""] * len(idx)
        if not want:
            return out
        with open(path, "rb") as f:
            for lineno, line in enumerate(f):
                k = want.get(lineno)
                if k is not None:
                    out[k] = json.loads(line)
        return out

    return ids_of


def run_stage(ctx: Any) -> StageStats:
    """The stage: in this process (run.executor local), or as Ray tasks (`pipeline.dedup_dist`, same results)."""
    from pipeline.scale import engine_for

    engine = engine_for(ctx.cfg)
    if engine.distributed:
        from pipeline.dedup_dist import run_distributed

        return run_distributed(ctx, engine)
    section = ctx.section
    p = DedupParams.from_section(section)
    stats = StageStats(ctx.name)
    work = _start(ctx, p)
    t_start = time.time()
    scores, prios, per_source_in = _hash_inputs(ctx, p, work, stats, section)
    n_new = len(scores)
    seconds_hash = time.time() - t_start

    rows, prior_docs = prior_rows(ctx, p)
    n_prior = len(rows)
    rows.add(_memmap(work / "sig.u32", np.uint32, p.num_perm), _memmap(work / "band.u64", np.uint64, p.bands),
             _memmap(work / "exact.u64", np.uint64, 2))
    ids_new = _ids_reader(work / "ids.txt")
    result = find_duplicates(rows, n_prior, scores, prios, ids_new, p,
                             log=lambda m: print(m, file=sys.stderr))
    kept_ids = survivor_ids(result, n_prior, prior_docs, ids_new)
    lowest, want_text = _audit_rows(result, n_prior, 10)
    removed_per_source, pairs, texts = _write_outputs(ctx, result, n_prior, kept_ids, stats, section, want_text)
    if section.keep_index:
        _write_index(ctx.out_dir / "index", rows, n_prior, prior_docs, result, work, p, section)
    shutil.rmtree(work, ignore_errors=True)
    set_stats(stats, p, section, result, n_new, n_prior, per_source_in, removed_per_source, pairs,
              _audit(lowest, result.near_misses[:10], texts, kept_ids, p.verify_threshold), ctx.out_dir,
              time.time() - t_start, seconds_hash)
    return stats


def _start(ctx: Any, p: DedupParams) -> Path:
    """Print the S-curve, refuse an empty input, make a fresh scratch directory (returned)."""
    print(format_curve(p.bands, p.rows, p.verify_threshold), file=sys.stderr)
    if not ctx.inputs:
        raise NoInputDocuments("dedup: no input documents (the upstream stages kept nothing, or dedup.inputs is empty)")
    work = ctx.state_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def prior_rows(ctx: Any, p: DedupParams) -> tuple[Rows, list[tuple[Path, int]]]:
    """Rows of the earlier runs' indexes (dedup.index_in), and (docs.parquet, first global row) of each."""
    rows = Rows()
    prior_docs: list[tuple[Path, int]] = []
    for path in ctx.section.index_in:
        if Path(path).resolve() == (ctx.out_dir / "index").resolve():
            raise TextbookError(f"dedup.index_in: {path} is this run's own index (it is rewritten by this stage); "
                                "copy it elsewhere or use it from another run")
        sig, band, exact, docs_path = load_index(path, p)
        prior_docs.append((docs_path, len(rows)))
        rows.add(sig, band, exact)
    return rows, prior_docs


def survivor_ids(result: Clustering, n_prior: int, prior_docs: list[tuple[Path, int]],
                 ids_new: Callable[[np.ndarray], list[str]]) -> dict[int, str]:
    """ids of the survivors that removed documents point at (their meta.kept_id), by row."""
    surv = np.unique(result.survivor[n_prior:][result.reason[n_prior:] != KEEP])
    kept_ids: dict[int, str] = {}
    new_s = surv[surv >= n_prior]
    kept_ids.update(zip(new_s.tolist(), ids_new(new_s - n_prior), strict=True))
    for k, (docs_path, start) in enumerate(prior_docs):
        end = prior_docs[k + 1][1] if k + 1 < len(prior_docs) else n_prior
        sel = surv[(surv >= start) & (surv < end)]
        kept_ids.update(zip(sel.tolist(), _read_index_ids(docs_path, sel - start), strict=True))
    return kept_ids


def set_stats(stats: StageStats, p: DedupParams, section: Any, result: Clustering, n_new: int, n_prior: int,
              per_source_in: Counter[str], removed_per_source: dict[str, dict[str, int]],
              pairs: list[dict[str, Any]], audit: dict[str, Any], out_dir: Path, elapsed: float,
              seconds_hash: float) -> None:
    """The stage's figures (both executors set the same ones)."""
    stats.set("params", {**p.fingerprint(), "verify_threshold": p.verify_threshold, "exact": p.exact,
                         "near": p.near, "source_priority": list(section.source_priority)})
    stats.set("threshold_curve", [{"jaccard": j, "p_candidate": pr} for j, pr in threshold_curve(p.bands, p.rows)])
    stats.set("documents_hashed", n_new)
    stats.set("prior_index_documents", n_prior)
    stats.set("documents_per_source", dict(per_source_in))
    stats.set("removed_per_source", removed_per_source)
    stats.set("sample_pairs", pairs)
    stats.set("audit", audit)
    stats.set("pairs_file", str(out_dir / "pairs.parquet"))
    stats.set("memory_per_million_docs", memory_per_million(p.num_perm, p.bands))
    stats.set("docs_per_second", round(n_new / elapsed, 1) if elapsed > 0 else None)
    stats.set("seconds_hash", round(seconds_hash, 3))
    for k, v in result.figures.items():
        stats.set(k, v)


class _PairsWriter:
    """Every removal as one row of `pairs.parquet`: removed_id, kept_id, reason, verified similarity."""

    SCHEMA = pa.schema([("removed_id", pa.string()), ("kept_id", pa.string()), ("reason", pa.string()),
                        ("similarity", pa.float32()), ("kept_from_earlier_run", pa.bool_())])

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.rows: list[tuple[str, str, str, float, bool]] = []
        self.writer = pq.ParquetWriter(self.tmp, self.SCHEMA, compression="zstd")

    def add(self, removed_id: str, kept_id: str, reason: str, similarity: float, earlier: bool) -> None:
        self.rows.append((removed_id, kept_id, reason, similarity, earlier))
        if len(self.rows) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            cols = list(zip(*self.rows, strict=True))
            self.writer.write_table(pa.table([pa.array(c, t) for c, t in zip(cols, self.SCHEMA.types, strict=True)],
                                             schema=self.SCHEMA))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.tmp.replace(self.path)


def _write_outputs(ctx: Any, result: Clustering, n_prior: int, kept_ids: dict[int, str], stats: StageStats,
                   section: Any, want_text: set[int]
                   ) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]], dict[int, tuple[str, str]]]:
    """Step 6: stream the inputs again (same order, same filter) and route each document.

    Returns removals per source, sample pairs, and (id, text) of the rows in `want_text` (for the audit)."""
    from pipeline.documents import STREAM_ROWS_PER_FILE, DocumentWriter, RemovedWriters, iter_documents

    removed_per_source: dict[str, Counter[str]] = defaultdict(Counter)
    pairs: list[dict[str, Any]] = []
    texts: dict[int, tuple[str, str]] = {}
    removed = RemovedWriters(ctx.removed_dir, rows_per_file=STREAM_ROWS_PER_FILE)
    every_pair = _PairsWriter(ctx.out_dir / "pairs.parquet")
    i = n_prior
    kept = DocumentWriter(ctx.kept_dir, rows_per_file=STREAM_ROWS_PER_FILE)
    with _progress("dedup: writing", len(result.survivor) - n_prior) as bar:
        for doc in iter_documents(ctx.inputs, on_error=lambda r, w: None):
            if not _usable(doc):
                removed.write(doc, "empty_text")
                continue
            if i in want_text:
                texts[i] = (doc["id"], doc["text"])
            code = int(result.reason[i])
            if code == KEEP:
                kept.write(doc)
                stats.keep()
            else:
                why = REASONS[code]
                s = int(result.survivor[i])
                sim = round(float(result.similarity[i]), 4)
                meta = dict(doc.get("meta") or {})
                meta.update({"kept_id": kept_ids[s], "similarity": sim,
                             "kept_from_earlier_run": s < n_prior})
                removed.write({**doc, "meta": meta}, why)
                every_pair.add(doc["id"], kept_ids[s], why, sim, s < n_prior)
                stats.drop(why)
                removed_per_source[doc.get("source") or "unknown"][why] += 1
                if len(pairs) < section.sample_pairs:
                    pairs.append({"removed_id": doc["id"], "kept_id": kept_ids[s], "reason": why,
                                  "similarity": sim, "removed_text": doc["text"][:200]})
            i += 1
            bar.update(1)
    kept.close()
    removed.close()
    every_pair.close()
    if i != len(result.survivor):
        raise TextbookError(f"dedup: the inputs changed while the stage ran ({i - n_prior} documents on the second "
                            f"pass, {len(result.survivor) - n_prior} on the first); run it again")
    return {k: dict(v) for k, v in sorted(removed_per_source.items())}, pairs, texts


def _audit_rows(result: Clustering, n_prior: int, k: int) -> tuple[list[tuple[int, int, float]], set[int]]:
    """The k near-duplicate removals with the lowest verified similarity, and the rows whose text they need."""
    near = np.nonzero(result.reason[n_prior:] == NEAR)[0] + n_prior
    low = near[np.argsort(result.similarity[near], kind="stable")][:k]
    lowest = [(int(r), int(result.survivor[r]), float(result.similarity[r])) for r in low]
    rows = {x for a, b, _ in lowest + result.near_misses[:k] for x in (a, b) if x >= n_prior}
    return lowest, rows


def _audit(lowest: list[tuple[int, int, float]], misses: list[tuple[int, int, float]],
           texts: dict[int, tuple[str, str]], kept_ids: dict[int, str], threshold: float | None) -> dict[str, Any]:
    """The pairs nearest the threshold on both sides, with text starts, for a person to check the threshold."""
    def side(row: int) -> tuple[str, str]:
        return texts.get(row, (kept_ids.get(row, "(an earlier run's document)"), ""))

    def pair(a: int, b: int, sim: float, first: str, second: str) -> dict[str, Any]:
        (ida, ta), (idb, tb) = side(a), side(b)
        return {f"{first}_id": ida, f"{second}_id": idb, "similarity": round(sim, 4),
                f"{first}_text": ta[:200], f"{second}_text": tb[:200]}

    return {"verify_threshold": threshold,
            "lowest_removed": [pair(r, s, sim, "removed", "kept") for r, s, sim in lowest],
            "highest_not_removed": [pair(a, b, sim, "a", "b") for a, b, sim in misses]}


def _write_index(dest: Path, rows: Rows, n_prior: int, prior_docs: list[tuple[Path, int]], result: Clustering,
                 work: Path, p: DedupParams, section: Any) -> None:
    """The index a later run passes as dedup.index_in: earlier index rows + this run's kept documents."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep_rows = np.concatenate([np.arange(n_prior), n_prior + np.nonzero(result.reason[n_prior:] == KEEP)[0]])
    with open(tmp / "sig.u32", "wb") as fs, open(tmp / "band.u64", "wb") as fb, open(tmp / "exact.u64", "wb") as fe:
        for i in range(0, len(keep_rows), 65536):
            part = keep_rows[i:i + 65536]
            fs.write(rows.take("sig", part).tobytes())
            fb.write(rows.take("band", part).tobytes())
            fe.write(rows.take("exact", part).tobytes())
    tables = [pq.read_table(path, columns=["id"]) for path, _ in prior_docs]
    kept_new = np.nonzero(result.reason[n_prior:] == KEEP)[0]
    new_ids = _ids_reader(work / "ids.txt")(kept_new)
    tables.append(pa.table({"id": pa.array(new_ids, pa.string())}))
    pq.write_table(pa.concat_tables(tables), tmp / "docs.parquet", compression="zstd")
    publish_index(tmp, dest, p, int(len(keep_rows)))


def publish_index(tmp: Path, dest: Path, p: DedupParams, documents: int, fmt: str = INDEX_FORMAT) -> None:
    """Describe the index written in `tmp` (index.json) and move it to `dest`, replacing the old one whole."""
    meta = {"format": fmt, **p.fingerprint(), "documents": documents,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
