"""Labelled documents for training and evaluation: read, validate, merge repeats, assign folds and holdout by hash.

Every row read ends as a used annotation or a counted problem (`LoadReport`): empty text, invalid UTF-8
(replaced and kept), non-numeric label, score outside the rubric's range, filtered by `where`. With
`strict`, the first bad row is a one-line error naming the file and the row instead.
Repeated annotations of one document (same id, or same normalised text) are merged into one example whose
score is their mean; cross-validation folds (`fold_of`, hash of the id) and the holdout (`is_held_out`, hash of
the text) are decided per document, so repeats never straddle a fit and its measurement.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.classifier import LabelSource
from pipeline.documents import clean_text, doc_id
from pipeline.errors import ResourceUnavailable, TextbookError


@dataclass
class Example:
    id: str
    text: str
    source: str
    scores: list[float] = field(default_factory=list)
    fixed: bool = False  # label set by the source (DCLM-style), not by an annotator
    targets: list[float] = field(default_factory=list)  # fit targets of a source with `target_column`

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def target(self) -> float:
        """What a model is fitted on: the mean `target_column` value if the source has one, else `score`."""
        return sum(self.targets) / len(self.targets) if self.targets else self.score


@dataclass
class LoadReport:
    rows: int = 0
    used: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    examples_of: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "file:row"

    def problem(self, reason: str, where: str) -> None:
        self.problems[reason] += 1
        self.examples_of.setdefault(reason, [])
        if len(self.examples_of[reason]) < 3:
            self.examples_of[reason].append(where)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "used": self.used, "problems": dict(sorted(self.problems.items())),
                "problem_examples": self.examples_of}


# ------------------------------------------------------------------------------------------- reading rows
def _fmt(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    if path.is_dir():
        return "dir"
    for suffix, f in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".json.gz", "jsonl"),
                      (".ndjson", "jsonl"), (".csv", "csv"), (".json", "json")):
        if name.endswith(suffix):
            return f
    raise TextbookError(f"{path}: cannot tell the format from the name; set format: parquet|jsonl|csv|json|text")


def _open(path: Path) -> Any:
    # newline="": the csv module does its own line splitting (quoted fields may hold newlines)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def _rows(src: LabelSource) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) pairs from one source."""
    if src.path.startswith("hf:"):
        yield from _hf_rows(src.path[3:])
        return
    path = Path(src.path)
    if not path.exists():
        raise TextbookError(f"{path}: training source does not exist")
    fmt = _fmt(path, src.format)
    if fmt == "text":
        files = sorted(p for p in path.glob(src.glob) if p.is_file()) if path.is_dir() else [path]
        for p in files:
            yield str(p), {src.text_column: p.read_bytes().decode("utf-8", "surrogateescape"), "_file": p.name}
        return
    if fmt == "dir":
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.name.startswith(".") and p.name != "SOURCES.md":
                try:
                    sub = src.model_copy(update={"path": str(p), "format": "auto"})
                    yield from _rows(sub)
                except TextbookError:
                    continue
        return
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            n = 0
            for batch in pf.iter_batches(batch_size=2000):
                for rec in batch.to_pylist():
                    n += 1
                    yield f"{path}:row {n}", rec
        elif fmt == "jsonl":
            with _open(path) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            rec = {"_malformed": True}
                        yield f"{path}:line {n}", rec if isinstance(rec, dict) else {"_malformed": True}
        elif fmt == "json":
            with _open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):  # {"data": [...]} or column-oriented
                data = next((v for v in data.values() if isinstance(v, list)), [data])
            for n, rec in enumerate(data, 1):
                yield f"{path}:item {n}", rec if isinstance(rec, dict) else {"_malformed": True}
        elif fmt == "csv":
            csv.field_size_limit(sys.maxsize)
            with _open(path) as f:
                for n, rec in enumerate(csv.DictReader(f), 2):  # row 1 is the header
                    yield f"{path}:row {n}", rec
    except (OSError, ValueError, EOFError) as e:
        raise TextbookError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _hf_rows(spec: str) -> Iterator[tuple[str, dict[str, Any]]]:
    name, _, split = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # offline, unknown name, gated...
        raise ResourceUnavailable(
            f"hf:{name}: cannot load the Hugging Face data set ({type(e).__name__}); download it and point "
            f"`path` at the local files instead") from None
    for n, rec in enumerate(ds, 1):
        yield f"hf:{name}:{n}", rec


