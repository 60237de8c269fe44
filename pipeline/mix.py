"""The `shard` stage: mix sources by weight, tokenize, shuffle globally and write the final shard set.

Steps:

1. tokenize   stream the documents once; drop empty and over-long ones (named reasons); tokenize in batches
              (the tokenizer's Rust thread pool); spill the tokenized rows to `state/store/` in input order.
              Only ~20 bytes per document stay in RAM (id hash, source, split, token count, byte size).
2. plan       split by id hash (validation never repeats and never appears in train); train copies per
              document = weight (synthetic x2, web x1, 0.5 = a deterministic half), scaled to
              `target_tokens` when set; every output row gets a random key from (seed, id, copy).
3. bucket     one pass over the store writes each output row to bucket key % B, B sized so one bucket fits
              `shuffle_buffer_mb`: a global shuffle in bounded memory.
4. write      bucket by bucket, rows sorted by key go to the lead's `ShardSetWriter` (atomic: a failed run
              leaves the previous shard set, never a partial one); the manifest carries every stage's stats
              and the accounting of every input document.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import NoInputDocuments, TextbookError
from pipeline.minhash import fmix64
from pipeline.shards import token_id_array
from pipeline.stats import StageStats

_U64 = float(2**64)


def id_hash(doc_id: str, salt: str = "") -> int:
    """Stable 64-bit hash of an id (split assignment, sampling, shuffle keys)."""
    return int.from_bytes(hashlib.blake2b(f"{salt}\0{doc_id}".encode("utf-8", "replace"), digest_size=8).digest(),
                          "little")


def is_validation(doc_id: str, fraction: float) -> bool:
    """Validation membership depends on the id alone, so it is the same in every run and for every seed."""
    return fraction > 0 and id_hash(doc_id, "validation") / _U64 < fraction


def copies_for(weight: float, doc_id: str, seed: int) -> int:
    """floor(weight) copies plus one more with probability frac(weight), decided by the id (deterministic)."""
    whole = math.floor(weight)
    frac = weight - whole
    return whole + (1 if frac > 0 and id_hash(doc_id, f"sample-{seed}") / _U64 < frac else 0)


def shuffle_keys(doc_hash: np.ndarray, copy: np.ndarray, seed: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return fmix64(doc_hash ^ fmix64(copy.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)))


class _Store:
    """Tokenized documents in input order, as Arrow IPC files of ~64 MB."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.dir = directory
        self.schema = schema
        self.files: list[tuple[Path, int, int]] = []  # (path, first doc, docs)
        self._writer: Any = None
        self._bytes = 0
        self._first = 0
        self._n = 0

    def add(self, table: pa.Table) -> None:
        if self._writer is None:
            path = self.dir / f"store-{len(self.files):05d}.arrow"
            self._writer = pa.ipc.new_file(path, self.schema)
            self._path = path
        self._writer.write_table(table)
        self._bytes += table.nbytes
        self._n += len(table)
        if self._bytes >= 64 << 20:
            self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.files.append((self._path, self._first, self._n))
            self._first += self._n
            self._writer, self._bytes, self._n = None, 0, 0

    def close(self) -> None:
        self._close()

    @staticmethod
    def listing(directory: Path) -> list[tuple[Path, int, int]]:
        """(path, first doc, docs) of the files a closed store left in `directory` (read back by another task)."""
        out, first = [], 0
        for path in sorted(directory.glob("store-*.arrow")):
            with pa.memory_map(str(path)) as src:
                n = pa.ipc.open_file(src).read_all().num_rows
            out.append((path, first, n))
            first += n
        return out

    def batches(self) -> Iterator[tuple[int, pa.Table]]:
        for path, first, _ in self.files:
            with pa.memory_map(str(path)) as src:
                yield first, pa.ipc.open_file(src).read_all()


