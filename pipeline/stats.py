"""Per-stage accounting: every record read ends kept, dropped (named reason) or errored, and the counts add up.

`repaired` counts kept records whose text was repaired by the reading policy (`pipeline.textio`: invalid UTF-8
or lone surrogates to U+FFFD, a meta that is not an object); a repair is not a fate, so it is outside the sum."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import TextbookError
from pipeline.io import atomic_write_text


class StageStats:
    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.n_read = 0
        self.n_kept = 0
        self.dropped: Counter[str] = Counter()
        self.errored: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.error_locations: list[dict[str, str]] = []  # the first MAX_LOCATIONS, for <stage>/errors.jsonl
        self.extra: dict[str, Any] = {}

    def read(self, n: int = 1) -> None:
        self.n_read += n

    def keep(self, n: int = 1) -> None:
        self.n_kept += n

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def error(self, reason: str, n: int = 1) -> None:
        self.errored[reason] += n

    MAX_LOCATIONS = 10_000

    def error_at(self, reason: str, where: str) -> None:
        """One errored record with its location (file:line, file:row ...); the locations go to errors.jsonl."""
        self.error(reason)
        if len(self.error_locations) < self.MAX_LOCATIONS:
            self.error_locations.append({"reason": reason, "where": where})

    def write_errors(self, path: Path) -> None:
        """`errors.jsonl`: one line per errored record (up to MAX_LOCATIONS), when there are any."""
        if self.error_locations:
            atomic_write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.error_locations))

    def repair(self, reason: str, n: int = 1) -> None:
        self.repaired[reason] += n

    def on_repair(self, reason: str, where: str) -> None:
        """`iter_documents(on_repair=...)` callback."""
        self.repair(reason)

    def set(self, key: str, value: Any) -> None:
        """Stage-specific figures (tokens, cost, latency percentiles, coverage, ...)."""
        self.extra[key] = value

    @property
    def accounted(self) -> int:
        return self.n_kept + sum(self.dropped.values()) + sum(self.errored.values())

    @property
    def reconciled(self) -> bool:
        return self.n_read == self.accounted

    def check(self) -> None:
        if not self.reconciled:
            raise TextbookError(
                f"stage {self.stage}: counts do not reconcile: read {self.n_read} != kept {self.n_kept} "
                f"+ dropped {sum(self.dropped.values())} + errored {sum(self.errored.values())}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "read": self.n_read,
            "kept": self.n_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "errored": dict(sorted(self.errored.items())),
            "reconciled": self.reconciled,
            "repaired": dict(sorted(self.repaired.items())),
            **self.extra,
        }

    def write(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.as_dict(), indent=2, sort_keys=False, default=str) + "\n")

    def counts(self) -> dict[str, Any]:
        """The counts of a part of a stage (a task's share), for `merge` in the stage's driver."""
        return {"read": self.n_read, "kept": self.n_kept, "dropped": dict(self.dropped),
                "errored": dict(self.errored), "repaired": dict(self.repaired), "locations": self.error_locations}

    def merge(self, part: dict[str, Any]) -> None:
        """Add a task's `counts()`; merged in input order, the totals and error locations equal one pass."""
        self.n_read += part["read"]
        self.n_kept += part["kept"]
        self.dropped.update(part["dropped"])
        self.errored.update(part["errored"])
        self.repaired.update(part["repaired"])
        room = self.MAX_LOCATIONS - len(self.error_locations)
        self.error_locations.extend(part["locations"][:max(room, 0)])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageStats:
        s = cls(d["stage"])
        s.n_read, s.n_kept = d["read"], d["kept"]
        s.dropped.update(d.get("dropped", {}))
        s.errored.update(d.get("errored", {}))
        s.repaired.update(d.get("repaired", {}))
        known = {"stage", "read", "kept", "dropped", "errored", "reconciled", "repaired"}
        s.extra = {k: v for k, v in d.items() if k not in known}
        return s
