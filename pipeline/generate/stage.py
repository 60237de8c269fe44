"""The generate stage: prompt specs → LLM requests → validated synthetic documents.

    specs    = SpecSampler(taxonomy, formats, audiences, seeds).sample(n)      # coverage-driven, deterministic
    requests = [render(spec) for each sample 0..llm.n-1]                       # content-addressed (ledger key)
    run_requests(requests, should_send=diversity guard, on_result=judge)       # LLM layer: Ray, limits, ledger
    judge    = ok → Validator → kept | removed/<reason>;  failed → removed/failed;  skipped → removed/skipped

Every request ends in exactly one state, counted in the stage stats: kept, dropped:<reason> (filtered output or
never sent) or errored:failed_<error>. Request construction depends only on the config and the inputs, so a
re-run after a crash hits the ledger for everything that was already answered.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.documents import DocumentWriter, doc_id
from pipeline.generate.sampler import PromptSpec, SpecSampler, coverage
from pipeline.generate.seeds import load_seeds
from pipeline.generate.taxonomy import Taxonomy, load_taxonomy
from pipeline.generate.templates import Format, load_formats
from pipeline.llm.types import LLMRequest, LLMResult
from pipeline.stats import StageStats

SOURCE = "synthetic"


@dataclass
class Plan:
    specs: list[PromptSpec]
    requests: list[LLMRequest]
    formats: dict[str, Format]
    taxonomy: Taxonomy
    grid_cells: list[tuple[str, str]]
    seeds_info: dict[str, Any]

    def spec_of(self, request: LLMRequest) -> PromptSpec:
        return self.specs[request.tag["spec"]]


def build_request(cfg: RunConfig, spec: PromptSpec, fmt: Format, sample_index: int, cell: str) -> LLMRequest:
    """Deterministic: the same spec under the same config is the same request (and ledger key)."""
    text = fmt.render(**spec.variables())
    system = cfg.generate.system_prompt
    params = cfg.llm.sampling_params()
    tag = {"spec": spec.index, "cell": cell, "sample_index": sample_index}
    if cfg.llm.api == "chat":
        messages = ({"role": "system", "content": system},) if system else ()
        messages += ({"role": "user", "content": text},)
        return LLMRequest(messages=messages, params=params, sample_index=sample_index,
                          template_version=fmt.prompt_id, tag=tag)
    prompt = f"{system}\n\n{text}" if system else text
    return LLMRequest(prompt=prompt, params=params, sample_index=sample_index, template_version=fmt.prompt_id,
                      tag=tag)


def plan(cfg: RunConfig, inputs: list[Path], n: int | None = None, on_error: Any = None) -> Plan:
    """Everything decided before the first call: the specs, their requests, the grid."""
    g = cfg.generate
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
        else:
            seeds_info["note"] = "no web pages (web stage not run and generate.seed_inputs empty)"
        formats = {**formats, seed_format.name: seed_format}
    seed = g.seed if g.seed is not None else cfg.run.seed
    sampler = SpecSampler(taxonomy, {k: f for k, f in formats.items() if not f.seeded}, g.audiences, seed=seed,
                          audience_weights=g.weights.audience, format_weights=g.weights.format,
                          subject_weights=g.weights.subject, seeds=seeds, seed_format=seed_format,
                          web_seed_fraction=g.web_seed_fraction)
    specs = sampler.sample(n or g.n)
    cell_by = g.diversity.cell_by
    requests = [build_request(cfg, s, formats[s.format], i, " × ".join(s.field(f) for f in cell_by))
                for s in specs for i in range(cfg.llm.n)]
    return Plan(specs, requests, formats, taxonomy, sampler.grid_cells, seeds_info)


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


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "unknown"


def failure_reason(error: str | None) -> str:
    """`failed_<kind>` from the LLM layer's error ('after 7 attempt(s): InternalServerError 500: ...' →
    failed_internalservererror_500): few, stable reason names for the stats."""
    text = re.sub(r"^(after \d+ attempt\(s\):\s*|worker error:\s*)+", "", error or "unknown")
    return f"failed_{_slug(text.split(':', 1)[0], 40)}"


def skip_reason(skipped: str) -> str:
    return f"skipped_{_slug(skipped.split(':', 1)[0], 40)}"


class Judge:
    """`on_result` of the run: every result ends as exactly one counted state and (except kept) a removed row."""

    def __init__(self, ctx_kept: Path, ctx_removed: Path, cfg: RunConfig, stats: StageStats, the_plan: Plan,
                 guard: Any) -> None:
        self.cfg, self.stats, self.plan, self.guard = cfg, stats, the_plan, guard
        self._validator: Any = None
        self.kept_rows: list[tuple[int, int, dict[str, Any]]] = []
        self.removed: dict[str, DocumentWriter] = {}
        self.removed_dir = ctx_removed
        self.kept_dir = ctx_kept
        self.kept_specs: list[PromptSpec] = []
        self.words_kept = 0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached = 0
        self.states: Counter[str] = Counter()

    @property
    def validator(self) -> Any:
        # Built on first use, in the judging thread: loading the tokenizer and the language-id model overlaps
        # with the LLM layer's start-up instead of delaying it.
        if self._validator is None:
            from pipeline.generate.validate import Validator

            self._validator = Validator(self.cfg.generate, self.cfg.tokenizer.path)
        return self._validator

    def _doc(self, spec: PromptSpec, result: LLMResult, request: LLMRequest | None, text: str,
             extra: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "request_key": result.key, "spec_index": spec.index, "sample_index": result.tag.get("sample_index"),
            "params": request.sent_params() if request is not None else None,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "finish_reason": result.finish_reason, "latency_s": round(result.latency_s, 3),
            "attempts": result.attempts, "cached": result.cached,
        }
        if spec.leaf is not None:
            meta.update(subject=spec.leaf.subject, subtopic=spec.leaf.subtopic, concept=spec.leaf.concept)
        if spec.seed is not None:
            meta.update(seed_id=spec.seed.id, seed_edu_score=spec.seed.edu_score)
        meta.update(extra)
        return {"id": doc_id(text) if text else result.key[:32], "text": text, "source": SOURCE,
                "topic": spec.topic, "audience": spec.audience, "format": spec.format,
                "prompt_id": self.plan.formats[spec.format].prompt_id, "model": result.model or self.cfg.llm.model,
                "url": spec.seed.url if spec.seed is not None else None, "meta": meta}

    def _remove(self, reason: str, doc: dict[str, Any]) -> None:
        writer = self.removed.get(reason)
        if writer is None:
            writer = self.removed[reason] = DocumentWriter(self.removed_dir, prefix=reason)
        writer.write({**doc, "reason": reason})

    def __call__(self, result: LLMResult, request: LLMRequest | None = None) -> None:
        spec = self.plan.specs[result.tag["spec"]]
        self.stats.read()
        if result.skipped:
            reason = skip_reason(result.skipped)
            self.stats.drop(reason)
            self._remove(reason, self._doc(spec, result, request, "", {"skipped": result.skipped}))
            self.states["skipped"] += 1
            return
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        self.cached += result.cached
        if not result.ok:
            reason = failure_reason(result.error)
            self.stats.error(reason)
            self._remove("failed", self._doc(spec, result, request, "", {"error": result.error}))
            self.states["failed"] += 1
            return
        text = result.text or ""
        verdict = self.validator.check(text, result.finish_reason)
        extra: dict[str, Any] = {"words": verdict.words}
        if verdict.tokens is not None:
            extra["tokens"] = verdict.tokens
        if verdict.language is not None:
            extra.update(language=verdict.language, language_score=round(verdict.language_score or 0, 3))
        if text.strip():
            extra.update(self.guard.observe(result.key, result.tag["cell"], text))
        doc = self._doc(spec, result, request, text, extra)
        if verdict.reason is not None:
            self.stats.drop(verdict.reason)
            self._remove(verdict.reason, doc)
            self.states["filtered"] += 1
            return
        self.stats.keep()
        self.states["ok"] += 1
        self.words_kept += verdict.words
        self.kept_specs.append(spec)
        self.kept_rows.append((spec.index, int(result.tag.get("sample_index", 0)), doc))

    def close(self) -> None:
        # Kept documents in spec order: the same config gives the same files whatever order answers came in.
        with DocumentWriter(self.kept_dir) as w:
            for _, _, doc in sorted(self.kept_rows, key=lambda r: (r[0], r[1])):
                w.write(doc)
        for writer in self.removed.values():
            writer.close()


class JudgeThread:
    """Judges results on a background thread, so validation (tokenizer, language id, MinHash) never holds up the
    LLM layer's driver loop, which must keep `concurrency` requests in flight. Results are judged in arrival
    order; an exception in judging is re-raised by `close()`."""

    def __init__(self, judge: Judge, by_key: dict[str, LLMRequest]) -> None:
        import queue
        import threading

        self.judge, self.by_key = judge, by_key
        self.queue: queue.Queue[LLMResult | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="generate-judge", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            self.judge.validator  # noqa: B018 - load tokenizer + language id now, while the LLM layer starts
        except BaseException as e:  # noqa: BLE001
            self.error = e
        while (result := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                self.judge(result, self.by_key.get(result.key))
            except BaseException as e:  # noqa: BLE001 - handed to the caller in close()
                self.error = e

    def put(self, result: LLMResult) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(result)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def run_stage(ctx: Any) -> StageStats:
    from pipeline.generate.diversity import DiversityGuard
    from pipeline.llm.runner import run_requests

    cfg: RunConfig = ctx.cfg
    stats = StageStats("generate")
    input_errors: Counter[str] = Counter()
    the_plan = plan(cfg, list(ctx.inputs), on_error=lambda reason, where: input_errors.update([reason]))
    requests = the_plan.requests
    by_key = {r.key(cfg.llm.model): r for r in requests}
    guard = DiversityGuard(cfg.generate.diversity)
    judge = Judge(ctx.kept_dir, ctx.removed_dir, cfg, stats, the_plan, guard)
    pump = JudgeThread(judge, by_key)

    def should_send(request: LLMRequest) -> str | None:
        return guard.should_send(request.tag["cell"])

    # The judging thread holds the GIL in bursts; a short switch interval lets the driver loop (which keeps
    # requests in flight) take it back quickly instead of waiting up to the default 5 ms each time.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        summary = run_requests(requests, cfg.llm, cfg.budget, cfg.llm.ledger_path(), should_send=should_send,
                               on_result=pump.put, progress=True)
    finally:
        sys.setswitchinterval(interval)
        pump.close()
    judge.close()
    _account_missing(stats, len(requests))
    stats.set("prompt_specs", len(the_plan.specs))
    stats.set("requests", len(requests))
    stats.set("states", dict(judge.states))
    stats.set("llm", summary.as_dict())
    stats.set("tokens", {"prompt": judge.prompt_tokens, "completion": judge.completion_tokens,
                         "kept_documents_words": judge.words_kept, "spent_this_run_prompt": summary.prompt_tokens,
                         "spent_this_run_completion": summary.completion_tokens})
    stats.set("cost_usd", round(summary.cost_usd, 6))
    stats.set("latency_s", summary.latency_s)
    stats.set("stopped_reason", summary.stopped_reason)
    stats.set("coverage", {
        "requested": coverage(the_plan.specs, the_plan.grid_cells, the_plan.taxonomy),
        "kept": coverage(judge.kept_specs, the_plan.grid_cells, the_plan.taxonomy),
    })
    stats.set("diversity", guard.stats())
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