def _docs_of(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts with input_ids as numpy views (the shard writer then skips re-tokenizing)."""
    ids = table.column("input_ids").combine_chunks()
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy(zero_copy_only=False)
    docs = table.drop_columns(["input_ids", "num_tokens"]).to_pylist()
    for i, d in enumerate(docs):
        d["input_ids"] = values[offsets[i]:offsets[i + 1]]
    return docs


@dataclass
class _DocFigures:
    """What the plan needs of each tokenized document, in input order (~40 bytes a document)."""

    sources: dict[str, int] = field(default_factory=dict)
    hash: list[int] = field(default_factory=list)
    src: list[int] = field(default_factory=list)
    val: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    u: list[float] = field(default_factory=list)  # uniform in [0, 1) from (seed, id): decides fractional copies
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, rows: list[dict[str, Any]], ids: list[Any], validation_fraction: float, seed: int) -> None:
        for r, x in zip(rows, ids, strict=True):
            src = r["source"] or "unknown"
            self.src.append(self.sources.setdefault(src, len(self.sources)))
            self.hash.append(id_hash(r["id"]))
            self.val.append(is_validation(r["id"], validation_fraction))
            self.tokens.append(len(x))
            self.bytes.append(len(r["text"].encode("utf-8", "replace")) + 4 * len(x))
            self.u.append(id_hash(r["id"], f"sample-{seed}") / _U64)

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-document figures as arrays (what a file's plan is computed from)."""
        return {"hash": np.asarray(self.hash, dtype=np.uint64), "src": np.asarray(self.src, dtype=np.int64),
                "val": np.asarray(self.val, dtype=bool), "tokens": np.asarray(self.tokens, dtype=np.int64),
                "bytes": np.asarray(self.bytes, dtype=np.int64), "u": np.asarray(self.u, dtype=np.float64)}


class _Tokenizing:
    """Step 1 over a stream of documents: drops (named reasons), tokenizes in batches, spills to a `_Store`."""

    def __init__(self, stats: StageStats, store: _Store, tokenizer: Any, section: Any, seed: int,
                 batch_size: int) -> None:
        self.stats, self.store, self.tokenizer, self.section, self.seed = stats, store, tokenizer, section, seed
        self.batch_size = batch_size
        self.figures = _DocFigures()

    def drop(self, reason: str, doc: dict[str, Any]) -> None:
        self.stats.drop(reason)
        ex = self.figures.dropped_examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(str(doc.get("id")))

    def flush(self, batch: list[dict[str, Any]]) -> None:
        from pipeline.documents import to_row
        from pipeline.shards import SHARD_COLUMNS, SHARD_SCHEMA

        rows = [to_row(d) for d in batch]
        ids = self.tokenizer.encode_batch([r["text"] for r in rows])
        cols: dict[str, Any] = {c: [r[c] for r in rows] for c in SHARD_COLUMNS if c not in ("input_ids", "num_tokens")}
        cols["input_ids"] = token_id_array(ids)
        cols["num_tokens"] = pa.array([len(x) for x in ids], pa.int32())
        self.store.add(pa.table({c: cols[c] for c in SHARD_COLUMNS}, schema=SHARD_SCHEMA))
        self.figures.add(rows, ids, self.section.validation_fraction, self.seed)

    def run(self, docs: Iterator[dict[str, Any]], bar: Any = None) -> None:
        batch: list[dict[str, Any]] = []
        batch_chars = 0
        for doc in docs:
            self.stats.read()
            if not doc["text"].strip():
                self.drop("empty_text", doc)
                continue
            if len(doc["text"]) > self.section.max_chars:
                self.drop("too_long", doc)
                continue
            batch.append(doc)
            batch_chars += len(doc["text"])
            if len(batch) >= self.batch_size or batch_chars > 8_000_000:
                self.flush(batch)
                if bar is not None:
                    bar.update(len(batch))
                batch, batch_chars = [], 0
        if batch:
            self.flush(batch)
            if bar is not None:
                bar.update(len(batch))
        self.store.close()


@dataclass
class _Plan:
    """Step 2: every output row (entry) with its document, copy number, shuffle key, split and bucket."""

    doc: np.ndarray
    copy: np.ndarray
    key: np.ndarray
    val: np.ndarray
    bucket: np.ndarray
    buckets: int
    figures: dict[str, Any]


def _plan(f: _DocFigures, section: Any, seed: int, stats: StageStats) -> _Plan:
    """Step 2 in one process: every output row of every document (the distributed path plans file by file
    with the same functions: `_run_tasks`)."""
    arrays = f.arrays()
    names = list(f.sources)
    before = _sums_before(arrays, len(names))
    scale = _scale(names, before, section)
    copies = _copies(arrays, _weights(names, section) * scale)
    after = _sums_after(arrays, copies, len(names))
    buckets = _buckets(after["row_bytes"], section)
    figures = _plan_figures(names, section, seed, scale, buckets, before, after, f.dropped_examples, stats)
    return _entries(arrays, copies, seed, buckets, 0, figures)


def _weights(names: list[str], section: Any) -> np.ndarray:
    """Weight per source code (float64[len(names)], at least one element)."""
    return np.array([section.weights.get(s, section.default_weight) for s in names] or [0.0])


def _sums_before(a: dict[str, np.ndarray], sources: int) -> dict[str, Any]:
    """What the scale needs, summed per source code (integers, so parts add up to exactly the whole)."""
    train = ~a["val"]
    return {"documents": np.bincount(a["src"], minlength=sources).astype(np.int64),
            "validation_documents": int(a["val"].sum()),
            "train_tokens": np.bincount(a["src"][train], weights=a["tokens"][train], minlength=sources).astype(np.int64)}


def _scale(names: list[str], before: dict[str, Any], section: Any) -> float:
    """The factor on every weight that makes the planned train tokens `target_tokens` (1 without a target)."""
    if not section.target_tokens or not int(before["documents"].sum()):
        return 1.0
    weight_of = _weights(names, section)
    planned = float(sum(float(weight_of[k]) * int(t) for k, t in enumerate(before["train_tokens"].tolist())))
    if planned <= 0:
        raise TextbookError("shard.target_tokens: the train split has no tokens to scale (all weights are 0?)")
    return section.target_tokens / planned


def _copies(a: dict[str, np.ndarray], eff: np.ndarray) -> np.ndarray:
    """Output rows per document (int64): the rule of copies_for(), vectorised; validation documents once."""
    e = eff[a["src"]] if len(a["src"]) else np.empty(0)
    whole = np.floor(e)
    frac = e - whole
    return np.where(a["val"], 1, whole.astype(np.int64) + ((frac > 0) & (a["u"] < frac))).astype(np.int64)


def _sums_after(a: dict[str, np.ndarray], copies: np.ndarray, sources: int) -> dict[str, Any]:
    """The planned rows' figures (integers: a part's add up to the whole's)."""
    train = ~a["val"]
    return {"sampled_out": int((copies == 0).sum()), "kept": int((copies > 0).sum()),
            "row_bytes": int((a["bytes"] * copies).sum()), "train_rows": int(copies[train].sum()),
            "validation_rows": int(copies[~train].sum()),
            "train_tokens": np.bincount(a["src"][train], weights=(a["tokens"] * copies)[train],
                                        minlength=sources).astype(np.int64)}


def _buckets(row_bytes: int, section: Any) -> int:
    return max(1, math.ceil(row_bytes / (section.shuffle_buffer_mb << 20)))


def _plan_figures(names: list[str], section: Any, seed: int, scale: float, buckets: int, before: dict[str, Any],
                  after: dict[str, Any], dropped_examples: dict[str, list[str]], stats: StageStats) -> dict[str, Any]:
    """The plan's figures, set on `stats` (with the sampled-out drops and the kept count) and returned."""
    weight_of = _weights(names, section)
    if after["sampled_out"]:
        stats.drop("sampled_out", after["sampled_out"])
    stats.keep(after["kept"])
    figures = {
        "seed": seed, "validation_fraction": section.validation_fraction,
        "weights": {s: float(weight_of[k]) for k, s in enumerate(names)}, "target_tokens": section.target_tokens,
        "weight_scale": round(scale, 6), "shuffle_buckets": buckets,
        "documents_per_source": {s: int(before["documents"][k]) for k, s in enumerate(names)},
        "validation_documents": before["validation_documents"],
        "train_rows": after["train_rows"], "validation_rows": after["validation_rows"],
        "train_tokens_per_source": {s: int(after["train_tokens"][k]) for k, s in enumerate(names)},
        "dropped_examples": dropped_examples,
    }
    for k, v in figures.items():
        stats.set(k, v)
    return figures


def _entries(a: dict[str, np.ndarray], copies: np.ndarray, seed: int, buckets: int, first_doc: int,
             figures: dict[str, Any] | None = None) -> _Plan:
    """The output rows of documents first_doc.. (arrays `a`, in input order): document, copy, shuffle key
    (from the id hash, the copy and the seed: never from a position), split and bucket."""
    n = len(copies)
    entry_doc = np.repeat(np.arange(n), copies)
    entry_copy = np.arange(len(entry_doc)) - np.repeat(np.cumsum(copies) - copies, copies)
    entry_key = shuffle_keys(a["hash"][entry_doc], entry_copy, seed)
    entry_bucket = (entry_key % np.uint64(buckets)).astype(np.int64)
    return _Plan(entry_doc + first_doc, entry_copy, entry_key, a["val"][entry_doc], entry_bucket, buckets,
                 figures or {})


def _bucket_parts(store: _Store, plan: _Plan, first_doc: int, bucket_dir: Path, name: str, bar: Any = None) -> None:
    """Step 3 for the documents of one store: each of their output rows to `<split>-<bucket>/<name>.arrow`
    (or, with name "", to `<split>-<bucket>.arrow`), in store order."""
    from pipeline.shards import SHARD_SCHEMA

    bucket_schema = SHARD_SCHEMA.append(pa.field("_key", pa.uint64())).append(pa.field("_copy", pa.int32()))
    lo_doc = first_doc
    hi_doc = first_doc + sum(n for _, _, n in store.files)
    lo, hi = np.searchsorted(plan.doc, [lo_doc, hi_doc])  # plan.doc is sorted (np.repeat of aranged docs)
    entry_doc = plan.doc[lo:hi] - first_doc
    writers: dict[tuple[bool, int], Any] = {}
    for first, table in store.batches():
        a, b = np.searchsorted(entry_doc, [first, first + len(table)])
        if a == b:
            continue
        local = entry_doc[a:b] - first
        sel_val, sel_bucket = plan.val[lo + a:lo + b], plan.bucket[lo + a:lo + b]
        sel_key, sel_copy = plan.key[lo + a:lo + b], plan.copy[lo + a:lo + b].astype(np.int32)
        for (is_val, bk) in sorted({(bool(v), int(k)) for v, k in zip(sel_val, sel_bucket, strict=True)}):
            m = (sel_val == is_val) & (sel_bucket == bk)
            part = table.take(pa.array(local[m])).append_column(
                "_key", pa.array(sel_key[m], pa.uint64())).append_column("_copy", pa.array(sel_copy[m], pa.int32()))
            w = writers.get((is_val, bk))
            if w is None:
                stem = f"{'validation' if is_val else 'train'}-{bk:05d}"
                path = bucket_dir / stem / f"{name}.arrow" if name else bucket_dir / f"{stem}.arrow"
                path.parent.mkdir(parents=True, exist_ok=True)
                w = writers[(is_val, bk)] = pa.ipc.new_file(str(path), bucket_schema)
            w.write_table(part)
        if bar is not None:
            bar.update(b - a)
    for w in writers.values():
        w.close()


def _bucket_docs(paths: list[Path]) -> list[dict[str, Any]]:
    """Step 4 for one bucket: its rows (from one file or a task's parts, in order) sorted by shuffle key."""
    tables = []
    for path in paths:
        with pa.memory_map(str(path)) as srcf:
            tables.append(pa.ipc.open_file(srcf).read_all())
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    table = table.take(pa.array(np.argsort(table.column("_key").to_numpy(), kind="stable")))
    copy_col = table.column("_copy").to_numpy()
    docs = _docs_of(table.drop_columns(["_key", "_copy"]))
    for d, c in zip(docs, copy_col.tolist(), strict=True):
        if c:
            d["copy"] = c  # folded into meta: the epoch this repeat belongs to
    return docs


def run_stage(ctx: Any) -> StageStats:
    """The stage: in this process, or (run.executor ray) as Ray tasks (`_run_tasks`): the same rows in the
    same order. A shard.out URL is built in state/ and published there (`pipeline.scale.storage`)."""
    from tqdm import tqdm

    from pipeline.documents import iter_documents
    from pipeline.scale import engine_for
    from pipeline.shards import SHARD_SCHEMA, ShardSetWriter
    from pipeline.tokenizer import load_tokenizer

    section, cfg = ctx.section, ctx.cfg
    seed = section.seed if section.seed is not None else cfg.run.seed
    stats = StageStats(ctx.name)
    if not ctx.inputs:
        raise NoInputDocuments("shard: no input documents (the upstream stages kept nothing, or shard.inputs is empty)")
    tokenizer = load_tokenizer(cfg.tokenizer.path, workers=cfg.tokenizer.workers)
    out_dir, url = _out_dir(ctx)
    if url is not None:  # the local check runs in ShardSetWriter; a published set is checked before any work
        from pipeline.scale.storage import remote_manifest
        from pipeline.shards import check_compatible

        published = remote_manifest(url)
        if published is not None:
            check_compatible(url, tokenizer.sha256, published)
    work = ctx.state_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "store").mkdir(parents=True)
    t0 = time.time()
    engine = engine_for(cfg)
    if engine.distributed:
        return _run_tasks(ctx, engine, stats, seed, out_dir, url, work, t0)

    # 1. tokenize -----------------------------------------------------------------------------------
    store = _Store(work / "store", SHARD_SCHEMA)

    def unreadable(reason: str, where: str) -> None:
        stats.read()
        stats.error_at(reason, where)

    tok = _Tokenizing(stats, store, tokenizer, section, seed, cfg.tokenizer.batch_size)
    with tqdm(desc="shard: tokenizing", unit="doc", mininterval=1.0, file=sys.stderr) as bar:
        tok.run(iter_documents(ctx.inputs, on_error=unreadable, on_repair=stats.on_repair), bar)
    seconds_tokenize = time.time() - t0

    # 2. plan ---------------------------------------------------------------------------------------
    plan = _plan(tok.figures, section, seed, stats)

    # 3. bucket -------------------------------------------------------------------------------------
    (work / "buckets").mkdir()
    with tqdm(total=len(plan.doc), desc="shard: shuffling", unit="row", mininterval=1.0, file=sys.stderr) as bar:
        _bucket_parts(store, plan, 0, work / "buckets", "", bar)
    shutil.rmtree(work / "store", ignore_errors=True)

    # 4. write --------------------------------------------------------------------------------------
    writer = ShardSetWriter(out_dir, tokenizer, shard_bytes=section.shard_mb << 20, batch_size=1024)
    try:
        with tqdm(total=len(plan.doc), desc="shard: writing", unit="row", mininterval=1.0, file=sys.stderr) as bar:
            for split in ("train", "validation"):
                for path in sorted((work / "buckets").glob(f"{split}-*.arrow")):
                    docs = _bucket_docs([path])
                    writer.add(split, docs)
                    bar.update(len(docs))
        return _finish(ctx, stats, writer, plan, out_dir, url, seconds_tokenize, t0)
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _out_dir(ctx: Any) -> tuple[Path, str | None]:
    """(where the shard set is written, the URL it is then published to, or None)."""
    from pipeline.scale.storage import is_url, staging_dir_for

    out = ctx.section.out
    if not out and is_url(ctx.cfg.run.out_dir):  # a run directory on object storage: the set goes to its root
        out = ctx.cfg.run.out_dir
    if out and is_url(out):
        return staging_dir_for(out, ctx.state_dir), out
    return (Path(out) if out else Path(ctx.run_dir)), None


