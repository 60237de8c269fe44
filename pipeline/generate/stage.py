"""The generate stage: prompt specs → LLM requests → validated synthetic documents.

    specs    = SpecSampler(taxonomy, formats, audiences, seeds).sample(n)      # coverage-driven, deterministic
    requests = [render(spec) for each sample 0..llm.n-1]                       # content-addressed (ledger key)
    run_requests(requests, should_send=diversity guard, on_result=judge)       # LLM layer: Ray, limits, ledger
    judge    = ok → Validator → kept | removed/<reason>;  failed → removed/failed;  skipped → removed/skipped_<why>
           (judge.py: in a child process, so judging never competes with the requests in flight)

Every request ends in exactly one state, counted in the stage stats: kept, dropped:<reason> (filtered output or
never sent) or errored:failed_<error>. Request construction depends only on the config and the inputs, so a
re-run after a crash hits the ledger for everything that was already answered.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.generate.sampler import PromptSpec, SpecSampler, coverage
from pipeline.generate.seeds import load_seeds
from pipeline.generate.taxonomy import Taxonomy, load_taxonomy
from pipeline.generate.templates import Format, load_formats
from pipeline.llm.types import LLMRequest
from pipeline.stats import StageStats


@dataclass
class Plan:
    specs: list[PromptSpec]
    requests: list[LLMRequest]
    formats: dict[str, Format]
    taxonomy: Taxonomy
    grid_cells: list[tuple[str, str]]
    seeds_info: dict[str, Any]


def build_request(cfg: RunConfig, spec: PromptSpec, fmt: Format, sample_index: int, cell: str,
                  api: str | None = None, params: dict | None = None) -> LLMRequest:
    """Deterministic: the same spec under the same config is the same request (and ledger key). `api` and
    `params` (default `cfg.llm.request_api()`, `cfg.llm.sampling_params()`): pass them when building many."""
    tag = {"spec": spec.index, "cell": cell, "sample_index": sample_index}
    return LLMRequest.for_api(api or cfg.llm.request_api(), fmt.render(**spec.variables()),
                              system=cfg.generate.system_prompt,
                              params=params if params is not None else cfg.llm.sampling_params(),
                              sample_index=sample_index, template_version=fmt.prompt_id, tag=tag)

def web_seeded_share(n: int, fraction: float) -> int:
    """How many of `n` specs the sampler seeds with web pages when it has pages enough (its interleaving rule:
    spec i is seeded while the seeded count is below (i + 1) * fraction)."""
    used = 0
    for i in range(n):
        if used < (i + 1) * fraction:
            used += 1
    return used


def web_pending(cfg: RunConfig, inputs: list[Path], upstream: list[str]) -> bool:
    """True when the web stage of this run is still to run: no web output feeds generate yet (`upstream` holds
    the completed upstream stages, `inputs` their files or generate.inputs), web is among run.stages and
    generate.seed_inputs names no pages of its own."""
    return not upstream and not inputs and "web" in cfg.run.stages and not cfg.generate.seed_inputs


def plan(cfg: RunConfig, inputs: list[Path], n: int | None = None, on_error: Any = None,
         pending_web: bool = False) -> Plan:
    """Everything decided before the first call: the specs, their requests, the grid.

    `pending_web` (see `web_pending`): the web stage has not run yet, so the web-seeded share of the `n` specs
    (`web_seeded_share`) is left out rather than filled with topic prompts; once web has run, a re-run plans
    it, and the topic prompts planned now are the same requests (ledger hits). `seeds_info["note"]` says so.
    """
    g = cfg.generate
    n = n or g.n
    taxonomy = load_taxonomy(g.taxonomy)
    if g.subjects:
        taxonomy = taxonomy.restrict(g.subjects)
    formats = load_formats(g.formats_dir, g.formats or None)
    if not g.formats:
        formats = {k: f for k, f in formats.items() if not f.seeded}
    seeds: list = []
    seeds_info: dict[str, Any] = {"fraction": g.web_seed_fraction}
    seed_format = None
    if g.web_seed_fraction > 0:
        seed_paths = list(g.seed_inputs) or [str(p) for p in inputs]
        seed_format = load_formats(g.formats_dir, [g.seed_format])[g.seed_format]
        if not seed_format.seeded:
            from pipeline.errors import TextbookError

            raise TextbookError(f"generate.seed_format: template '{g.seed_format}' is not a web-seeded template "
                                "(its header needs `seeded: true`)")
        if seed_paths:
            from pipeline.documents import list_document_files

            seeds, skipped = load_seeds(list_document_files(seed_paths), g.seed_min_score, g.seed_extract_chars,
                                        on_error=on_error)
            seeds_info.update(pages_available=len(seeds), pages_skipped=skipped)
            if seeds and (g.decontaminate_seeds or "decontaminate" in cfg.run.stages):
                seeds, contaminated = drop_contaminated_seeds(cfg, seeds)
                seeds_info.update(pages_available=len(seeds), pages_contaminated=contaminated)
        elif pending_web:
            share = web_seeded_share(n, g.web_seed_fraction)
            seeds_info.update(pending=True, share_skipped=share)
            seeds_info["note"] = (
                f"the web stage has not run yet: the web-seeded share ({share} of {n} prompts, "
                f"generate.web_seed_fraction={g.web_seed_fraction}) is skipped until web has run; planning the "
                f"{n - share} topic prompts (after web has run, a re-run adds the web-seeded ones and takes these "
                f"from the ledger). Set generate.web_seed_fraction=0 to plan all {n} as topic prompts")
            n -= share
        else:
            seeds_info["note"] = ("no web pages to seed prompts from (web is not among run.stages, or kept no page, "
                                  "and generate.seed_inputs is empty): every prompt is a topic prompt")
        formats = {**formats, seed_format.name: seed_format}
    seeding = g.web_seed_fraction > 0 and not seeds_info.get("pending")
    asked = web_seeded_share(n, g.web_seed_fraction) if seeding else 0  # the share the plan asks for
    if asked > len(seeds) and g.seed_shortfall == "skip":
        n -= asked - len(seeds)  # the gap is not filled: the plan is that many specs short
    seed = g.seed if g.seed is not None else cfg.run.seed
    sampler = SpecSampler(taxonomy, {k: f for k, f in formats.items() if not f.seeded}, g.audiences, seed=seed,
                          audience_weights=g.weights.audience, format_weights=g.weights.format,
                          subject_weights=g.weights.subject, seeds=seeds, seed_format=seed_format,
                          web_seed_fraction=g.web_seed_fraction)
    specs = sampler.sample(n) if n > 0 else []
    if asked:
        seeds_info["shortfall"] = seed_shortfall(g, asked, sum(1 for s in specs if s.seed is not None), seeds_info)
    cell_by = g.diversity.cell_by
    api, params = cfg.llm.request_api(), cfg.llm.sampling_params()  # once: each may look at the model's files
    requests = [build_request(cfg, s, formats[s.format], i, " × ".join(s.field(f) for f in cell_by), api, params)
                for s in specs for i in range(cfg.llm.n)]
    return Plan(specs, requests, formats, taxonomy, sampler.grid_cells, seeds_info)


def plan_notes(p: Plan) -> list[str]:
    """What the plan could not do as configured, for the run's output and the dry run: web seeding pending or
    impossible, a web-seeded share not filled (`seed_shortfall`)."""
    notes = [p.seeds_info["note"]] if p.seeds_info.get("note") else []
    shortfall = p.seeds_info.get("shortfall") or {}
    if shortfall.get("note"):
        notes.append(shortfall["note"])
    return notes


def seed_shortfall(g: Any, asked: int, made: int, seeds_info: dict[str, Any]) -> dict[str, Any]:
    """How many web-seeded prompts the plan asked for (`web_seeded_share`), how many it made, and why the others
    were not: the pages read and why each was not a seed (`seeds.load_seeds`' skip reasons, decontamination),
    and what filled the gap (`generate.seed_shortfall`)."""
    skipped = dict(seeds_info.get("pages_skipped") or {})
    contaminated = len(seeds_info.get("pages_contaminated") or [])
    available = int(seeds_info.get("pages_available") or 0)
    why = {k: v for k, v in skipped.items() if v}
    if contaminated:
        why["contaminated"] = contaminated
    short = max(0, asked - made)
    filled = short if g.seed_shortfall == "topics" else 0
    out: dict[str, Any] = {"asked": asked, "made": made, "short": short,
                           "pages_read": available + contaminated + sum(skipped.values()),
                           "pages_not_seeds": why, "filled_from_topics": filled}
    if short:
        words = {"low_score": f"scored below generate.seed_min_score={g.seed_min_score:g}",
                 "no_score": "had no edu_score (not scored by the web stage)",
                 "invalid_score": "had an edu_score that is not a finite number",
                 "too_short": "gave an extract under 200 characters", "duplicate": "were duplicates",
                 "contaminated": "overlapped a benchmark"}
        reasons = "; ".join(f"{n:,} {words.get(k, k)}" for k, n in sorted(why.items(), key=lambda kv: -kv[1]))
        pages = (f"of {out['pages_read']:,} page(s) read, {available:,} qualified" +
                 (f" ({reasons})" if reasons else "")) if out["pages_read"] else "no pages to seed from"
        then = (f"{filled:,} topic prompt(s) fill the gap (generate.seed_shortfall: topics)" if filled else
                f"the plan is {short:,} prompt(s) short (generate.seed_shortfall: skip)")
        out["note"] = (f"web-seeded prompts: {made:,} of {asked:,} asked were made (generate.web_seed_fraction="
                       f"{g.web_seed_fraction:g}): {pages}; {then}")
    return out


def drop_contaminated_seeds(cfg: RunConfig, seeds: list) -> tuple[list, list[dict[str, Any]]]:
    """Seed extracts that overlap a benchmark item are dropped before any money is spent on them."""
    from pipeline.decontam import check_texts, index_for_section
    from pipeline.errors import ResourceUnavailable
    from pipeline.paths import cache_dir

    try:
        index = index_for_section(cfg.decontaminate, cache_dir() / "decontam")
    except ResourceUnavailable as e:
        print(f"generate: seed decontamination skipped: {e}", file=sys.stderr)
        return seeds, []
    matches = check_texts(index, [s.extract for s in seeds], cfg.decontaminate.min_matches)
    dropped = [{"id": s.id, "url": s.url, **m.as_meta()} for s, m in zip(seeds, matches, strict=True) if m is not None]
    return [s for s, m in zip(seeds, matches, strict=True) if m is None], dropped


def run_stage(ctx: Any) -> StageStats:
    from pipeline.generate.judge import JudgeProcess, JudgeSetup, billed_reconciles
    from pipeline.llm.runner import prestart_workers

    cfg: RunConfig = ctx.cfg
    input_errors: Counter[str] = Counter()
    judge = JudgeProcess()  # the judging interpreter and the Ray workers start while we plan
    judge.preload(cfg)  # and it loads its tokenizer and language id meanwhile
    pool = prestart_workers(cfg.llm)
    try:
        the_plan = plan(cfg, list(ctx.inputs), on_error=lambda reason, where: input_errors.update([reason]),
                        pending_web=web_pending(cfg, list(ctx.inputs), list(ctx.upstream)))
        for note in plan_notes(the_plan):
            print(f"generate: {note}", file=sys.stderr)
        if cfg.llm.api_note():
            print(f"generate: {cfg.llm.api_note()}", file=sys.stderr)
        requests = the_plan.requests
    except BaseException:
        judge.abort()
        if pool is not None:
            pool.close()
        raise
    summary, judged = judge.judge_requests(
        JudgeSetup(cfg, Path(ctx.kept_dir).resolve(), Path(ctx.removed_dir).resolve(), the_plan.specs,
                   {k: f.prompt_id for k, f in the_plan.formats.items()}), requests, cfg, ctx.state_dir, pool)
    stats = StageStats.from_dict(judged["stats"])
    _account_missing(stats, len(requests))
    stats.set("prompt_specs", len(the_plan.specs))
    stats.set("requests", len(requests))
    stats.set("states", judged["states"])
    stats.set("llm", summary.as_dict())
    stats.set("tokens", {"prompt": judged["prompt_tokens"], "completion": judged["completion_tokens"],
                         "kept_documents_words": judged["words_kept"], "spent_this_run_prompt": summary.prompt_tokens,
                         "spent_this_run_completion": summary.completion_tokens})
    stats.set("cost_usd", round(summary.cost_usd, 6))
    stats.set("billed", {**judged["billed"], "reconciled": billed_reconciles(judged["billed"], summary)})
    stats.set("latency_s", summary.latency_s)
    stats.set("stopped_reason", summary.stopped_reason)
    stats.set("api", {"configured": cfg.llm.api, "used": cfg.llm.request_api(), "note": cfg.llm.api_note()})
    if summary.partial() is not None:  # requests left unanswered: not complete, the same command continues it
        stats.set("partial", summary.partial())
    kept_specs = [the_plan.specs[i] for i in judged["kept_spec_indices"]]
    stats.set("coverage", {
        "requested": coverage(the_plan.specs, the_plan.grid_cells, the_plan.taxonomy),
        "kept": coverage(kept_specs, the_plan.grid_cells, the_plan.taxonomy),
    })
    stats.set("diversity", judged["diversity"])
    stats.set("taxonomy", the_plan.taxonomy.summary())
    stats.set("prompt_ids", sorted({f.prompt_id for f in the_plan.formats.values()}))
    stats.set("web_seeds", {**the_plan.seeds_info, "used": sum(1 for s in the_plan.specs if s.seed is not None),
                            "input_errors": dict(input_errors)})
    return stats


def _account_missing(stats: StageStats, n_requests: int) -> None:
    """The LLM layer promises one result per request; if it ever falls short, say so rather than lose them."""
    missing = n_requests - stats.n_read
    if missing > 0:
        stats.read(missing)
        stats.error("no_result_from_llm_layer", missing)


def input_files(section: Any) -> list[Path]:
    """Taxonomy files and format templates: editing them changes the stage's output (run.py hashes them)."""
    from pipeline.generate.taxonomy import resolve_path

    files: list[Path] = []
    for p in [*section.taxonomy, section.formats_dir, *section.seed_inputs]:
        path = resolve_path(p)
        if path.is_dir():
            files.extend(sorted(f for f in path.rglob("*") if f.is_file()))
        elif path.is_file():
            files.append(path)
    return files
