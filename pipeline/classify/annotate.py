"""`textbook classifier annotate`: score a sample of documents with an LLM and a rubric prompt.

Uses the project's LLM layer (`pipeline.llm.runner.run_requests`: Ray workers, shared limits, request ledger,
budget, progress), so a re-run resumes: answered requests come from the ledger and cost nothing. Score
extraction is strict and reads only the model's own verdict, its final non-blank line: a page that itself says
"Educational score: 5" is text to judge, and an answer that quotes it keeps its own final score. No score on
the final line, several different scores on it, or a score outside the rubric's range is a *failed*
annotation (`parse_score` names the reason) recorded with the raw response, never a guess.

Outputs: `<out>` parquet of successful annotations (id, text, score, rubric_id, model, raw_response, ...),
`<out stem>.failed.parquet` with the failures and their raw text, `<out stem>.stats.json`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import TextbookError
from pipeline.io import atomic_path, atomic_write_text
from pipeline.paths import repo_path

ANNOTATION_COLUMNS = ("id", "text", "score", "sample_index", "rubric_id", "model", "raw_response", "error",
                      "finish_reason", "request_key")


def load_rubric(path: str) -> tuple[str, str]:
    """(template, rubric_id). rubric_id = file stem + content hash, so editing a rubric never reuses old answers."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and repo_path(path).is_file():
        p = repo_path(path)
    if not p.is_file():
        raise TextbookError(f"{path}: rubric file not found")
    template = p.read_text(encoding="utf-8")
    if "{text}" not in template:
        raise TextbookError(f"{p}: rubric has no {{text}} slot for the document")
    return template, f"{p.stem}@{hashlib.sha256(template.encode()).hexdigest()[:12]}"


PARSE_FAILURES = ("empty_response", "unparseable", "score_not_on_final_line", "conflicting_scores",
                  "score_out_of_range")


def parse_score(raw: str | None, pattern: str, lo: float, hi: float) -> tuple[float | None, str | None]:
    """(score, None) or (None, reason), reason one of PARSE_FAILURES: strict, never guessed.

    Only the final non-blank line of the answer counts (the rubric asks for the score there): scores on earlier
    lines (the model quoting the page, or thinking aloud) are ignored. `pattern` is a regex whose group 1 is
    the score. Reasons: `empty_response`; `unparseable` (no score anywhere); `score_not_on_final_line` (scores
    only before the final line); `conflicting_scores` (different values on the final line);
    `score_out_of_range` (outside [lo, hi])."""
    if not raw or not raw.strip():
        return None, "empty_response"
    final = raw.strip().splitlines()[-1]
    values = {float(m) for m in re.findall(pattern, final, flags=re.IGNORECASE)}
    if not values:
        earlier = re.search(pattern, raw, flags=re.IGNORECASE)
        return None, "score_not_on_final_line" if earlier else "unparseable"
    if len(values) > 1:
        return None, "conflicting_scores"
    score = values.pop()
    if not lo <= score <= hi:
        return None, "score_out_of_range"
    return score, None


def render(template: str, text: str, max_chars: int) -> str:
    prefix = text[:max_chars]
    return template.replace("{text}", prefix.strip())


def sample_documents(inputs: list[str], text_column: str, id_column: str, k: int | None,
                     on_error: Callable[[str, str], None]) -> list[dict[str, Any]]:
    """Deterministic sample: the k documents with the smallest hash of their id (same inputs → same sample)."""
    from pipeline.documents import iter_documents

    if not inputs:
        raise TextbookError("classifier.annotate.inputs is empty: name jsonl/parquet files or directories")
    heap: list[tuple[int, str, dict[str, Any]]] = []
    seen: set[str] = set()
    for doc in iter_documents(inputs, text_field=text_column, id_field=id_column, on_error=on_error):
        if doc["id"] in seen:
            continue
        seen.add(doc["id"])
        if not doc["text"].strip():
            on_error("empty_text", doc["id"])
            continue
        h = int.from_bytes(hashlib.blake2b(doc["id"].encode(), digest_size=8).digest(), "big")
        item = (-h, doc["id"], {"id": doc["id"], "text": doc["text"]})
        if k is None:
            heap.append(item)
        elif len(heap) < k:
            heapq.heappush(heap, item)
        elif -h > heap[0][0]:
            heapq.heapreplace(heap, item)
    return [d for _, _, d in sorted(heap, key=lambda x: (-x[0], x[1]))]


