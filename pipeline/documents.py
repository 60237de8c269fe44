"""Documents between stages: parquet files with `id`, `text`, `source`, `edu_score` and provenance columns.

Stages talk through files on disk. Each stage writes the documents it keeps under
`<run.out>/stages/<stage>/kept/` and what it removes under `.../removed/` with the reason in the file name
and in a `reason` column. Input files may be parquet or jsonl (plain, .gz, .zst) with at least `text`;
a missing `id` is computed from the text. Columns outside the schema travel in `meta` (a JSON string).

Reading follows the project's one policy (`pipeline.textio`): record by record, a bad record is reported with
a named reason and its location and reading goes on; invalid UTF-8 and lone surrogates become U+FFFD and
are reported as repairs; a BOM is ignored; a `meta` that is not a JSON object is kept as `meta_raw`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import TextbookError
from pipeline.io import atomic_path
from pipeline.textio import (
    Gap,
    OnEvent,
    iter_json_records,
    meta_object,
    repair_strings,
    repair_surrogates,
)

# Provenance columns: null where not applicable. Order is the on-disk order.
PROVENANCE = ("topic", "audience", "format", "prompt_id", "model", "url")

DOC_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("edu_score", pa.float32()),
        *[pa.field(name, pa.string()) for name in PROVENANCE],
        pa.field("meta", pa.string()),  # JSON object with everything else (sampling params, usage, filters...)
        pa.field("reason", pa.string()),  # why a removed document was removed; null for kept ones
    ]
)
DOC_COLUMNS = tuple(DOC_SCHEMA.names)
# Rows a writer buffers per part in a stage that streams a whole corpus: bounds memory (~25 MB of text per writer).
STREAM_ROWS_PER_FILE = 10_000

def normalize_for_id(text: str) -> str:
    """NFC + collapsed whitespace + strip: the same text re-wrapped or re-indented keeps its id."""
    return " ".join(unicodedata.normalize("NFC", text).split())  # split() is ~5x faster than a regex here


def doc_id(text: str) -> str:
    """Stable id: the first 16 bytes of blake2b over the normalised text, hex."""
    return hashlib.blake2b(normalize_for_id(text).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def edu_score_of(value: Any) -> tuple[float | None, bool]:
    """(score, invalid) from a stored `edu_score`: a finite number or numeric string is the score; None is no
    score; anything else (text, NaN, an infinity, a boolean) is invalid (score None). Every stage reads scores
    through this, so one bad value costs that value, never the stage: dedup ranks the document as unscored and
    counts the repair `invalid_edu_score`, the writers keep the value as read in `meta.edu_score_as_read`,
    rephrase drops the page as `invalid_edu_score`, seed selection skips it."""
    if value is None:
        return None, False
    if isinstance(value, bool):
        return None, True
    try:
        score = float(value)
    except (TypeError, ValueError, OverflowError):
        return None, True
    return (score, False) if math.isfinite(score) else (None, True)


def to_row(doc: dict[str, Any]) -> dict[str, Any]:
    """Fit a document dict to DOC_SCHEMA: known columns kept, the rest folded into `meta`."""
    text = doc.get("text")
    if not isinstance(text, str):
        raise ValueError(f"document without string text (got {type(text).__name__})")
    row: dict[str, Any] = {name: None for name in DOC_COLUMNS}
    meta: dict[str, Any] = dict(meta_object(doc.get("meta"))[0])
    for key, value in doc.items():
        if key == "meta":
            continue
        if key in row:
            row[key] = value
        elif key == "metadata" and isinstance(value, dict):  # datatrove documents
            for k, v in value.items():
                if k in row and row[k] is None:
                    row[k] = v
                else:
                    meta[k] = v
        else:
            meta[key] = value
    row["id"] = str(row["id"]) if row["id"] not in (None, "") else doc_id(text)
    if row["edu_score"] is not None:
        score, invalid = edu_score_of(row["edu_score"])
        if invalid:  # the column is a number: what was read is kept, in meta, rather than failing the write
            meta["edu_score_as_read"] = repr(row["edu_score"])[:200]
        row["edu_score"] = score
    for name in ("source", *PROVENANCE, "reason"):
        if row[name] is not None and not isinstance(row[name], str):
            row[name] = str(row[name])
    row["meta"] = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str) if meta else None
    return row


class DocumentWriter:
    """Writes documents as parquet parts `<prefix>-00000.parquet`, ... Never writes an empty file.

    Each part is written under a temporary name and renamed when complete.
    """

    def __init__(self, directory: str | Path, prefix: str = "part", rows_per_file: int = 50_000,
                 row_group_rows: int = 2_000) -> None:
        self.directory = Path(directory)
        self.prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix)
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        self._buffer: list[dict[str, Any]] = []
        self._part = 0
        self.paths: list[Path] = []
        self.rows_written = 0

    def write(self, doc: dict[str, Any]) -> None:
        self._buffer.append(to_row(doc))
        if len(self._buffer) >= self.rows_per_file:
            self._flush()

    def write_many(self, docs: Iterable[dict[str, Any]]) -> None:
        for d in docs:
            self.write(d)

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=DOC_SCHEMA)
        final = self.directory / f"{self.prefix}-{self._part:05d}.parquet"
        with atomic_path(final) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=self.row_group_rows)
        self.paths.append(final)
        self.rows_written += len(self._buffer)
        self._part += 1
        self._buffer = []

    def close(self) -> list[Path]:
        self._flush()
        return self.paths

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()


class RemovedWriters:
    """A stage's removed documents: one DocumentWriter per reason (the file prefix), opened on first use."""

    def __init__(self, directory: str | Path, rows_per_file: int = 50_000, tag: str = "") -> None:
        self.directory = Path(directory)
        self.rows_per_file = rows_per_file
        self.tag = tag  # a task's partition (`<reason>-<tag>-00000.parquet`): tasks never write the same file
        self._writers: dict[str, DocumentWriter] = {}

    def write(self, doc: dict[str, Any], reason: str) -> None:
        w = self._writers.get(reason)
        if w is None:
            prefix = f"{reason}-{self.tag}" if self.tag else reason
            w = self._writers[reason] = DocumentWriter(self.directory, prefix=prefix, rows_per_file=self.rows_per_file)
        w.write({**doc, "reason": reason})

    def close(self) -> None:
        for w in self._writers.values():
            w.close()


