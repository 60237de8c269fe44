"""The dedup stage as Ray tasks (`run.executor: ray`): the same survivors and stats as `pipeline.dedup`.

Phases (each a set of independent tasks; the driver only joins small results):

1. hash      one task per input file: signatures, band hashes (written band-major, so a band is one
             contiguous run of a file), exact hashes and ids to `state/work/seg-<k>.*`; score and priority
             per document come back to the driver (8 bytes each).
2. exact     the driver sorts the 16-byte exact hashes (as the local path does).
3. buckets   one task per (band, hash range of the band): reads its band's values chunk by chunk, keeps the
             rows of its range, and finds that part of the bucket table (`dedup.band_buckets`, the same
             function the local path runs per band). A bucket never spans two ranges, so the union over
             tasks is the local result exactly. Run twice: the rows that share a bucket, then (with the
             survivor rank, read from a scratch file chunk by chunk) the candidate pairs.
4. verify    candidate pairs in chunks, one task each (estimated Jaccard from the signature files).
5. cluster   survivor-verified star clustering in the driver (`dedup.find_duplicates`): O(n) small arrays
             (~70 B per document) and 16 B per verified pair.
6. filter    one task per input file again: kept documents to `kept/part-<k>-*.parquet`, removed ones to
             `removed/<reason>-<k>-*.parquet`, its removals to a pairs part; file names come from the input
             file's position, so kept/ read in name order is the local path's stream, and a retried task
             overwrites its own files.

Why the same result whatever the number of workers: rows are numbered in input-file order (as one pass
numbers them), every decision is a function of the rows' content and the survivor order (never of which
task saw what first), and the per-task parts are merged in file order.

Memory per task: hash, one input file's documents (batch by batch) plus its band hashes (8*bands B per
document); buckets, `rows_per_task` rows of one band range (~40 B each: value, row, rank, sort order) plus a
chunk of 262,144 rows of the band file: flat as the input grows, since the number of ranges grows with it;
verify, 2 * 4 * num_perm B per pair of a chunk; filter, one batch of documents.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dedup import (
    KEEP,
    REASONS,
    DedupParams,
    Rows,
    _audit,
    _audit_rows,
    _ids_reader,
    _memmap,
    _PairsWriter,
    _priority_rank,
    _scores,
    _start,
    _usable,
    _write_index,
    band_buckets,
    find_duplicates,
    hash_batch,
    merge_pairs,
    minhash_jaccard,
    prior_rows,
    set_stats,
    survivor_ids,
)
from pipeline.errors import TextbookError
from pipeline.stats import StageStats

CHUNK_ROWS = 262_144  # rows of a band file read at once by a bucket task
ROWS_PER_TASK = 2_000_000  # rows of one band a bucket task holds: sets the number of hash ranges per band
PAIRS_PER_TASK = 250_000  # pairs a verify task is given, compared VERIFY_CHUNK at a time
VERIFY_CHUNK = 32_768  # pairs compared at once: their signature rows, ~4 * 4 * num_perm B a pair (~60 MB)
READ_SPAN = 1 << 20  # bytes of a signature file read at once: rows closer than this come in one read
MIN_PAIRS_PER_TASK = 20_000  # below this a task's start costs more than it saves


def run_distributed(ctx: Any, engine: Any, rows_per_task: int | None = None) -> StageStats:
    """The stage on `engine` (`pipeline.scale.Engine`); rows_per_task bounds a bucket task (default ROWS_PER_TASK)."""
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
    scores, prios, per_source_in = _join_hashes(hashed, work, stats)
    seconds_hash = time.time() - t_start

    rows, prior_docs = prior_rows(ctx, p)
    n_prior = len(rows)
    # earlier indexes keep their row-major files; this run's segments are band-major
    band_files = [(str(Path(dp).parent / "band.u64"), len(seg["sig"]), True)
                  for (dp, _), seg in zip(prior_docs, rows.segments, strict=True)]
    sig_files = [(str(Path(dp).parent / "sig.u32"), len(seg["sig"]))
                 for (dp, _), seg in zip(prior_docs, rows.segments, strict=True)]
    for k, h in enumerate(hashed):
        seg = work / f"seg-{k:06d}"
        rows.add(_memmap(Path(f"{seg}.sig.u32"), np.uint32, p.num_perm),
                 _band_view(Path(f"{seg}.bandT.u64"), p.bands, h["rows"]),
                 _memmap(Path(f"{seg}.exact.u64"), np.uint64, 2))
        band_files.append((f"{seg}.bandT.u64", h["rows"], False))
    sig_files += [(str(work / f"seg-{k:06d}.sig.u32"), h["rows"]) for k, h in enumerate(hashed)]
    ids_new = _ids_reader(work / "ids.txt")
    tasks = _BandTasks(engine, band_files, sig_files, work, p.bands, p.num_perm, rows_per_task)
    result = find_duplicates(rows, n_prior, scores, prios, ids_new, p, log=lambda m: None,
                             candidates=tasks.candidates, similarity_of=tasks.similarity)
    kept_ids = survivor_ids(result, n_prior, prior_docs, ids_new)
    lowest, want_text = _audit_rows(result, n_prior, 10)
    removed_per_source, pairs, texts = _filter(ctx, engine, files, hashed, result, n_prior, kept_ids, stats,
                                               want_text, work)
    if section.keep_index:
        _write_index(ctx.out_dir / "index", rows, n_prior, prior_docs, result, work, p, section)
    shutil.rmtree(work, ignore_errors=True)
    set_stats(stats, p, section, result, len(scores), n_prior, per_source_in, removed_per_source, pairs,
              _audit(lowest, result.near_misses[:10], texts, kept_ids, p.verify_threshold), ctx.out_dir,
              time.time() - t_start, seconds_hash)
    stats.set("engine", {**engine.describe(), "band_tasks": tasks.band_tasks, "hash_tasks": len(files)})
    return stats


# ---------------------------------------------------------------------------------------------- 1. hash


def _hash_file(k: int, path: str, work: str, p: DedupParams, order: list[str], batch_size: int) -> dict[str, Any]:
    """Task: hash one input file into `work/seg-<k>.*`; its counts, scores, priorities and sources."""
    from datatrove.utils.batching import batched

    from pipeline.documents import iter_documents

    stats = StageStats("dedup")
    rank = _priority_rank(order)
    seg = Path(work) / f"seg-{k:06d}"
    scores: list[np.ndarray] = []
    prios: list[np.ndarray] = []
    bands: list[np.ndarray] = []
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
    with open(f"{seg}.sig.u32", "wb") as fs, open(f"{seg}.exact.u64", "wb") as fe, open(f"{seg}.ids.txt", "wb") as fi:
        for docs in batched(usable_docs(), batch_size):
            sig, band, exact = hash_batch([d["text"] for d in docs], p)
            fs.write(sig.tobytes())
            fe.write(exact.tobytes())
            fi.write(("\n".join(json.dumps(d["id"]) for d in docs) + "\n").encode())
            bands.append(band)
            scores.append(_scores([d.get("edu_score") for d in docs]))
            prios.append(np.array([rank(d.get("source")) for d in docs], dtype=np.int32))
            per_source.update(d.get("source") or "unknown" for d in docs)
            n += len(docs)
    band_all = np.concatenate(bands) if bands else np.empty((0, p.bands), np.uint64)
    np.ascontiguousarray(band_all.T).tofile(f"{seg}.bandT.u64")  # band-major: a band task reads one run
    return {"rows": n, "counts": stats.counts(), "per_source": dict(per_source),
            "scores": np.concatenate(scores) if scores else np.empty(0, np.float32),
            "prios": np.concatenate(prios) if prios else np.empty(0, np.int32)}


def _join_hashes(hashed: list[dict[str, Any]], work: Path, stats: StageStats
                 ) -> tuple[np.ndarray, np.ndarray, Counter[str]]:
    """Counts, scores, priorities and sources in input order; the ids of all files into one ids.txt."""
    per_source: Counter[str] = Counter()
    with open(work / "ids.txt", "wb") as out:
        for k, h in enumerate(hashed):
            stats.merge(h["counts"])
            per_source.update(h["per_source"])
            with open(work / f"seg-{k:06d}.ids.txt", "rb") as f:
                shutil.copyfileobj(f, out)
    scores = np.concatenate([h["scores"] for h in hashed]) if hashed else np.empty(0, np.float32)
    prios = np.concatenate([h["prios"] for h in hashed]) if hashed else np.empty(0, np.int32)
    return scores, prios, per_source


def _band_view(path: Path, bands: int, n: int) -> np.ndarray:
    """uint64[n, bands] view of a band-major file (what `Rows` indexes by row)."""
    if n == 0:
        return np.empty((0, bands), dtype=np.uint64)
    return np.memmap(path, dtype=np.uint64, mode="r", shape=(bands, n)).T


# ---------------------------------------------------------------------------------------------- 3-4. buckets, verify


class _BandTasks:
    """`find_duplicates`'s candidates/similarity hooks, as tasks over (band, hash range) and pair chunks."""

    def __init__(self, engine: Any, band_files: list[tuple[str, int, bool]], sig_files: list[tuple[str, int]],
                 work: Path, bands: int, num_perm: int, rows_per_task: int) -> None:
        self.engine, self.band_files, self.sig_files, self.work = engine, band_files, sig_files, work
        self.bands, self.num_perm = bands, num_perm
        n = sum(x[1] for x in band_files)
        self.parts = max(1, math.ceil(n / rows_per_task))
        self.band_tasks = bands * self.parts

    def candidates(self, rows: Rows, reps: np.ndarray, rank: np.ndarray | None, p: DedupParams, window: int
                   ) -> Any:
        n = len(rows)
        rep_mask = np.zeros(n, dtype=np.uint8)
        rep_mask[reps] = 1
        rep_mask.tofile(self.work / "reps.u8")
        rank_path = None
        if rank is not None:
            rank_path = str(self.work / "rank.i64")
            np.ascontiguousarray(rank, dtype=np.int64).tofile(rank_path)
        items = [(self.band_files, b, self.bands, part, self.parts, str(self.work / "reps.u8"), rank_path, window)
                 for b in range(self.bands) for part in range(self.parts)]
        found = self.engine.map(_bucket_task, items, label="dedup: buckets" + (" (pairs)" if rank is not None else ""))
        found = [f for f in found if f is not None]
        if rank is None:
            return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
        return merge_pairs([f[0] for f in found], [f[1] for f in found])

    def similarity(self, rows: Rows, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if not len(a):
            return np.empty(0, dtype=np.float32)
        # at most PAIRS_PER_TASK a task (memory), and enough tasks to keep every CPU busy (one chunk of
        # 250k pairs would run on one worker while the others wait), but not below MIN_PAIRS_PER_TASK
        per = min(PAIRS_PER_TASK, max(MIN_PAIRS_PER_TASK, math.ceil(len(a) / (2 * self.engine.cpus()))))
        items = [(self.sig_files, self.num_perm, a[i:i + per], b[i:i + per]) for i in range(0, len(a), per)]
        return np.concatenate(self.engine.map(_similarity_task, items, label="dedup: verify"))


def _bucket_task(band_files: list[tuple[str, int, bool]], band: int, bands: int, part: int, parts: int,
                 reps_path: str, rank_path: str | None, window: int) -> Any:
    """Task: the bucket table of one hash range of one band (`dedup.band_buckets` on those rows)."""
    cols, members, ranks = [], [], []
    first = 0
    for path, n, row_major in band_files:
        for lo in range(0, n, CHUNK_ROWS):
            cnt = min(CHUNK_ROWS, n - lo)
            col = _read_band(path, n, row_major, band, bands, lo, cnt)
            rep = np.fromfile(reps_path, dtype=np.uint8, count=cnt, offset=first + lo).astype(bool)
            sel = rep & ((col % np.uint64(parts)) == np.uint64(part)) if parts > 1 else rep
            idx = np.nonzero(sel)[0]
            cols.append(col[idx])
            members.append(first + lo + idx)
            if rank_path is not None:
                ranks.append(np.fromfile(rank_path, dtype=np.int64, count=cnt, offset=8 * (first + lo))[idx])
        first += n
    if not cols:
        return None
    col_all = np.concatenate(cols)
    del cols
    return band_buckets(col_all, np.concatenate(members).astype(np.int64),
                        np.concatenate(ranks) if rank_path is not None else None, window)


def _read_band(path: str, n: int, row_major: bool, band: int, bands: int, lo: int, cnt: int) -> np.ndarray:
    """Band `band` of rows lo..lo+cnt of one file (band-major: one contiguous read; row-major: an index)."""
    if not row_major:
        return np.fromfile(path, dtype=np.uint64, count=cnt, offset=8 * (band * n + lo))
    block = np.fromfile(path, dtype=np.uint64, count=cnt * bands, offset=8 * bands * lo).reshape(cnt, bands)
    return np.ascontiguousarray(block[:, band])


def _similarity_task(sig_files: list[tuple[str, int]], num_perm: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Task: estimated Jaccard (share of equal MinHash values; float32, len(a)) of candidate pairs `a[i], b[i]`
    (global rows over `sig_files`, each `(path, rows)` of uint32 signatures, num_perm a row).

    The signatures are read with explicit reads, VERIFY_CHUNK pairs at a time, never memory-mapped: a mapped
    file's pages stay in the worker's RSS, and random rows map nearly all of it (the kernel maps 64 KB around
    each fault), so the task grew with the corpus (+508 MB at 1M documents, benchmarks/results/scale.md).
    Now it holds one chunk's rows whatever the size of the files."""
    offsets = np.cumsum([0] + [n for _, n in sig_files])
    out = []
    fds = [os.open(path, os.O_RDONLY) if n else -1 for path, n in sig_files]
    try:
        for i in range(0, len(a), VERIFY_CHUNK):
            ca, cb = a[i:i + VERIFY_CHUNK], b[i:i + VERIFY_CHUNK]
            need = np.unique(np.concatenate([ca, cb]))
            sig = np.empty((len(need), num_perm), dtype=np.uint32)
            for k, fd in enumerate(fds):
                lo, hi = np.searchsorted(need, offsets[k]), np.searchsorted(need, offsets[k + 1])
                if hi > lo:
                    sig[lo:hi] = _read_rows(fd, need[lo:hi] - offsets[k], num_perm)
            sa, sb = sig[np.searchsorted(need, ca)], sig[np.searchsorted(need, cb)]
            out.append(minhash_jaccard(sa, sb))
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    return np.concatenate(out) if out else np.empty(0, dtype=np.float32)


def _read_rows(fd: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Rows `rows` (ascending, unique) of a file of uint32 rows of `width`: one read per READ_SPAN bytes that
    hold wanted rows, so memory is the rows plus one span."""
    row_bytes = 4 * width
    span = max(1, READ_SPAN // row_bytes)
    out = np.empty((len(rows), width), dtype=np.uint32)
    i = 0
    while i < len(rows):
        first = int(rows[i])
        j = int(np.searchsorted(rows, first + span, side="left"))
        count = int(rows[j - 1]) - first + 1
        data = os.pread(fd, count * row_bytes, first * row_bytes)
        if len(data) != count * row_bytes:
            raise TextbookError(f"dedup: a signature file ended early (row {first + len(data) // row_bytes}); "
                                "the stage's scratch was changed while it ran")
        out[i:j] = np.frombuffer(data, dtype=np.uint32).reshape(count, width)[rows[i:j] - first]
        i = j
    return out


# ---------------------------------------------------------------------------------------------- 6. filter


def _filter(ctx: Any, engine: Any, files: list[str], hashed: list[dict[str, Any]], result: Any, n_prior: int,
            kept_ids: dict[int, str], stats: StageStats, want_text: set[int], work: Path
            ) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]], dict[int, tuple[str, str]]]:
    """Step 6 as one task per input file; the parts merged in file order (as one pass would write them)."""
    items = []
    first = n_prior
    for k, (f, h) in enumerate(zip(files, hashed, strict=True)):
        end = first + h["rows"]
        surv = result.survivor[first:end]
        reason = result.reason[first:end]
        needed = np.unique(surv[reason != KEEP])
        items.append((k, f, first, h["rows"], surv, reason, result.similarity[first:end],
                      {int(s): kept_ids[int(s)] for s in needed.tolist()}, n_prior, str(ctx.kept_dir),
                      str(ctx.removed_dir), str(work), sorted(r for r in want_text if first <= r < end),
                      ctx.section.sample_pairs))
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


def _filter_file(k: int, path: str, first: int, count: int, survivor: np.ndarray, reason: np.ndarray,
                 similarity: np.ndarray, kept_ids: dict[int, str], n_prior: int, kept_dir: str, removed_dir: str,
                 work: str, want_text: list[int], sample_pairs: int) -> dict[str, Any]:
    """Task: route one input file's documents (kept / removed with reason, kept_id, similarity)."""
    from pipeline.documents import STREAM_ROWS_PER_FILE, DocumentWriter, RemovedWriters, iter_documents

    stats = StageStats("dedup")
    tag = f"{k:06d}"
    kept = DocumentWriter(kept_dir, prefix=f"part-{tag}", rows_per_file=STREAM_ROWS_PER_FILE)
    removed = RemovedWriters(removed_dir, rows_per_file=STREAM_ROWS_PER_FILE, tag=tag)
    rows: list[tuple[str, str, str, float, bool]] = []
    removed_per_source: dict[str, Counter[str]] = defaultdict(Counter)
    pairs: list[dict[str, Any]] = []
    texts: dict[int, tuple[str, str]] = {}
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
        code = int(reason[i])
        if code == KEEP:
            kept.write(doc)
            stats.keep()
        else:
            why = REASONS[code]
            s = int(survivor[i])
            sim = round(float(similarity[i]), 4)
            meta = dict(doc.get("meta") or {})
            meta.update({"kept_id": kept_ids[s], "similarity": sim, "kept_from_earlier_run": s < n_prior})
            removed.write({**doc, "meta": meta}, why)
            rows.append((doc["id"], kept_ids[s], why, sim, s < n_prior))
            stats.drop(why)
            removed_per_source[doc.get("source") or "unknown"][why] += 1
            if len(pairs) < sample_pairs:
                pairs.append({"removed_id": doc["id"], "kept_id": kept_ids[s], "reason": why,
                              "similarity": sim, "removed_text": doc["text"][:200]})
        i += 1
    if i != count:
        raise TextbookError(f"dedup: {path} changed while the stage ran ({i} documents on the second pass, "
                            f"{count} on the first); run it again")
    kept.close()
    removed.close()
    piece = Path(work) / f"pairs-{k:06d}.parquet"
    if rows:
        cols = list(zip(*rows, strict=True))
        pq.write_table(pa.table([pa.array(c, t) for c, t in zip(cols, _PairsWriter.SCHEMA.types, strict=True)],
                                schema=_PairsWriter.SCHEMA), piece)
    else:
        piece.unlink(missing_ok=True)
    return {"counts": stats.counts(), "removed_per_source": {s: dict(c) for s, c in removed_per_source.items()},
            "pairs": pairs, "texts": texts}
