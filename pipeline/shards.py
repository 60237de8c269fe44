"""Shard format v1: tokenized parquet shards that describe themselves.

    <out>/data/train-00000-of-00004.parquet   id, text, input_ids, num_tokens, source, edu_score, provenance
    <out>/data/validation-00000-of-00001.parquet
    <out>/manifest.json                        schema version, tokenizer hash, counts, file sha256s, fingerprint,
                                               stage stats, config
    <out>/tokenizer.json                       the tokenizer the ids were made with
    <out>/README.md                            dataset card; its YAML header lets `datasets.load_dataset(<out>)` work
                                               (it carries the fingerprint, so the `datasets` cache is keyed by
                                               the rows, never by the folder's name)

Writes are atomic: shards are built in a hidden temp directory and moved into `data/` only when all are
complete; the manifest is removed first and written last, so it never counts a shard that is not there.
See shards/README.md for the full description.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.documents import PROVENANCE, to_row
from pipeline.errors import TextbookError
from pipeline.io import atomic_write_text, fsync_dir

SCHEMA_VERSION = 1
FORMAT_NAME = "textbook-shards"
SPLITS = ("train", "validation")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.uint32()), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("edu_score", pa.float32()),
        *[pa.field(name, pa.string()) for name in PROVENANCE],
        pa.field("meta", pa.string()),
    ]
)
SHARD_COLUMNS = tuple(SHARD_SCHEMA.names)


def _file_metadata(tokenizer_sha256: str) -> dict[bytes, bytes]:
    return {b"textbook.schema_version": str(SCHEMA_VERSION).encode(),
            b"textbook.tokenizer_sha256": tokenizer_sha256.encode()}


@dataclass
class _SplitWriter:
    """One split's open shard: rows buffered to a row group of about `row_group_bytes`, shards cut at `shard_bytes`."""

    directory: Path
    split: str
    schema: pa.Schema
    shard_bytes: int
    row_group_bytes: int
    files: list[dict[str, Any]] = field(default_factory=list)
    _writer: pq.ParquetWriter | None = None
    _path: Path | None = None
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffer_bytes: int = 0
    _shard_bytes: int = 0
    _docs: int = 0
    _tokens: int = 0

    def add(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._buffer_bytes += table.nbytes
        if self._buffer_bytes >= self.row_group_bytes:
            self._flush_group()

    def _flush_group(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffer_bytes = [], 0
        if self._writer is None:
            self._path = self.directory / f".{self.split}-{len(self.files):05d}.parquet.partial"
            self._writer = pq.ParquetWriter(self._path, self.schema, compression="zstd", write_statistics=True)
        self._writer.write_table(table, row_group_size=len(table))
        self._shard_bytes += table.nbytes
        self._docs += len(table)
        self._tokens += int(pc.sum(table["num_tokens"]).as_py() or 0)
        if self._shard_bytes >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        with open(self._path, "rb+") as f:
            os.fsync(f.fileno())
        self.files.append({"tmp": self._path, "documents": self._docs, "tokens": self._tokens})
        self._writer, self._path = None, None
        self._shard_bytes = self._docs = self._tokens = 0

    def close(self) -> list[dict[str, Any]]:
        self._flush_group()
        self._close_shard()
        return self.files


class ShardSetWriter:
    """Tokenize documents and write a v1 shard set into `out_dir`.

    >>> w = ShardSetWriter("shards/demo", load_tokenizer())
    >>> w.add("train", [{"text": "...", "source": "web"}])
    >>> manifest = w.finalize(stage_stats={}, config={}, config_hash="")
    """

    def __init__(self, out_dir: str | Path, tokenizer: Any, *, shard_bytes: int = 256 << 20,
                 row_group_bytes: int = 4 << 20, batch_size: int = 256, progress: Any = None) -> None:
        self.out_dir = Path(out_dir)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        check_compatible(self.out_dir, tokenizer.sha256)
        self.tmp_dir = self.out_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        (self.tmp_dir / "data").mkdir(parents=True)
        schema = SHARD_SCHEMA.with_metadata(_file_metadata(tokenizer.sha256))
        self._splits = {s: _SplitWriter(self.tmp_dir / "data", s, schema, shard_bytes, row_group_bytes)
                        for s in SPLITS}
        self._per_source: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, split: str, docs: Iterable[dict[str, Any]]) -> int:
        """Add documents (dicts with `text` and any provenance) to a split; returns how many were added."""
        if split not in self._splits:
            raise TextbookError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
        n = 0
        batch: list[dict[str, Any]] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= self.batch_size:
                n += self._add_batch(split, batch)
                batch = []
        if batch:
            n += self._add_batch(split, batch)
        return n

    def _add_batch(self, split: str, docs: list[dict[str, Any]]) -> int:
        # input_ids is a shard column, not provenance: keep it out of `meta` (to_row folds unknown keys there)
        rows = [to_row({k: v for k, v in d.items() if k != "input_ids"}) for d in docs]
        missing = [i for i, d in enumerate(docs) if d.get("input_ids") is None]
        ids: list[Any] = [d.get("input_ids") for d in docs]
        if missing:
            for i, enc in zip(missing, self.tokenizer.encode_batch([rows[i]["text"] for i in missing]), strict=True):
                ids[i] = enc
        columns: dict[str, Any] = {name: [r[name] for r in rows] for name in SHARD_COLUMNS
                                   if name not in ("input_ids", "num_tokens")}
        lengths = [len(x) for x in ids]
        columns["input_ids"] = token_id_array(ids)
        columns["num_tokens"] = pa.array(lengths, pa.int32())
        table = pa.table({name: columns[name] for name in SHARD_COLUMNS}, schema=SHARD_SCHEMA)
        self._splits[split].add(table)
        for r, ntok in zip(rows, lengths, strict=True):
            c = self._per_source[f"{split}\0{r['source'] or 'unknown'}"]
            c["documents"] += 1
            c["tokens"] += ntok
        if self.progress is not None:
            self.progress(len(rows), sum(lengths))
        return len(rows)

    def parts(self, split: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
        """Close `split`'s shards without publishing them: (files: tmp path, documents, tokens; counts per source).

        For a writer in a task (one shuffle bucket): the writer that publishes the set `adopt`s them."""
        files = self._splits[split].close()
        per_source = {k.split("\0", 1)[1]: dict(v) for k, v in self._per_source.items() if k.startswith(split + "\0")}
        return [{**f, "tmp": str(f["tmp"])} for f in files], per_source

    def adopt(self, split: str, files: list[dict[str, Any]], per_source: dict[str, dict[str, int]]) -> None:
        """Take another writer's closed shard files (`parts`) as the next shards of `split`, in order.

        The files must carry this writer's schema and tokenizer (a writer of the same tokenizer made them)."""
        w = self._splits[split]
        w._close_shard()
        for f in files:
            dest = self.tmp_dir / "data" / f".{split}-{len(w.files):05d}.parquet.partial"
            os.replace(f["tmp"], dest)
            w.files.append({"tmp": dest, "documents": f["documents"], "tokens": f["tokens"]})
        for source, counts in per_source.items():
            self._per_source[f"{split}\0{source}"].update(counts)

    def finalize(self, *, stage_stats: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                 config_hash: str = "", description: str = "") -> dict[str, Any]:
        """Close, name and move the shards into place; write tokenizer.json, manifest.json and README.md."""
        files = {s: w.close() for s, w in self._splits.items()}
        if not any(files.values()):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            raise TextbookError(f"{self.out_dir}: no documents to write (an empty shard set is never written)")
        splits: dict[str, Any] = {}
        for split, entries in files.items():
            if not entries:
                continue
            n = len(entries)
            listed = []
            for i, e in enumerate(entries):
                name = f"{split}-{i:05d}-of-{n:05d}.parquet"
                os.replace(e["tmp"], self.tmp_dir / "data" / name)
                listed.append({"path": f"data/{name}", "documents": e["documents"], "tokens": e["tokens"],
                               "bytes": (self.tmp_dir / "data" / name).stat().st_size,
                               "sha256": file_sha256(self.tmp_dir / "data" / name)})
            sources = {k.split("\0", 1)[1]: dict(v) for k, v in sorted(self._per_source.items())
                       if k.startswith(split + "\0")}
            splits[split] = {"documents": sum(e["documents"] for e in listed),
                             "tokens": sum(e["tokens"] for e in listed), "files": listed, "sources": sources}
        fsync_dir(self.tmp_dir / "data")
        manifest = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "package_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokenizer": {**self.tokenizer.describe(), "file": "tokenizer.json"},
            "totals": {"documents": sum(s["documents"] for s in splits.values()),
                       "tokens": sum(s["tokens"] for s in splits.values())},
            "splits": splits,
            "fingerprint": fingerprint_of(splits),
            "stages": stage_stats or {},
            "config_hash": config_hash,
            "config": config or {},
            "description": description,
        }
        self._swap_in(manifest)
        return manifest

    def _swap_in(self, manifest: dict[str, Any]) -> None:
        out = self.out_dir
        (out / "manifest.json").unlink(missing_ok=True)  # from here until the end, no manifest counts anything
        fsync_dir(out)
        old = out / f".old-{uuid.uuid4().hex[:8]}"
        if (out / "data").exists():
            os.replace(out / "data", old)
        os.replace(self.tmp_dir / "data", out / "data")
        fsync_dir(out)
        shutil.copyfile(self.tokenizer.path, self.tmp_dir / "tokenizer.json")
        os.replace(self.tmp_dir / "tokenizer.json", out / "tokenizer.json")
        atomic_write_text(out / "README.md", dataset_card(manifest))
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


def token_id_array(ids: list[Any]) -> pa.Array:
    """Arrow list<uint32> column from per-document id arrays (built from numpy, not Python lists: fast)."""
    import numpy as np

    arrays = [np.asarray(x, dtype=np.uint32) for x in ids]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.empty(0, np.uint32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.uint32()))