DOC_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson",
                ".ndjson.gz", ".ndjson.zst")


def list_document_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (recursively) into document files, sorted; missing paths are an error.

    An fsspec URL (s3://bucket/prefix, hf://datasets/..., file://...) is expanded the same way and stays a
    `str` in the list (`pipeline.scale.storage`); `iter_documents` reads it from a whole local copy."""
    from pipeline.scale.storage import is_url, list_url_documents

    out: list[Path] = []
    for raw in paths:
        if is_url(raw):
            out.extend(list_url_documents(str(raw), DOC_SUFFIXES))  # type: ignore[arg-type]
            continue
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(DOC_SUFFIXES)
                              and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise TextbookError(f"{p}: input path does not exist")
    return out


def clean_text(text: Any) -> str | None:
    """The text with lone surrogates (e.g. bytes a reader kept with surrogateescape) replaced; None if not a str."""
    if not isinstance(text, str):
        return None
    return repair_surrogates(text)[0]


def iter_documents(
    paths: Iterable[str | Path],
    text_field: str = "text",
    id_field: str = "id",
    on_error: OnEvent | None = None,
    batch_rows: int = 2_000,
    on_repair: OnEvent | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield documents (dicts with `id`, `text`, ...) from parquet/jsonl files, record by record.

    A record that cannot be read (malformed JSON line, no text, a corrupt parquet row group or gzip member) is
    not yielded: `on_error(reason, where)` is called with a named reason and `file:location`, and reading goes
    on at the next record. A repaired record is yielded and reported through `on_repair(reason, where)`
    (invalid_utf8, lone_surrogate, meta_not_object). A file that cannot be opened at all is reported once as
    `unreadable_file` (with its size) and the other files are still read.
    """
    report = on_error or (lambda reason, where: None)
    repaired = on_repair or (lambda reason, where: None)
    from pipeline.scale.storage import local_copy

    for listed in list_document_files(paths):
        with local_copy(listed) as path:  # a URL is read from a whole local copy; a local path is itself
            on_error_, on_repair_ = report, repaired
            if str(listed) != str(path):  # locations name the object, not the temporary copy
                def on_error_(reason: str, where: str, _p: str = str(path), _u: str = str(listed)) -> None:
                    report(reason, where.replace(_p, _u, 1))

                def on_repair_(reason: str, where: str, _p: str = str(path), _u: str = str(listed)) -> None:
                    repaired(reason, where.replace(_p, _u, 1))
            try:
                if path.name.lower().endswith(".parquet"):
                    yield from _iter_parquet(path, text_field, id_field, on_error_, on_repair_, batch_rows)
                else:
                    yield from _iter_jsonl(path, text_field, id_field, on_error_, on_repair_)
            except (OSError, pa.ArrowException, EOFError, ValueError) as e:
                size = path.stat().st_size if path.is_file() else 0
                report("unreadable_file", f"{listed} ({size} bytes): {type(e).__name__}: {e}")


def _normalise(rec: dict[str, Any], text_field: str, id_field: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(document, repairs); document None when there is no string text."""
    repairs: list[str] = []
    text = rec.get(text_field)
    if not isinstance(text, str):
        return None, repairs
    text, fixed = repair_surrogates(text)
    if fixed:
        repairs.append("lone_surrogate")
    doc = {k: v for k, v in rec.items() if k not in (text_field, id_field)}
    if "meta" in doc:
        doc["meta"], bad_meta = meta_object(doc["meta"])
        if bad_meta:
            repairs.append("meta_not_object")
    doc["text"] = text
    rid = rec.get(id_field)
    doc["id"] = str(rid) if rid not in (None, "") else doc_id(text)
    return doc, repairs


def _iter_parquet(path: Path, text_field: str, id_field: str, report: OnEvent, repaired: OnEvent,
                  batch_rows: int) -> Iterator[dict]:
    """Row group by row group: a group that cannot be decoded is reported with its row count, the rest is read."""
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"no '{text_field}' column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        try:
            table = pf.read_row_group(group)
            records = [rec for batch in table.to_batches(batch_rows) for rec in batch.to_pylist()]
        except (pa.ArrowException, OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            report("corrupt_row_group", f"{path}:rows {row + 1}-{row + n} ({n} rows): {type(e).__name__}: {e}")
            row += n
            continue
        for rec in records:
            row += 1
            doc, repairs = _normalise(rec, text_field, id_field)
            if doc is None:
                report("missing_text", f"{path}:row {row}")
                continue
            for reason in repairs:
                repaired(reason, f"{path}:row {row}")
            yield doc


def iter_json_lines(lines: Iterable[str], where: str | Path, report: Callable[[str, str], None],
                    reason: str = "malformed_json") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each JSON-object line (BOM ignored, lone surrogates repaired); blank lines are
    skipped, any other is reported as `reason`."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.removeprefix("\ufeff"))
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            yield lineno, repair_strings(rec)[0]
        else:
            report(reason, f"{where}:{lineno}")


def _iter_jsonl(path: Path, text_field: str, id_field: str, report: OnEvent, repaired: OnEvent) -> Iterator[dict]:
    """JSON lines or a JSON array, record by record (`pipeline.textio.iter_json_records`)."""
    for rec in iter_json_records(path):
        if isinstance(rec, Gap):
            report(rec.reason, f"{path}:{rec.where}: {rec.describe()}")
        elif rec.error is not None:
            report("malformed_json", f"{path}:{rec.where.removeprefix('line ')}")
        else:
            yield from _line_document(rec.value, list(rec.repairs), text_field, id_field, report, repaired,
                                      f"{path}:{rec.where.removeprefix('line ')}")


def _line_document(rec: Any, repairs: list[str], text_field: str, id_field: str, report: OnEvent,
                   repaired: OnEvent, where: str) -> Iterator[dict]:
    if not isinstance(rec, dict):
        report("malformed_json", where)
        return
    doc, more = _normalise(rec, text_field, id_field)
    if doc is None:
        report("missing_text", where)
        return
    for reason in dict.fromkeys(repairs + more):
        repaired(reason, where)
    yield doc


def count_rows(paths: Iterable[str | Path]) -> int:
    """Rows in parquet document files (metadata only)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in list_document_files(paths)
               if isinstance(p, Path) and p.suffix == ".parquet")
