"""Issue 13: choose the near-dedup defaults on REAL data; the precision/recall curve of MinHash-LSH.

    .venv/bin/python benchmarks/bench_dedup_curve.py            # sweep, table, benchmarks/results/dedup_curve.*
    .venv/bin/python benchmarks/bench_dedup_curve.py --quick    # fewer shingle sizes and LSH shapes (a smoke run)

One evaluation corpus per page-text variant (tests/_dedup_realsets.py builds it, seeded):

- `main`: the 766 SQLite documentation pages as the web stage extracts them (trafilatura, favour_precision) and
  its min-length filter keeps them; `full`: the same pages as all their visible text, menus and link lists kept;
- the Python 3.11 documentation reST sources (a second site, same text in both variants);
- planted near-copies of 200 of those pages (100 per site; substitutions 2-10 %, reordered paragraphs, boilerplate
  header/footer, truncation 10-20 %, whitespace/case), the natural pairs of GSM8K test vs test_socratic, and the
  4 documents of ../shared/cases/dedup/chain.jsonl, all in the same corpus (a dedup run sees all sources together).

Every pair of documents is then a planted positive, a GSM8K aligned positive, a chain pair, a natural duplicate
(excluded: neither positive nor negative), a site negative (both from the two documentation sites) or another
negative. For each shingle size, frequent-shingle filter, LSH shape (num_perm = bands x rows) and verify threshold the
script counts pairs the stage would call duplicates (share an LSH band AND estimated Jaccard >= threshold; or,
for `exact` rows, exact shingle Jaccard >= threshold, no estimator and no LSH).

MinHash rows use the columns of ONE 256-permutation hasher of the stage (`MinHasher(256, seed=1)`); P = 112 / 128
use its first P columns: the estimator has the same statistics as the stage's own hasher of that size (different
random draws). The baseline and the recommendation are re-measured through the stage's own `hash_batch` and
`find_duplicates` at the end (section "stage check").
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RESULTS = ROOT / "benchmarks" / "results"
SHINGLES = (2, 3, 4, 5, 7, 9)
EXACT_FILTERS: tuple[int | None, ...] = (None, 10, 30, 100)
MINHASH_FILTERS: tuple[int | None, ...] = (None, 30)
SHAPES = {112: [(37, 3), (28, 4), (22, 5), (14, 8), (11, 10)],
          128: [(42, 3), (32, 4), (25, 5), (16, 8), (12, 10)],
          256: [(85, 3), (64, 4), (51, 5), (32, 8), (25, 10)]}
THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 .. 0.95
BASELINE = {"k": 3, "filter": None, "P": 112, "b": 37, "r": 3, "thr": 0.3}
MIN_J = 0.25  # exact-Jaccard pairs below this are never flagged at any threshold of the sweep
FULL_HASHER = 256
STAGE_SEED = 1  # DedupParams.seed: the stage's MinHasher(num_perm, seed)
SENTINEL = np.uint64(0x5E57_1E00_0000_0000)
COLS = ("variant", "method", "k", "filter", "P", "b", "r", "thr", "planted", "planted_sqlite", "planted_python",
        "gsm8k", "site_fp_pairs", "site_fp_pages", "fp_pages_sqlite", "fp_pages_python", "other_fp_pairs",
        "excluded_flagged", "chain_AB", "chain_BC", "chain_CD")


# ------------------------------------------------------------------------------------------------ shingles


def shingle_table(wh: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(shingle hash, owner) of every distinct k-word shingle of every document, sorted by owner; a document shorter
    than k words has one shingle of all its words (exactly as `pipeline.dedup.hash_batch`)."""
    from pipeline.minhash import batch_ngram_hashes, ngram_hashes

    x, own, _ = batch_ngram_hashes(wh, k)
    short = [i for i, w in enumerate(wh) if 0 < len(w) < k]
    if short:
        x = np.concatenate([x, *[ngram_hashes(wh[i], len(wh[i])) for i in short]])
        own = np.concatenate([own, np.asarray(short, dtype=np.int64)])
    order = np.lexsort((x, own))
    x, own = x[order], own[order]
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = (x[1:] != x[:-1]) | (own[1:] != own[:-1])
    return x[keep], own[keep]


def frequent_masks(x: np.ndarray, filters: tuple[int | None, ...]) -> dict[int | None, np.ndarray]:
    """Per filter f: True for shingles kept (found in at most f documents); None keeps all. One counting pass."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    df = counts[inverse]
    return {f: (np.ones(len(x), dtype=bool) if f is None else df <= f) for f in filters}


def with_sentinels(x: np.ndarray, own: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Documents left without any shingle get one of their own (so they match nothing but an exact copy, which
    the stage's exact step finds anyway)."""
    empty = np.nonzero(np.bincount(own, minlength=n) == 0)[0]
    if not len(empty):
        return x, own, 0
    x2 = np.concatenate([x, SENTINEL + empty.astype(np.uint64)])
    own2 = np.concatenate([own, empty])
    order = np.argsort(own2, kind="stable")
    return x2[order], own2[order], len(empty)


# ------------------------------------------------------------------------------------------------ pairs


