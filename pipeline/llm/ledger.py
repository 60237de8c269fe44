"""The request ledger: a content-addressed SQLite (WAL) table of results = cache + resume + idempotency + the bill.

Keyed by `LLMRequest.key(model)`, so only what changes the answer (model, rendered prompt, sampling params,
sample index, template version) changes the key; output dir, concurrency or retry settings do not.
Results are committed as they arrive (WAL: a committed row survives `kill -9` of the writer), so a re-run
sends only requests without a successful row. A failure never overwrites a success.

The bill: `billed_prompt_tokens` / `billed_completion_tokens` add up every answer ever billed for a key, usable
or not, over all runs (a success's own tokens are in `prompt_tokens` / `completion_tokens`); `unusable_answers`
counts the answers that were billed but unusable (content filter, null content, ...), which is how a re-run knows
a request already used up `llm.content_filter_retries` and answers it from here instead of paying again.

Batch mode (`pipeline.llm.batch`) keeps its submissions here too, so a killed run resumes by polling them:
`batches` (one row per submission: our `ref`, the uploaded `input_file_id`, the provider's `batch_id` once
created, its status, `done` once its results are in `results`) and `batch_requests` (which key went in which
open submission, with the request, so results can be recorded even for a submission an earlier run made; removed
when the submission is done).
The API key is never written here: rows hold the request body and the (redacted) error only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
# added after the first version: created on an old ledger by `_migrate`
_ADDED_COLUMNS = {
    "billed_prompt_tokens": "INTEGER NOT NULL DEFAULT 0",
    "billed_completion_tokens": "INTEGER NOT NULL DEFAULT 0",
    "unusable_answers": "INTEGER NOT NULL DEFAULT 0",
    "outcome": "TEXT",
}
_BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    ref TEXT PRIMARY KEY,
    batch_id TEXT,
    input_file_id TEXT,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    n INTEGER NOT NULL,
    status TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    detail TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_requests (
    ref TEXT NOT NULL,
    key TEXT NOT NULL,
    request TEXT NOT NULL,
    PRIMARY KEY (ref, key)
);
"""

_COLUMNS = ("key", "model", "ok", "text", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s",
            "attempts", "error", "template_version", "request", "created", "billed_prompt_tokens",
            "billed_completion_tokens", "unusable_answers", "outcome")
# a success is never overwritten (its columns keep their values), but what any later answer was billed still adds up
_KEEP_SUCCESS = ("model", "ok", "text", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s", "error",
                 "created", "outcome")
_UPSERT = (
    f"INSERT INTO results ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})\n"
    "ON CONFLICT(key) DO UPDATE SET\n"
    + ",\n".join(f"    {c}=CASE WHEN results.ok = 0 THEN excluded.{c} ELSE results.{c} END" for c in _KEEP_SUCCESS)
    + ",\n    attempts=CASE WHEN results.ok = 0 THEN results.attempts + excluded.attempts ELSE results.attempts END"
    + ",\n    billed_prompt_tokens=results.billed_prompt_tokens + excluded.billed_prompt_tokens"
    + ",\n    billed_completion_tokens=results.billed_completion_tokens + excluded.billed_completion_tokens"
    + ",\n    unusable_answers=results.unusable_answers + excluded.unusable_answers"
)


