"""The rephrase stage: the web stage's scored pages -> by edu-score bucket: kept as is, rewritten, or dropped.

    pages    = web kept/ + the edu cut's below_cutoff pages (or rephrase.inputs), each with its stored edu_score
    plan     = bucket -> policy -> source checks (incl. benchmark overlap, before paying) -> rewrites -> chunk requests
    run      = run_requests(requests, should_send=diversity guard, on_result=RephraseJudge)   (ledger, budget,
               batch mode and resume exactly as in generate: the same LLM layer)
    judge    = every rewrite kept or dropped/errored with a reason (validators, fidelity, benchmark overlap after)
    pages    = kept (passed on as is, maybe also rewritten) | rewritten | dropped <reason> | errored <reason>

Why a stage and not `generate.mode: rephrase`: its unit is a page, not a prompt spec. It needs the web stage's
output (generate only optionally does), keeps or drops pages by a policy, passes the pages it keeps on in place of
the web stage's output (`supersedes: web` in the stage registry, so dedup reads the rephrased web, never the page
twice), and has its own accounting (every page ends in exactly one fate, every rewrite in one state). A run can do
both: topic textbooks from generate and rephrased web from rephrase, resumable separately.

One answer per chunk: `llm.n` (samples per prompt, for generate) is not used here; sampling parameters, model and
template id enter each request's ledger key as in generate.

Stats: `read`/`kept`/`dropped`/`errored` count PAGES (kept = kept as is + rewritten, split in `pages`); the
rewrites have their own ledger per template (`rewrites`), and `documents_out` counts what kept/ holds (pages as is
+ kept rewrites). Sources: WRAP (Maini et al. 2024), Nemotron-CC (Su et al. 2024), REWIRE (Nguyen et al. 2025).
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import NoInputDocuments
from pipeline.rephrase.plan import Page, Plan, decontaminating, load_index, plan, read_pages, source_files
from pipeline.stats import StageStats


def build_plan(cfg: RunConfig, inputs: list[Path], upstream: list[str], web_dir: Path | None,
               on_error: Any = None) -> tuple[Plan, dict[str, Any]]:
    """Read the pages and plan the run (what `run_stage` and `textbook rephrase --dry-run` share); the second value
    says what was read: pages per origin and the removed rows of the web stage left out, by reason."""
    files = source_files(cfg, inputs, upstream, web_dir)
    pages, left_out = read_pages(files, on_error or (lambda reason, where: None))
    the_plan = plan(cfg, pages, index_loader=(lambda: load_index(cfg)) if decontaminating(cfg) else None)
    read = {"pages_per_origin": dict(Counter(p.origin for p in pages)),
            "web_removed_rows_left_out": dict(left_out), "files": {k: len(v) for k, v in files.items()}}
    return the_plan, read


def _setup(cfg: RunConfig, the_plan: Plan, kept_dir: Path, removed_dir: Path) -> Any:
    from pipeline.rephrase.judge import RephraseSetup, RewriteInfo, SourceInfo, TemplateInfo

    used = {rw.page for rw in the_plan.rewrites}
    sources = {p.index: SourceInfo(p.id, p.url, p.text, p.bucket or "", p.edu_score)
               for p in the_plan.pages if p.index in used}
    rewrites = [RewriteInfo(rw.page, rw.template, rw.audience, rw.chunks, rw.cell) for rw in the_plan.rewrites]
    templates = {n: TemplateInfo(t.prompt_id, t.format_words, cfg.rephrase.bounds_for(n, t.fidelity))
                 for n, t in the_plan.templates.items()}
    return RephraseSetup(cfg, kept_dir, removed_dir, sources, rewrites, templates, decontaminating(cfg))


def run_stage(ctx: Any) -> StageStats:
    from pipeline.generate.judge import JudgeProcess, billed_reconciles
    from pipeline.llm.runner import prestart_workers
    from pipeline.llm.types import RunSummary

    cfg: RunConfig = ctx.cfg
    stats = StageStats("rephrase")

    def unreadable(reason: str, where: str) -> None:
        stats.read()
        stats.error_at(reason, where)

    web_dir = Path(ctx.stage_dir("web")) if "web" in ctx.upstream else None
    the_plan, read = build_plan(cfg, list(ctx.inputs), list(ctx.upstream), web_dir, on_error=unreadable)
    if not the_plan.pages and not stats.n_read:
        raise NoInputDocuments("rephrase: no input pages (the web stage kept and recycled nothing, or "
                               "rephrase.inputs holds no document)")
    kept_dir, removed_dir = Path(ctx.kept_dir).resolve(), Path(ctx.removed_dir).resolve()
    requests = the_plan.requests
    print(f"rephrase: {len(the_plan.pages):,} pages -> {len(the_plan.rewrites):,} rewrites in {len(requests):,} "
          f"requests (chunks of <= {the_plan.chunk_tokens:,} estimated tokens)", file=sys.stderr)
    summary = RunSummary(model=cfg.llm.model, ledger=str(cfg.llm.ledger_path()), mode=cfg.llm.mode)
    judged = _nothing_judged()
    if requests:  # no request, no model: a plan that keeps or drops every page starts no server and no worker
        judge = JudgeProcess(factory="pipeline.rephrase.judge:RephraseJudge", stage="rephrase")
        try:
            pool = prestart_workers(cfg.llm)
        except BaseException:
            judge.abort()
            raise
        summary, judged = judge.judge_requests(_setup(cfg, the_plan, kept_dir, removed_dir), requests, cfg,
                                               ctx.state_dir, pool)
    account_pages(stats, the_plan, judged, kept_dir, removed_dir)
    stats.set("inputs", read)
    stats.set("requests", len(requests))
    stats.set("request_states", judged["requests"])
    stats.set("chunks", {"chunk_tokens": the_plan.chunk_tokens, "context_tokens": the_plan.context_tokens,
                         "per_rewrite": dict(sorted(Counter(len(rw.chunks) for rw in the_plan.rewrites).items()))})
    stats.set("llm", summary.as_dict())
    stats.set("tokens", {"prompt": judged["prompt_tokens"], "completion": judged["completion_tokens"],
                         "kept_rewrites_words": judged["kept_words"],
                         "spent_this_run_prompt": summary.prompt_tokens,
                         "spent_this_run_completion": summary.completion_tokens})
    stats.set("cost_usd", round(summary.cost_usd, 6))
    stats.set("billed", {**judged["billed"], "reconciled": billed_reconciles(judged["billed"], summary)})
    stats.set("latency_s", summary.latency_s)
    stats.set("stopped_reason", summary.stopped_reason)
    stats.set("diversity", judged["diversity"])
    stats.set("fidelity_mean_of_kept", judged["fidelity_mean_of_kept"])
    stats.set("contamination", {"sources_checked": the_plan.info["decontaminated"],
                                "sources": the_plan.info["contaminated"], "rewrites": judged["contamination"]})
    stats.set("prompt_ids", sorted(t.prompt_id for t in the_plan.templates.values()))
    return stats


def _nothing_judged() -> dict[str, Any]:
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0}
    return {"outcomes": {}, "requests": {}, "prompt_tokens": 0, "completion_tokens": 0,
            "billed": {"kept": dict(zero), "dropped": dict(zero), "dropped_by_reason": {}},
            "diversity": {"requests_not_sent_per_cell": {}}, "fidelity_mean_of_kept": {},
            "contamination": {"checked": False}, "kept_words": 0}


def _page_doc(p: Page, fate: str, rewritten_as: list[str]) -> dict[str, Any]:
    meta = dict(p.doc.get("meta") or {})
    meta["rephrase"] = {"bucket": p.bucket, "fate": fate, "rewritten_as": rewritten_as, "origin": p.origin}
    if p.not_rewritten:
        meta["rephrase"]["not_rewritten"] = p.not_rewritten
    doc = {**p.doc, "source": p.doc.get("source") or "web", "meta": meta}  # pages as is are web text
    if fate == "invalid_edu_score":  # the writers store edu_score as a number: the value as read goes to meta
        meta["rephrase"]["edu_score_as_read"] = repr(doc.pop("edu_score", None))[:200]
    return doc


def account_pages(stats: StageStats, the_plan: Plan, judged: dict[str, Any], kept_dir: Path,
                  removed_dir: Path) -> None:
    """Each page's fate from the plan and the judged rewrites, counted (pages, buckets, per template) and
    written: kept-as-is pages to kept/ (prefix page-), dropped and errored pages to removed/<reason>."""
    from pipeline.documents import DocumentWriter, RemovedWriters

    outcomes = {int(r): (fate, reason) for r, (fate, reason) in judged["outcomes"].items()}
    by_page: dict[int, list[int]] = defaultdict(list)
    for rw in the_plan.rewrites:
        by_page[rw.page].append(rw.index)
    rewrites: dict[str, dict[str, Any]] = {}
    for rw in the_plan.rewrites:
        row = rewrites.setdefault(rw.template, {"planned": 0, "kept": 0, "dropped": Counter(), "errored": Counter()})
        row["planned"] += 1
        fate, reason = outcomes.get(rw.index, ("errored", "no_result_from_llm_layer"))
        if fate == "kept":
            row["kept"] += 1
        else:
            row[fate][reason] += 1
    pages = Counter()
    buckets: dict[str, dict[str, Any]] = {}
    per_template: Counter[str] = Counter()
    not_rewritten: Counter[str] = Counter()
    removed = RemovedWriters(removed_dir)
    with DocumentWriter(kept_dir, prefix="page") as kept:
        for p in the_plan.pages:
            stats.read()
            kept_as = [the_plan.rewrites[r].template for r in by_page.get(p.index, [])
                       if outcomes.get(r, ("errored",))[0] == "kept"]
            b = buckets.setdefault(p.bucket or "(none)", {"pages": 0, "kept": 0, "rewritten": 0,
                                                          "dropped": Counter(), "errored": Counter()})
            b["pages"] += 1
            per_template.update(kept_as)
            if p.not_rewritten:
                not_rewritten[p.not_rewritten] += 1
            if p.fate is not None:
                stats.drop(p.fate)
                b["dropped"][p.fate] += 1
                removed.write(_page_doc(p, p.fate, []), p.fate)
                continue
            if p.keep:
                stats.keep()
                pages["kept"] += 1
                b["kept"] += 1
                kept.write(_page_doc(p, "kept", kept_as))
                continue
            if kept_as:
                stats.keep()
                pages["rewritten"] += 1
                b["rewritten"] += 1
                continue
            fate, reason = fate_of_unkept_page([outcomes.get(r, ("errored", "no_result_from_llm_layer"))
                                                for r in by_page.get(p.index, [])])
            (stats.drop if fate == "dropped" else stats.error)(reason)
            b[fate][reason] += 1
            removed.write(_page_doc(p, reason, []), reason)
    removed.close()
    as_is = pages["kept"]
    n_rewrites = sum(v["kept"] for v in rewrites.values())
    stats.set("pages", {"kept": pages["kept"], "rewritten": pages["rewritten"],
                        "dropped": sum(stats.dropped.values()), "errored": sum(stats.errored.values())})
    stats.set("rewritten_per_template", dict(sorted(per_template.items())))
    stats.set("rewrites", {t: {"planned": v["planned"], "kept": v["kept"], "dropped": dict(v["dropped"]),
                               "errored": dict(v["errored"]),
                               "reconciled": v["planned"] == v["kept"] + sum(v["dropped"].values())
                               + sum(v["errored"].values())}
                           for t, v in sorted(rewrites.items())})
    stats.set("buckets", {k: {**v, "dropped": dict(v["dropped"]), "errored": dict(v["errored"])}
                          for k, v in buckets.items()})
    stats.set("kept_not_rewritten", dict(not_rewritten))
    stats.set("documents_out", {"as_is": as_is, "rewrites": n_rewrites, "total": as_is + n_rewrites})


def fate_of_unkept_page(states: list[tuple[str, str | None]]) -> tuple[str, str]:
    """(dropped|errored, reason) of a page the policy does not keep and none of whose rewrites was kept, from its
    rewrites' (state, reason) in rewrite order: dropped as `rewrite_<reason>` of its first dropped rewrite, else
    errored as that of its first one (`rewrite_not_planned` without any). A reason that already names a rewrite
    (the judge's `rewrite_contaminated`) is not prefixed twice."""
    dropped = [reason for state, reason in states if state == "dropped"]
    first = (dropped or [reason for _, reason in states] or ["not_planned"])[0] or "unknown"
    return ("dropped" if dropped else "errored"), (first if first.startswith("rewrite_") else f"rewrite_{first}")


def input_files(section: Any) -> list[Path]:
    """The rephrasing templates (and partials): editing one changes the stage's output (run.py hashes them)."""
    from pipeline.rephrase.templates import template_files

    return template_files(section.templates_dir)


def explain_empty(cfg: RunConfig, stats: dict[str, Any]) -> list[str]:
    """Hint lines for a rephrase stage that passed nothing on (`pipeline.run` asks when a later stage has no input):
    the page fates that emptied it and the settings behind them. Never raises."""
    read = int(stats.get("read", 0))
    if stats.get("kept") or not read:
        return [] if stats.get("kept") else ["rephrase read no page (the web stage's output, or rephrase.inputs)"]
    dropped: dict[str, int] = {**stats.get("dropped", {}), **stats.get("errored", {})}
    hints = []
    for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1])[:3]:
        if reason == "unscored":
            why = "pages without an edu_score: turn on web.edu.enabled (or give rephrase.inputs an edu_score field)"
        elif reason == "invalid_edu_score":
            why = "pages whose edu_score is not a finite number (text, NaN, infinity): fix the inputs' edu_score field"
        elif reason.startswith("policy_drop_") or reason == "below_buckets":
            why = "the bucket policy drops them: give the bucket templates or keep: true (rephrase.buckets)"
        elif reason.startswith("source_"):
            why = ("a source check before paying (rephrase.min_source_words, max_chunks, source_language_check, "
                   "decontamination)")
        elif reason.startswith("rewrite_fidelity_"):
            why = "every rewrite failed a fidelity check: see rephrase.fidelity and the removed rewrites' meta.fidelity"
        elif reason.startswith("rewrite_"):
            why = f"every rewrite was dropped ({reason.removeprefix('rewrite_')}): see stages/rephrase/removed/"
        else:
            why = "see stages/rephrase/removed/"
        hints.append(f"rephrase: {n:,} of {read:,} pages {reason}: {why}")
    return hints