def check_compatible(out_dir: Path | str, tokenizer_sha256: str, manifest: dict[str, Any] | None = None) -> None:
    """Refuse to mix shards of another tokenizer or schema into an existing output directory (or URL, whose
    `manifest` the caller read: `pipeline.scale.storage.remote_manifest`)."""
    if manifest is None:
        mpath = Path(out_dir) / "manifest.json"
        if not mpath.is_file():
            return
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError:
            raise TextbookError(f"{mpath}: existing manifest is not valid JSON; remove the directory or choose "
                                "another run.out") from None
    m = manifest
    if m.get("schema_version") != SCHEMA_VERSION:
        raise TextbookError(f"{out_dir}: holds shards of schema version {m.get('schema_version')}, "
                            f"this writer makes version {SCHEMA_VERSION}; choose another run.out")
    old = m.get("tokenizer", {}).get("sha256")
    if old and old != tokenizer_sha256:
        raise TextbookError(f"{out_dir}: holds shards of another tokenizer ({m['tokenizer'].get('name')}, "
                            f"sha256 {old[:12]}…); choose another run.out or remove it")


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_of(splits: dict[str, Any]) -> str:
    """Content fingerprint of a shard set: sha256 (hex, 16 chars) over each split's file paths and file sha256s.

    `splits` is the manifest's `splits` mapping. Two shard sets with the same fingerprint hold the same rows; any
    rewrite that changes a row changes it. Used as the `datasets` cache key (see `dataset_card`, `load_hf`).
    """
    h = hashlib.sha256()
    for split in sorted(splits):
        for f in splits[split]["files"]:
            h.update(f"{split}\0{f['path']}\0{f['sha256']}\n".encode())
    return h.hexdigest()[:16]