def _finish(ctx: Any, stats: StageStats, writer: Any, plan: _Plan, out_dir: Path, url: str | None,
            seconds_tokenize: float, t0: float) -> StageStats:
    """Manifest (every stage's stats, the accounting), publication to a URL, the stage's output figures."""
    from pipeline.config import config_hash
    from pipeline.run import gather_stage_stats

    cfg = ctx.cfg
    run_stats = gather_stage_stats(Path(ctx.run_dir))
    run_stats.pop(ctx.name, None)
    stats.set("seconds_tokenize", round(seconds_tokenize, 3))
    stats.set("accounting", accounting(run_stats, stats, list(ctx.upstream)))
    manifest = writer.finalize(stage_stats={**run_stats, ctx.name: stats.as_dict()}, config=cfg.resolved(),
                               config_hash=config_hash(cfg.resolved()),
                               description=_description(plan.figures, stats))
    if url is not None:
        from pipeline.scale.storage import publish_shard_set

        publish_shard_set(out_dir, url)
        shutil.rmtree(out_dir, ignore_errors=True)
    stats.set("output_dir", url or str(out_dir))
    stats.set("output_documents", manifest["totals"]["documents"])
    stats.set("output_tokens", manifest["totals"]["tokens"])
    elapsed = time.time() - t0
    stats.set("tokens_per_second", round(manifest["totals"]["tokens"] / elapsed, 1) if elapsed > 0 else None)
    return stats


