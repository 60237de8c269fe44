"""The dedup stage as Ray tasks (`run.executor: ray`): the same survivors and stats as `pipeline.dedup`.

Phases (each a set of independent tasks; the driver holds only per-task results, never per-document arrays):

1. hash        one task per input file: signatures, band hashes (band-major, so a band is one contiguous
               run of a file), exact hashes, edu scores, source priorities and ids (with byte offsets, for
               random access) to `state/work/seg-<k>.*`.
2. edges       one task per (band or the exact hash, hash range of its values): reads that column chunk by
               chunk, keeps the rows of its range, and links every member of a bucket of >= 2 rows to the
               bucket's first row. A bucket never spans two ranges.
3. components  connected components of that graph (`pipeline.dedup_cc`: Large-Star / Small-Star rounds, one
               task per node partition), then every node with its component's label, partitioned by label.
4. cluster     one task per label partition: gathers its rows (signatures, bands, exact hashes, scores,
               priorities, ids) with explicit reads and runs the single-process `dedup.find_duplicates` on
               them. Star clustering, survivor order, exact groups, window pairs and verification never look
               across a component of this graph (every bucket and exact group lies inside one), so running
               it per union of whole components decides every row as one run over all rows would. Rows in
               no component are unique: kept. Writes its decisions (removed row, survivor, reason,
               similarity, survivor id) as parquet with one row group per input file.
5. filter      one task per input file: kept documents to `kept/part-<k>-*.parquet`, removed ones to
               `removed/<reason>-<k>-*.parquet`, its removals to a pairs part, its kept rows' index piece;
               file names come from the input file's position, so kept/ read in name order is the local
               path's stream, and a retried task overwrites its own files.

Why the same result whatever the number of workers: rows are numbered in input-file order (as one pass
numbers them), every decision is a function of the rows' content and the survivor order within a component,
and per-task parts are merged in file order. `tests/test_scale.py` checks it row by row and figure by figure.

Memory per task (none grows with the corpus except through the largest component): hash, one input file;
edges, `rows_per_task` rows of one column range (~24 B each) plus a chunk of CHUNK_ROWS; components, the
edges of one node partition (~16 B each, x3 to sort; partitions of at most CC_NODES rows); cluster, the rows
of one label partition (~650 B each at 112 permutations: at most CLUSTER_ROWS nodes, unless one component is
larger: a component is never split) plus `find_duplicates`' arrays over them; filter, one batch of documents.
Driver: per-task results (counts, the audit's 10-20 pairs, cluster-size counts), O(tasks).
"""

from __future__ import annotations

import json
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
    INDEX_FORMAT,
    KEEP,
    NEAR,
    REASONS,
    DedupParams,
    Rows,
    _audit,
    _PairsWriter,
    _priority_rank,
    _read_index_ids,
    _runs,
    _scores,
    _start,
    _usable,
    find_duplicates,
    hash_batch,
    prior_rows,
    publish_index,
    set_stats,
)
from pipeline.dedup_cc import components, symmetric_parts
from pipeline.errors import TextbookError
from pipeline.stats import StageStats

CHUNK_ROWS = 262_144  # rows of a column read at once by an edge task
ROWS_PER_TASK = 2_000_000  # rows of one column an edge task holds: sets the number of hash ranges per column
CC_NODES = 250_000  # rows per node partition of the components step (their edges: <= 2 x (bands + 1) each)
CLUSTER_ROWS = 200_000  # nodes per cluster task (~650 B each gathered), unless one component is larger
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
    label_files, clusters, graph = _graph(engine, store, p, n_prior + n_new, rows_per_task, work)
    t1 = time.time()
    clustered = engine.map(_cluster_task, [(label_files, q, store, p, n_prior, f"{work}/decisions-{q:05d}.parquet")
                                           for q in range(clusters)], label="dedup: cluster")
    result = _merge_clusters(clustered, p, n_prior + n_new)
    t2 = time.time()
    want_text = {x for a, b, _ in result.lowest + result.near_misses[:AUDIT_ROWS] for x in (a, b) if x >= n_prior}
    removed_per_source, pairs, texts = _filter(ctx, engine, files, hashed, clustered, work, n_prior, stats,
                                               want_text)
    if section.keep_index:
        _write_index(ctx.out_dir / "index", prior_docs, store, hashed, work, p)
    shutil.rmtree(work, ignore_errors=True)
    result.figures["seconds_buckets"] = round(t1 - t0, 3)  # edges + components: the distributed buckets
    result.figures["seconds_cluster"] = round(t2 - t1, 3)
    set_stats(stats, p, section, result, n_new, n_prior, per_source_in, removed_per_source, pairs,
              _audit(result.lowest, result.near_misses[:AUDIT_ROWS], texts, result.kept_ids, p.verify_threshold),
              ctx.out_dir, time.time() - t_start, seconds_hash)
    stats.set("engine", {**engine.describe(), "hash_tasks": len(files), "band_tasks": graph["edge_tasks"],
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
    with (open(f"{seg}.sig.u32", "wb") as fs, open(f"{seg}.exact.u64", "wb") as fe, open(f"{seg}.ids.txt", "wb") as fi,
          open(f"{seg}.score.f32", "wb") as fsc, open(f"{seg}.prio.i32", "wb") as fp):
        for docs in batched(usable_docs(), batch_size):
            sig, band, exact = hash_batch([d["text"] for d in docs], p)
            fs.write(sig.tobytes())
            fe.write(exact.tobytes())
            lines = [(json.dumps(d["id"]) + "\n").encode() for d in docs]
            fi.write(b"".join(lines))
            id_bytes.extend(len(x) for x in lines)
            fsc.write(_scores([d.get("edu_score") for d in docs]).tobytes())
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
                      "prio": f"{seg}.prio.i32", "ids": f"{seg}.ids.txt", "ids_off": f"{seg}.ids.off"})
        first += h["rows"]
    return store, prior_docs, n_prior