def dataset_card(m: dict[str, Any]) -> str:
    """README.md with the `configs` header `datasets.load_dataset(dir)` reads, and a human summary.

    The config's `description` carries the shard set's content fingerprint. `datasets` keys its cache of a
    local folder by the folder's name and this header only, so without it two different shard sets in two
    folders of the same name (or one folder rewritten) would load each other's cached rows.
    """
    lines = ["---", "configs:", "- config_name: default",
             f"  description: textbook-shards {m['fingerprint']} (content fingerprint; keys the datasets cache)",
             "  data_files:"]
    for split in m["splits"]:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += ["tags:", "- textbook", "- pretraining", "---", "",
              "# Textbook-quality pretraining shards", "",
              f"Made by `textbook` {m['package_version']} on {m['created']}. Shard format v{m['schema_version']} "
              "(see `shards/README.md` in the textbook repository).", ""]
    if m.get("description"):
        lines += [m["description"], ""]
    tok = m["tokenizer"]
    lines += [f"Tokenizer: `{tok['name']}` (vocab {tok['vocab_size']}, EOS id {tok['eos_id']}, "
              f"sha256 `{tok['sha256'][:16]}…`), copied here as `tokenizer.json`.", "",
              "| split | source | documents | tokens |", "|---|---|---:|---:|"]
    for split, s in m["splits"].items():
        for src, c in s["sources"].items():
            lines.append(f"| {split} | {src} | {c['documents']:,} | {c['tokens']:,} |")
        lines.append(f"| {split} | **all** | **{s['documents']:,}** | **{s['tokens']:,}** |")
    if m.get("stages"):
        lines += ["", "## How it was made", "", "| stage | read | kept | dropped | errored |", "|---|---:|---:|---:|---:|"]
        for name, st in m["stages"].items():
            lines.append(f"| {name} | {st.get('read', '')} | {st.get('kept', '')} | "
                         f"{sum(st.get('dropped', {}).values())} | {sum(st.get('errored', {}).values())} |")
    lines += ["", "```python", "from datasets import load_dataset",
              "ds = load_dataset(\"<this directory>\")   # the header's fingerprint keys the cache to these rows",
              "from pipeline.shards import load_hf, open_shards",
              "ds = load_hf(\"<this directory>\")         # the same, checked against manifest.json first",
              "shards = open_shards(\"<this directory>\")", "```", ""]
    return "\n".join(lines)