# ---------------------------------------------------------------------------------------------- as Ray tasks


def _run_tasks(ctx: Any, engine: Any, stats: StageStats, seed: int, out_dir: Path, url: str | None, work: Path,
               t0: float) -> StageStats:
    """The four steps as tasks: tokenize one input file each (its per-document figures stay in its store
    directory); plan file by file (the driver only adds up per-file sums: the weight scale and the number of
    buckets); bucket one tokenized file each (hash-partitioned by shuffle key: `<split>-<bucket>/<file>.arrow`,
    its plan recomputed in the task from its figures and the global scale); write one bucket each (rows sorted
    by key, shards cut inside the bucket). The driver adopts the buckets' shard files in (split, bucket) order
    and writes the one manifest last.

    The row sequence of each split equals the local path's; with one shuffle bucket (shuffle_buffer_mb above
    the data) the files are byte-identical too. With several buckets a shard ends at a bucket's end (the local
    path fills shards across buckets), so file boundaries and the fingerprint differ from a local run, never
    between runs with different numbers of workers: what a task writes depends on its partition alone.

    Memory of a worker process (which runs many tasks) does not depend on the size of the input, only on
    the partitions: a fixed part (Python, pyarrow, one tokenizer per process: `process_tokenizer`; ~230 MB
    RSS measured) plus the largest of: a tokenize task, one input file's figures (~150 B a document) and one
    batch (`tokenizer.batch_size` documents, <= 8 MB of text); a plan or bucket task, one file's figures and
    plan (~40 B a document, 33 B a row), one store file (<= 64 MB, memory-mapped) and one open Arrow writer per
    bucket it feeds; a write task, one bucket (`shard.shuffle_buffer_mb` of row bytes on average, ~3x that in
    RSS as Arrow table, row dicts and parquet row group). tests/test_scale_memory.py checks 10x the input
    within 40 MB. The driver holds per-file sums and the sources' names: nothing per document.
    """
    from pipeline.shards import ShardSetWriter
    from pipeline.tokenizer import load_tokenizer

    section, cfg = ctx.section, ctx.cfg
    tok_cfg = (cfg.tokenizer.path, cfg.tokenizer.batch_size)
    store = str(work / "store")
    parts = engine.map(_tokenize_file, [(k, str(f), store, section, seed, tok_cfg) for k, f in enumerate(ctx.inputs)],
                       label="shard: tokenize")
    seconds_tokenize = time.time() - t0
    names, codes, before, dropped, firsts = _join_parts(parts, stats)
    scale = _scale(names, before, section)
    eff = _weights(names, section) * scale
    sums = engine.map(_plan_file, [(k, store, codes[k], eff) for k in range(len(parts))], label="shard: plan")
    after = _add_sums(sums, len(names))
    buckets = _buckets(after["row_bytes"], section)
    plan = _Plan(*(np.empty(0) for _ in range(5)), buckets,
                 _plan_figures(names, section, seed, scale, buckets, before, after, dropped, stats))
    engine.map(_bucket_file, [(k, store, codes[k], eff, seed, buckets, firsts[k], str(work / "buckets"))
                              for k in range(len(parts))], label="shard: bucket")
    shutil.rmtree(work / "store", ignore_errors=True)
    groups = [(split, b) for split in ("train", "validation") for b in range(buckets)
              if (work / "buckets" / f"{split}-{b:05d}").is_dir()]
    written = engine.map(_write_bucket, [(split, b, str(work / "buckets"), str(work / "written"), section.shard_mb,
                                          tok_cfg) for split, b in groups], label="shard: write")
    writer = ShardSetWriter(out_dir, load_tokenizer(cfg.tokenizer.path, workers=cfg.tokenizer.workers),
                            shard_bytes=section.shard_mb << 20, batch_size=1024)
    try:
        for (split, _), (files, per_source) in zip(groups, written, strict=True):
            writer.adopt(split, files, per_source)
        stats.set("engine", {**engine.describe(), "tokenize_tasks": len(parts), "write_tasks": len(groups)})
        return _finish(ctx, stats, writer, plan, out_dir, url, seconds_tokenize, t0)
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _join_parts(parts: list[dict[str, Any]], stats: StageStats
                ) -> tuple[list[str], list[np.ndarray], dict[str, Any], dict[str, list[str]], list[int]]:
    """The tokenize tasks' results as one pass gives them: source names in first-appearance order, each
    file's local -> global source codes, the per-source sums, the dropped examples, each file's first doc."""
    names: dict[str, int] = {}
    codes, firsts = [], [0]
    dropped: dict[str, list[str]] = {}
    for part in parts:
        stats.merge(part["counts"])
        codes.append(np.array([names.setdefault(s, len(names)) for s in part["sources"]] or [0], dtype=np.int64))
        firsts.append(firsts[-1] + part["documents"])
        for reason, ids in part["dropped_examples"].items():
            ex = dropped.setdefault(reason, [])
            ex.extend(ids[: max(0, 5 - len(ex))])
    before = {"documents": np.zeros(len(names), np.int64), "train_tokens": np.zeros(len(names), np.int64),
              "validation_documents": sum(p["before"]["validation_documents"] for p in parts)}
    for part, code in zip(parts, codes, strict=True):
        for key in ("documents", "train_tokens"):
            np.add.at(before[key], code[:len(part["before"][key])], part["before"][key])
    return list(names), codes, before, dropped, firsts