def exact_pairs(x: np.ndarray, own: np.ndarray, n: int, min_j: float = MIN_J
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with exact Jaccard >= min_j (sparse incidence product)."""
    from scipy import sparse

    vocab, inv = np.unique(x, return_inverse=True)
    m = sparse.csr_matrix((np.ones(len(x), np.float32), (own, inv)), shape=(n, len(vocab)))
    sizes = np.bincount(own, minlength=n).astype(np.float32)
    c = sparse.triu(m @ m.T, k=1).tocoo()
    j = c.data / (sizes[c.row] + sizes[c.col] - c.data)
    ok = j >= min_j
    return c.row[ok].astype(np.int64), c.col[ok].astype(np.int64), j[ok].astype(np.float32)


def signatures(x: np.ndarray, own: np.ndarray, n: int, masks: list[np.ndarray], hasher: Any,
               chunk: int = 4096) -> list[np.ndarray]:
    """MinHash signatures for several shingle masks in one pass (`MinHasher.signatures_of`, the hash values of a
    chunk computed once and reduced per mask)."""
    sigs = [np.full((n, hasher.num_perm), 0xFFFFFFFF, dtype=np.uint32) for _ in masks]
    x32 = x >> np.uint64(32)
    big = np.uint32(0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for start in range(0, len(x32), chunk):
            part, o = x32[start:start + chunk, None], own[start:start + chunk]
            v = ((part * hasher.a + hasher.b) >> np.uint64(32)).astype(np.uint32)
            seg = np.nonzero(np.concatenate([[True], o[1:] != o[:-1]]))[0]
            who = o[seg]
            for m, s in zip(masks, sigs, strict=True):
                mm = m[start:start + chunk]
                vv = v if mm.all() else np.where(mm[:, None], v, big)
                s[who] = np.minimum(s[who], np.minimum.reduceat(vv, seg, axis=0))
    return sigs


def band_pairs(bands: np.ndarray) -> np.ndarray:
    """Keys i * n + j (i < j) of every pair sharing at least one band hash (all pairs within each bucket)."""
    n = len(bands)
    keys = []
    for c in range(bands.shape[1]):
        col = bands[:, c]
        order = np.argsort(col, kind="stable")
        sv = col[order]
        same = sv[1:] == sv[:-1]
        if not same.any():
            continue
        # run id of each sorted position; pairs at distance d inside a run, d = 1 .. longest run - 1
        run = np.concatenate([[0], np.cumsum(~same)])
        longest = int(np.bincount(run).max())
        for d in range(1, longest):
            ok = run[d:] == run[:-d]
            if not ok.any():
                break
            a, b = order[:-d][ok], order[d:][ok]
            keys.append(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
    return np.unique(np.concatenate(keys)) if keys else np.empty(0, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ metrics


def pair_metrics(corpus: Any, a: np.ndarray, b: np.ndarray, score: np.ndarray, thresholds: tuple[float, ...],
                 chain_ids: dict[str, int]) -> list[dict[str, Any]]:
    """Per threshold: recalls and false positives of the pairs (a, b) whose score >= threshold."""
    cl = corpus.classify(a, b)
    site_a = corpus.group[a]
    chain_key = {}
    for name, (x, y) in {"AB": ("A", "B"), "BC": ("B", "C"), "CD": ("C", "D")}.items():
        if x in chain_ids and y in chain_ids:
            chain_key[name] = min(chain_ids[x], chain_ids[y]) * len(corpus.docs) + max(chain_ids[x], chain_ids[y])
    keys = np.minimum(a, b) * len(corpus.docs) + np.maximum(a, b)
    planted_site = corpus.group[np.nonzero(corpus.is_copy)[0]]
    n_sqlite, n_python = int((planted_site == 0).sum()), int((planted_site == 1).sum())
    out = []
    for thr in thresholds:
        fl = score >= thr - 1e-9
        p = cl["planted"] & fl
        neg = cl["site_negative"] & fl
        pages = np.unique(np.concatenate([a[neg], b[neg]]))
        pg = corpus.group[pages]
        flagged_keys = set(keys[fl & cl["chain"]].tolist())
        out.append({
            "thr": thr,
            "planted": round(float(p.sum()) / max(corpus.n_planted, 1), 4),
            "planted_sqlite": round(float((p & (site_a == 0)).sum()) / max(n_sqlite, 1), 4),
            "planted_python": round(float((p & (site_a == 1)).sum()) / max(n_python, 1), 4),
            "gsm8k": round(float((cl["gsm8k_aligned"] & fl).sum()) / max(corpus.n_gsm8k, 1), 4),
            "site_fp_pairs": int(neg.sum()), "site_fp_pages": int(len(pages)),
            "fp_pages_sqlite": int((pg == 0).sum()), "fp_pages_python": int((pg == 1).sum()),
            "other_fp_pairs": int((cl["other_negative"] & fl).sum()),
            "excluded_flagged": int((cl["excluded"] & fl).sum()),
            **{f"chain_{k}": int(v in flagged_keys) for k, v in
               (("AB", chain_key.get("AB")), ("BC", chain_key.get("BC")), ("CD", chain_key.get("CD")))},
        })
    return out


def planted_similarity(corpus: Any, a: np.ndarray, b: np.ndarray, j: np.ndarray) -> dict[str, Any]:
    """Exact Jaccard of the planted pairs (0 when below MIN_J) and of GSM8K pairs: percentiles, per edit."""
    n = len(corpus.docs)
    got = dict(zip((np.minimum(a, b) * n + np.maximum(a, b)).tolist(), j.tolist(), strict=True))
    per_edit: dict[str, list[float]] = {}
    vals = []
    for i in np.nonzero(corpus.is_copy)[0]:
        o = corpus.partner[i]
        v = got.get(min(i, o) * n + max(i, o), 0.0)
        vals.append(v)
        edits = corpus.docs[i]["edits"]
        kinds = sorted(e for e in edits if e not in ("primary", "whitespace_case"))
        per_edit.setdefault("+".join(kinds), []).append(v)
    gs = [got.get(min(i, corpus.partner[i]) * n + max(i, corpus.partner[i]), 0.0)
          for i in np.nonzero(corpus.group == 2)[0] if i < corpus.partner[i]]
    pct = (5, 10, 25, 50)
    return {"planted_percentiles": {str(p): round(float(np.percentile(vals, p)), 3) for p in pct},
            "gsm8k_percentiles": {str(p): round(float(np.percentile(gs, p)), 3) for p in pct} if gs else {},
            "planted_by_edit": {k: {"n": len(v), "median": round(float(np.median(v)), 3),
                                    "min": round(float(np.min(v)), 3)} for k, v in sorted(per_edit.items())}}


def p_flag(j: float, P: int, b: int, r: int, thr: float) -> float:
    """P(a pair of exact Jaccard j is a candidate AND its estimate >= thr), estimate ~ Binomial(P, j) / P
    (the two events treated as independent: a slight underestimate of the joint probability)."""
    from scipy.stats import binom

    cand = 1.0 - (1.0 - j ** r) ** b
    need = math.ceil(thr * P - 1e-9)
    return cand * float(binom.sf(need - 1, P, j))


# ------------------------------------------------------------------------------------------------ one variant


def sweep_variant(args: tuple[str, int, tuple[int, ...], dict, tuple]) -> dict[str, Any]:
    variant, seed, ks, shapes, mh_filters = args
    from _dedup_realsets import evaluation_corpus

    from pipeline.minhash import MinHasher, band_hashes, word_hashes, words
    from pipeline.paths import shared_data_dir

    t0 = time.perf_counter()
    shared = shared_data_dir()
    corpus = evaluation_corpus(shared, shared.parent / "cases", variant, seed=seed)
    t_build = time.perf_counter() - t0
    n = len(corpus.docs)
    chain_ids = {d["id"].split("/")[1]: i for i, d in enumerate(corpus.docs) if d["group"] == "chain"}
    wh = [word_hashes(words(d["text"])) for d in corpus.docs]
    hasher = MinHasher(FULL_HASHER, STAGE_SEED)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"sizes": corpus.sizes, "natural": {f"{a} | {b}": r for (a, b), r in
                                                                  sorted(corpus.natural.items())},
                            "seconds_build": round(t_build, 1), "per_k": {}}
    edits = {}
    for d in corpus.docs:
        if "edits" in d:
            kinds = "+".join(sorted(e for e in d["edits"] if e not in ("primary", "whitespace_case")))
            edits[kinds] = edits.get(kinds, 0) + 1
    info["planted_edits"] = dict(sorted(edits.items()))
    for k in ks:
        t1 = time.perf_counter()
        x, own = shingle_table(wh, k)
        masks = frequent_masks(x, tuple(sorted(set(EXACT_FILTERS) | set(mh_filters), key=lambda f: f or 0)))
        per_k: dict[str, Any] = {"shingles": int(len(x))}
        # exact Jaccard (no estimator, no LSH)
        for f in EXACT_FILTERS:
            xx, oo, emptied = with_sentinels(x[masks[f]], own[masks[f]], n)
            a, b, j = exact_pairs(xx, oo, n)
            key = f"f={f}"
            per_k[key] = {"documents_without_shingles": emptied,
                          "shingles_kept": round(float(masks[f].mean()), 4),
                          "chain_exact": {nm: round(float(_pair_value(a, b, j, chain_ids[p], chain_ids[q], n)), 3)
                                          for nm, (p, q) in (("AB", ("A", "B")), ("BC", ("B", "C")),
                                                             ("CD", ("C", "D")))},
                          **planted_similarity(corpus, a, b, j)}
            for m in pair_metrics(corpus, a, b, j, THRESHOLDS, chain_ids):
                rows.append({"variant": variant, "method": "exact", "k": k, "filter": f, "P": 0, "b": 0, "r": 0,
                             **m})
        # MinHash-LSH
        sig_sets = signatures(x, own, n, [masks[f] for f in mh_filters], hasher)
        for f, sig_all in zip(mh_filters, sig_sets, strict=True):
            empty = np.nonzero(np.bincount(own[masks[f]], minlength=n) == 0)[0]
            if len(empty):
                sig_all[empty] = hasher.signatures_of(SENTINEL + empty.astype(np.uint64), np.arange(len(empty)),
                                                      len(empty))
            chain_est = {}
            for P, shape_list in shapes.items():
                sig = np.ascontiguousarray(sig_all[:, :P])
                cand = {bs: band_pairs(band_hashes(sig, *bs)) for bs in shape_list}
                union = np.unique(np.concatenate(list(cand.values()))) if cand else np.empty(0, np.int64)
                ua, ub = union // n, union % n
                est = np.concatenate([(sig[ua[i:i + 65536]] == sig[ub[i:i + 65536]]).mean(axis=1)
                                      for i in range(0, len(ua), 65536)]) if len(ua) else np.empty(0)
                for (bb, rr), keys in cand.items():
                    sel = np.isin(union, keys, assume_unique=True)
                    for m in pair_metrics(corpus, ua[sel], ub[sel], est[sel], THRESHOLDS, chain_ids):
                        rows.append({"variant": variant, "method": "minhash", "k": k, "filter": f, "P": P,
                                     "b": bb, "r": rr, **m})
                chain_est[P] = {nm: round(float((sig[chain_ids[p]] == sig[chain_ids[q]]).mean()), 3)
                                for nm, (p, q) in (("AB", ("A", "B")), ("BC", ("B", "C")), ("CD", ("C", "D")))}
            per_k[f"f={f}"]["chain_estimate"] = chain_est
        per_k["seconds"] = round(time.perf_counter() - t1, 1)
        info["per_k"][str(k)] = per_k
        print(f"  [{variant}] k={k}: {per_k['seconds']}s", file=sys.stderr, flush=True)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["cpu_seconds"] = round(time.process_time(), 1)
    info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)
    return {"variant": variant, "rows": rows, "info": info}


def _pair_value(a: np.ndarray, b: np.ndarray, j: np.ndarray, p: int, q: int, n: int) -> float:
    lo, hi = min(p, q), max(p, q)
    hit = np.nonzero((a == lo) & (b == hi))[0]
    return float(j[hit[0]]) if len(hit) else 0.0


# ------------------------------------------------------------------------------------------------ selection

CHAIN_RISK = 0.05  # at most this probability that a chain pair (at its exact Jaccard) is flagged
TARGET_RECALL = 0.95
PERM_BUDGET = 128  # more permutations only if they buy >= 0.03 recall


def combine(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per configuration present in both variants: the worse of the two for every quality figure."""
    chain_j = {}
    for res in results:
        for k, pk in res["info"]["per_k"].items():
            for fk, v in pk.items():
                if fk.startswith("f="):
                    chain_j[(res["variant"], int(k), fk)] = v["chain_exact"]
    by: dict[tuple, dict[str, dict]] = {}
    for res in results:
        for r in res["rows"]:
            key = (r["method"], r["k"], r["filter"], r["P"], r["b"], r["r"], r["thr"])
            by.setdefault(key, {})[r["variant"]] = r
    out = []
    for key, v in by.items():
        if set(v) != {"main", "full"}:
            continue
        m, f = v["main"], v["full"]
        method, k, filt, P, b, r, thr = key
        risk = 0.0
        if method == "minhash":
            for variant in ("main", "full"):
                for j in chain_j[(variant, k, f"f={filt}")].values():
                    risk = max(risk, p_flag(j, P, b, r, thr))
        else:
            risk = max(float(j >= thr) for variant in ("main", "full")
                       for j in chain_j[(variant, k, f"f={filt}")].values())
        chain = sorted({c for c in ("AB", "BC", "CD") if m[f"chain_{c}"] or f[f"chain_{c}"]})
        out.append({"method": method, "k": k, "filter": filt, "P": P, "b": b, "r": r, "thr": thr,
                    "recall": min(m["planted"], f["planted"]), "recall_main": m["planted"], "recall_full": f["planted"],
                    "gsm8k": min(m["gsm8k"], f["gsm8k"]),
                    "fp_pages_main": m["site_fp_pages"], "fp_pages_full": f["site_fp_pages"],
                    "fp_pairs_main": m["site_fp_pairs"], "fp_pairs_full": f["site_fp_pairs"],
                    "other_fp_pairs": max(m["other_fp_pairs"], f["other_fp_pairs"]),
                    "chain_flagged": chain, "chain_risk": round(risk, 4)})
    return out


def is_safe(c: dict[str, Any]) -> bool:
    return c["fp_pages_main"] == 0 and c["fp_pages_full"] == 0 and not c["chain_flagged"] \
        and c["chain_risk"] <= CHAIN_RISK


def choose(comb: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The recommended MinHash configuration and why."""
    mh = [c for c in comb if c["method"] == "minhash" and is_safe(c)]
    target = [c for c in mh if c["recall"] >= TARGET_RECALL]
    if target:
        pool, why = target, f"recall >= {TARGET_RECALL} on both variants, no false-positive page, chain apart"
    else:
        pool, why = mh, (f"no configuration reaches recall {TARGET_RECALL} with zero false-positive pages and the "
                         "chain apart: the highest recall among those that keep both")

    def rank(c: dict[str, Any]) -> tuple:
        return (round(c["recall"], 3), c["gsm8k"], c["filter"] is None, -c["chain_risk"], -c["P"], -c["thr"])

    best = max(pool, key=rank)
    small = [c for c in pool if c["P"] <= PERM_BUDGET]
    if best["P"] > PERM_BUDGET and small:
        alt = max(small, key=rank)
        if best["recall"] - alt["recall"] < 0.03:
            best = alt
    return best, why


def config_name(c: dict[str, Any]) -> str:
    f = "none" if c["filter"] is None else f"df<={c['filter']}"
    if c["method"] == "exact":
        return f"exact J, {c['k']}-shingles, filter {f}, thr {c['thr']:.2f}"
    return f"{c['k']}-shingles, {c['P']} perms = {c['b']}x{c['r']}, verify {c['thr']:.2f}, filter {f}"


# ------------------------------------------------------------------------------------------------ stage check


SCALE_DOCS = 100_000  # the scale emulated for the frequency filter


def reference_df(ref_wh: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct shingle hashes, document frequency) of the reference web corpus."""
    x, _ = shingle_table(ref_wh, k)
    return np.unique(x, return_counts=True)


def lookup_df(x: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    vals, counts = ref
    pos = np.clip(np.searchsorted(vals, x), 0, max(len(vals) - 1, 0))
    return np.where((len(vals) > 0) & (vals[pos] == x), counts[pos], 0) if len(vals) else np.zeros(len(x), np.int64)


def measure(corpus: Any, c: dict[str, Any], sig: np.ndarray, band: np.ndarray, chain_ids: dict[str, int]
            ) -> dict[str, Any]:
    n = len(corpus.docs)
    keys = band_pairs(band)
    a, b = keys // n, keys % n
    est = (sig[a] == sig[b]).mean(axis=1) if len(a) else np.empty(0)
    m = pair_metrics(corpus, a, b, est, (c["thr"],), chain_ids)[0]
    fl = est >= c["thr"] - 1e-9
    cl = corpus.classify(a, b)
    found = set(np.minimum(a, b)[cl["planted"] & fl].tolist()) | set(np.maximum(a, b)[cl["planted"] & fl].tolist())
    per_edit: dict[str, list[int]] = {}
    by_size: dict[str, list[int]] = {}
    for i in np.nonzero(corpus.is_copy)[0]:
        d = corpus.docs[i]
        kinds = "+".join(sorted(e for e in d["edits"] if e not in ("primary", "whitespace_case")))
        hit = int(i in found)
        per_edit.setdefault(kinds, []).append(hit)
        words_orig = len(corpus.docs[corpus.partner[i]]["text"].split())
        size = "<100 words" if words_orig < 100 else ("100-999 words" if words_orig < 1000 else ">=1000 words")
        by_size.setdefault(size, []).append(hit)
    single = [h for k, v in per_edit.items() if "+" not in k for h in v]
    chain_est = {nm: round(float((sig[chain_ids[p1]] == sig[chain_ids[q1]]).mean()), 3)
                 for nm, (p1, q1) in (("AB", ("A", "B")), ("BC", ("B", "C")), ("CD", ("C", "D")))}
    neg = cl["site_negative"] & fl
    fp_examples = [f"{corpus.docs[x]['id']} ~ {corpus.docs[y]['id']} ({e:.2f})"
                   for x, y, e in zip(a[neg][:8].tolist(), b[neg][:8].tolist(), est[neg][:8].tolist(), strict=True)]
    return {"pairs": m, "recall_single_edit": round(sum(single) / max(len(single), 1), 3),
            "recall_by_edit": {k: {"n": len(v), "recall": round(sum(v) / len(v), 3)} for k, v in sorted(per_edit.items())},
            "recall_by_size": {k: {"n": len(v), "recall": round(sum(v) / len(v), 3)} for k, v in sorted(by_size.items())},
            "chain_estimate": chain_est, "fp_examples": fp_examples}


def filtered_signatures(keep: np.ndarray, x: np.ndarray, own: np.ndarray, n: int, hasher: Any, c: dict[str, Any]
                        ) -> tuple[np.ndarray, np.ndarray, int]:
    """Signatures and band hashes over the kept shingles; a document left without any gets a sentinel shingle."""
    from pipeline.minhash import band_hashes

    s = signatures(x, own, n, [keep], hasher)[0]
    empty = np.nonzero(np.bincount(own[keep], minlength=n) == 0)[0]
    if len(empty):
        s[empty] = hasher.signatures_of(SENTINEL + empty.astype(np.uint64), np.arange(len(empty)), len(empty))
    return s, band_hashes(s, c["b"], c["r"]), int(len(empty))


RESCUE = 0.8  # a pair is also a duplicate when its UNFILTERED estimate reaches this (see dual_measure)


def dual_measure(corpus: Any, c: dict[str, Any], filt: tuple[np.ndarray, np.ndarray],
                 unfilt: tuple[np.ndarray, np.ndarray], chain_ids: dict[str, int]) -> dict[str, Any]:
    """A pair is a duplicate when the filtered signatures say so (>= verify threshold) OR the unfiltered ones do at
    >= RESCUE: near-copies in clusters larger than the filter's limit lose their shared shingles to the filter."""
    n = len(corpus.docs)
    kf, ku = band_pairs(filt[1]), band_pairs(unfilt[1])
    keys = np.union1d(kf, ku)
    a, b = keys // n, keys % n
    ef = np.where(np.isin(keys, kf), (filt[0][a] == filt[0][b]).mean(axis=1), 0.0) if len(a) else np.empty(0)
    eu = np.where(np.isin(keys, ku), (unfilt[0][a] == unfilt[0][b]).mean(axis=1), 0.0) if len(a) else np.empty(0)
    flag = ((ef >= c["thr"] - 1e-9) | (eu >= RESCUE - 1e-9)).astype(float)
    return {"pairs": pair_metrics(corpus, a, b, flag, (0.5,), chain_ids)[0]}


def stage_check(args: tuple[str, int, list[dict[str, Any]], int]) -> dict[str, Any]:
    """Configurations through the stage's own code: `hash_batch` (or the stage's `MinHasher(P, 1)` on the
    frequency-filtered shingles), `band_hashes`, pair metrics per edit kind, and `find_duplicates` (today's union-find
    clustering: documents removed that are copies of nothing). A frequency filter is also run as it would act on
    SCALE_DOCS documents: a shingle is dropped as well when its rate in a reference web corpus (6,800 pages not in
    the evaluation set) exceeds filter / SCALE_DOCS (the rate at which a language n-gram passes the filter there)."""
    variant, seed, configs, viral = args
    from _dedup_realsets import evaluation_corpus, reference_web_documents

    from pipeline.dedup import DedupParams, Rows, find_duplicates, hash_batch
    from pipeline.minhash import MinHasher, word_hashes, words
    from pipeline.paths import shared_data_dir

    shared = shared_data_dir()
    corpus = evaluation_corpus(shared, shared.parent / "cases", variant, seed=seed)
    n = len(corpus.docs)
    texts = [d["text"] for d in corpus.docs]
    ids = [d["id"] for d in corpus.docs]
    chain_ids = {d["id"].split("/")[1]: i for i, d in enumerate(corpus.docs) if d["group"] == "chain"}
    out: dict[str, Any] = {"variant": variant, "configs": [], "documents": n}
    t = time.perf_counter()
    wh = [word_hashes(words(x)) for x in texts]
    out["seconds_words"] = round(time.perf_counter() - t, 2)
    ref_texts = reference_web_documents(shared)
    ref_wh = [word_hashes(words(x)) for x in ref_texts]
    out["reference_docs"] = len(ref_texts)
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    refs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    excl = set(corpus.excluded.tolist())
    exact = None
    for c in configs:
        p = DedupParams(shingle_size=c["k"], num_perm=c["P"], bands=c["b"], rows=c["r"], verify_threshold=c["thr"])
        hasher = MinHasher(c["P"], STAGE_SEED)
        if c["k"] not in tables:
            tables[c["k"]] = shingle_table(wh, c["k"])
        x, own = tables[c["k"]]
        res: dict[str, Any] = {"config": c}
        if exact is None:  # the stage's own hashing once; the other configurations reuse its exact hashes
            t = time.perf_counter()
            sig, band, exact = hash_batch(texts, p)
            out["seconds_hash_batch"] = round(time.perf_counter() - t, 2)
            out["hash_batch_params"] = config_name(c)
            same = signatures(x, own, n, [np.ones(len(x), bool)], hasher)[0]
            if not np.array_equal(same, sig):
                raise SystemExit("bench_dedup_curve: signatures() no longer matches pipeline.dedup.hash_batch")
        else:
            sig, band, _ = filtered_signatures(np.ones(len(x), bool), x, own, n, hasher, c)
        if c["filter"] is not None:
            t = time.perf_counter()
            x, own = shingle_table(wh, c["k"])
            keep = frequent_masks(x, (c["filter"],))[c["filter"]]
            res["seconds_count_pass"] = round(time.perf_counter() - t + out["seconds_words"], 2)
            res["shingle_occurrences"] = int(len(x))
            res["frequent_distinct"] = int(len(np.unique(x[~keep])))
            sig, band, emptied = filtered_signatures(keep, x, own, n, hasher, c)
            res["documents_without_shingles"] = emptied
            if c["k"] not in refs:
                refs[c["k"]] = reference_df(ref_wh, c["k"])
            f_ref = c["filter"] * len(ref_texts) / SCALE_DOCS
            keep_scaled = keep & (lookup_df(x, refs[c["k"]]) <= f_ref)
            sig_s, band_s, emptied_s = filtered_signatures(keep_scaled, x, own, n, hasher, c)
            ref_vals, ref_counts = refs[c["k"]]
            res["at_scale"] = {**measure(corpus, c, sig_s, band_s, chain_ids), "documents_without_shingles": emptied_s,
                               "reference_frequent_distinct": int((ref_counts > f_ref).sum()),
                               "reference_distinct": int(len(ref_vals)),
                               "shingles_kept": round(float(keep_scaled.mean()), 3),
                               "shingles_kept_here": round(float(keep.mean()), 3), "reference_df_max": f_ref}
        res.update(measure(corpus, c, sig, band, chain_ids))
        if c["filter"] is not None:  # the filter's blind spot (big clusters) covered by the unfiltered signature
            sig_u, band_u, _ = filtered_signatures(np.ones(len(x), bool), x, own, n, hasher, c)
            res["with_unfiltered_rescue"] = dual_measure(corpus, c, (sig, band), (sig_u, band_u), chain_ids)
        rows = Rows()
        rows.add(sig, band, exact)
        cl_res = find_duplicates(rows, 0, np.zeros(n, np.float32), np.zeros(n, np.int32),
                                 lambda idx: [ids[i] for i in idx.tolist()], p)
        removed = np.nonzero(cl_res.survivor != np.arange(n))[0]
        unjust: list[str] = []
        n_unjust = 0
        for i in removed:
            s = int(cl_res.survivor[i])
            ok = corpus.partner[i] == s or (min(i, s) * n + max(i, s)) in excl or bool((exact[i] == exact[s]).all())
            if not ok:
                n_unjust += 1
                if len(unjust) < 12:
                    unjust.append(f"{ids[i]} -> {ids[s]} ({float(cl_res.similarity[i]):.2f})")
        res.update({"removed": int(len(removed)), "removed_without_cause": n_unjust,
                    "removed_without_cause_examples": unjust,
                    "chain_kept_today": {nm: bool(cl_res.survivor[chain_ids[nm]] == chain_ids[nm]) for nm in "ABCD"}})
        out["configs"].append(res)
        print(f"  [{variant}] stage check {config_name(c)}", file=sys.stderr, flush=True)
    if viral and variant == "main":
        out["viral"] = [viral_cluster(corpus, c, viral, seed) for c in configs if c["filter"] is not None]
        out["cost_probe"] = cost_probe(texts[:: max(1, n // 1500)], configs)
    return out


def cost_probe(texts: list[str], configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Back-to-back timings on the same documents (best of 3, the machine is shared): the stage's `hash_batch`
    vs the counting pass of a frequency filter (words, shingles, one sort with counts)."""
    from pipeline.dedup import DedupParams, hash_batch
    from pipeline.minhash import word_hashes, words

    out: dict[str, Any] = {"documents": len(texts)}
    for c in configs:
        p = DedupParams(shingle_size=c["k"], num_perm=c["P"], bands=c["b"], rows=c["r"], verify_threshold=c["thr"])
        th, tc = [], []
        for _ in range(3):
            t = time.perf_counter()
            hash_batch(texts, p)
            th.append(time.perf_counter() - t)
            t = time.perf_counter()
            shingles, _ = shingle_table([word_hashes(words(doc)) for doc in texts], c["k"])
            frequent_masks(shingles, (c["filter"] or 30,))
            tc.append(time.perf_counter() - t)
        out[config_name(c)] = {"hash_batch_s": round(min(th), 3), "count_pass_s": round(min(tc), 3)}
    return out


def viral_cluster(corpus: Any, c: dict[str, Any], m: int, seed: int) -> dict[str, Any]:
    """A page copied m times (planted edits) into the corpus: share of copy-original pairs whose exact Jaccard
    reaches the threshold, with and without the frequency filter (copies share > f documents' worth of shingles)."""
    import random

    from _dedup_realsets import plant_copy

    from pipeline.minhash import word_hashes, words

    page = next(d for d in sorted(corpus.docs, key=lambda d: d["id"]) if d["group"] == "python" and
                "copy_of" not in d and 300 <= len(d["text"].split()) <= 800)
    vocab = sorted({w for d in corpus.docs if d["group"] == "python" for w in d["text"].split() if w.isalpha()})
    copies = [plant_copy(page["text"], random.Random(f"viral:{seed}:{i}"), vocab)[0] for i in range(m)]
    texts = [d["text"] for d in corpus.docs] + copies
    n = len(texts)
    orig = next(i for i, d in enumerate(corpus.docs) if d["id"] == page["id"])
    wh = [word_hashes(words(t)) for t in texts]
    x, own = shingle_table(wh, c["k"])
    res: dict[str, Any] = {"page": page["id"], "copies": m, "threshold": c["thr"], "k": c["k"]}
    for f in sorted({None, c["filter"], 2 * m} - {None}) + [None]:
        keep = frequent_masks(x, (f,))[f]
        xx, oo, _ = with_sentinels(x[keep], own[keep], n)
        a, b, j = exact_pairs(xx, oo, n, min_j=0.0)
        sel = (a == orig) & (b >= len(corpus.docs))
        hits = int((j[sel] >= c["thr"]).sum())
        res[f"filter {f}"] = {"pairs_found": hits, "share": round(hits / m, 3),
                              "median_jaccard": round(float(np.median(j[sel])) if sel.any() else 0.0, 3)}
        if f is None:
            res[f"no filter, Jaccard >= {RESCUE}"] = {"pairs_found": int((j[sel] >= RESCUE).sum()),
                                                      "share": round(float((j[sel] >= RESCUE).sum()) / m, 3),
                                                      "median_jaccard": res["filter None"]["median_jaccard"]}
    return res


# ------------------------------------------------------------------------------------------------ report


def fmt_row(label: str, c: dict[str, Any]) -> str:
    return (f"| {label} | {config_name(c)} | {c['recall_main']:.3f} / {c['recall_full']:.3f} | {c['gsm8k']:.3f} | "
            f"{c['fp_pages_main']} / {c['fp_pages_full']} ({c['fp_pairs_main']} / {c['fp_pairs_full']} pairs) | "
            f"{', '.join(c['chain_flagged']) or 'none'} | {c['chain_risk']:.3f} |")


TABLE_HEAD = ("| | configuration | planted recall (extracted / full page) | GSM8K recall | false-positive pages "
              "(extracted / full page) | chain pairs flagged | P(flag) at chain J |\n|---|---|---:|---:|---:|---|---:|")


def plot(path: Path, comb: list[dict[str, Any]], rec: dict[str, Any], base: dict[str, Any],
         results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(19, 11.5))
    colors = {2: "tab:purple", 3: "tab:blue", 4: "tab:green", 5: "tab:orange", 7: "tab:red", 9: "tab:brown"}
    filt_rec = rec["filter"]
    for row, variant in enumerate(("main", "full")):
        for col, filt in enumerate((None, filt_rec)):
            ax = axes[row][col]
            key_fp = f"fp_pages_{variant}"
            key_rec = f"recall_{variant}"
            for k in sorted(colors):
                pts = sorted((c for c in comb if c["method"] == "minhash" and c["k"] == k and c["filter"] == filt
                              and c["P"] == rec["P"] and (c["b"], c["r"]) == (rec["b"], rec["r"])),
                             key=lambda c: c["thr"])
                if not pts:
                    continue
                ax.plot([c[key_fp] + 0.5 for c in pts], [c[key_rec] for c in pts], "-o", ms=3, color=colors[k],
                        label=f"{k}-shingles")
                if k == rec["k"]:
                    for c in pts:
                        if c["thr"] in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9) or c["thr"] == rec["thr"]:
                            ax.annotate(f"{c['thr']:.2f}", (c[key_fp] + 0.5, c[key_rec]), fontsize=8,
                                        xytext=(4, -10), textcoords="offset points", color=colors[k])
            for c, marker, label in ((base, "*", "baseline (today)"), (rec, "D", "recommended")):
                if c["filter"] == filt:
                    ax.plot([c[key_fp] + 0.5], [c[key_rec]], marker, ms=14, mfc="none", mec="black", mew=2,
                            label=f"{label}: {c['k']}-sh, {c['b']}x{c['r']}, {c['thr']:.2f}")
            ax.set_xscale("log")
            ax.axhline(TARGET_RECALL, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("false-positive pages on the two sites (+0.5, log scale)")
            ax.set_ylabel("planted-pair recall")
            text = "extracted text (trafilatura)" if variant == "main" else "full page text (navigation kept)"
            ftxt = "no frequency filter" if filt is None else f"shingles in > {filt} documents ignored"
            ax.set_title(f"{text}\n{rec['P']} perms = {rec['b']}x{rec['r']}, {ftxt}; labels = verify threshold",
                         fontsize=10)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    # recall vs threshold for the recommended shingle size / filter: exact and MinHash, planted and GSM8K
    ax = axes[0][2]
    for method, ls in (("exact", "--"), ("minhash", "-")):
        pts = sorted((c for c in comb if c["method"] == method and c["k"] == rec["k"] and c["filter"] == rec["filter"]
                      and (method == "exact" or (c["P"], c["b"], c["r"]) == (rec["P"], rec["b"], rec["r"]))),
                     key=lambda c: c["thr"])
        ax.plot([c["thr"] for c in pts], [c["recall"] for c in pts], ls, color="tab:blue",
                label=f"planted ({method})")
        ax.plot([c["thr"] for c in pts], [c["gsm8k"] for c in pts], ls, color="tab:green", label=f"GSM8K ({method})")
        ax.plot([c["thr"] for c in pts], [min(1.0, (c["fp_pages_main"] + c["fp_pages_full"]) / 50) for c in pts], ls,
                color="tab:red", label=f"false-positive pages / 50 ({method})")
    chain = results[0]["info"]["per_k"][str(rec["k"])][f"f={rec['filter']}"]["chain_exact"]
    for y, (nm, j) in enumerate(chain.items()):
        ax.axvline(j, color="grey", lw=0.8, ls=":")
        ax.annotate(f"chain {nm[0]}-{nm[1]}", (j, 0.25 + 0.2 * y), rotation=90, fontsize=8, color="grey")
    ax.axvline(rec["thr"], color="black", lw=1)
    ax.set_xlabel("verify threshold (Jaccard)")
    ax.set_ylabel("recall / scaled false positives")
    ax.set_title(f"{rec['k']}-shingles, filter {rec['filter']}: exact Jaccard vs MinHash {rec['P']} perms "
                 f"{rec['b']}x{rec['r']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    # similarity of planted pairs per edit, GSM8K and chain (exact Jaccard, recommended shingles and filter)
    ax = axes[1][2]
    info = results[0]["info"]["per_k"][str(rec["k"])][f"f={rec['filter']}"]
    edits = info["planted_by_edit"]
    names = list(edits)
    ax.barh(range(len(names)), [edits[e]["median"] for e in names], color="tab:blue", alpha=0.6, label="median")
    ax.plot([edits[e]["min"] for e in names], range(len(names)), "k|", ms=12, label="minimum")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"{e} (n={edits[e]['n']})" for e in names], fontsize=8)
    for j in chain.values():
        ax.axvline(j, color="grey", lw=0.8, ls=":")
    ax.axvline(rec["thr"], color="black", lw=1, label=f"threshold {rec['thr']:.2f}")
    gp = info["gsm8k_percentiles"]
    ax.axvspan(gp["5"], gp["50"], color="tab:green", alpha=0.15, label="GSM8K pairs, 5th-50th percentile")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"exact {rec['k']}-shingle Jaccard, filter {rec['filter']} (extracted-text corpus)")
    ax.set_title("planted copies by edit (dotted: the chain pairs)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Near-dedup on real documentation pages: planted-copy recall vs false-positive pages "
                 "(MinHash-LSH; issue 13)", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find(comb: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return next(c for c in comb if all(c[k] == v for k, v in kw.items()))


def frontier(comb: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """Per (k, filter[, P]): the safe configuration with the highest recall (ties: GSM8K recall)."""
    best: dict[tuple, dict[str, Any]] = {}
    for c in comb:
        if c["method"] != method or not is_safe(c):
            continue
        g = (c["k"], c["filter"] or 0, c["P"])
        if g not in best or (c["recall"], c["gsm8k"]) > (best[g]["recall"], best[g]["gsm8k"]):
            best[g] = c
    return [best[g] for g in sorted(best)]


def cheapest_at_target(comb: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """Per (k, filter): among configurations with recall >= target, the one with fewest false-positive pages."""
    best: dict[tuple, dict[str, Any]] = {}
    for c in comb:
        if c["method"] != method or c["recall"] < TARGET_RECALL or (method == "minhash" and c["P"] > PERM_BUDGET):
            continue
        g = (c["k"], c["filter"] or 0)
        score = (c["fp_pages_main"] + c["fp_pages_full"], len(c["chain_flagged"]), -c["recall"])
        if g not in best or score < (best[g]["fp_pages_main"] + best[g]["fp_pages_full"],
                                     len(best[g]["chain_flagged"]), -best[g]["recall"]):
            best[g] = c
    return [best[g] for g in sorted(best)]


def write_report(out: Path, meta: dict[str, Any], results: list[dict[str, Any]], comb: list[dict[str, Any]],
                 rec: dict[str, Any], why: str, base: dict[str, Any], checks: list[dict[str, Any]],
                 cands: list[dict[str, Any]], cand_table: dict[str, Any], all_checks: list[dict[str, Any]]) -> str:
    info = {r["variant"]: r["info"] for r in results}
    lines: list[str] = []
    w = lines.append
    w("# Near-dedup defaults chosen on real data (issue 13)\n")
    w(f"`{meta['command']}` — {meta['machine']}; {meta['date']}; commit {meta['commit']}"
      f"{' (working tree modified: ' + meta['dirty'] + ')' if meta['dirty'] else ''}; "
      f"`pipeline.minhash.NORMALIZATION_VERSION` = {meta['normalization']}. Wall {meta['wall_s']:.0f} s "
      f"(sweep {meta['sweep_s']:.0f} s in 2 processes, stage check {meta['check_s']:.0f} s), "
      f"CPU {meta['cpu_s']:.0f} s, peak RSS {meta['peak_rss_mb']:.0f} MB per process.\n")
    w("## Recommendation\n")
    w(f"Chosen: **{config_name(rec)}**. Sweep: {why}. Candidates (the best safe configuration per shingle size) "
      "were then re-run through the stage's own hasher and, for a frequency filter, as the filter would act on "
      f"{SCALE_DOCS:,} documents (see below); the chosen one stays safe everywhere with the best worst-case recall.\n")
    w(TABLE_HEAD)
    w(fmt_row("baseline (today's defaults)", base))
    w(fmt_row("**recommended**", rec))
    for c in cands:
        if c is not rec:
            w(fmt_row("other candidate", c))
    w("")
    w("Pairs are counted as the stage judges them: both documents share an LSH band and the estimated Jaccard "
      "reaches the verify threshold (sweep: columns of one 256-permutation hasher). `P(flag) at chain J` is the "
      "probability that a pair with the exact Jaccard of a chain.jsonl pair is flagged (S-curve x binomial "
      "estimate; the worst of the three pairs); a configuration is *safe* when it flags no site page, flags no "
      f"chain pair and that probability is <= {CHAIN_RISK}.\n")
    w("Candidates through the stage's own hasher (worst of: extracted, full page, and both again with the filter "
      f"as at {SCALE_DOCS:,} documents):\n")
    w("| candidate | safe everywhere | worst planted recall | worst GSM8K recall | false-positive pages (each view) |")
    w("|---|---|---:|---:|---|")
    for name, v in cand_table.items():
        w(f"| {name} | {'yes' if v['safe'] else 'no'} | {v['recall_worst']:.3f} | {v['gsm8k_worst']:.3f} | "
          f"{v['fp_pages']} |")
    w("")
    w("### Stage check (the stage's own `hash_batch` / `find_duplicates`, today's union-find clustering)\n")
    w("| | variant | planted recall | single-edit copies | GSM8K recall | false-positive pages | chain estimates "
      "A-B / B-C / C-D | chain docs kept | documents removed | removed that are copies of nothing |")
    w("|---|---|---:|---:|---:|---:|---|---|---:|---:|")
    for chk in checks:
        for cc, label in zip(chk["configs"], ("baseline", "recommended"), strict=True):
            p, ce = cc["pairs"], cc["chain_estimate"]
            kept = "".join(k for k, v in cc["chain_kept_today"].items() if v) or "-"
            w(f"| {label} | {chk['variant']} | {p['planted']:.3f} | {cc['recall_single_edit']:.3f} | {p['gsm8k']:.3f} "
              f"| {p['site_fp_pages']} | {ce['AB']:.2f} / {ce['BC']:.2f} / {ce['CD']:.2f} | {kept} | {cc['removed']} "
              f"| {cc['removed_without_cause']} |")
            if "with_unfiltered_rescue" in cc:
                d = cc["with_unfiltered_rescue"]["pairs"]
                w(f"| {label} OR unfiltered estimate >= {RESCUE} | {chk['variant']} | {d['planted']:.3f} | | "
                  f"{d['gsm8k']:.3f} | {d['site_fp_pages']} | flagged: "
                  f"{', '.join(x for x in ('AB', 'BC', 'CD') if d[f'chain_{x}']) or 'none'} | | | |")
            if "at_scale" in cc:
                a, ae = cc["at_scale"]["pairs"], cc["at_scale"]["chain_estimate"]
                w(f"| {label}, filter as at {SCALE_DOCS:,} docs | {chk['variant']} | {a['planted']:.3f} | "
                  f"{cc['at_scale']['recall_single_edit']:.3f} | {a['gsm8k']:.3f} | {a['site_fp_pages']} | "
                  f"{ae['AB']:.2f} / {ae['BC']:.2f} / {ae['CD']:.2f} | | | |")
    w("")
    w("`documents removed` counts every document the stage would drop (planted copies, GSM8K rows, natural "
      "duplicates included); `copies of nothing` = removed although its survivor is neither its planted/aligned "
      "partner, nor a natural duplicate of it, nor an exact copy (with today's union-find clustering, which the "
      "lead is replacing).\n")
    w("Planted recall by edit under the recommendation (extracted-text corpus; `+` = two content edits on one copy):\n")
    rc = checks[0]["configs"][1]
    bc = checks[0]["configs"][0]
    w("| edit | copies | recall (baseline) | recall (recommended) |\n|---|---:|---:|---:|")
    for e, v in rc["recall_by_edit"].items():
        w(f"| {e} | {v['n']} | {bc['recall_by_edit'][e]['recall']:.3f} | {v['recall']:.3f} |")
    for e, v in rc["recall_by_size"].items():
        w(f"| original page {e} | {v['n']} | {bc['recall_by_size'][e]['recall']:.3f} | {v['recall']:.3f} |")
    w("")
    ex = checks[0]["configs"][0]["removed_without_cause_examples"][:6]
    if ex:
        w("Baseline removals without cause (examples, extracted text): " + "; ".join(f"`{e}`" for e in ex) + "\n")
    w("## The sets\n")
    for v in ("main", "full"):
        s = info[v]["sizes"]
        w(f"- **{'extracted' if v == 'main' else 'full page'}** corpus: {s['documents']} documents = "
          f"{s['sqlite_pages']} SQLite pages + {s['python_pages']} Python reST pages (min-length filter: 200 chars, "
          f"30 words) + {s['planted_copies']} planted copies + {s['gsm8k_pairs']} x 2 GSM8K rows + "
          f"{s['chain_docs']} chain docs; {s['natural_duplicate_pairs']} natural duplicate pairs excluded "
          f"({s['excluded_pairs_incl_copies']} with the copies of their pages).")
    w(f"- Planted edits (kinds per copy, extracted corpus): {info['main']['planted_edits']}. Each copy gets one "
      "content edit drawn uniformly from substitute (2-10 % of words replaced by words of the same site), reorder "
      "(chunks of >= 40 words shuffled), truncate (last 10-20 % of words cut), boilerplate (a header and a footer "
      "line added); a second one with probability 0.25; a whitespace/case change with probability 0.5 (invisible "
      "to `words`). 100 originals per site, seeded.")
    w("- GSM8K: test vs test_socratic aligned by line (1,319 pairs); a document = question + newline + answer "
      "(calculator annotations and the `#### n` line kept), as a benchmark row would enter the corpus.\n")
    w("Similarity of the positives (exact Jaccard, extracted-text corpus, no filter) against the chain pairs:\n")
    w("| shingles | planted 5th / 10th / 50th pct | GSM8K 5th / 10th / 50th pct | chain A-B / B-C / C-D |")
    w("|---:|---|---|---|")
    for k, pk in info["main"]["per_k"].items():
        d = pk["f=None"]
        pp, gp, ch = d["planted_percentiles"], d["gsm8k_percentiles"], d["chain_exact"]
        w(f"| {k} | {pp['5']:.2f} / {pp['10']:.2f} / {pp['50']:.2f} | {gp['5']:.2f} / {gp['10']:.2f} / "
          f"{gp['50']:.2f} | {ch['AB']:.2f} / {ch['BC']:.2f} / {ch['CD']:.2f} |")
    w("")
    w("### Natural duplicates excluded (neither positive nor negative)\n")
    for v in ("main", "full"):
        nat = info[v]["natural"]
        kinds: dict[str, int] = {}
        for r in nat.values():
            kind = " ".join(r.split(" ")[:2]) if r.startswith(("same release", "by eye")) else r.split(" (")[0]
            kinds[kind.rstrip(":")] = kinds.get(kind.rstrip(":"), 0) + 1
        w(f"- {'extracted' if v == 'main' else 'full page'}: {len(nat)} pairs — {kinds}")
    w("- `contained`: a page whose content is >= 90 % inside another (each C-API page inside capi3ref.html, "
      "each release inside changes.html, session/* inside session.html, syntax/* inside syntaxdiagrams.html): "
      "aggregate pages, Jaccard < 0.2, never near a threshold.")
    w("- `same release`: the release-log pages of one release (3.X.Y.Z of 3.X.Y before 3.9, 3.X.Z of 3.X.0 after): "
      "each patch page repeats the release's notes.")
    w("- near-identical (content = the page without its lines found on >= 20 pages of the site; difflib ratio of "
      "the content words >= 0.8) or by eye. Release-log pages: "
      + ", ".join(f"{len(set(k for k, r in info[v]['natural'].items() if 'releaselog/' in k and not r.startswith(('contained', 'same'))))} pairs ({'extracted' if v == 'main' else 'full page'})" for v in ("main", "full"))
      + " (patch releases of one release, `3_30_1`/`3_31_1`/`3_8_10_1` whose extracted text lost its lists and "
      "kept only the same headings, and `current.html` = `3_40_1.html`); the others:\n")
    both = sorted(set(k for v in ("main", "full") for k, r in info[v]["natural"].items()
                      if "releaselog/" not in k and not r.startswith(("contained", "same"))))
    for k in both:
        rs = [f"{'extracted' if v == 'main' else 'full page'}: {info[v]['natural'][k]}" for v in ("main", "full")
              if k in info[v]["natural"]]
        w(f"  - `{k}` — " + "; ".join(rs))
    w("- Not excluded although the rule would (by eye, full-page text): join-constraint / join-operator, "
      "join-constraint / result-column, signed-number / type-name: different syntax diagrams whose pages share "
      "one long line of 16 'See also' file names.\n")
    w("## Exact Jaccard (no estimator, no LSH): the best any threshold can do\n")
    w("Per shingle size and frequency filter: the highest planted recall with zero false-positive pages on both "
      "variants and no chain pair at or above the threshold.\n")
    w("| shingles | filter | threshold | planted recall (extr. / full) | GSM8K | chain J (A-B/B-C/C-D) |")
    w("|---:|---|---:|---|---:|---|")
    for c in frontier(comb, "exact"):
        ch = info["main"]["per_k"][str(c["k"])][f"f={c['filter']}"]["chain_exact"]
        w(f"| {c['k']} | {c['filter'] or 'none'} | {c['thr']:.2f} | {c['recall_main']:.3f} / {c['recall_full']:.3f} "
          f"| {c['gsm8k']:.3f} | {ch['AB']:.2f} / {ch['BC']:.2f} / {ch['CD']:.2f} |")
    w("")
    w(f"What recall {TARGET_RECALL} costs (exact Jaccard; fewest false-positive pages among thresholds reaching it):\n")
    w("| shingles | filter | threshold | planted recall | false-positive pages (extr. / full) | chain flagged |")
    w("|---:|---|---:|---:|---|---|")
    for c in cheapest_at_target(comb, "exact"):
        w(f"| {c['k']} | {c['filter'] or 'none'} | {c['thr']:.2f} | {c['recall']:.3f} | {c['fp_pages_main']} / "
          f"{c['fp_pages_full']} | {', '.join(c['chain_flagged']) or 'none'} |")
    w("")
    w("## MinHash-LSH sweep: best safe configuration per shingle size, filter and permutations\n")
    w("| shingles | filter | perms | bands x rows | verify | planted recall (extr. / full) | GSM8K | P(flag) chain |")
    w("|---:|---|---:|---|---:|---|---:|---:|")
    for c in frontier(comb, "minhash"):
        w(f"| {c['k']} | {c['filter'] or 'none'} | {c['P']} | {c['b']}x{c['r']} | {c['thr']:.2f} | "
          f"{c['recall_main']:.3f} / {c['recall_full']:.3f} | {c['gsm8k']:.3f} | {c['chain_risk']:.3f} |")
    w("")
    w(f"MinHash, <= {PERM_BUDGET} perms, recall >= {TARGET_RECALL}: fewest false-positive pages per shingle size "
      "and filter:\n")
    w("| configuration | planted recall | false-positive pages (extr. / full) | chain flagged | GSM8K |")
    w("|---|---:|---|---|---:|")
    for c in cheapest_at_target(comb, "minhash"):
        w(f"| {config_name(c)} | {c['recall']:.3f} | {c['fp_pages_main']} / {c['fp_pages_full']} | "
          f"{', '.join(c['chain_flagged']) or 'none'} | {c['gsm8k']:.3f} |")
    w("")
    rc = checks[0]["configs"][1]
    if rec["filter"] is not None:
        w("## The frequency filter: what it costs and where it fails\n")
        for chk in all_checks:
            cc = chk["configs"][[x["config"] for x in chk["configs"]].index(rec)]
            sc = cc["at_scale"]
            w(f"- {chk['variant']}: {cc['shingle_occurrences']:,} distinct-per-document {rec['k']}-shingles counted; "
              f"{cc['frequent_distinct']:,} "
              f"distinct shingles are frequent (> {rec['filter']} documents); documents left without any shingle: "
              f"{cc['documents_without_shingles']} here, {sc['documents_without_shingles']} with the filter as at "
              f"{SCALE_DOCS:,} documents (shingles kept: {sc['shingles_kept_here']:.0%} here, "
              f"{sc['shingles_kept']:.0%} at scale).")
        chk = all_checks[0]
        cc = chk["configs"][[x["config"] for x in chk["configs"]].index(rec)]
        per_doc = cc["shingle_occurrences"] / chk["documents"]
        occ_100k = per_doc * SCALE_DOCS
        probe = chk["cost_probe"][config_name(rec)]
        ratio = probe["count_pass_s"] / probe["hash_batch_s"]
        w(f"- At {SCALE_DOCS:,} documents of this mix (~{per_doc:.0f} distinct shingles each): {occ_100k / 1e6:.0f} M "
          f"shingle hashes = {occ_100k * 8 / 2**20:.0f} MB to count by one in-memory sort (x2 while sorting), vs the "
          "stage's ~70 MB per million documents for clustering today (its 550 MB peak at 100k is buffers); a "
          "disk-partitioned count (shingle hashes spilled by their top bits, as the signatures are spilled now, one "
          "partition counted at a time) needs ~1/16 of that with 16 partitions, and only the frequent set stays in "
          f"memory ({cc['at_scale']['reference_frequent_distinct']:,} distinct language {rec['k']}-grams of the "
          f"reference web text pass the rate of {rec['filter']}/{SCALE_DOCS:,}, plus the boilerplate: ~8 B each). "
          f"Time: the counting pass costs {ratio:.0%} of the stage's `hash_batch` with these parameters (best of 3, "
          f"back to back on {chk['cost_probe']['documents']} documents: {probe['count_pass_s']:.2f} s vs "
          f"{probe['hash_batch_s']:.2f} s), on top of a second read of the input (or keep pass 1's shingle hashes on "
          "disk, ~8 B per shingle).")
        for v in (all_checks[0].get("viral") or []):
            if (v["k"], v["threshold"]) == (rec["k"], rec["thr"]):
                parts = "; ".join(f"{key}: {val['pairs_found']}/{v['copies']} copy-original pairs at or above "
                                  f"{RESCUE if str(RESCUE) in key else 'the threshold'} (median Jaccard "
                                  f"{val['median_jaccard']:.2f})"
                                  for key, val in v.items() if key.startswith(("filter", "no filter")))
                w(f"- A page copied {v['copies']} times (`{v['page']}`, planted edits), exact Jaccard: {parts}.")
        w("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def warm_caches(seed: int, jobs: int) -> None:
    """Extract the SQLite pages and judge the natural pairs once here (cached), so workers never start a pool."""
    from _dedup_realsets import natural_duplicates, python_pages, sqlite_pages

    from pipeline.paths import shared_data_dir

    shared = shared_data_dir()
    if shared is None:
        sys.exit("../shared/data is needed for this benchmark")
    python = python_pages(shared)
    for variant in ("main", "full"):
        natural_duplicates(sqlite_pages(shared, variant, jobs=jobs) + python)


def run_sweep(ks: tuple[int, ...], shapes: dict, seed: int, jobs: int) -> list[dict[str, Any]]:
    tasks = [(v, seed, ks, shapes, MINHASH_FILTERS) for v in ("main", "full")]
    if jobs <= 1:
        return [sweep_variant(t) for t in tasks]
    with mp.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
        return pool.map(sweep_variant, tasks)


def candidates(comb: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shingle size, the safe MinHash configuration (<= PERM_BUDGET perms) with the highest recall; those within
    0.10 of the best go to the stage check."""
    best: dict[int, dict[str, Any]] = {}
    for c in comb:
        if c["method"] == "minhash" and c["P"] <= PERM_BUDGET and is_safe(c):
            if c["k"] not in best or (c["recall"], c["gsm8k"], -c["P"]) > (best[c["k"]]["recall"],
                                                                          best[c["k"]]["gsm8k"], -best[c["k"]]["P"]):
                best[c["k"]] = c
    if not best:
        return []
    top = max(c["recall"] for c in best.values())
    return [best[k] for k in sorted(best) if best[k]["recall"] >= top - 0.10]


def final_choice(cands: list[dict[str, Any]], checks: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The candidate that stays safe through the stage's own hasher, on both variants, here and at SCALE_DOCS
    (emulated), with the best worst-case planted recall; then GSM8K recall, fewer perms, no filter."""
    table: dict[str, Any] = {}
    for ci, c in enumerate(cands):
        rows = [chk["configs"][ci + 1] for chk in checks]
        views = [r for r in rows] + [r["at_scale"] for r in rows if "at_scale" in r]
        safe = all(v["pairs"]["site_fp_pages"] == 0 and not any(v["pairs"][f"chain_{x}"] for x in ("AB", "BC", "CD"))
                   for v in views)
        table[config_name(c)] = {"safe": safe, "recall_worst": min(v["pairs"]["planted"] for v in views),
                                 "gsm8k_worst": min(v["pairs"]["gsm8k"] for v in views),
                                 "fp_pages": [v["pairs"]["site_fp_pages"] for v in views]}
    order = sorted(range(len(cands)), key=lambda i: (table[config_name(cands[i])]["safe"],
                                                     table[config_name(cands[i])]["recall_worst"],
                                                     table[config_name(cands[i])]["gsm8k_worst"],
                                                     -cands[i]["P"], cands[i]["filter"] is None), reverse=True)
    return cands[order[0]], table


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def git_state() -> tuple[str, str]:
    import subprocess

    def run(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in run("status", "--porcelain").splitlines()
             if line[3:].startswith(("pipeline/minhash.py", "pipeline/dedup.py"))]
    return run("rev-parse", "--short", "HEAD"), ", ".join(dirty)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shingle sizes 2, 3, 5 and four LSH shapes only")
    ap.add_argument("--seed", type=int, default=0, help="seed of the planted copies")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--viral", type=int, default=60, help="copies of one page for the frequency-filter caveat")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for dedup_curve.{json,md,png}")
    ap.add_argument("--from-raw", type=Path, help="reuse a sweep saved with --save-raw (re-render only)")
    ap.add_argument("--save-raw", type=Path, help="save the raw sweep here")
    args = ap.parse_args()
    ks, shapes = SHINGLES, SHAPES
    if args.quick:
        ks = (2, 3, 5)
        shapes = {112: [(37, 3), (28, 4), (14, 8)], 128: [(42, 3)]}
    from pipeline.minhash import NORMALIZATION_VERSION

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    warm_caches(args.seed, args.jobs)
    if args.from_raw:
        results = json.loads(args.from_raw.read_text())["results"]
    else:
        results = run_sweep(ks, shapes, args.seed, args.jobs)
        if args.save_raw:
            args.save_raw.write_text(json.dumps({"results": results}))
    t_sweep = time.perf_counter() - t0
    comb = combine(results)
    base = find(comb, method="minhash", **BASELINE)
    sweep_pick, why = choose(comb)
    cands = candidates(comb) or [sweep_pick]
    t1 = time.perf_counter()
    tasks = [(v, args.seed, [base, *cands], args.viral) for v in ("main", "full")]
    with mp.get_context("spawn").Pool(min(args.jobs, 2)) as pool:
        checks = pool.map(stage_check, tasks)
    t_check = time.perf_counter() - t1
    rec, cand_table = final_choice(cands, checks)
    rec_i = cands.index(rec) + 1
    # the report shows the baseline and the chosen configuration
    checks_view = [{"variant": chk["variant"], "configs": [chk["configs"][0], chk["configs"][rec_i]],
                    "viral": chk.get("viral")} for chk in checks]
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    commit, dirty = git_state()
    meta = {"command": "python benchmarks/bench_dedup_curve.py" + (" --quick" if args.quick else ""),
            "machine": machine(), "date": time.strftime("%Y-%m-%d"), "commit": commit, "dirty": dirty,
            "normalization": NORMALIZATION_VERSION, "wall_s": wall, "sweep_s": t_sweep, "check_s": t_check,
            "cpu_s": time.process_time() - cpu0 + children.ru_utime + children.ru_stime,
            "peak_rss_mb": max(children.ru_maxrss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
            "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)
    md = write_report(args.out, meta, results, comb, rec, why, base, checks_view, cands, cand_table, checks)
    (args.out / "dedup_curve.md").write_text(md + "\n")
    plot(args.out / "dedup_curve.png", comb, rec, base, results)
    compact = [[r[c] for c in COLS] for res in results for r in res["rows"]]
    (args.out / "dedup_curve.json").write_text(json.dumps({
        "meta": meta, "baseline": base, "recommended": rec, "sweep_pick": sweep_pick, "why": why,
        "candidates": cand_table, "grid": {"shingles": list(ks), "exact_filters": list(EXACT_FILTERS),
                                           "minhash_filters": list(MINHASH_FILTERS),
                                           "shapes": {str(k): v for k, v in shapes.items()},
                                           "thresholds": list(THRESHOLDS)},
        "info": {r["variant"]: r["info"] for r in results}, "stage_check": checks,
        "columns": list(COLS), "rows": compact}, separators=(",", ":")) + "\n")
    print(md)
    print(f"wrote {args.out}/dedup_curve.{{json,md,png}} in {wall:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
