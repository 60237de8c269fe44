"""Stream packed training sequences out of v1 shards, one parquet row group at a time.

The order is a pure function of (seed, epoch): row groups are permuted per epoch, documents are permuted
inside each row group, source weights drop or repeat documents, and the token stream (every document ends
with EOS already) is cut into sequences of seq_len+1 tokens with a stride of seq_len (the last target of a
sequence is the first input of the next, so no token is lost). Under DDP each rank takes every world-th row
group (or every world-th document when there are fewer row groups than ranks).

The loader's position (epoch, row group cursor, offset, and the few tokens carried over from the previous
row group) is small and goes into every checkpoint: a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import TextbookError


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    rows: int


def open_sets(paths: list[str | Path]) -> list[Any]:
    """Open shard directories and check they share one tokenizer (ids from two tokenizers cannot be mixed)."""
    from pipeline.scale.storage import open_shards_any

    if not paths:
        raise TextbookError("pretrain: no shard directories to train on (set pretrain.data.shards)")
    sets = [open_shards_any(p) for p in paths]
    first = sets[0].manifest["tokenizer"]
    for s in sets[1:]:
        tok = s.manifest["tokenizer"]
        if tok["sha256"] != first["sha256"]:
            raise TextbookError(f"{s.path}: made with tokenizer {tok['name']} ({tok['sha256'][:12]}…), but "
                                f"{sets[0].path} with {first['name']} ({first['sha256'][:12]}…): one run needs one tokenizer")
    return sets


def check_vocab(sets: list[Any], vocab_size: int) -> None:
    """Refuse shards whose token ids may not fit the model's embedding."""
    for s in sets:
        tok = s.manifest["tokenizer"]
        if int(tok["vocab_size"]) > vocab_size:
            raise TextbookError(f"{s.path}: tokenizer {tok['name']} has {tok['vocab_size']} tokens but the model's "
                                f"vocab_size is {vocab_size}; set model.vocab_size >= {tok['vocab_size']} "
                                "(or leave it unset to follow the shards)")


def default_vocab_size(sets: list[Any]) -> int:
    """The shards' tokenizer vocab rounded up to a multiple of 64 (faster matmuls; the extra rows go unused)."""
    return 64 * math.ceil(int(sets[0].manifest["tokenizer"]["vocab_size"]) / 64)


def split_tokens(sets: list[Any], split: str) -> int:
    return sum(int(s.manifest["splits"].get(split, {}).get("tokens", 0)) for s in sets)