def _add_sums(sums: list[dict[str, Any]], sources: int) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(s[k] for s in sums) for k in ("sampled_out", "kept", "row_bytes", "train_rows",
                                                                "validation_rows")}
    out["train_tokens"] = np.zeros(sources, np.int64)
    for s in sums:
        out["train_tokens"] += s["train_tokens"]
    return out


def _tokenize_file(k: int, path: str, store_dir: str, section: Any, seed: int, tok_cfg: tuple[Any, int]
                   ) -> dict[str, Any]:
    """Task: step 1 for one input file into `store/<k>/` (its per-document figures in `figures.npz`, source
    codes local to the file); its counts, sources and per-source sums."""
    from pipeline.documents import iter_documents
    from pipeline.shards import SHARD_SCHEMA
    from pipeline.tokenizer import process_tokenizer

    stats = StageStats("shard")
    d = Path(store_dir) / f"{k:06d}"
    shutil.rmtree(d, ignore_errors=True)  # a retried task starts its part afresh
    d.mkdir(parents=True)

    def unreadable(reason: str, where: str) -> None:
        stats.read()
        stats.error_at(reason, where)

    tok = _Tokenizing(stats, _Store(d, SHARD_SCHEMA), process_tokenizer(tok_cfg[0], workers=1), section, seed,
                      tok_cfg[1])
    tok.run(iter_documents([path], on_error=unreadable, on_repair=stats.on_repair))
    arrays = tok.figures.arrays()
    np.savez(d / "figures.npz", **arrays)
    return {"counts": stats.counts(), "sources": list(tok.figures.sources), "documents": len(arrays["hash"]),
            "before": _sums_before(arrays, len(tok.figures.sources)),
            "dropped_examples": tok.figures.dropped_examples}


