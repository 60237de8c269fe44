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


def run_stage(ctx: Any) -> StageStats:
    from tqdm import tqdm

    from pipeline.config import config_hash
    from pipeline.documents import iter_documents, to_row
    from pipeline.run import gather_stage_stats
    from pipeline.shards import SHARD_COLUMNS, SHARD_SCHEMA, ShardSetWriter
    from pipeline.tokenizer import load_tokenizer

    section, cfg = ctx.section, ctx.cfg
    seed = section.seed if section.seed is not None else cfg.run.seed
    stats = StageStats(ctx.name)
    if not ctx.inputs:
        raise NoInputDocuments("shard: no input documents (the upstream stages kept nothing, or shard.inputs is empty)")
    tokenizer = load_tokenizer(cfg.tokenizer.path, workers=cfg.tokenizer.workers)
    out_dir = Path(section.out) if section.out else Path(ctx.run_dir)
    work = ctx.state_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "store").mkdir(parents=True)
    t0 = time.time()

    # 1. tokenize -----------------------------------------------------------------------------------
    store = _Store(work / "store", SHARD_SCHEMA)
    sources: dict[str, int] = {}
    doc_hash: list[int] = []
    doc_src: list[int] = []
    doc_val: list[bool] = []
    doc_tokens: list[int] = []
    doc_bytes: list[int] = []
    doc_u: list[float] = []  # uniform in [0, 1) from (seed, id): decides fractional copies
    dropped_examples: dict[str, list[str]] = {}

    def unreadable(reason: str, where: str) -> None:
        stats.read()
        stats.error_at(reason, where)

    def drop(reason: str, doc: dict[str, Any]) -> None:
        stats.drop(reason)
        ex = dropped_examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(str(doc.get("id")))

    def flush(batch: list[dict[str, Any]]) -> None:
        rows = [to_row(d) for d in batch]
        ids = tokenizer.encode_batch([r["text"] for r in rows])
        cols: dict[str, Any] = {c: [r[c] for r in rows] for c in SHARD_COLUMNS if c not in ("input_ids", "num_tokens")}
        cols["input_ids"] = token_id_array(ids)
        cols["num_tokens"] = pa.array([len(x) for x in ids], pa.int32())
        store.add(pa.table({c: cols[c] for c in SHARD_COLUMNS}, schema=SHARD_SCHEMA))
        for r, x in zip(rows, ids, strict=True):
            src = r["source"] or "unknown"
            doc_src.append(sources.setdefault(src, len(sources)))
            doc_hash.append(id_hash(r["id"]))
            doc_val.append(is_validation(r["id"], section.validation_fraction))
            doc_tokens.append(len(x))
            doc_bytes.append(len(r["text"].encode("utf-8", "replace")) + 4 * len(x))
            doc_u.append(id_hash(r["id"], f"sample-{seed}") / _U64)

    batch: list[dict[str, Any]] = []
    batch_chars = 0
    with tqdm(desc="shard: tokenizing", unit="doc", mininterval=1.0, file=sys.stderr) as bar:
        for doc in iter_documents(ctx.inputs, on_error=unreadable, on_repair=stats.on_repair):
            stats.read()
            if not doc["text"].strip():
                drop("empty_text", doc)
                continue
            if len(doc["text"]) > section.max_chars:
                drop("too_long", doc)
                continue
            batch.append(doc)
            batch_chars += len(doc["text"])
            if len(batch) >= cfg.tokenizer.batch_size or batch_chars > 8_000_000:
                flush(batch)
                bar.update(len(batch))
                batch, batch_chars = [], 0
        if batch:
            flush(batch)
            bar.update(len(batch))
    store.close()
    seconds_tokenize = time.time() - t0
    n = len(doc_hash)

    # 2. plan ---------------------------------------------------------------------------------------
    names = list(sources)
    src = np.asarray(doc_src, dtype=np.int32)
    val = np.asarray(doc_val, dtype=bool)
    tokens = np.asarray(doc_tokens, dtype=np.int64)
    weight_of = np.array([section.weights.get(s, section.default_weight) for s in names] or [0.0])
    weights = weight_of[src] if n else np.empty(0)
    scale = 1.0
    if section.target_tokens and n:
        planned = float((weights * tokens)[~val].sum())
        if planned <= 0:
            raise TextbookError("shard.target_tokens: the train split has no tokens to scale (all weights are 0?)")
        scale = section.target_tokens / planned
    eff = weights * scale
    whole = np.floor(eff)
    frac = eff - whole
    # the same rule as copies_for(), vectorised
    copies = np.where(val, 1, whole.astype(np.int64) + ((frac > 0) & (np.asarray(doc_u) < frac))).astype(np.int64)
    sampled_out = int((copies == 0).sum())
    if sampled_out:
        stats.drop("sampled_out", sampled_out)
    stats.keep(int((copies > 0).sum()))
    dh = np.asarray(doc_hash, dtype=np.uint64)
    entry_doc = np.repeat(np.arange(n), copies)
    entry_copy = np.arange(len(entry_doc)) - np.repeat(np.cumsum(copies) - copies, copies)
    entry_key = shuffle_keys(dh[entry_doc], entry_copy, seed)
    entry_val = val[entry_doc]
    row_bytes = np.asarray(doc_bytes, dtype=np.int64)[entry_doc]
    buckets = max(1, math.ceil(int(row_bytes.sum()) / (section.shuffle_buffer_mb << 20)))
    entry_bucket = (entry_key % np.uint64(buckets)).astype(np.int64)

    # 3. bucket -------------------------------------------------------------------------------------
    bucket_schema = SHARD_SCHEMA.append(pa.field("_key", pa.uint64())).append(pa.field("_copy", pa.int32()))
    order = np.argsort(entry_doc, kind="stable")  # entries in store order, for one sequential pass
    sorted_doc = entry_doc[order]
    writers: dict[tuple[bool, int], Any] = {}
    (work / "buckets").mkdir()
    with tqdm(total=len(entry_doc), desc="shard: shuffling", unit="row", mininterval=1.0, file=sys.stderr) as bar:
        for first, table in store.batches():
            lo, hi = np.searchsorted(sorted_doc, [first, first + len(table)])
            sel = order[lo:hi]
            if not len(sel):
                continue
            local, sel_val, sel_bucket = entry_doc[sel] - first, entry_val[sel], entry_bucket[sel]
            sel_key, sel_copy = entry_key[sel], entry_copy[sel].astype(np.int32)
            for (is_val, b) in {(bool(v), int(k)) for v, k in zip(sel_val, sel_bucket, strict=True)}:
                m = (sel_val == is_val) & (sel_bucket == b)
                part = table.take(pa.array(local[m])).append_column(
                    "_key", pa.array(sel_key[m], pa.uint64())).append_column(
                    "_copy", pa.array(sel_copy[m], pa.int32()))
                w = writers.get((is_val, b))
                if w is None:
                    w = writers[(is_val, b)] = pa.ipc.new_file(
                        str(work / "buckets" / f"{'validation' if is_val else 'train'}-{b:05d}.arrow"), bucket_schema)
                w.write_table(part)
            bar.update(len(sel))
    for w in writers.values():
        w.close()
    shutil.rmtree(work / "store", ignore_errors=True)

    # 4. write --------------------------------------------------------------------------------------
    run_stats = gather_stage_stats(Path(ctx.run_dir))
    run_stats.pop(ctx.name, None)
    figures = {
        "seed": seed, "validation_fraction": section.validation_fraction,
        "weights": {s: float(weight_of[k]) for k, s in enumerate(names)}, "target_tokens": section.target_tokens,
        "weight_scale": round(scale, 6), "shuffle_buckets": buckets,
        "documents_per_source": {s: int((src == k).sum()) for k, s in enumerate(names)},
        "validation_documents": int(val.sum()),
        "train_rows": int((~entry_val).sum()), "validation_rows": int(entry_val.sum()),
        "train_tokens_per_source": {s: int((tokens[entry_doc] * ((src[entry_doc] == k) & ~entry_val)).sum())
                                    for k, s in enumerate(names)},
        "dropped_examples": dropped_examples,
    }
    for k, v in figures.items():
        stats.set(k, v)
    writer = ShardSetWriter(out_dir, tokenizer, shard_bytes=section.shard_mb << 20, batch_size=1024)
    try:
        with tqdm(total=len(entry_doc), desc="shard: writing", unit="row", mininterval=1.0, file=sys.stderr) as bar:
            for split in ("train", "validation"):
                for path in sorted((work / "buckets").glob(f"{split}-*.arrow")):
                    with pa.memory_map(str(path)) as srcf:
                        table = pa.ipc.open_file(srcf).read_all()
                    table = table.take(pa.array(np.argsort(table.column("_key").to_numpy(), kind="stable")))
                    copy_col = table.column("_copy").to_numpy()
                    docs = _docs_of(table.drop_columns(["_key", "_copy"]))
                    for d, c in zip(docs, copy_col.tolist(), strict=True):
                        if c:
                            d["copy"] = c  # folded into meta: the epoch this repeat belongs to
                    writer.add(split, docs)
                    bar.update(len(docs))
        stats.set("seconds_tokenize", round(seconds_tokenize, 3))
        stats.set("accounting", accounting(run_stats, stats, list(ctx.upstream)))
        manifest = writer.finalize(stage_stats={**run_stats, ctx.name: stats.as_dict()}, config=cfg.resolved(),
                                   config_hash=config_hash(cfg.resolved()),
                                   description=_description(figures, stats))
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats.set("output_dir", str(out_dir))
    stats.set("output_documents", manifest["totals"]["documents"])
    stats.set("output_tokens", manifest["totals"]["tokens"])
    elapsed = time.time() - t0
    stats.set("tokens_per_second", round(manifest["totals"]["tokens"] / elapsed, 1) if elapsed > 0 else None)
    return stats


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