def build_requests(cfg: RunConfig, docs: list[dict[str, Any]], template: str, rubric_id: str) -> list[Any]:
    from pipeline.llm.types import LLMRequest

    a = cfg.classifier.annotate
    params, api = cfg.llm.sampling_params(), cfg.llm.request_api()
    reqs = []
    for doc in docs:
        content = render(template, doc["text"], a.max_chars)
        for i in range(a.repeats):
            # the result carries the tag back, not the request: what the rows need from it travels there
            reqs.append(LLMRequest.for_api(api, content, params=params, sample_index=i,
                                           template_version=rubric_id, tag={"id": doc["id"], "sample_index": i}))
    return reqs


def annotate(cfg: RunConfig, *, dry_run: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    a = cfg.classifier.annotate
    template, rubric_id = load_rubric(a.rubric)
    problems: Counter[str] = Counter()
    docs = sample_documents(a.inputs, a.text_column, a.id_column, a.sample,
                            lambda reason, where: problems.update([reason]))
    if not docs:
        raise TextbookError(f"no documents to annotate in {', '.join(a.inputs)} ({dict(problems)})")
    requests = build_requests(cfg, docs, template, rubric_id)
    ledger = cfg.llm.ledger_path()
    if dry_run:
        from pipeline.llm.runner import estimate

        est = estimate(requests, cfg.llm, cfg.budget, ledger_path=ledger)
        return {"dry_run": True, "documents": len(docs), "rubric_id": rubric_id, **est}

    from pipeline.llm.runner import run_requests

    text_of = {d["id"]: d["text"] for d in docs}
    ok_rows: list[dict[str, Any]] = []
    failed_rows: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()

    def on_result(res: Any) -> None:
        doc_id = res.tag["id"]
        row = {"id": doc_id, "text": text_of[doc_id], "score": None, "sample_index": res.tag["sample_index"],
               "rubric_id": rubric_id, "model": res.model or cfg.llm.model, "raw_response": res.text,
               "error": None, "finish_reason": res.finish_reason, "request_key": res.key}
        if not res.ok:
            row["error"] = res.skipped and f"skipped: {res.skipped}" or res.error or "failed"
            reasons["skipped" if res.skipped else "request_failed"] += 1
            failed_rows.append(row)
            return
        score, why = parse_score(res.text, a.score_pattern, a.score_min, a.score_max)
        if score is None:
            row["error"] = why
            reasons[why] += 1
            failed_rows.append(row)
        else:
            row["score"] = score
            ok_rows.append(row)

    summary = run_requests(requests, cfg.llm, cfg.budget, ledger, on_result=on_result, progress=progress)
    out = Path(a.out)
    _write(out, ok_rows)
    failed_path = out.with_name(out.stem + ".failed.parquet")
    if failed_rows:
        _write(failed_path, failed_rows)
    else:
        failed_path.unlink(missing_ok=True)
    scores = Counter(str(int(r["score"])) if float(r["score"]).is_integer() else str(r["score"]) for r in ok_rows)
    stats = {
        "documents": len(docs), "requests": len(requests), "annotations_ok": len(ok_rows),
        "annotations_failed": len(failed_rows), "failed_reasons": dict(sorted(reasons.items())),
        "input_problems": dict(sorted(problems.items())), "score_counts": dict(sorted(scores.items())),
        "rubric": a.rubric, "rubric_id": rubric_id, "model": cfg.llm.model, "out": str(out),
        "failed_out": str(failed_path) if failed_rows else None, "llm": summary.as_dict(),
    }
    assert stats["annotations_ok"] + stats["annotations_failed"] == len(requests), "annotation counts must reconcile"
    atomic_write_text(out.with_name(out.stem + ".stats.json"), json.dumps(stats, indent=2, default=str) + "\n")
    log(f"annotated {len(docs)} documents: {len(ok_rows)} scored, {len(failed_rows)} failed "
        f"({dict(reasons) or 'none'}) → {out}")
    return stats


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("score", pa.float32()),
                        ("sample_index", pa.int32()), ("rubric_id", pa.string()), ("model", pa.string()),
                        ("raw_response", pa.string()), ("error", pa.string()), ("finish_reason", pa.string()),
                        ("request_key", pa.string())])
    rows = sorted(rows, key=lambda r: (r["id"], r["sample_index"] or 0))
    table = pa.Table.from_pylist([{c: r.get(c) for c in ANNOTATION_COLUMNS} for r in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