def request_json(req: LLMRequest) -> str:
    """The request as stored in the ledger (its tag, caller data, left out)."""
    return json.dumps({k: v for k, v in req.to_json().items() if k != "tag"}, ensure_ascii=False, default=str)


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: commits survive a killed process (not a power cut), without an fsync per row
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(_SCHEMA)
        self._migrate()
        self.db.executescript(_BATCH_SCHEMA)

    def _migrate(self) -> None:
        have = {row[1] for row in self.db.execute("PRAGMA table_info(results)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                try:
                    self.db.execute(f"ALTER TABLE results ADD COLUMN {name} {decl}")
                except sqlite3.OperationalError as e:  # another process added it meanwhile
                    if "duplicate column" not in str(e):
                        raise

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

    def get_failed(self, key: str) -> LLMResult | None:
        """A recorded failure as a cached result (costs nothing now), None if the key has no failed row."""
        row = self.db.execute(
            "SELECT model, latency_s, attempts, error, unusable_answers, outcome FROM results WHERE key = ? AND ok = 0",
            (key,)).fetchone()
        if row is None:
            return None
        model, latency, attempts, error, unusable, outcome = row
        return LLMResult(key=key, ok=False, text=None, finish_reason=None, prompt_tokens=0, completion_tokens=0,
                         latency_s=latency, attempts=attempts, error=error, model=model, cached=True,
                         unusable_answers=0, outcome=outcome)

    def ok_keys(self) -> set[str]:
        """Keys with a successful result (about 100 bytes each in memory)."""
        return {k for (k,) in self.db.execute("SELECT key FROM results WHERE ok = 1")}

    def unusable_counts(self) -> dict[str, int]:
        """Keys without a success that were billed unusable answers: key → how many, over all runs."""
        return dict(self.db.execute("SELECT key, unusable_answers FROM results WHERE ok = 0 AND unusable_answers > 0"))

    def put_many(self, items: Iterable[tuple[LLMResult, LLMRequest]]) -> None:
        """Record results in one transaction (one commit per batch of arrivals keeps up with hundreds/s)."""
        rows = self._rows(items)
        if not rows:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(_UPSERT, rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @staticmethod
    def _rows(items: Iterable[tuple[LLMResult, LLMRequest | str]]) -> list[tuple]:
        now = time.time()
        return [
            (r.key, r.model, int(r.ok), r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens,
             r.latency_s, r.attempts, r.error, (req.template_version if isinstance(req, LLMRequest) else
                                                json.loads(req).get("template_version", "")),
             request_json(req) if isinstance(req, LLMRequest) else req, now,
             r.billed_prompt_tokens, r.billed_completion_tokens, r.unusable_answers, r.outcome)
            for r, req in items
        ]

    def counts(self) -> dict[str, int]:
        ok, failed = self.db.execute(
            "SELECT COALESCE(SUM(ok), 0), COALESCE(SUM(1 - ok), 0) FROM results").fetchone()
        return {"ok": int(ok), "failed": int(failed)}

    def billed(self) -> dict[str, int]:
        """Every token ever billed through this ledger: prompt, completion, and the unusable answers' count."""
        p, c, u = self.db.execute("SELECT COALESCE(SUM(billed_prompt_tokens), 0), "
                                  "COALESCE(SUM(billed_completion_tokens), 0), COALESCE(SUM(unusable_answers), 0) "
                                  "FROM results").fetchone()
        return {"prompt_tokens": int(p), "completion_tokens": int(c), "unusable_answers": int(u)}

    # ------------------------------------------------------------------------------------------ batch mode
    def add_batch(self, ref: str, endpoint: str, model: str, items: list[tuple[str, LLMRequest]]) -> None:
        """Record a submission before anything is uploaded: its requests are in flight from now on."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("INSERT INTO batches (ref, endpoint, model, n, status, created, updated) "
                            "VALUES (?, ?, ?, ?, 'preparing', ?, ?)", (ref, endpoint, model, len(items), now, now))
            self.db.executemany("INSERT OR REPLACE INTO batch_requests (ref, key, request) VALUES (?, ?, ?)",
                                [(ref, key, request_json(req)) for key, req in items])
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def update_batch(self, ref: str, **fields: Any) -> None:
        """Set any of batch_id, input_file_id, status, detail (and `updated`)."""
        allowed = {"batch_id", "input_file_id", "status", "detail"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"update_batch: fields must be among {sorted(allowed)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE batches SET {cols}, updated = ? WHERE ref = ?", (*fields.values(), time.time(), ref))

    def open_batches(self) -> list[dict[str, Any]]:
        """Submissions whose results are not recorded yet, oldest first: ref, batch_id, input_file_id, endpoint,
        model, n, status, created, and `requests` {key: stored request JSON}."""
        rows = self.db.execute("SELECT ref, batch_id, input_file_id, endpoint, model, n, status, created "
                               "FROM batches WHERE done = 0 ORDER BY created").fetchall()
        out = []
        for ref, batch_id, file_id, endpoint, model, n, status, created in rows:
            reqs = dict(self.db.execute("SELECT key, request FROM batch_requests WHERE ref = ?", (ref,)))
            out.append({"ref": ref, "batch_id": batch_id, "input_file_id": file_id, "endpoint": endpoint,
                        "model": model, "n": n, "status": status, "created": created, "requests": reqs})
        return out

    def open_batch_keys(self, model: str) -> dict[str, tuple[str, str]]:
        """Keys of `model`'s requests in submissions whose results are not recorded yet: key -> (the provider's
        batch id, or our ref before it has one; status)."""
        rows = self.db.execute("SELECT r.key, COALESCE(b.batch_id, b.ref), b.status FROM batches b "
                               "JOIN batch_requests r ON r.ref = b.ref WHERE b.done = 0 AND b.model = ?", (model,))
        return {key: (batch, status) for key, batch, status in rows}

    def finish_batch(self, ref: str, status: str, detail: str | None,
                     items: Iterable[tuple[LLMResult, LLMRequest | str]]) -> None:
        """A batch's results and its `done` flag in one transaction: a kill leaves either both or neither, so a
        re-poll never records (or bills) a batch twice."""
        rows = self._rows(items)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                self.db.executemany(_UPSERT, rows)
            self.db.execute("UPDATE batches SET done = 1, status = ?, detail = ?, updated = ? WHERE ref = ?",
                            (status, detail, time.time(), ref))
            # the requests are in `results` now: their copies were needed only while the batch was open
            self.db.execute("DELETE FROM batch_requests WHERE ref = ?", (ref,))
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
