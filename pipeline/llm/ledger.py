"""The request ledger: a content-addressed SQLite (WAL) table of results = cache + resume + idempotency.

Keyed by `LLMRequest.key(model)`, so only what changes the answer (model, rendered prompt, sampling params,
sample index, template version) changes the key; output dir, concurrency or retry settings do not.
Results are committed as they arrive (WAL: a committed row survives `kill -9` of the writer), so a re-run
sends only requests without a successful row. A failure never overwrites a success.
The API key is never written here: rows hold the request body and the (redacted) error only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.llm.types import LLMRequest, LLMResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    ok INTEGER NOT NULL,
    text TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    template_version TEXT,
    request TEXT,
    created REAL NOT NULL
)
"""

_UPSERT = """
INSERT INTO results (key, model, ok, text, finish_reason, prompt_tokens, completion_tokens, latency_s, attempts,
                     error, template_version, request, created)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET
    model=excluded.model, ok=excluded.ok, text=excluded.text, finish_reason=excluded.finish_reason,
    prompt_tokens=excluded.prompt_tokens, completion_tokens=excluded.completion_tokens,
    latency_s=excluded.latency_s, attempts=results.attempts + excluded.attempts, error=excluded.error,
    created=excluded.created
WHERE results.ok = 0
"""


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: commits survive a killed process (not a power cut), without an fsync per row
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_ok(self, key: str) -> LLMResult | None:
        row = self.db.execute(
            "SELECT model, text, finish_reason, prompt_tokens, completion_tokens, latency_s, attempts "
            "FROM results WHERE key = ? AND ok = 1", (key,)).fetchone()
        if row is None:
            return None
        model, text, finish, p_tok, c_tok, latency, attempts = row
        return LLMResult(key=key, ok=True, text=text, finish_reason=finish, prompt_tokens=p_tok,
                         completion_tokens=c_tok, latency_s=latency, attempts=attempts, error=None, model=model,
                         cached=True)

    def ok_keys(self) -> set[str]:
        """Keys with a successful result (about 100 bytes each in memory)."""
        return {k for (k,) in self.db.execute("SELECT key FROM results WHERE ok = 1")}

    def put_many(self, items: Iterable[tuple[LLMResult, LLMRequest]]) -> None:
        """Record results in one transaction (one commit per batch of arrivals keeps up with hundreds/s)."""
        now = time.time()
        rows = [
            (r.key, r.model, int(r.ok), r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens,
             r.latency_s, r.attempts, r.error, req.template_version,
             json.dumps({k: v for k, v in req.to_json().items() if k != "tag"}, ensure_ascii=False, default=str),
             now)
            for r, req in items
        ]
        if not rows:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(_UPSERT, rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def counts(self) -> dict[str, int]:
        ok, failed = self.db.execute(
            "SELECT COALESCE(SUM(ok), 0), COALESCE(SUM(1 - ok), 0) FROM results").fetchone()
        return {"ok": int(ok), "failed": int(failed)}
