"""One datatrove reader for every web input kind, counting each record it reads.

Unlike datatrove's readers (which skip unreadable records silently) this one gives every record a fate:
a Document goes down the pipeline; a record that cannot become one is dropped (not_html, empty, too_large,
http_status) or errored (content_length_mismatch, corrupt_gzip_member, malformed_json, missing_text,
unknown_content_encoding, unreadable_file, ...), with its file and offset. One bad record costs one record:
every format is read record by record and resumes after an error (see `pipeline.web.warc` and
`pipeline.textio`, whose text-repair policy applies here as in every other reader: invalid UTF-8 and lone
surrogates become U+FFFD and are counted as *repaired*, the record is kept). At the end of a task it writes
`read/<rank>.json`: records read, non-document records and repairs per input file.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from pipeline.io import atomic_write_text
from pipeline.textio import Gap, decode_utf8, iter_json_records
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


def decode_page(data: bytes, declared: str | None = None) -> tuple[str, bool]:
    """(text, repaired): UTF-8 (a BOM ignored), else the declared charset (HTTP header or <meta>), else a
    detected one; a page no charset decodes cleanly is read as UTF-8 with U+FFFD (repaired=True)."""
    text, repaired = decode_utf8(data)
    if not repaired:
        return text, False
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
        if enc.lower().replace("_", "-") in ("utf-8", "utf8"):
            break  # a UTF-8 page with a few bad bytes: repair them rather than re-read it as another charset
        try:
            return data.decode(enc), False
        except (UnicodeDecodeError, LookupError):
            continue
    return text, True


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
        self.repaired: dict[str, Counter[str]] = {}
        with self.fates:
            for unit in tqdm(mine, desc=f"web task {rank}", unit="file", disable=len(mine) < 2, leave=False):
                self.stat_update("input_files")
                yield from self._read_unit(unit, rank)
        atomic_write_text(Path(self.out_root, "read", f"{rank_tag(rank)}.json"),
                          json.dumps({"read": dict(self.read), "non_document_records": dict(self.non_documents),
                                      "repaired": {k: dict(v) for k, v in self.repaired.items()}}))

    def _read_unit(self, unit: Unit, rank: int) -> Iterator[Document]:
        reader = getattr(self, f"_iter_{unit.kind}")
        last_where: Any = None
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
        except Exception as e:  # noqa: BLE001 - a file that cannot be read on is counted; other files still are
            # The rest of the file is one errored record: its size says how much was not read.
            self.read[unit.label] += 1
            where = "whole file" if last_where is None else f"after {last_where}"
            self.fates.error(rank, unit.label, where, "unreadable_file",
                             f"{type(e).__name__}: {e}; {_size_note(unit.path)}")
            self.stat_update("unreadable_file")

    def _skip(self, skip: Skip, unit: Unit, where: Any, rank: int) -> None:
        self.stat_update(skip.reason)
        if skip.fate == "errored":
            self.fates.error(rank, unit.label, where, skip.reason, skip.detail)
        else:
            doc = Document(text=skip.detail or "", id=f"{unit.label}:{where}",
                           metadata={FILE_KEY: unit.label, WHERE_KEY: where})
            self.fates.drop(doc, rank, skip.reason)

    def _repair(self, unit: Unit, reasons: list[str]) -> None:
        for reason in reasons:
            self.repaired.setdefault(unit.label, Counter())[reason] += 1
            self.stat_update(f"repaired_{reason}")

    def _check_size(self, n: int) -> None:
        if n > self.max_page_bytes:
            raise Skip("dropped", "too_large", "")

    # --- WARC / WET ---------------------------------------------------------------------------------------
    def _iter_warc(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        from pipeline.web.warc import WarcError, iter_warc

        if unit.path.lower().endswith((".arc", ".arc.gz")):
            yield from self._iter_arc(unit)
            return
        # HTTP headers ride in the block: allow for them beyond the page cap
        for record in iter_warc(unit.path, self.max_page_bytes + (1 << 16)):
            if isinstance(record, WarcError):
                yield record.offset, Skip("errored", record.reason, record.detail)
                continue
            uri = record.headers.get("warc-target-uri", "").strip("<>")
            # crawler logs stored as resource records (wget's metadata://...) are not web pages
            if record.type not in ("response", "conversion", "resource") or uri.startswith("metadata:"):
                self.non_documents[f"{unit.label}:{record.type}"] += 1
                continue
            try:
                item: Any = self._warc_document(record, unit)
            except Skip as s:
                item = s
            yield record.offset, item

    def _warc_document(self, record: Any, unit: Unit) -> Document:
        from pipeline.web.warc import PayloadError, decode_body, split_http

        headers = record.headers
        if record.block is None:
            raise Skip("dropped", "too_large", "")
        mime = headers.get("warc-identified-payload-type", "")
        body, http_type = record.block, None
        if record.type == "response" and "application/http" in headers.get("content-type", "").lower():
            status, http, body = split_http(record.block)
            if status is not None and not str(status).startswith("2"):
                raise Skip("dropped", "http_status", "")
            http_type = http.get("content-type")
            try:
                body = decode_body(body, http)
            except PayloadError as e:
                raise Skip("errored", e.reason, e.detail) from None
        mime = mime or http_type or headers.get("content-type", "")
        is_text = record.type == "conversion" or mime.startswith("text/plain")
        self._check_size(len(body))
        if not body.strip():
            raise Skip("dropped", "empty")
        if not is_text and not mime.lower().startswith(HTML_TYPES):
            sniff = body[:2048].lstrip().lower()
            if mime or not (sniff.startswith(b"<!doctype html") or b"<html" in sniff):
                raise Skip("dropped", "not_html")
        text, repaired = decode_page(body, _charset_of(http_type))
        self._repair(unit, ["invalid_utf8"] * repaired + ["content_length_adjusted"] * record.adjusted)
        url = headers.get("warc-target-uri", "").strip("<>") or None  # WARC/1.1 writers may bracket it
        return Document(text=text, id=headers.get("warc-record-id") or url or "",
                        metadata={"url": url, "date": headers.get("warc-date"),
                                  FORMAT_KEY: "text" if is_text else "html"})

    def _iter_arc(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        """Legacy ARC files: warcio's ARC-to-WARC reader (a broken file ends where warcio stops)."""
        from warcio.archiveiterator import ArchiveIterator

        from pipeline.web.warc import WarcRecord

        with open(unit.path, "rb") as f:
            records = ArchiveIterator(f, arc2warc=True)
            for record in records:
                if record.rec_type != "response":
                    self.non_documents[f"{unit.label}:{record.rec_type}"] += 1
                    continue
                block = record.content_stream().read(self.max_page_bytes + 1)
                headers = {k.lower(): v for k, v in record.rec_headers.headers}
                http = record.http_headers
                if http is not None:
                    headers["warc-identified-payload-type"] = http.get_header("Content-Type") or ""
                rec = WarcRecord("", {**headers, "content-type": "text/html"}, block, len(block))
                try:
                    item: Any = self._warc_document(rec, unit)
                except Skip as s:
                    item = s
                yield f"byte {records.get_record_offset()}", item

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
        """JSON lines or a JSON array (whatever the name says), record by record (`iter_json_records`)."""
        for rec in iter_json_records(unit.path):
            if isinstance(rec, Gap):
                yield rec.where, Skip("errored", rec.reason, rec.describe())
            elif rec.raw_size > self.max_page_bytes:
                yield rec.where, Skip("dropped", "too_large")
            elif rec.error is not None:
                yield rec.where, Skip("errored", "malformed_json", rec.error)
            else:
                item = self._record(rec.value, unit, rec.where)
                if not isinstance(item[1], Skip):
                    self._repair(unit, list(rec.repairs))
                yield item

    _iter_json = _iter_jsonl

    def _iter_parquet(self, unit: Unit) -> Iterator[tuple[Any, Any]]:
        """Row group by row group: a row group that cannot be decoded is one errored record naming its rows."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        if unit.text_key not in pf.schema_arrow.names:
            raise ValueError(f"no '{unit.text_key}' column (columns: {', '.join(pf.schema_arrow.names)})")
        row = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            try:
                rows = pf.read_row_group(group).to_pylist()
            except Exception as e:  # noqa: BLE001 - arrow raises many types for corrupt pages
                yield f"row group {group}", Skip("errored", "corrupt_row_group",
                                                 f"rows {row}-{row + n - 1} ({n} rows) skipped: {type(e).__name__}: {e}")
                row += n
                continue
            for rec in rows:
                yield self._record(rec, unit, f"row {row}")
                row += 1

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
            try:
                data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
            except (OSError, EOFError, zlib.error) as e:
                raise Skip("errored", "corrupt_gzip_member", f"{type(e).__name__}: {e}") from None
            if not data.strip():
                raise Skip("dropped", "empty")
            html, repaired = decode_page(data)
            if repaired:
                self._repair(unit, ["invalid_utf8"])
            yield "file", Document(text=html, id=str(path),
                                   metadata={"url": page_url(html), FORMAT_KEY: "html"})
        except Skip as s:
            yield "file", s


def _size_note(path: str) -> str:
    try:
        return f"the file has {Path(path).stat().st_size} bytes"
    except OSError:
        return "the file cannot be opened"