_RST_ROLE = re.compile(r":[a-zA-Z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_DIRECTIVE = re.compile(r"^\s*\.\. [\w:-]+::.*$|^\s*:[\w-]+:.*$|^[=\-~^\"'`#*+<>]{3,}\s*$", re.M)


def strip_rst(text: str) -> str:
    """Crude reST → prose: roles become their text, directive/option/underline lines go."""
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_DIRECTIVE.sub("", text)
    return text.replace("``", "").replace("**", "")


def chunk(text: str, size: int) -> list[str]:
    """Paragraph-aligned chunks of about `size` characters (a single huge paragraph is cut hard)."""
    out: list[str] = []
    cur: list[str] = []
    n = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        while len(para) > size:
            out.append(para[:size])
            para = para[size:]
        if n + len(para) > size and cur:
            out.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(para)
        n += len(para) + 2
    if cur:
        out.append("\n\n".join(cur))
    return [c for c in out if len(c) >= min(200, size // 4)]


def _to_float(value: Any, label_map: dict[str, float] | None) -> float | None:
    if label_map is not None and isinstance(value, str) and value in label_map:
        return float(label_map[value])
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


def load_source(src: LabelSource, score_min: float, score_max: float, report: LoadReport,
                strict: bool = False) -> list[Example]:
    """Rows of one source as (unmerged) examples; problems counted in `report`."""
    name = src.name or Path(src.path.rstrip("/")).name
    out: list[Example] = []

    def bad(reason: str, where: str, detail: str = "") -> None:
        if strict:
            raise TextbookError(f"{where}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}")
        report.problem(reason, where)

    for where, rec in _rows(src):
        report.rows += 1
        if rec.get("_malformed"):
            bad("malformed_record", where)
            continue
        if src.where and any(rec.get(k) != v for k, v in src.where.items()):
            report.problems["not_selected"] += 1
            continue
        text = rec.get(src.text_column)
        if not isinstance(text, str) or not text.strip():
            bad("empty_text", where)
            continue
        cleaned = clean_text(text)
        if cleaned is not text:
            text = cleaned
            report.problem("invalid_utf8_replaced", where)  # kept: the replaced text is still usable
        if src.label is not None:
            score: float | None = float(src.label)
        else:
            if not src.score_column or src.score_column not in rec:
                raise TextbookError(f"{where}: no score column '{src.score_column}' (columns: {', '.join(rec)})")
            score = _to_float(rec[src.score_column], src.label_map)
            if score is None:
                bad("non_numeric_label", where, repr(rec[src.score_column])[:40])
                continue
        if not score_min <= score <= score_max:
            bad("score_out_of_range", where, f"{score} not in [{score_min}, {score_max}]")
            continue
        targets: list[float] = []
        if src.target_column:
            if src.target_column not in rec:
                raise TextbookError(f"{where}: no target column '{src.target_column}' (columns: {', '.join(rec)})")
            target = _to_float(rec[src.target_column], src.label_map)
            if target is None or not score_min <= target <= score_max:
                bad("bad_target", where, repr(rec[src.target_column])[:40])
                continue
            targets = [target]
        if src.markup == "rst":
            text = strip_rst(text)
        pieces = chunk(text, src.chunk_chars) if src.chunk_chars else [text]
        rid = rec.get(src.id_column) if src.id_column else None
        for i, piece in enumerate(pieces):
            if src.id_column and rid not in (None, ""):
                ident = f"{rid}#{i}" if len(pieces) > 1 else str(rid)
            else:
                ident = doc_id(piece)
            out.append(Example(ident, piece, name, [score], fixed=src.label is not None, targets=list(targets)))
        report.used += 1
    if src.limit is not None:
        # a deterministic sample of *documents* (all annotations of a chosen document stay)
        ids = sorted({e.id for e in out}, key=lambda i: _hash01(i + "|sample"))[: src.limit]
        chosen = set(ids)
        out = [e for e in out if e.id in chosen]
    return out


def merge(examples: list[Example]) -> tuple[list[Example], int]:
    """Repeated annotations of one document become one example (all scores kept); returns (merged, repeats)."""
    by_id: dict[str, Example] = {}
    repeats = 0
    for ex in examples:
        seen = by_id.get(ex.id)
        if seen is None:
            by_id[ex.id] = Example(ex.id, ex.text, ex.source, list(ex.scores), ex.fixed, list(ex.targets))
        else:
            seen.scores.extend(ex.scores)
            seen.targets.extend(ex.targets)
            repeats += 1
    return list(by_id.values()), repeats


def _hash01(key: str) -> float:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def fold_of(ident: str, folds: int) -> int:
    """Cross-validation fold (0..folds-1) from the id's hash: same id, same fold, in every run and on every
    machine, so the repeated annotations of one document never straddle folds."""
    return min(int(_hash01(ident + "|fold") * folds), folds - 1)


def text_bucket(text: str, modulo: int) -> int:
    """`int(sha256(text)[:8], 16) % modulo` over the UTF-8 text: the hash rule of `../shared/data`'s hidden
    splits and of `classifier.train.holdout`."""
    return int(hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) % modulo


def is_held_out(example: Example, rule: Any) -> bool:
    """True when `rule` (a `HoldoutRule`, or None for no holdout) holds the example out of every fit."""
    return rule is not None and text_bucket(example.text, rule.modulo) == rule.remainder


def load_labelled(sources: list[LabelSource], score_min: float, score_max: float,
                  strict: bool = False) -> tuple[list[Example], LoadReport, int]:
    """Every source read and merged: (examples, report, number of repeated annotations merged)."""
    if not sources:
        raise TextbookError("no training sources: set classifier.train.sources (files with text and score)")
    report = LoadReport()
    rows: list[Example] = []
    for src in sources:
        rows.extend(load_source(src, score_min, score_max, report, strict))
    merged, repeats = merge(rows)
    if not merged:
        raise TextbookError(f"no usable labelled documents in the sources ({dict(report.problems)})")
    return merged, report, repeats
