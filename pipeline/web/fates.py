"""Where each record ends: kept, dropped (named reason) or errored (file + offset), counted per input file.

Every step that can end a record owns a `Fates` (one per task). It writes kept/removed documents as parquet
through `DocumentWriter`, error lines as jsonl, and on close a small ledger JSON with its counts per
(input file, fate, reason). The stage sums the ledgers and checks them against what the readers read.

`Fates` also speaks datatrove's `exclusion_writer` protocol (`with writer: writer.write(doc, rank)`), so it
can be handed to any datatrove filter.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.documents import DocumentWriter
from pipeline.io import atomic_write_text

# Metadata keys the readers add for accounting; they travel in meta as input_file / input_offset.
FILE_KEY, WHERE_KEY, FORMAT_KEY, ERROR_KEY = "_file", "_where", "_format", "_error"
PRIVATE = (FILE_KEY, WHERE_KEY, FORMAT_KEY, ERROR_KEY, "filter_reason", "file_path")


def rank_tag(rank: int) -> str:
    return f"r{rank:05d}"


def doc_to_record(doc: Any, reason: str | None = None) -> dict[str, Any]:
    """A datatrove Document as one of our documents: source web, url, edu_score, the rest in meta."""
    md = dict(doc.metadata)
    meta = {k: v for k, v in md.items() if k not in PRIVATE and k not in ("url", "edu_score")}
    meta["input_file"] = md.get(FILE_KEY)
    meta["input_offset"] = md.get(WHERE_KEY)
    meta["source_id"] = doc.id
    return {"id": None, "text": doc.text, "source": "web", "url": md.get("url"), "edu_score": md.get("edu_score"),
            "meta": meta, "reason": reason}


def sampled(doc_id: str, rate: float) -> bool:
    """Deterministic sample (same documents whatever the task split)."""
    return rate >= 1.0 or (zlib.crc32(doc_id.encode()) % 10_000) < rate * 10_000


class Fates:
    def __init__(self, root: str, step: str, sample_rate: float = 1.0) -> None:
        self.root = str(root)
        self.step = step
        self.sample_rate = sample_rate
        self._reset()

    def _reset(self) -> None:
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.detail: Counter[str] = Counter()
        self.rank: int | None = None
        self._writers: dict[str, DocumentWriter] = {}
        self._errors: Any = None

    def __getstate__(self) -> dict[str, Any]:  # open writers never travel between processes
        return {"root": self.root, "step": self.step, "sample_rate": self.sample_rate}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # --- datatrove exclusion_writer protocol --------------------------------------------------------------
    def __enter__(self) -> Fates:
        self._reset()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write(self, doc: Any, rank: int = 0) -> None:
        """A document a filter dropped (or, when it carries _error, one the filter failed on)."""
        if ERROR_KEY in doc.metadata:
            self.error(rank, doc.metadata.get(FILE_KEY), doc.metadata.get(WHERE_KEY), doc.metadata.pop(ERROR_KEY),
                       str(doc.metadata.get("filter_reason", "")))
            return
        self.drop(doc, rank, self.step, doc.metadata.get("filter_reason"))

    # --- fates ----------------------------------------------------------------------------------------------
    def keep(self, doc: Any, rank: int) -> None:
        self._count(rank, doc.metadata.get(FILE_KEY), "kept", "")
        self._writer(rank, "kept", rank_tag(rank)).write(doc_to_record(doc))

    def hold(self, doc: Any, rank: int) -> None:
        """A scored document whose fate the edu cut decides after every task is done (`pipeline.web.edu`)."""
        self._count(rank, doc.metadata.get(FILE_KEY), "scored", "")
        self._writer(rank, "scored", rank_tag(rank)).write(doc_to_record(doc))

    def drop(self, doc: Any, rank: int, reason: str, detail: str | None = None) -> None:
        self._count(rank, doc.metadata.get(FILE_KEY), "dropped", reason)
        if detail:
            self.detail[f"{reason}: {detail}"] += 1
        if sampled(str(doc.id), self.sample_rate):
            text = f"{reason}: {detail}" if detail else reason
            self._writer(rank, "removed", f"{reason}-{rank_tag(rank)}").write(doc_to_record(doc, text))

    def error(self, rank: int, file: str | None, where: Any, reason: str, detail: str = "") -> None:
        self._count(rank, file, "errored", reason)
        if self._errors is None:
            path = Path(self.root, "errors", f"{rank_tag(rank)}-{self.step}.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._errors = open(path, "w", encoding="utf-8")
        line = {"file": file, "where": where, "reason": reason, "step": self.step, "detail": detail[:500]}
        self._errors.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _count(self, rank: int, file: str | None, fate: str, reason: str) -> None:
        self.rank = rank
        self.counts[(file or "?", fate, reason)] += 1

    def _writer(self, rank: int, kind: str, prefix: str) -> DocumentWriter:
        key = f"{kind}/{prefix}"
        if key not in self._writers:
            self._writers[key] = DocumentWriter(Path(self.root, kind), prefix=prefix, rows_per_file=20_000)
        return self._writers[key]

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        if self._errors is not None:
            self._errors.close()
        if self.rank is not None:
            ledger = {"step": self.step, "rank": self.rank,
                      "counts": [[f, fate, reason, n] for (f, fate, reason), n in sorted(self.counts.items())],
                      "detail": dict(self.detail)}
            atomic_write_text(Path(self.root, "ledger", f"{self.step}-{rank_tag(self.rank)}.json"),
                              json.dumps(ledger) + "\n")
        self._reset()


def clear_rank_outputs(root: str, rank: int) -> None:
    """A task that is re-run (after a crash) first removes what its earlier attempt wrote."""
    tag = rank_tag(rank)
    for sub in ("kept", "removed", "errors", "ledger", "read", "scored", "edu"):
        d = Path(root, sub)
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(f"{tag}-") or f"-{tag}-" in p.name or p.name.endswith(f"-{tag}.json") \
                        or p.name == f"{tag}.json":
                    p.unlink(missing_ok=True)