class ShardSet:
    """A v1 shard directory, for notebooks and the trainer. Use `open_shards(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._tokenizer: Any = None

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def files(self, split: str | None = None) -> list[Path]:
        names = [split] if split else self.splits
        return [self.path / f["path"] for s in names for f in self.manifest["splits"].get(s, {}).get("files", [])]

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from pipeline.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.path / "tokenizer.json")
        return self._tokenizer

    def decode(self, input_ids: Iterable[int]) -> str:
        return self.tokenizer.decode(input_ids)

    def stats(self) -> dict[str, Any]:
        """Documents and tokens per split and source, from the manifest."""
        out: dict[str, Any] = {"totals": self.manifest["totals"], "splits": {}}
        for split, s in self.manifest["splits"].items():
            out["splits"][split] = {"documents": s["documents"], "tokens": s["tokens"], "sources": s["sources"],
                                    "files": len(s["files"])}
        return out

    def to_pandas(self, columns: list[str] | None = None, split: str | None = None) -> Any:
        import pandas as pd

        frames = []
        for s in ([split] if split else self.splits):
            for f in self.files(s):
                df = pq.read_table(f, columns=columns).to_pandas()
                if "split" not in df.columns:
                    df.insert(0, "split", s)
                frames.append(df)
        return pd.concat(frames, ignore_index=True)

    @property
    def fingerprint(self) -> str:
        """The manifest's content fingerprint (`fingerprint_of`); computed from the files for a manifest without one."""
        fp = self.manifest.get("fingerprint")
        if fp:
            return str(fp)
        return fingerprint_of({s: {"files": [{"path": f["path"], "sha256": file_sha256(self.path / f["path"])}
                                             for f in self.manifest["splits"][s]["files"]]} for s in self.splits})

    def to_dataset(self, split: str | None = None) -> Any:
        """A `datasets.DatasetDict` with the same splits (a `Dataset` when `split` is given).

        Always this directory's own rows: the files are named by absolute path and the `datasets` cache is
        keyed by the shard set's content fingerprint as well, so a cached copy of another shard set (another
        folder of the same name, or this folder before a rewrite) is never returned.
        """
        from datasets import load_dataset

        if split is not None and split not in self.splits:
            raise TextbookError(f"{self.path}: no split {split!r} (splits: {', '.join(self.splits)})")
        data_files = {s: [str(f.resolve()) for f in self.files(s)] for s in ([split] if split else self.splits)}
        ds = load_dataset("parquet", data_files=data_files, description=f"textbook-shards {self.fingerprint}")
        return ds[split] if split else ds

    def iter_documents(self, split: str | None = None, columns: list[str] | None = None,
                       batch_size: int = 1024) -> Iterator[dict[str, Any]]:
        """Row dicts, one row group at a time (never the whole set in memory)."""
        for s in ([split] if split else self.splits):
            for f in self.files(s):
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                    yield from batch.to_pylist()

    def __repr__(self) -> str:
        t = self.manifest["totals"]
        return f"ShardSet({str(self.path)!r}, documents={t['documents']:,}, tokens={t['tokens']:,})"