# ---------------------------------------------------------------------------------------------- 2-3. graph


def _graph(engine: Any, store: list[dict[str, Any]], p: DedupParams, n: int, rows_per_task: int, work: Path
           ) -> tuple[list[str], int, dict[str, Any]]:
    """Steps 2-3: the bucket graph's edge files, its components; (label files, label partitions, figures)."""
    columns = (list(range(p.bands)) if p.near else []) + ([p.bands] if p.exact else [])
    parts = max(1, math.ceil(n / rows_per_task))
    cc_parts = max(1, math.ceil(n / min(rows_per_task, CC_NODES)))
    items = [(store, col, p.bands, part, parts, cc_parts, f"{work}/edges-{col:03d}-{part:05d}")
             for col in columns for part in range(parts)]
    engine.map(_edge_task, items, label="dedup: buckets")
    per_task = min(rows_per_task, CLUSTER_ROWS)
    label_files, clusters, figures = components(engine, [it[-1] for it in items], cc_parts,
                                                lambda nodes: max(1, math.ceil(nodes / per_task)), str(work))
    return label_files, clusters, {**figures, "edge_tasks": len(items), "partitions": cc_parts}


def _edge_task(store: list[dict[str, Any]], col: int, bands: int, part: int, parts: int, cc_parts: int, out: str
               ) -> dict[str, Any]:
    """Task: the buckets of one hash range of one column (a band, or the exact hash when col == bands), as
    edges from every member to its bucket's first row, written for the components step."""
    vals, rows = [], []
    for seg in store:
        for lo in range(0, seg["n"], CHUNK_ROWS):
            cnt = min(CHUNK_ROWS, seg["n"] - lo)
            v = _read_column(seg, col, bands, lo, cnt)
            idx = np.nonzero(v % np.uint64(parts) == np.uint64(part))[0] if parts > 1 else np.arange(cnt)
            vals.append(v[idx])
            rows.append(seg["first"] + lo + idx)
    v = np.concatenate(vals) if vals else np.empty(0, np.uint64)
    r = np.concatenate(rows).astype(np.int64) if rows else np.empty(0, np.int64)
    del vals, rows
    order = np.lexsort((r, v))
    v, r = v[order], r[order]
    starts, lengths = _runs(v)
    pos = np.concatenate([np.arange(1, k) for k in lengths.tolist()]) if len(lengths) else np.empty(0, np.int64)
    first = np.repeat(starts, lengths - 1)
    return {"edges": symmetric_parts(out, r[first + pos], r[first], cc_parts) // 2}


def _read_column(seg: dict[str, Any], col: int, bands: int, lo: int, cnt: int) -> np.ndarray:
    """uint64 values of column `col` (a band, or the exact hash's first word) of rows lo..lo+cnt of a segment."""
    if col == bands:
        return np.fromfile(seg["exact"], dtype=np.uint64, count=2 * cnt, offset=16 * lo)[0::2]
    if seg["band_major"]:
        return np.fromfile(seg["band"], dtype=np.uint64, count=cnt, offset=8 * (col * seg["n"] + lo))
    block = np.fromfile(seg["band"], dtype=np.uint64, count=cnt * bands, offset=8 * bands * lo).reshape(cnt, bands)
    return np.ascontiguousarray(block[:, col])


# ---------------------------------------------------------------------------------------------- 4. cluster


def _cluster_task(label_files: list[str], q: int, store: list[dict[str, Any]], p: DedupParams, n_prior: int,
                  out: str) -> dict[str, Any]:
    """Task: `find_duplicates` over the rows of label partition `q` (whole components); its decisions to `out`."""
    from pipeline.dedup_cc import read_part

    nodes = np.sort(read_part(label_files, q)[:, 0])
    g, ids = gather(store, nodes, p)
    rows = Rows()
    rows.add(g["sig"], g["band"], g["exact"])
    k = int(np.searchsorted(nodes, n_prior))
    res = find_duplicates(rows, k, g["score"][k:], g["prio"][k:], lambda idx: [ids[k + i] for i in idx.tolist()], p,
                          near_misses=NEAR_MISSES)
    removed = np.nonzero(res.reason != KEEP)[0]
    surv = res.survivor[removed]
    segments = _write_decisions(out, store, nodes[removed], nodes[surv], res.reason[removed],
                                res.similarity[removed], [ids[s] for s in surv.tolist()])
    near = removed[res.reason[removed] == NEAR]
    low = near[np.argsort(res.similarity[near], kind="stable")][:AUDIT_ROWS]
    lowest = [(int(nodes[r]), int(nodes[res.survivor[r]]), float(res.similarity[r])) for r in low]
    misses = [(int(nodes[a]), int(nodes[b]), s) for a, b, s in res.near_misses]
    survivors = set(np.unique(surv).tolist())
    local = {int(nodes[i]): i for i in survivors}
    kept_ids = {x: ids[local[x]] for a, b, _ in lowest + misses for x in (a, b) if x in local}
    return {"nodes": len(nodes), "figures": {k: v for k, v in res.figures.items() if not k.startswith("seconds")},
            "lowest": lowest, "misses": misses, "kept_ids": kept_ids, "segments": segments, "out": out}


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


def _merge_clusters(clustered: list[dict[str, Any]], p: DedupParams, n: int) -> SimpleNamespace:
    """The cluster tasks' figures summed, and the audit's pairs across them, as one run over all rows gives."""
    figures: dict[str, Any] = {"exact_duplicates": 0} if p.exact else {}
    if p.near and n:
        figures["candidate_pairs"] = 0
    figures.update(verified_pairs=0, clusters=0)
    sizes: Counter[int] = Counter()
    for c in clustered:
        for key in ("exact_duplicates", "candidate_pairs", "verified_pairs", "clusters"):
            if key in c["figures"]:
                figures[key] += c["figures"][key]
        sizes.update({int(k): v for k, v in c["figures"]["cluster_sizes"].items()})
    figures["cluster_sizes"] = {str(k): v for k, v in sorted(sizes.items())}
    lowest = sorted((x for c in clustered for x in c["lowest"]), key=lambda t: (t[2], t[0]))[:AUDIT_ROWS]
    misses = sorted((x for c in clustered for x in c["misses"]), key=lambda t: (-t[2], t[0], t[1]))[:NEAR_MISSES]
    kept_ids = {k: v for c in clustered for k, v in c["kept_ids"].items()}
    return SimpleNamespace(figures=figures, lowest=lowest, near_misses=misses, kept_ids=kept_ids)


# ---------------------------------------------------------------------------------------------- gather


def gather(store: list[dict[str, Any]], rows: np.ndarray, p: DedupParams) -> tuple[dict[str, np.ndarray], list[str]]:
    """Arrays of rows `rows` (ascending, unique, global): sig uint32[m, num_perm], band uint64[m, bands],
    exact uint64[m, 2], score float32[m], prio int32[m] (both only for this run's rows), and their ids.

    Explicit reads, never memory-mapping: a mapped file's pages stay in the task's RSS, and scattered rows
    map nearly all of it (the kernel maps 64 KB around each fault), so a task grew with the corpus (+508 MB
    at 1M documents, benchmarks/results/scale.md). Memory: the rows plus one READ_SPAN."""
    m = len(rows)
    out = {"sig": np.empty((m, p.num_perm), np.uint32), "band": np.empty((m, p.bands), np.uint64),
           "exact": np.empty((m, 2), np.uint64), "score": np.full(m, -np.inf, np.float32),
           "prio": np.zeros(m, np.int32)}
    ids: list[str] = [""] * m
    for seg in store:
        lo, hi = (int(x) for x in np.searchsorted(rows, [seg["first"], seg["first"] + seg["n"]]))
        if hi == lo:
            continue
        local = rows[lo:hi] - seg["first"]
        out["sig"][lo:hi] = _read_file_rows(seg["sig"], local, p.num_perm, np.uint32)
        out["exact"][lo:hi] = _read_file_rows(seg["exact"], local, 2, np.uint64)
        if seg["band_major"]:
            for b in range(p.bands):
                out["band"][lo:hi, b] = _read_file_rows(seg["band"], local, 1, np.uint64, base=8 * b * seg["n"])[:, 0]
        else:
            out["band"][lo:hi] = _read_file_rows(seg["band"], local, p.bands, np.uint64)
        if "score" in seg:
            out["score"][lo:hi] = _read_file_rows(seg["score"], local, 1, np.float32)[:, 0]
            out["prio"][lo:hi] = _read_file_rows(seg["prio"], local, 1, np.int32)[:, 0]
            ids[lo:hi] = _read_ids(seg, local)
        else:
            ids[lo:hi] = _read_index_ids(Path(seg["docs"]), local)
    return out, ids


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
    """ids of rows `local` (ascending) of a segment, from its ids.txt by the byte offsets in ids.off."""
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
            out.extend(json.loads(data[a - at:b - at]) for a, b in zip(starts[i:j].tolist(), ends[i:j].tolist(),
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