def row_groups(sets: list[Any], split: str) -> list[RowGroup]:
    groups = []
    for s in sets:
        for f in s.files(split):
            md = pq.ParquetFile(f).metadata
            groups += [RowGroup(str(f), i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
    return groups


def _doc_slices(table: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of the input_ids list column: document i is values[offsets[i]:offsets[i+1]]."""
    col = table.column("input_ids").combine_chunks()
    return np.asarray(col.values), np.asarray(col.offsets)


class PackedLoader:
    """Batches (x, y) of shape (batch_size, seq_len), int64, forever (epoch after epoch)."""

    def __init__(self, sets: list[Any], split: str, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world: int = 1, source_weights: dict[str, float] | None = None) -> None:
        self.groups = row_groups(sets, split)
        if not self.groups:
            raise TextbookError(f"{', '.join(str(s.path) for s in sets)}: no '{split}' split to train on")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world = rank, world
        self.weights = dict(source_weights or {})
        if self.weights:
            known = {src for s in sets for src in s.manifest["splits"].get(split, {}).get("sources", {})}
            unknown = sorted(set(self.weights) - known)
            if unknown:
                raise TextbookError(f"data.source_weights: source(s) {', '.join(unknown)} not in the shards "
                                    f"(sources: {', '.join(sorted(known))})")
            if any(w < 0 for w in self.weights.values()):
                raise TextbookError("data.source_weights: weights must be >= 0")
        # position
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self.carry = np.empty(0, dtype=np.int64)
        self._stream: np.ndarray | None = None
        self._epoch_tokens = 0  # tokens loaded in this epoch: an epoch with none would loop forever

    # -- order ----------------------------------------------------------------------------------------
    def _epoch_groups(self, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        return [int(i) for i in (perm[self.rank::self.world] if len(self.groups) >= self.world else perm)]

    def _group_stream(self, epoch: int, g: int) -> np.ndarray:
        group = self.groups[g]
        columns = ["input_ids", "source"] if self.weights else ["input_ids"]
        table = pq.ParquetFile(group.file).read_row_group(group.index, columns=columns)
        values, offsets = _doc_slices(table)
        rng = np.random.default_rng([self.seed, epoch, g, 1])
        order = rng.permutation(len(offsets) - 1)
        if len(self.groups) < self.world:  # too few row groups for every rank: split documents instead
            order = order[self.rank::self.world]
        if self.weights:
            sources = table.column("source").to_pylist()
            w = np.array([self.weights.get(sources[i] or "unknown", 1.0) for i in order])
            repeats = np.floor(w).astype(np.int64) + (rng.random(len(order)) < (w - np.floor(w)))
            order = np.repeat(order, repeats)
        if len(order) == 0:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([values[offsets[i]:offsets[i + 1]] for i in order]).astype(np.int64)

    def _load(self) -> None:
        """Fill the stream from the row group at the cursor (next epoch when this one is done)."""
        while True:
            order = self._epoch_groups(self.epoch)
            if self.cursor >= len(order):
                if self._epoch_tokens == 0:
                    raise TextbookError("the training split holds no tokens for this rank (after source "
                                        "weights): nothing to train on")
                self.epoch, self.cursor, self._epoch_tokens = self.epoch + 1, 0, 0
                continue
            group = self._group_stream(self.epoch, order[self.cursor])
            self._epoch_tokens += len(group)
            self._stream = np.concatenate([self.carry, group])
            return

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        T = self.seq_len
        rows = np.empty((self.batch_size, T + 1), dtype=np.int64)
        for b in range(self.batch_size):
            while self._stream is None or len(self._stream) - self.offset < T + 1:
                if self._stream is not None:  # the tail of this group starts the next one
                    self.carry = self._stream[self.offset:].copy()
                    self.cursor, self.offset = self.cursor + 1, 0
                self._load()
            rows[b] = self._stream[self.offset:self.offset + T + 1]
            self.offset += T
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next_batch()

    # -- position ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset,
                "carry": self.carry.tolist(), "epoch_tokens": self._epoch_tokens,
                "groups": len(self.groups), "seed": self.seed, "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["groups"] != len(self.groups) or state["world"] != self.world:
            raise TextbookError(f"cannot resume the data position: the checkpoint saw {state['groups']} row groups "
                                f"on {state['world']} rank(s), now {len(self.groups)} on {self.world} "
                                "(the shards or the number of GPUs changed)")
        self.epoch, self.cursor, self.offset = state["epoch"], state["cursor"], state["offset"]
        self._epoch_tokens = state["epoch_tokens"]
        self.carry = np.asarray(state["carry"], dtype=np.int64)
        self._stream = None
        if self.offset or len(self.carry):
            # Rebuild the stream the position points into: carry + that row group, as when first loaded.
            self._load()


class Prefetcher:
    """Prepares batches in a background thread (pinned host memory on CUDA), each with the loader position
    just after it, so a checkpoint records the position of the last batch *consumed*, not the last prefetched."""

    def __init__(self, loader: PackedLoader, depth: int, pin: bool) -> None:
        self.loader, self.pin = loader, pin
        self.depth = depth
        self._q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _make(self) -> tuple[Any, Any, dict[str, Any]]:
        import torch

        x, y = self.loader.next_batch()
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        if self.pin:
            tx, ty = tx.pin_memory(), ty.pin_memory()
        return tx, ty, self.loader.state_dict()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._make()
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, raised there
            self._q.put(e)

    def next(self) -> tuple[Any, Any, dict[str, Any]]:
        if self.depth == 0:
            return self._make()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="textbook-loader", daemon=True)
            self._thread.start()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@dataclass
class EvalData:
    name: str
    x: np.ndarray  # (n_seq, seq_len)
    y: np.ndarray
    tokens_per_byte: float  # of the documents the sequences were cut from

    @property
    def tokens(self) -> int:
        return int(self.y.size)


def _documents(sets: list[Any], split: str) -> Iterator[tuple[np.ndarray, str]]:
    """(token ids, text) of every document of a split in file order, read one row group at a time."""
    for s in sets:
        for f in s.files(split):
            pf = pq.ParquetFile(f)
            for i in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(i, columns=["input_ids", "text"])
                values, offsets = _doc_slices(table)
                for d, text in enumerate(table.column("text").to_pylist()):
                    yield values[offsets[d]:offsets[d + 1]], text


def eval_data(name: str, sets: list[Any], split: str, max_tokens: int, seq_len: int) -> EvalData | None:
    """The first `max_tokens` target tokens of a split, in file order (fixed across runs and arms)."""
    return pack_eval(name, _documents(sets, split), max_tokens, seq_len)


def pack_eval(name: str, documents: Iterable[tuple[np.ndarray, str]], max_tokens: int, seq_len: int
              ) -> EvalData | None:
    """Evaluation sequences from the first `max_tokens` target tokens of `documents` ((token ids with EOS
    appended, text) in order); None when there are fewer than seq_len + 1 tokens.

    Bits per byte = (mean loss in nats / ln 2) * tokens_per_byte: the ratio is measured on the documents
    the sequences come from (UTF-8 bytes of their text; the EOS token costs no bytes but counts as a token).
    """
    chunks: list[np.ndarray] = []
    n_bytes = n_tokens = 0
    for ids, text in documents:
        chunks.append(ids)
        n_tokens += len(ids)
        n_bytes += len(text.encode("utf-8"))
        if n_tokens > max_tokens:  # max_tokens targets need one token more
            break
    if n_tokens < seq_len + 1:
        return None
    stream = np.concatenate(chunks).astype(np.int64)
    n_seq = min(max_tokens, len(stream) - 1) // seq_len
    idx = np.arange(n_seq)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    rows = stream[idx]
    return EvalData(name, np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]), n_tokens / max(n_bytes, 1))