def _file_figures(store_dir: str, k: int, codes: np.ndarray) -> dict[str, np.ndarray]:
    """A tokenized file's per-document figures, its source codes made global."""
    with np.load(Path(store_dir) / f"{k:06d}" / "figures.npz") as z:
        a = {name: z[name] for name in z.files}
    a["src"] = codes[a["src"]] if len(a["src"]) else a["src"]
    return a


def _plan_file(k: int, store_dir: str, codes: np.ndarray, eff: np.ndarray) -> dict[str, Any]:
    """Task: step 2's sums for one tokenized file (its output rows under the global weight scale)."""
    a = _file_figures(store_dir, k, codes)
    return _sums_after(a, _copies(a, eff), len(eff))


def _bucket_file(k: int, store_dir: str, codes: np.ndarray, eff: np.ndarray, seed: int, buckets: int, first_doc: int,
                 bucket_dir: str) -> None:
    """Task: step 3 for one tokenized file, its slice of the plan computed here from its figures."""
    from pipeline.shards import SHARD_SCHEMA

    a = _file_figures(store_dir, k, codes)
    plan = _entries(a, _copies(a, eff), seed, buckets, first_doc)
    store = _Store(Path(store_dir) / f"{k:06d}", SHARD_SCHEMA)
    store.files = _Store.listing(store.dir)
    _bucket_parts(store, plan, first_doc, Path(bucket_dir), f"{k:06d}")