def open_shards(path: str | os.PathLike[str]) -> ShardSet:
    """Open a shard directory; refuses one whose files disagree with the manifest on tokenizer or schema."""
    root = Path(path)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        hint = " (an interrupted write?)" if (root / "data").is_dir() else ""
        raise TextbookError(f"{root}: no manifest.json{hint}: not a textbook shard directory")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise TextbookError(f"{mpath}: invalid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("schema_version") != SCHEMA_VERSION:
        raise TextbookError(f"{root}: unsupported shard format {manifest.get('format')!r} v{manifest.get('schema_version')} "
                            f"(this reader reads {FORMAT_NAME} v{SCHEMA_VERSION})")
    shards = ShardSet(root, manifest)
    sha = manifest["tokenizer"]["sha256"]
    listed = {p.resolve() for p in shards.files()}
    on_disk = sorted((root / "data").glob("*.parquet")) if (root / "data").is_dir() else []
    for f in sorted(listed | {p.resolve() for p in on_disk}):
        if not f.is_file():
            raise TextbookError(f"{f}: listed in the manifest but missing")
        meta = _read_file_meta(f)
        if meta.get(b"textbook.schema_version") != str(SCHEMA_VERSION).encode():
            raise TextbookError(f"{f}: shard schema version {meta.get(b'textbook.schema_version')!r} disagrees "
                                f"with the manifest (v{SCHEMA_VERSION})")
        if meta.get(b"textbook.tokenizer_sha256") != sha.encode():
            raise TextbookError(f"{f}: made with another tokenizer than the manifest's ({sha[:12]}…)")
        if f not in listed:
            raise TextbookError(f"{f}: shard not listed in the manifest (left over from another run?)")
    return shards


def load_hf(path: str | os.PathLike[str], split: str | None = None) -> Any:
    """`datasets` view of a shard directory: a `DatasetDict` (train, validation), or one split's `Dataset`.

    The safe way to load shards with `datasets`: the directory is checked like `open_shards` does (raises
    `TextbookError` on a missing or inconsistent manifest), and the rows returned are always this directory's,
    whatever the `datasets` cache holds for another folder of the same name.
    """
    return open_shards(path).to_dataset(split)


def _read_file_meta(f: Path) -> dict[bytes, bytes]:
    try:
        return pq.read_schema(f).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise TextbookError(f"{f}: not a readable parquet file ({e})") from None
