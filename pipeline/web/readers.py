"""One datatrove reader for every web input kind, counting each record it reads.

Unlike datatrove's readers (which skip unreadable records silently) this one gives every record a fate:
a Document goes down the pipeline; a record that cannot become one is dropped (not_html, empty, too_large,
http_status) or errored (corrupt_warc, invalid_utf8, malformed_json, missing_text, unreadable_file), with
its file and offset. At the end of a task it writes `read/<rank>.json`: records read per input file.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from pipeline.io import atomic_write_text
from pipeline.web.fates import FILE_KEY, FORMAT_KEY, WHERE_KEY, Fates, clear_rank_outputs, rank_tag
from pipeline.web.units import Unit

HTML_TYPES = ("text/html", "application/xhtml+xml")
_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", re.I)
_CANONICAL = re.compile(r"""<link[^>]+rel=["']?canonical["']?[^>]*href=["']([^"']+)["']""", re.I)
_CANONICAL2 = re.compile(r"""<link[^>]+href=["']([^"']+)["'][^>]*rel=["']?canonical""", re.I)
_OG_URL = re.compile(r"""<meta[^>]+property=["']og:url["'][^>]*content=["']([^"']+)["']""", re.I)


class Skip(Exception):
    """A record that cannot become a document: fate (dropped/errored) and reason."""

    def __init__(self, fate: str, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.fate, self.reason, self.detail = fate, reason, detail


def decode_page(data: bytes, declared: str | None = None) -> str:
    """utf-8, else the declared charset (HTTP header or <meta>), else a detected one; otherwise undecodable."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    candidates = [declared] if declared else []
    m = _CHARSET.search(data[:4096])
    if m:
        candidates.append(m.group(1).decode("ascii", "ignore"))
    try:
        import cchardet

        candidates.append(cchardet.detect(data[:200_000]).get("encoding"))
    except ImportError:
        pass
    for enc in filter(None, candidates):
        try:
            text = data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
        return text
    raise Skip("errored", "undecodable", f"no charset decodes it (tried utf-8, {', '.join(filter(None, candidates))})")


def page_url(html: str) -> str | None:
    head = html[:100_000]
    for rx in (_CANONICAL, _CANONICAL2, _OG_URL):
        m = rx.search(head)
        if m and m.group(1).startswith(("http://", "https://")):
            return m.group(1)
    return None


def _charset_of(content_type: str | None) -> str | None:
    if content_type and "charset=" in content_type.lower():
        return content_type.lower().split("charset=")[-1].split(";")[0].strip(" \"'") or None
    return None


class WebReader(PipelineStep):
    """Reads this task's share of the units (round-robin) and yields Documents with `_file`/`_where`/`_format`."""

    name = "🕸 web reader"
    type = "📖 - READER"

    def __init__(self, units: list[Unit], out_root: str, max_page_bytes: int, sample_rate: float = 1.0) -> None:
        super().__init__()
        self.units = units
        self.out_root = out_root
        self.max_page_bytes = max_page_bytes
        self.fates = Fates(out_root, "reader", sample_rate)

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        clear_rank_outputs(self.out_root, rank)
        mine = self.units[rank::world_size]
        self.read: Counter[str] = Counter()
        self.non_documents: Counter[str] = Counter()
        with self.fates:
            for unit in tqdm(mine, desc=f"web task {rank}", unit="file", disable=len(mine) < 2, leave=False):
                self.stat_update("input_files")
                yield from self._read_unit(unit, rank)
        atomic_write_text(Path(self.out_root, "read", f"{rank_tag(rank)}.json"),
                          json.dumps({"read": dict(self.read), "non_document_records": dict(self.non_documents)}))

    def _read_unit(self, unit: Unit, rank: int) -> Iterator[Document]:
        reader = getattr(self, f"_iter_{unit.kind}")
        last_where: Any = 0
        try:
            for where, item in reader(unit):
                last_where = where
                self.read[unit.label] += 1
                self.stat_update("records")
                if isinstance(item, Skip):
                    self._skip(item, unit, where, rank)
                else:
                    item.metadata[FILE_KEY], item.metadata[WHERE_KEY] = unit.label, where
                    yield item
        except Exception as e:  # noqa: BLE001 - a broken file is counted and the other files are still read
            # The record being read when the file broke counts as one errored record.
            self.read[unit.label] += 1
            reason = "corrupt_warc" if unit.kind == "warc" else "unreadable_file"
            if unit.kind == "jsonl" and last_where:
                reason = "truncated_file"
            self.fates.error(rank, unit.label, f"after {last_where}", reason, f"{type(e).__name__}: {e}")
            self.stat_update(reason)

    def _skip(self, skip: Skip, unit: Unit, where: Any, rank: int) -> None:
        self.stat_update(skip.reason)
        if skip.fate == "errored":
            self.fates.error(rank, unit.label, where, skip.reason, skip.detail)
        else:
            doc = Document(text=skip.detail or "", id=f"{unit.label}:{where}",
                           metadata={FILE_KEY: unit.label, WHERE_KEY: where})
            self.fates.drop(doc, rank, skip.reason)

    def _check_size(self, n: int) -> None:
        if n > self.max_page_bytes:
            raise Skip("dropped", "too_large", "")

    # --- WARC / WET ---------------------------------------------------------------------------------------
    def _iter_warc(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        from warcio.archiveiterator import ArchiveIterator

        with open(unit.path, "rb") as f:
            records = ArchiveIterator(f, arc2warc=True)
            for record in records:
                uri = record.rec_headers.get_header("WARC-Target-URI") or ""
                # crawler logs stored as resource records (wget's metadata://...) are not web pages
                if record.rec_type not in ("response", "conversion", "resource") or uri.startswith("metadata:"):
                    self.non_documents[f"{unit.label}:{record.rec_type}"] += 1
                    continue
                try:
                    item: Any = self._warc_document(record)
                except Skip as s:
                    item = s
                # warcio computes the offset by reading the record to its end: only after the content was read
                yield f"byte {records.get_record_offset()}", item

    def _warc_document(self, record: Any) -> Document:
        headers = record.rec_headers
        mime = headers.get_header("WARC-Identified-Payload-Type")
        http = record.http_headers
        if http is not None:
            status = http.get_statuscode()
            if status and not str(status).startswith("2"):
                raise Skip("dropped", "http_status", "")
            mime = mime or http.get_header("Content-Type")
        mime = mime or headers.get_header("Content-Type") or ""
        is_text = record.rec_type == "conversion" or mime.startswith("text/plain")
        data = record.content_stream().read(self.max_page_bytes + 1)
        self._check_size(len(data))
        if getattr(record.raw_stream, "limit", 0) > 0:  # the file ended inside this record (warcio does not raise)
            raise Skip("errored", "truncated_warc_record", f"{record.raw_stream.limit} bytes missing")
        if not data.strip():
            raise Skip("dropped", "empty")
        if not is_text and not mime.lower().startswith(HTML_TYPES):
            sniff = data[:2048].lstrip().lower()
            if mime or not (sniff.startswith(b"<!doctype html") or b"<html" in sniff):
                raise Skip("dropped", "not_html")
        text = decode_page(data, _charset_of(http.get_header("Content-Type") if http is not None else None))
        url = headers.get_header("WARC-Target-URI")
        return Document(text=text, id=headers.get_header("WARC-Record-ID") or url or "",
                        metadata={"url": url, "date": headers.get_header("WARC-Date"),
                                  FORMAT_KEY: "text" if is_text else "html"})

    # --- JSON lines / JSON arrays / parquet / HF ------------------------------------------------------------
    def _record_document(self, rec: Any, unit: Unit, where: Any) -> Document:
        if not isinstance(rec, dict):
            raise Skip("errored", "malformed_json", f"record is a {type(rec).__name__}, not an object")
        text = rec.get(unit.text_key)
        if not isinstance(text, str):
            raise Skip("errored", "missing_text", f"no string field '{unit.text_key}' (keys: {', '.join(rec)[:200]})")
        self._check_size(len(text))
        if not text.strip():
            raise Skip("dropped", "empty")
        meta = rec.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        url = rec.get(unit.url_key) or meta.get(unit.url_key) or meta.get("warc_url")
        extra = {k: v for k, v in rec.items() if k not in (unit.text_key, unit.id_key, unit.url_key, "metadata")
                 and isinstance(v, str | int | float | bool)}
        rid = rec.get(unit.id_key)
        return Document(text=text, id=str(rid) if rid not in (None, "") else f"{unit.label}:{where}",
                        metadata={**extra, "url": url if isinstance(url, str) else None, FORMAT_KEY: "text"})

    def _record(self, rec: Any, unit: Unit, where: str) -> tuple[str, Document | Skip]:
        """(where, the record's Document or why it is not one)."""
        try:
            return where, self._record_document(rec, unit, where)
        except Skip as s:
            return where, s

    def _iter_jsonl(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        import orjson

        with _open_binary(unit.path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"line {lineno}"
                try:
                    if len(raw) > self.max_page_bytes:
                        raise Skip("dropped", "too_large")
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise Skip("errored", "invalid_utf8", str(e)) from None
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError as e:
                        raise Skip("errored", "malformed_json", str(e)) from None
                    yield where, self._record_document(rec, unit, where)
                except Skip as s:
                    yield where, s

    def _iter_json(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        import orjson

        raw = Path(unit.path).read_bytes()
        if not raw.lstrip().startswith(b"["):
            yield from self._iter_jsonl(unit)
            return
        try:
            items = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            yield "whole file", Skip("errored", "malformed_json", str(e))
            return
        for i, rec in enumerate(items):
            yield self._record(rec, unit, f"item {i}")

    def _iter_parquet(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        if unit.text_key not in pf.schema_arrow.names:
            raise ValueError(f"no '{unit.text_key}' column (columns: {', '.join(pf.schema_arrow.names)})")
        records = (rec for batch in pf.iter_batches(batch_size=1000) for rec in batch.to_pylist())
        for i, rec in enumerate(records):
            yield self._record(rec, unit, f"row {i}")

    def _iter_hf(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        import datasets
        from datasets.distributed import split_dataset_by_node

        path = Path(unit.path)
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[unit.hf_split]
        else:
            ds = datasets.load_dataset(unit.path, unit.hf_name, split=unit.hf_split, streaming=unit.hf_streaming)
        ds = split_dataset_by_node(ds, rank=unit.shard, world_size=unit.num_shards)
        limit = None if unit.hf_limit is None else -(-unit.hf_limit // unit.num_shards)
        for i, rec in enumerate(ds):
            if limit is not None and i >= limit:
                break
            yield self._record(rec, unit, f"row {i}")

    # --- a folder of HTML files: one file, one record -------------------------------------------------------
    def _iter_html(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        path = Path(unit.path)
        try:
            self._check_size(path.stat().st_size)
            data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
            if not data.strip():
                raise Skip("dropped", "empty")
            html = decode_page(data)
            yield "file", Document(text=html, id=str(path),
                                   metadata={"url": page_url(html), FORMAT_KEY: "html"})
        except Skip as s:
            yield "file", s


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))  # type: ignore[arg-type]
    return open(path, "rb")
