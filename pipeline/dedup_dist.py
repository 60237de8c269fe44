"""The dedup stage as Ray tasks (`run.executor: ray`): the same survivors and stats as `pipeline.dedup`.

Phases (each a set of independent tasks; the driver holds only per-task results, never per-document arrays):

1. hash        one task per input file: signatures, band hashes (band-major, so a band is one contiguous
               run of a file), exact hashes, edu scores, source priorities and ids (UTF-8 with byte offsets,
               for random access) to `state/work/seg-<k>.*`.
2. exact       one task per hash range of the exact hash: the exact groups, each member with its group's
               first row (its representative) and its best member in survivor order.
3. buckets     one task per (band, hash range of the band): the representatives sharing a bucket, ordered by
               survivor order (a representative ranks as its group's best member; the order is sorted from
               the rows' (edu score, source priority, id) keys, so no global rank is needed), give the
               candidate pairs of `dedup.band_buckets`. A bucket never spans two ranges.
4. verify      one task per partition of the pairs' first rows: the pairs made unique across bands, verified
               from the signatures (explicit reads, VERIFY_CHUNK pairs at a time); the near misses.
5. components  connected components of the verified pairs plus the exact groups (`pipeline.dedup_cc`:
               Large-Star / Small-Star rounds, one task per node partition); each node, verified edge and
               exact-group member sent to its component's label partition.
6. cluster     one task per label partition: survivor-verified star clustering (`dedup._greedy`,
               `dedup._assign`, the single-process code) over its components. A removal only follows a
               verified edge or an exact group, so no decision looks across a component: per component is
               the same as over all rows. Decisions (removed row, survivor, reason, similarity, survivor id)
               go to parquet with one row group per input file.
7. filter      one task per input file: kept documents to `kept/part-<k>-*.parquet`, removed ones to
               `removed/<reason>-<k>-*.parquet`, its removals to a pairs part, its kept rows' index piece;
               file names come from the input file's position, so kept/ read in name order is the local
               path's stream, and a retried task overwrites its own files.

Why the same result whatever the number of workers: rows are numbered in input-file order (as one pass
numbers them), every decision is a function of the rows' content and keys, and per-task parts are merged in
file order. `tests/test_scale.py` checks it row by row and figure by figure.

Memory per task: hash, one input file; exact and buckets, `rows_per_task` rows of one hash range (~24 B
each, plus the keys of the rows in buckets of >= 2) and a chunk of CHUNK_ROWS; verify, the pairs of one
partition (16 B each) and one chunk's signatures; components, the edges of one node partition (~16 B each,
x3 to sort; CC_NODES rows a partition); cluster, the verified edges and nodes of its components (at most
CLUSTER_ROWS nodes, unless one component is larger: a component is never split, so the largest set of
mutually verified copies bounds it); filter, one batch of documents. Driver: per-task results (counts, the
audit's 10-20 pairs, cluster-size counts), O(tasks).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dedup import (
    EXACT,
    INDEX_FORMAT,
    KEEP,
    NEAR,
    REASONS,
    WINDOW,
    DedupParams,
    _assign,
    _audit,
    _greedy,
    _PairsWriter,
    _priority_rank,
    _read_index_ids,
    _runs,
    _scores,
    _start,
    _usable,
    band_buckets,
    hash_batch,
    minhash_jaccard,
    prior_rows,
    publish_index,
    set_stats,
)
from pipeline.dedup_cc import components, symmetric_parts, write_parts
from pipeline.errors import TextbookError
from pipeline.stats import StageStats

CHUNK_ROWS = 262_144  # rows of a column read at once by an edge task
ROWS_PER_TASK = 2_000_000  # rows of one column an edge task holds: sets the number of hash ranges per column
CC_NODES = 250_000  # rows per node partition of the components step (their edges: <= 2 x (bands + 1) each)
CLUSTER_ROWS = 1_000_000  # graph nodes per cluster task (~100 B each), unless one component is larger
VERIFY_CHUNK = 32_768  # pairs compared at once: their signature rows, ~4 * 4 * num_perm B a pair (~60 MB)
READ_SPAN = 1 << 20  # bytes of a file read at once when gathering rows: rows closer than this come in one read
AUDIT_ROWS, NEAR_MISSES = 10, 20  # what `dedup.find_duplicates` and `dedup._audit_rows` keep for the audit


def run_distributed(ctx: Any, engine: Any, rows_per_task: int | None = None) -> StageStats:
    """The stage on `engine` (`pipeline.scale.Engine`); rows_per_task bounds an edge task (default ROWS_PER_TASK)."""
    rows_per_task = rows_per_task or ROWS_PER_TASK
    section = ctx.section
    p = DedupParams.from_section(section)
    stats = StageStats(ctx.name)
    work = _start(ctx, p)
    t_start = time.time()
    files = [str(f) for f in ctx.inputs]
    order = list(section.source_priority)
    hashed = engine.map(_hash_file, [(k, f, str(work), p, order, section.batch_size) for k, f in enumerate(files)],
                        label="dedup: hash")
    per_source_in: Counter[str] = Counter()
    for h in hashed:
        stats.merge(h["counts"])
        per_source_in.update(h["per_source"])
    n_new = sum(h["rows"] for h in hashed)
    seconds_hash = time.time() - t_start

    store, prior_docs, n_prior = _store(ctx, p, hashed, work)
    t0 = time.time()
    label_files, clusters, graph = _graph(engine, store, p, n_prior + n_new, n_prior, rows_per_task, work)
    t1 = time.time()
    clustered = engine.map(_cluster_task, [(label_files, graph["edges_q"], graph["exact_q"], q, store, n_prior,
                                            f"{work}/decisions-{q:05d}.parquet") for q in range(clusters)],
                           label="dedup: cluster")
    result = _merge_clusters(clustered, graph, p)
    t2 = time.time()
    want_text = {x for a, b, _ in result.lowest + result.near_misses[:AUDIT_ROWS] for x in (a, b) if x >= n_prior}
    removed_per_source, pairs, texts = _filter(ctx, engine, files, hashed, clustered, work, n_prior, stats,
                                               want_text)
    if section.keep_index:
        _write_index(ctx.out_dir / "index", prior_docs, store, hashed, work, p)
    shutil.rmtree(work, ignore_errors=True)
    result.figures["seconds_buckets"] = round(t1 - t0, 3)  # exact groups, buckets, verification, components
    result.figures["seconds_cluster"] = round(t2 - t1, 3)
    set_stats(stats, p, section, result, n_new, n_prior, per_source_in, removed_per_source, pairs,
              _audit(result.lowest, result.near_misses[:AUDIT_ROWS], texts, result.kept_ids, p.verify_threshold),
              ctx.out_dir, time.time() - t_start, seconds_hash)
    stats.set("engine", {**engine.describe(), "hash_tasks": len(files),
                         "band_tasks": p.bands * max(1, math.ceil((n_prior + n_new) / rows_per_task)) if p.near else 0,
                         "component_rounds": graph["rounds"], "component_partitions": graph["partitions"],
                         "graph_nodes": graph["nodes"], "cluster_tasks": clusters,
                         "largest_cluster_task_rows": max((c["nodes"] for c in clustered), default=0)})
    return stats


# ---------------------------------------------------------------------------------------------- 1. hash


def _hash_file(k: int, path: str, work: str, p: DedupParams, order: list[str], batch_size: int) -> dict[str, Any]:
    """Task: hash one input file into `work/seg-<k>.*`; its counts and sources."""
    from datatrove.utils.batching import batched

    from pipeline.documents import iter_documents

    stats = StageStats("dedup")
    rank = _priority_rank(order)
    seg = Path(work) / f"seg-{k:06d}"
    bands: list[np.ndarray] = []
    id_bytes: list[int] = [0]
    per_source: Counter[str] = Counter()

    def unreadable(reason: str, where: str) -> None:
        stats.read()
        stats.error_at(reason, where)

    def usable_docs() -> Any:
        for doc in iter_documents([path], on_error=unreadable, on_repair=stats.on_repair):
            stats.read()
            if not _usable(doc):
                stats.drop("empty_text")
                continue
            yield doc

    n = 0
    with (open(f"{seg}.sig.u32", "wb") as fs, open(f"{seg}.exact.u64", "wb") as fe, open(f"{seg}.ids.bin", "wb") as fi,
          open(f"{seg}.score.f32", "wb") as fsc, open(f"{seg}.prio.i32", "wb") as fp):
        for docs in batched(usable_docs(), batch_size):
            sig, band, exact = hash_batch([d["text"] for d in docs], p)
            fs.write(sig.tobytes())
            fe.write(exact.tobytes())
            lines = [str(d["id"]).encode("utf-8", "surrogatepass") for d in docs]
            fi.write(b"".join(lines))
            id_bytes.extend(len(x) for x in lines)
            fsc.write(_scores([d.get("edu_score") for d in docs], stats).tobytes())
            fp.write(np.array([rank(d.get("source")) for d in docs], dtype=np.int32).tobytes())
            bands.append(band)
            per_source.update(d.get("source") or "unknown" for d in docs)
            n += len(docs)
    np.cumsum(np.asarray(id_bytes, dtype=np.uint64)).tofile(f"{seg}.ids.off")  # n + 1 byte offsets
    band_all = np.concatenate(bands) if bands else np.empty((0, p.bands), np.uint64)
    np.ascontiguousarray(band_all.T).tofile(f"{seg}.bandT.u64")  # band-major: an edge task reads one run
    return {"rows": n, "counts": stats.counts(), "per_source": dict(per_source)}


def _store(ctx: Any, p: DedupParams, hashed: list[dict[str, Any]], work: Path
           ) -> tuple[list[dict[str, Any]], list[tuple[Path, int]], int]:
    """Where every row lives: the earlier indexes' rows (dedup.index_in, row-major) then this run's
    segments, each `{"first": global row, "n": rows, paths...}` (plain data: it travels with the tasks)."""
    rows, prior_docs = prior_rows(ctx, p)  # validates the indexes (parameters, not this run's own)
    store: list[dict[str, Any]] = []
    for (docs_path, first), seg in zip(prior_docs, rows.segments, strict=True):
        d = docs_path.parent
        store.append({"first": first, "n": len(seg["sig"]), "sig": str(d / "sig.u32"), "band": str(d / "band.u64"),
                      "band_major": False, "exact": str(d / "exact.u64"), "docs": str(docs_path)})
    first = n_prior = len(rows)
    for k, h in enumerate(hashed):
        seg = f"{work}/seg-{k:06d}"
        store.append({"first": first, "n": h["rows"], "sig": f"{seg}.sig.u32", "band": f"{seg}.bandT.u64",
                      "band_major": True, "exact": f"{seg}.exact.u64", "score": f"{seg}.score.f32",
                      "prio": f"{seg}.prio.i32", "ids": f"{seg}.ids.bin", "ids_off": f"{seg}.ids.off"})
        first += h["rows"]
    return store, prior_docs, n_prior


# ---------------------------------------------------------------------------------------------- 2-4. pairs


def _graph(engine: Any, store: list[dict[str, Any]], p: DedupParams, n: int, n_prior: int, rows_per_task: int,
           work: Path) -> tuple[list[str], int, dict[str, Any]]:
    """Steps 2-4: exact groups, candidate pairs, verification, components of the verified graph (with the exact
    groups); (label files, label partitions, figures incl. the near misses)."""
    parts = max(1, math.ceil(n / rows_per_task))
    cc_parts = max(1, math.ceil(n / min(rows_per_task, CC_NODES)))
    segs = len(store)
    figures: dict[str, Any] = {"exact_duplicates": 0} if p.exact else {}
    exact_seg: list[str] = []
    exact_cc: list[str] = []
    exact_edges: list[str] = []
    if p.exact:
        items = [(store, n_prior, part, parts, cc_parts, f"{work}/exact-{part:05d}") for part in range(parts)]
        figures["exact_duplicates"] = sum(engine.map(_exact_task, items, label="dedup: exact"))
        exact_seg = [f"{it[-1]}.seg" for it in items]
        exact_cc = [f"{it[-1]}.cc" for it in items]
        exact_edges = [f"{it[-1]}.edge" for it in items]
    misses: list[tuple[int, int, float]] = []
    verified_cc: list[str] = []
    weighted: list[str] = []
    if p.near and n:
        items = [(store, n_prior, exact_seg, band, p.bands, part, parts, cc_parts, f"{work}/pairs-{band:03d}-{part:05d}")
                 for band in range(p.bands) for part in range(parts)]
        engine.map(_bucket_task, items, label="dedup: buckets")
        pair_files = [it[-1] for it in items]
        threshold = p.verify_threshold if p.verify_threshold is not None else 0.0
        ver = engine.map(_verify_task, [(store, pair_files, v, p.num_perm, threshold, cc_parts, f"{work}/verified-{v:05d}")
                                        for v in range(cc_parts)], label="dedup: verify")
        figures["candidate_pairs"] = sum(r["candidates"] for r in ver)
        misses = sorted((m for r in ver for m in r["misses"]), key=lambda t: (-t[2], t[0], t[1]))[:NEAR_MISSES]
        verified_cc = [f"{work}/verified-{v:05d}.cc" for v in range(cc_parts)]
        weighted = [f"{work}/verified-{v:05d}.w" for v in range(cc_parts)]
        figures["verified_pairs"] = sum(r["verified"] for r in ver)
    else:
        figures["verified_pairs"] = 0
    per_task = min(rows_per_task, CLUSTER_ROWS)
    payloads = ((weighted, 3, f"{work}/edges-q"), (exact_cc, 3, f"{work}/exact-q"))
    label_files, clusters, cc = components(engine, verified_cc + exact_edges, cc_parts,
                                           lambda nodes: max(1, math.ceil(nodes / per_task)), str(work), payloads)
    return label_files, clusters, {**figures, "near_misses": misses, "rounds": cc["rounds"], "nodes": cc["nodes"],
                                   "partitions": cc_parts, "segments": segs,
                                   "edges_q": [f"{work}/edges-q-{k:05d}" for k in range(cc_parts)],
                                   "exact_q": [f"{work}/exact-q-{k:05d}" for k in range(cc_parts)]}


def _exact_task(store: list[dict[str, Any]], n_prior: int, part: int, parts: int, cc_parts: int, out: str) -> int:
    """Task: the exact groups (same folded-text hash) of one hash range: (row, group's first row, group's
    best row in survivor order) for every member of a group of >= 2, written by segment (`out`.seg: the
    bucket tasks' representatives) and by node partition (`out`.cc: the graph). Returns its exact copies."""
    h0, h1, rows = [], [], []
    for seg in store:
        for lo in range(0, seg["n"], CHUNK_ROWS):
            cnt = min(CHUNK_ROWS, seg["n"] - lo)
            ex = np.fromfile(seg["exact"], dtype=np.uint64, count=2 * cnt, offset=16 * lo).reshape(cnt, 2)
            idx = np.nonzero(ex[:, 0] % np.uint64(parts) == np.uint64(part))[0] if parts > 1 else np.arange(cnt)
            h0.append(ex[idx, 0])
            h1.append(ex[idx, 1])
            rows.append(seg["first"] + lo + idx)
    a0, a1 = _cat(h0, np.uint64), _cat(h1, np.uint64)
    r = _cat(rows, np.int64).astype(np.int64)
    order = np.lexsort((r, a1, a0))
    a0, a1, r = a0[order], a1[order], r[order]
    new = np.concatenate([[True], (a0[1:] != a0[:-1]) | (a1[1:] != a1[:-1])]) if len(r) else np.empty(0, bool)
    start = np.maximum.accumulate(np.where(new, np.arange(len(r)), 0)) if len(r) else np.empty(0, np.int64)
    multi = np.bincount(start, minlength=len(r))[start] > 1 if len(r) else np.empty(0, bool)
    members, first = r[multi], r[start[multi]]
    # each group's best member: the lowest rank (a group is a run of equal `first`)
    gid = np.cumsum(np.concatenate([[True], first[1:] != first[:-1]])) - 1 if len(first) else np.empty(0, np.int64)
    order = np.lexsort((_ranks(store, members, n_prior), gid))
    leads = order[np.concatenate([[0], np.nonzero(np.diff(gid[order]))[0] + 1])] if len(order) else order
    best = members[leads][gid]
    triples = np.stack([members, first, best], axis=1)
    firsts = np.array([s["first"] for s in store], dtype=np.int64)
    write_parts(f"{out}.seg", triples, np.searchsorted(firsts, members, side="right") - 1, len(store))
    write_parts(f"{out}.cc", triples, members % cc_parts, cc_parts)
    copies = members != first
    symmetric_parts(f"{out}.edge", members[copies], first[copies], cc_parts)
    return int((members != first).sum())


def _bucket_task(store: list[dict[str, Any]], n_prior: int, exact_seg: list[str], band: int, bands: int, part: int,
                 parts: int, pair_parts: int, out: str) -> int:
    """Task: the candidate pairs of one hash range of one band, as `dedup.band_buckets` gives them: the
    representatives of the exact groups that share a bucket, in survivor order (a representative ranks as its
    group's best member), each with the bucket's first and its `window` predecessors. Written partitioned by
    the pair's first row. Returns the number of pairs (before the dedup across bands)."""
    from pipeline.dedup_cc import read_part

    vals, rows, keyrow = [], [], []
    for k, seg in enumerate(store):
        ex = read_part(exact_seg, k, 3)  # this segment's exact-group members: (row, first, best)
        copies = np.sort(ex[ex[:, 0] != ex[:, 1], 0])
        heads = ex[ex[:, 0] == ex[:, 1]]
        heads = heads[np.argsort(heads[:, 0])]
        for lo in range(0, seg["n"], CHUNK_ROWS):
            cnt = min(CHUNK_ROWS, seg["n"] - lo)
            v = _read_column(seg, band, bands, lo, cnt)
            r = seg["first"] + lo + np.arange(cnt, dtype=np.int64)
            sel = ~np.isin(r, copies, assume_unique=True)  # an exact group is represented by its first row
            if parts > 1:
                sel &= v % np.uint64(parts) == np.uint64(part)
            idx = np.nonzero(sel)[0]
            vals.append(v[idx])
            rows.append(r[idx])
            keyrow.append(_lookup(heads[:, 0], heads[:, 2], r[idx]))
    v, r, kr = _cat(vals, np.uint64), _cat(rows, np.int64), _cat(keyrow, np.int64)
    order = np.argsort(v, kind="stable")
    starts, lengths = _runs(v[order])
    in_bucket = order[np.repeat(starts, lengths) + _positions(lengths)] if len(starts) else np.empty(0, np.int64)
    v, r, kr = v[in_bucket], r[in_bucket], kr[in_bucket]
    found = band_buckets(v, r, _ranks(store, kr, n_prior), WINDOW) if len(r) else None
    a, b = found if found is not None else (np.empty(0, np.int64), np.empty(0, np.int64))
    write_parts(out, np.stack([a, b], axis=1), a % pair_parts, pair_parts)
    return int(len(a))


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[keys == q] for each q found in `keys` (ascending), q itself where absent."""
    if not len(keys):
        return query.copy()
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[at] == query, values[at], query)


def _positions(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(k) for k in lengths.tolist()]) if len(lengths) else np.empty(0, np.int64)


def _verify_task(store: list[dict[str, Any]], pair_files: list[str], v: int, num_perm: int, threshold: float,
                 cc_parts: int, out: str) -> dict[str, Any]:
    """Task: the candidate pairs whose first row falls in partition `v`, made unique across bands, verified
    (estimated Jaccard from the signatures, read VERIFY_CHUNK pairs at a time); those >= threshold written
    as graph edges (`out`.cc, symmetric) and as (a, b, similarity bits) keyed by a (`out`.w)."""
    from pipeline.dedup_cc import read_part

    pairs = np.unique(read_part(pair_files, v), axis=0)
    a, b = pairs[:, 0], pairs[:, 1]
    sims = np.concatenate([_pair_similarity(store, a[i:i + VERIFY_CHUNK], b[i:i + VERIFY_CHUNK], num_perm)
                           for i in range(0, len(a), VERIFY_CHUNK)]) if len(a) else np.empty(0, np.float32)
    under = np.nonzero(sims < threshold)[0]
    misses = [(int(a[k]), int(b[k]), float(sims[k]))
              for k in under[np.argsort(-sims[under], kind="stable")][:NEAR_MISSES].tolist()]
    ok = sims >= threshold
    a, b, sims = a[ok], b[ok], sims[ok]
    symmetric_parts(f"{out}.cc", a, b, cc_parts)
    w = np.stack([a, b, sims.astype(np.float32).view(np.int32).astype(np.int64)], axis=1)
    write_parts(f"{out}.w", w, a % cc_parts, cc_parts)
    return {"candidates": int(len(pairs)), "verified": int(len(a)), "misses": misses}


def _pair_similarity(store: list[dict[str, Any]], a: np.ndarray, b: np.ndarray, num_perm: int) -> np.ndarray:
    need = np.unique(np.concatenate([a, b]))
    sig = np.empty((len(need), num_perm), dtype=np.uint32)
    for seg in store:
        lo, hi = (int(x) for x in np.searchsorted(need, [seg["first"], seg["first"] + seg["n"]]))
        if hi > lo:
            sig[lo:hi] = _read_file_rows(seg["sig"], need[lo:hi] - seg["first"], num_perm, np.uint32)
    return minhash_jaccard(sig[np.searchsorted(need, a)], sig[np.searchsorted(need, b)])


def _read_column(seg: dict[str, Any], band: int, bands: int, lo: int, cnt: int) -> np.ndarray:
    """uint64 values of band `band` of rows lo..lo+cnt of a segment (band-major: one read; row-major: a slice)."""
    if seg["band_major"]:
        return np.fromfile(seg["band"], dtype=np.uint64, count=cnt, offset=8 * (band * seg["n"] + lo))
    block = np.fromfile(seg["band"], dtype=np.uint64, count=cnt * bands, offset=8 * bands * lo).reshape(cnt, bands)
    return np.ascontiguousarray(block[:, band])


def _ranks(store: list[dict[str, Any]], rows: np.ndarray, n_prior: int) -> np.ndarray:
    """Survivor order of `rows` (any order, repeats allowed): int64 ranks among them, 0 first. The order of
    `dedup._survivor_rank`: an earlier index's rows by row, then the highest edu_score, the earliest source in
    source_priority, the smallest id, the row (sorted by Arrow: UTF-8 byte order is Python's str order)."""
    import pyarrow.compute as pc

    u, inv = np.unique(rows, return_inverse=True)
    score, prio, ids = _keys(store, u)
    new = u >= n_prior
    table = pa.table({"grp": new.astype(np.int8), "neg": np.where(new, -score, 0).astype(np.float32), "prio": prio,
                      "id": pa.array(ids, pa.string()), "row": u})
    idx = pc.sort_indices(table, sort_keys=[("grp", "ascending"), ("neg", "ascending"), ("prio", "ascending"),
                                            ("id", "ascending"), ("row", "ascending")]).to_numpy()
    rank = np.empty(len(u), np.int64)
    rank[idx] = np.arange(len(u))
    return rank[inv.ravel()]


def _keys(store: list[dict[str, Any]], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """edu score, source priority and id of this run's rows among `rows` (ascending); zero / "" for index rows."""
    score, prio = np.zeros(len(rows), np.float32), np.zeros(len(rows), np.int32)
    ids = [""] * len(rows)
    for seg in store:
        if "score" not in seg:
            continue
        lo, hi = (int(x) for x in np.searchsorted(rows, [seg["first"], seg["first"] + seg["n"]]))
        if hi > lo:
            local = rows[lo:hi] - seg["first"]
            score[lo:hi] = _read_file_rows(seg["score"], local, 1, np.float32)[:, 0]
            prio[lo:hi] = _read_file_rows(seg["prio"], local, 1, np.int32)[:, 0]
            ids[lo:hi] = _read_ids(seg, local)
    return score, prio, ids


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype)


# ---------------------------------------------------------------------------------------------- 5. cluster


def _cluster_task(label_files: list[str], edge_files: list[str], exact_files: list[str], q: int,
                  store: list[dict[str, Any]], n_prior: int, out: str) -> dict[str, Any]:
    """Task: survivor-verified star clustering (`dedup._greedy`, `dedup._assign`, as `find_duplicates` runs
    them) over the components of label partition `q`: its verified edges and exact groups; its decisions
    (removed rows) to `out`."""
    from pipeline.dedup_cc import read_part

    nodes = np.sort(read_part(label_files, q)[:, 0])
    n, k = len(nodes), int(np.searchsorted(nodes, n_prior))
    w = read_part(edge_files, q, 3)
    a, b = np.searchsorted(nodes, w[:, 0]), np.searchsorted(nodes, w[:, 1])
    sims = w[:, 2].astype(np.int32).view(np.float32)
    ex = read_part(exact_files, q, 3)
    group, best = np.arange(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    group[np.searchsorted(nodes, ex[:, 0])] = np.searchsorted(nodes, ex[:, 1])
    heads = ex[ex[:, 0] == ex[:, 1]]
    best[np.searchsorted(nodes, heads[:, 0])] = np.searchsorted(nodes, heads[:, 2])
    # pairs link representatives only; one ranks as its group's best member
    pair_nodes = np.unique(np.concatenate([a, b]))
    keyrow = np.where(best[pair_nodes] >= 0, best[pair_nodes], pair_nodes)
    pair_nodes = pair_nodes[np.argsort(_ranks(store, nodes[keyrow], n_prior), kind="stable")]
    star, similarity = _greedy(pair_nodes, a, b, sims, n, k)
    survivor, reason = _assign(group, best, star, n, k)
    similarity[reason == KEEP] = 1.0
    similarity[reason == EXACT] = 1.0
    near = np.nonzero(reason == NEAR)[0]
    similarity[near] = similarity[group[near]]
    removed = np.nonzero(reason != KEEP)[0]
    surv = survivor[removed]
    id_of = dict(zip(np.unique(surv).tolist(), _ids_of(store, nodes[np.unique(surv)]), strict=True))
    segments = _write_decisions(out, store, nodes[removed], nodes[surv], reason[removed], similarity[removed],
                                [id_of[s] for s in surv.tolist()])
    low = near[np.argsort(similarity[near], kind="stable")][:AUDIT_ROWS]
    lowest = [(int(nodes[r]), int(nodes[survivor[r]]), float(similarity[r])) for r in low]
    sizes = Counter(Counter(surv.tolist()).values())
    return {"nodes": n, "clusters": int(sum(sizes.values())), "sizes": dict(sizes), "lowest": lowest,
            "survivor_ids": {int(nodes[s]): i for s, i in id_of.items()}, "segments": segments, "out": out}


def _write_decisions(out: str, store: list[dict[str, Any]], row: np.ndarray, survivor: np.ndarray,
                     reason: np.ndarray, similarity: np.ndarray, kept_id: list[str]) -> list[int]:
    """Removed rows (ascending) as parquet, one row group per segment they fall in; the segments' indexes."""
    table = pa.table({"row": row, "survivor": survivor, "reason": reason.astype(np.int8),
                      "similarity": similarity.astype(np.float32), "kept_id": pa.array(kept_id, pa.string())})
    firsts = np.array([s["first"] for s in store] + [store[-1]["first"] + store[-1]["n"]])
    bounds = np.searchsorted(row, firsts)
    touched = []
    tmp = f"{out}.tmp-{os.getpid()}"
    with pq.ParquetWriter(tmp, table.schema) as writer:
        for s in range(len(store)):
            if bounds[s + 1] > bounds[s]:
                writer.write_table(table.slice(int(bounds[s]), int(bounds[s + 1] - bounds[s])))
                touched.append(s)
    os.replace(tmp, out)
    return touched


def _merge_clusters(clustered: list[dict[str, Any]], graph: dict[str, Any], p: DedupParams) -> SimpleNamespace:
    """The figures of one run over all rows, from the tasks' (their sums; the audit's pairs across them)."""
    figures = {k: graph[k] for k in ("exact_duplicates", "candidate_pairs", "verified_pairs") if k in graph}
    sizes: Counter[int] = Counter()
    for c in clustered:
        sizes.update({int(k): v for k, v in c["sizes"].items()})
    figures["clusters"] = sum(c["clusters"] for c in clustered)
    figures["cluster_sizes"] = {str(k + 1): v for k, v in sorted(sizes.items())}
    lowest = sorted((x for c in clustered for x in c["lowest"]), key=lambda t: (t[2], t[0]))[:AUDIT_ROWS]
    misses = graph["near_misses"]
    survivor_ids = {k: v for c in clustered for k, v in c["survivor_ids"].items()}
    kept_ids = {x: survivor_ids[x] for a, b, _ in lowest + misses[:AUDIT_ROWS] for x in (a, b) if x in survivor_ids}
    return SimpleNamespace(figures=figures, lowest=lowest, near_misses=misses, kept_ids=kept_ids)


# ---------------------------------------------------------------------------------------------- gather


def _ids_of(store: list[dict[str, Any]], rows: np.ndarray) -> list[str]:
    """ids of rows `rows` (ascending, unique, global): this run's from the segments, an index's from its docs."""
    ids: list[str] = [""] * len(rows)
    for seg in store:
        lo, hi = (int(x) for x in np.searchsorted(rows, [seg["first"], seg["first"] + seg["n"]]))
        if hi > lo:
            local = rows[lo:hi] - seg["first"]
            ids[lo:hi] = _read_ids(seg, local) if "ids" in seg else _read_index_ids(Path(seg["docs"]), local)
    return ids


def _read_file_rows(path: str, rows: np.ndarray, width: int, dtype: Any, base: int = 0) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_rows(fd, rows, width, dtype, base)
    finally:
        os.close(fd)


def _read_rows(fd: int, rows: np.ndarray, width: int, dtype: Any = np.uint32, base: int = 0) -> np.ndarray:
    """Rows `rows` (ascending, unique) of a file of `dtype` rows of `width` starting at byte `base`: one read
    per READ_SPAN bytes that hold wanted rows, so memory is the rows plus one span."""
    dtype = np.dtype(dtype)
    row_bytes = dtype.itemsize * width
    span = max(1, READ_SPAN // row_bytes)
    out = np.empty((len(rows), width), dtype=dtype)
    i = 0
    while i < len(rows):
        first = int(rows[i])
        j = int(np.searchsorted(rows, first + span, side="left"))
        count = int(rows[j - 1]) - first + 1
        data = os.pread(fd, count * row_bytes, base + first * row_bytes)
        if len(data) != count * row_bytes:
            raise TextbookError(f"dedup: a scratch file ended early (row {first + len(data) // row_bytes}); "
                                "the stage's scratch was changed while it ran")
        out[i:j] = np.frombuffer(data, dtype=dtype).reshape(count, width)[rows[i:j] - first]
        i = j
    return out


def _read_ids(seg: dict[str, Any], local: np.ndarray) -> list[str]:
    """ids of rows `local` (ascending) of a segment, from its ids.bin (UTF-8, back to back) by ids.off."""
    starts = _read_file_rows(seg["ids_off"], local, 1, np.uint64)[:, 0].astype(np.int64)
    ends = _read_file_rows(seg["ids_off"], local + 1, 1, np.uint64)[:, 0].astype(np.int64)
    out: list[str] = []
    fd = os.open(seg["ids"], os.O_RDONLY)
    try:
        i = 0
        while i < len(local):
            at = int(starts[i])
            j = max(i + 1, int(np.searchsorted(starts, at + READ_SPAN, side="left")))
            data = os.pread(fd, int(ends[j - 1]) - at, at)
            out.extend(data[a - at:b - at].decode("utf-8", "surrogatepass") for a, b in zip(starts[i:j].tolist(), ends[i:j].tolist(),
                                                                       strict=True))
            i = j
    finally:
        os.close(fd)
    return out


# ---------------------------------------------------------------------------------------------- 5. filter


def _filter(ctx: Any, engine: Any, files: list[str], hashed: list[dict[str, Any]], clustered: list[dict[str, Any]],
            work: Path, n_prior: int, stats: StageStats, want_text: set[int]
            ) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]], dict[int, tuple[str, str]]]:
    """Step 5 as one task per input file; the parts merged in file order (as one pass would write them)."""
    n_segs_prior = len(ctx.section.index_in)
    decision_files: dict[int, list[str]] = defaultdict(list)
    for c in clustered:
        for s in c["segments"]:
            decision_files[s - n_segs_prior].append(c["out"])
    items = []
    first = n_prior
    index = str(work / "index") if ctx.section.keep_index else None
    for k, (f, h) in enumerate(zip(files, hashed, strict=True)):
        end = first + h["rows"]
        items.append((k, f, first, h["rows"], decision_files.get(k, []), n_prior, str(ctx.kept_dir),
                      str(ctx.removed_dir), str(work), sorted(r for r in want_text if first <= r < end),
                      ctx.section.sample_pairs, index, ctx.section.num_perm, ctx.section.bands))
        first = end
    parts = engine.map(_filter_file, items, label="dedup: filter")
    removed_per_source: dict[str, Counter[str]] = defaultdict(Counter)
    pairs: list[dict[str, Any]] = []
    texts: dict[int, tuple[str, str]] = {}
    writer = pq.ParquetWriter(work / "pairs.all.parquet", _PairsWriter.SCHEMA, compression="zstd")
    for k, part in enumerate(parts):
        stats.merge(part["counts"])
        for src, c in part["removed_per_source"].items():
            removed_per_source[src].update(c)
        pairs.extend(part["pairs"][: max(0, ctx.section.sample_pairs - len(pairs))])
        texts.update(part["texts"])
        piece = work / f"pairs-{k:06d}.parquet"
        if piece.is_file():
            writer.write_table(pq.read_table(piece))
    writer.close()
    (work / "pairs.all.parquet").replace(ctx.out_dir / "pairs.parquet")
    return {k: dict(v) for k, v in sorted(removed_per_source.items())}, pairs, texts


def _decisions(paths: list[str], first: int, end: int) -> dict[int, tuple[int, int, float, str]]:
    """row -> (survivor, reason, similarity, survivor id) of the removed rows in first..end."""
    tables = [pq.read_table(p, filters=[("row", ">=", first), ("row", "<", end)]) for p in paths]
    out: dict[int, tuple[int, int, float, str]] = {}
    for t in tables:
        out.update(zip(t.column("row").to_pylist(), zip(t.column("survivor").to_pylist(), t.column("reason").to_pylist(),
                                                        t.column("similarity").to_numpy().tolist(),
                                                        t.column("kept_id").to_pylist(), strict=True), strict=True))
    return out


def _filter_file(k: int, path: str, first: int, count: int, decision_files: list[str], n_prior: int, kept_dir: str,
                 removed_dir: str, work: str, want_text: list[int], sample_pairs: int, index: str | None,
                 width: int, bands: int) -> dict[str, Any]:
    """Task: route one input file's documents (kept / removed with reason, kept_id, similarity); with `index`,
    write its kept rows' piece of the dedup index."""
    from pipeline.documents import STREAM_ROWS_PER_FILE, DocumentWriter, RemovedWriters, iter_documents

    decided = _decisions(decision_files, first, first + count)
    stats = StageStats("dedup")
    tag = f"{k:06d}"
    kept = DocumentWriter(kept_dir, prefix=f"part-{tag}", rows_per_file=STREAM_ROWS_PER_FILE)
    removed = RemovedWriters(removed_dir, rows_per_file=STREAM_ROWS_PER_FILE, tag=tag)
    rows: list[tuple[str, str, str, float, bool]] = []
    removed_per_source: dict[str, Counter[str]] = defaultdict(Counter)
    pairs: list[dict[str, Any]] = []
    texts: dict[int, tuple[str, str]] = {}
    kept_ids: list[str] = []
    wanted = set(want_text)
    i = 0
    for doc in iter_documents([path], on_error=lambda r, w: None):
        if not _usable(doc):
            removed.write(doc, "empty_text")
            continue
        if i >= count:
            i += 1
            continue
        if first + i in wanted:
            texts[first + i] = (doc["id"], doc["text"])
        decision = decided.get(first + i)
        if decision is None:
            kept.write(doc)
            kept_ids.append(doc["id"])
            stats.keep()
        else:
            s, code, sim, kept_id = decision
            why = REASONS[code]
            sim = round(float(sim), 4)
            meta = dict(doc.get("meta") or {})
            meta.update({"kept_id": kept_id, "similarity": sim, "kept_from_earlier_run": s < n_prior})
            removed.write({**doc, "meta": meta}, why)
            rows.append((doc["id"], kept_id, why, sim, s < n_prior))
            stats.drop(why)
            removed_per_source[doc.get("source") or "unknown"][why] += 1
            if len(pairs) < sample_pairs:
                pairs.append({"removed_id": doc["id"], "kept_id": kept_id, "reason": why,
                              "similarity": sim, "removed_text": doc["text"][:200]})
        i += 1
    if i != count:
        raise TextbookError(f"dedup: {path} changed while the stage ran ({i} documents on the second pass, "
                            f"{count} on the first); run it again")
    kept.close()
    removed.close()
    _write_pairs(Path(work) / f"pairs-{k:06d}.parquet", rows)
    if index is not None:
        _index_piece(f"{index}-{k:06d}", f"{work}/seg-{k:06d}", count,
                     np.array(sorted(r - first for r in decided), dtype=np.int64), kept_ids, width, bands)
    return {"counts": stats.counts(), "removed_per_source": {s: dict(c) for s, c in removed_per_source.items()},
            "pairs": pairs, "texts": texts}


def _write_pairs(piece: Path, rows: list[tuple[str, str, str, float, bool]]) -> None:
    if not rows:
        piece.unlink(missing_ok=True)
        return
    cols = list(zip(*rows, strict=True))
    pq.write_table(pa.table([pa.array(c, t) for c, t in zip(cols, _PairsWriter.SCHEMA.types, strict=True)],
                            schema=_PairsWriter.SCHEMA), piece)


# ---------------------------------------------------------------------------------------------- index


def _index_piece(out: str, seg: str, n: int, removed_local: np.ndarray, kept_ids: list[str], width: int,
                 bands: int) -> None:
    """One input file's kept rows, row-major, as the index stores them (sig, band, exact) and their ids."""
    keep = np.ones(n, dtype=bool)
    keep[removed_local] = False
    with open(f"{out}.sig.u32", "wb") as fs, open(f"{out}.band.u64", "wb") as fb, open(f"{out}.exact.u64", "wb") as fe:
        for lo in range(0, n, CHUNK_ROWS):
            cnt = min(CHUNK_ROWS, n - lo)
            sel = keep[lo:lo + cnt]
            fs.write(np.fromfile(f"{seg}.sig.u32", np.uint32, cnt * width, offset=4 * width * lo).reshape(cnt, width)[sel]
                     .tobytes())
            band = np.stack([np.fromfile(f"{seg}.bandT.u64", np.uint64, cnt, offset=8 * (b * n + lo))
                             for b in range(bands)], axis=1)
            fb.write(np.ascontiguousarray(band[sel]).tobytes())
            fe.write(np.fromfile(f"{seg}.exact.u64", np.uint64, 2 * cnt, offset=16 * lo).reshape(cnt, 2)[sel].tobytes())
    pq.write_table(pa.table({"id": pa.array(kept_ids, pa.string())}), f"{out}.ids.parquet")


def _write_index(dest: Path, prior_docs: list[tuple[Path, int]], store: list[dict[str, Any]],
                 hashed: list[dict[str, Any]], work: Path, p: DedupParams) -> None:
    """The index a later run passes as dedup.index_in (as `dedup._write_index` writes it): the earlier
    indexes' rows, then this run's kept rows in input order, streamed piece by piece."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prior = [Path(s["sig"]).parent for s in store if not s["band_major"]]
    pieces = [work / f"index-{k:06d}" for k in range(len(hashed))]
    for name in ("sig.u32", "band.u64", "exact.u64"):
        with open(tmp / name, "wb") as out:
            for src in [d / name for d in prior] + [Path(f"{piece}.{name}") for piece in pieces]:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    documents = 0
    schema = pa.schema([("id", pa.string())])
    with pq.ParquetWriter(tmp / "docs.parquet", schema, compression="zstd") as writer:
        for src in [path for path, _ in prior_docs] + [Path(f"{piece}.ids.parquet") for piece in pieces]:
            for batch in pq.ParquetFile(src).iter_batches(columns=["id"], batch_size=65536):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))
                documents += batch.num_rows
    publish_index(tmp, dest, p, documents, INDEX_FORMAT)