def _write_bucket(split: str, bucket: int, bucket_dir: str, out_dir: str, shard_mb: int, tok_cfg: tuple[Any, int]
                  ) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Task: step 4 for one bucket: its shard files (in a directory of its own) and their counts per source."""
    from pipeline.shards import ShardSetWriter
    from pipeline.tokenizer import process_tokenizer

    target = Path(out_dir) / f"{split}-{bucket:05d}"
    shutil.rmtree(target, ignore_errors=True)  # a retried task starts afresh
    writer = ShardSetWriter(target, process_tokenizer(tok_cfg[0], workers=1), shard_bytes=shard_mb << 20,
                            batch_size=1024)
    writer.add(split, _bucket_docs(sorted((Path(bucket_dir) / f"{split}-{bucket:05d}").glob("*.arrow"))))
    return writer.parts(split)


def accounting(run_stats: dict[str, Any], shard: StageStats, upstream: list[str]) -> dict[str, Any]:
    """Every document that entered the chain dedup -> decontaminate -> shard ends in exactly one bucket.

    `input` is what the first of these stages read; each later stage must read what the one before kept.
    `upstream`: the stages this shard stage read from (empty when it read shard.inputs).
    """
    def present(name: str) -> bool:
        return name in run_stats and not run_stats[name].get("skipped")

    names: list[str] = []
    if "decontaminate" in upstream:
        names = (["dedup"] if present("dedup") else []) + ["decontaminate"]
    elif "dedup" in upstream:
        names = ["dedup"]
    chain = [(name, run_stats[name]) for name in names if present(name)]
    chain.append(("shard", shard.as_dict()))
    out: dict[str, Any] = {"input": chain[0][1]["read"], "kept": chain[-1][1]["kept"], "duplicate": 0,
                           "contaminated": 0, "failed": 0, "removed_other": {}, "chain": [n for n, _ in chain]}
    links_ok = True
    for (_, prev), (_, cur) in zip(chain, chain[1:], strict=False):
        links_ok = links_ok and prev["kept"] == cur["read"]
    other: Counter[str] = Counter()
    for name, s in chain:
        for reason, n in s.get("dropped", {}).items():
            if reason in ("exact_duplicate", "near_duplicate"):
                out["duplicate"] += n
            elif reason == "contaminated":
                out["contaminated"] += n
            else:
                other[f"{name}:{reason}"] += n
        out["failed"] += sum(s.get("errored", {}).values())
    out["removed_other"] = dict(other)
    total = out["kept"] + out["duplicate"] + out["contaminated"] + out["failed"] + sum(other.values())
    out["adds_up"] = bool(links_ok and total == out["input"])
    upstream = {k: {"read": v.get("read"), "kept": v.get("kept")} for k, v in run_stats.items()
                if k in ("web", "generate")}
    if upstream:
        out["upstream"] = upstream
    return out


def _description(figures: dict[str, Any], stats: StageStats) -> str:
    w = ", ".join(f"{s} x{v:g}" for s, v in figures["weights"].items())
    return (f"Mixed with weights {w} (scale {figures['weight_scale']:g}), shuffled with seed {figures['seed']}; "
            f"validation = {figures['validation_fraction']:g} of documents by id hash. "
            f"{stats.n_read:,} documents read, {stats.n_kept:,} kept.")
