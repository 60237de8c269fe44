"""Judging rephrased answers: a rewrite (page x template) is judged once all its chunks have an answer.

Runs in the generate stage's judging process (`pipeline.generate.judge.JudgeProcess` with this module's
`RephraseJudge` as factory), so judging never competes with the requests in flight for the driver's GIL.

A rewrite ends in exactly one state, in this order of reasons:
- `skipped_<why>` (dropped): a chunk was never sent (budget, diversity guard, duplicate request, server wait);
- `failed_<kind>` (errored): a chunk's request failed (retries exhausted, 4xx, content filter ...);
- per chunk, in order: `empty`, `length` (cut off at max_tokens), `refusal`, `preamble`, `meta_talk`,
  `placeholder` (the generate stage's validators),
  `no_usable_content` (the model answered the template's marker), then fidelity (`fidelity.check`):
  `fidelity_too_short`, `fidelity_too_long`, `fidelity_low_overlap`, `fidelity_invented_entities`;
- on the joined answer: `too_short` (< rephrase.min_tokens), `repetition` (Gopher's rules), `not_<lang>`;
- at the end, against the benchmark index: `rewrite_contaminated`;
- else kept. The diversity guard sees every joined answer (cells bucket x template) and stops paying for a cell
  that repeats itself; its unsent requests come back skipped.

Every billed token is accounted to what it bought (`billed`): the kept rewrites, or the dropped ones by reason,
and `unusable_answers` (billed answers the LLM layer could not use), reconciled with the LLM layer's summary.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.config.generate import GenerateSection
from pipeline.config.rephrase import FidelityBounds
from pipeline.documents import DocumentWriter, RemovedWriters, doc_id
from pipeline.generate.diversity import DiversityGuard
from pipeline.generate.judge import failure_reason, skip_reason
from pipeline.llm.types import LLMResult
from pipeline.rephrase.chunks import JOIN
from pipeline.rephrase.fidelity import SourceProfile, check

SOURCE = "rephrase"  # the `source` of every rewrite (shard.weights: {web: 1, rephrase: 1, ...})


@dataclass
class SourceInfo:
    id: str
    url: str | None
    text: str
    bucket: str
    edu_score: float | None


@dataclass
class TemplateInfo:
    prompt_id: str
    format_words: frozenset[str]
    bounds: FidelityBounds


@dataclass
class RewriteInfo:
    page: int  # index into RephraseSetup.sources
    template: str
    audience: str | None
    chunks: list[str]
    cell: str


@dataclass
class RephraseSetup:
    """Everything the judge needs, picklable (it crosses into the child process)."""

    cfg: RunConfig
    kept_dir: Path
    removed_dir: Path
    sources: dict[int, SourceInfo]
    rewrites: list[RewriteInfo]
    templates: dict[str, TemplateInfo]
    decontaminate: bool


def _bill() -> dict[str, float]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0}


def validation_section(cfg: RunConfig, whole: bool) -> GenerateSection:
    """The generate stage's validator settings from the rephrase section: per chunk (`whole=False`) empty, length
    and the pattern families (refusal, preamble, meta_talk, placeholder: each chunk's answer may open with
    "Here is the rewritten passage:"); on the joined rewrite also min_tokens, repetition and the language."""
    r = cfg.rephrase
    repetition = r.repetition if whole else r.repetition.model_copy(update={"enabled": False})
    return GenerateSection(min_tokens=r.min_tokens if whole else 0, token_counter=r.token_counter,
                           drop_length_finish=r.drop_length_finish, language=r.language if whole else None,
                           min_language_score=r.min_language_score, refusal_patterns=list(r.refusal_patterns),
                           preamble_patterns=list(r.preamble_patterns), meta_talk_patterns=list(r.meta_talk_patterns),
                           placeholder_patterns=list(r.placeholder_patterns), repetition=repetition,
                           code_checks={"formats": {}})


class RephraseJudge:
    def __init__(self, setup: RephraseSetup) -> None:
        self.setup, self.cfg = setup, setup.cfg
        self.guard = DiversityGuard(self.cfg.rephrase.diversity)
        self._validator: Any = None
        self._chunk_validator: Any = None
        self.pending: dict[int, dict[int, LLMResult]] = defaultdict(dict)
        self.outcomes: dict[int, tuple[str, str | None]] = {}  # rewrite -> (kept|dropped|errored, reason)
        self.kept: dict[int, dict[str, Any]] = {}
        self.removed = RemovedWriters(setup.removed_dir)
        self.requests: Counter[str] = Counter()  # request states: ok, failed, skipped
        self.prompt_tokens = self.completion_tokens = 0
        self.bills: dict[int, dict[str, float]] = {}  # rewrite -> what its answers cost this run
        self.unusable = _bill()
        self.profiles: dict[int, SourceProfile] = {}
        self.figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    @property
    def validator(self) -> Any:
        if self._validator is None:
            from pipeline.generate.validate import Validator

            self._validator = Validator(validation_section(self.cfg, True), self.cfg.tokenizer.path)
            self._chunk_validator = Validator(validation_section(self.cfg, False))
        return self._validator

    def profile(self, page: int) -> SourceProfile:
        p = self.profiles.get(page)
        if p is None:
            p = self.profiles[page] = SourceProfile.of(self.setup.sources[page].text)
        return p

    def __call__(self, result: LLMResult) -> None:
        r, k = result.tag["rewrite"], result.tag["chunk"]
        self.requests[result.status] += 1
        bill = self.bills.setdefault(r, _bill())
        if not result.skipped:
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens
            # unusable answers (content filter, null content) before this one: billed, never usable
            self.unusable["prompt_tokens"] += result.unusable_prompt_tokens
            self.unusable["completion_tokens"] += result.unusable_completion_tokens
            self.unusable["usd"] += result.unusable_cost_usd
            if not result.cached:
                bill["prompt_tokens"] += result.prompt_tokens
                bill["completion_tokens"] += result.completion_tokens
            bill["usd"] += result.cost_usd - result.unusable_cost_usd
        answers = self.pending[r]
        answers[k] = result
        if len(answers) == len(self.setup.rewrites[r].chunks):
            del self.pending[r]
            self._judge(r, [answers[i] for i in range(len(answers))])

    def _judge(self, r: int, results: list[LLMResult]) -> None:
        rw = self.setup.rewrites[r]
        tpl = self.setup.templates[rw.template]
        self.validator  # noqa: B018 - both validators loaded
        fate, reason = "kept", None
        detail: str | None = None  # what a validator found: the phrase, the repetition rule and its value
        chunk_figures: list[dict[str, Any]] = []
        skipped = next((x for x in results if x.skipped), None)
        failed = next((x for x in results if not x.ok and not x.skipped), None)
        if skipped is not None:
            fate, reason = "dropped", skip_reason(skipped.skipped or "")
        elif failed is not None:
            fate, reason = "errored", failure_reason(failed.error)
        texts = [(x.text or "").strip() for x in results]
        if fate == "kept":
            marker = self.cfg.rephrase.no_content_marker.lower()
            for chunk, x, text in zip(rw.chunks, results, texts, strict=True):
                verdict = self._chunk_validator.check(text, x.finish_reason)
                if verdict.reason is not None:
                    fate, reason = "dropped", verdict.reason
                    detail = verdict.detail
                    break
                if marker and marker in text[: len(marker) + 40].lower():
                    fate, reason = "dropped", "no_usable_content"
                    break
                why, figures = check(text, chunk, self.profile(rw.page), tpl.bounds, tpl.format_words)
                chunk_figures.append(figures)
                if why is not None:
                    fate, reason = "dropped", why
                    break
        joined = JOIN.join(t for t in texts if t) if fate != "errored" else ""
        extra: dict[str, Any] = {}
        if fate == "kept":
            verdict = self.validator.check(joined, "stop")
            extra["words"] = verdict.words
            if verdict.language is not None:
                extra.update(language=verdict.language, language_score=round(verdict.language_score or 0, 3))
            if verdict.reason is not None:
                fate, reason, detail = "dropped", verdict.reason, verdict.detail
        if detail is not None:
            extra["drop_detail"] = detail
        if joined.strip() and fate != "errored":
            key = hashlib.sha256("".join(x.key for x in results).encode()).hexdigest()
            extra.update(self.guard.observe(key, rw.cell, joined))
        if fate == "kept":
            for figures in chunk_figures:
                for name in ("overlap", "length_ratio", "copied"):
                    self.figures[rw.template][name].append(figures[name])
        doc = self._doc(r, results, joined, chunk_figures, extra)
        self.outcomes[r] = (fate, reason)
        if fate == "kept":
            self.kept[r] = doc
        else:
            detail = {"error": failed.error} if failed is not None else {}
            self.removed.write({**doc, "meta": {**doc["meta"], **detail}}, reason or "unknown")

    def _doc(self, r: int, results: list[LLMResult], text: str, chunk_figures: list[dict[str, Any]],
             extra: dict[str, Any]) -> dict[str, Any]:
        rw = self.setup.rewrites[r]
        src = self.setup.sources[rw.page]
        tpl = self.setup.templates[rw.template]
        excerpt_chars = self.cfg.rephrase.source_excerpt_chars
        meta: dict[str, Any] = {
            "source_id": src.id, "source_url": src.url, "bucket": src.bucket, "template": rw.template,
            "prompt_id": tpl.prompt_id, "source_edu_score": src.edu_score,
            "source_excerpt": src.text[:excerpt_chars], "source_words": len(src.text.split()),
            "chunks": len(rw.chunks), "request_keys": [x.key for x in results],
            "finish_reasons": [x.finish_reason for x in results],
            "usage": {"prompt_tokens": sum(x.prompt_tokens for x in results),
                      "completion_tokens": sum(x.completion_tokens for x in results)},
            "fidelity": chunk_figures,  # how the requests went (cached, latency) is the ledger's: not content
            "skipped": next((x.skipped for x in results if x.skipped), None),
        }
        meta.update(extra)
        return {"id": doc_id(text) if text.strip() else results[0].key[:32], "text": text, "source": SOURCE,
                "audience": rw.audience, "format": rw.template, "prompt_id": tpl.prompt_id,
                "model": next((x.model for x in results if x.model), None) or self.cfg.llm.model, "url": src.url,
                "meta": meta}

    def _decontaminate(self) -> dict[str, Any]:
        """Kept rewrites against the benchmark index: overlapping ones are dropped (rewrite_contaminated)."""
        if not self.setup.decontaminate or not self.kept:
            return {"checked": False}
        from pipeline.decontam import check_texts
        from pipeline.rephrase.plan import load_index

        index = load_index(self.cfg)
        if index is None:
            return {"checked": False, "note": "benchmark index unavailable"}
        order = sorted(self.kept)
        matches = check_texts(index, [self.kept[r]["text"] for r in order], self.cfg.decontaminate.min_matches)
        found = []
        for r, m in zip(order, matches, strict=True):
            if m is not None:
                doc = self.kept.pop(r)
                doc["meta"]["contamination"] = m.as_meta()
                self.outcomes[r] = ("dropped", "rewrite_contaminated")
                self.removed.write(doc, "rewrite_contaminated")
                found.append({"id": doc["id"], "source_id": doc["meta"]["source_id"], **m.as_meta()})
        return {"checked": True, "contaminated": found}

    def close(self) -> dict[str, Any]:
        """Judge what never completed (a request without result: `no_result_from_llm_layer`), check the kept
        rewrites against the benchmarks, write them (in rewrite order: the same config gives the same files
        whatever order answers came in) and return the accounting for the stage stats."""
        for r in sorted(self.pending):
            self.outcomes[r] = ("errored", "no_result_from_llm_layer")
        self.pending.clear()
        contamination = self._decontaminate()
        with DocumentWriter(self.setup.kept_dir, prefix="rewrite") as w:
            for r in sorted(self.kept):
                w.write(self.kept[r])
        self.removed.close()
        billed: dict[str, Any] = {"kept": _bill(), "dropped": _bill()}
        by_reason: dict[str, dict[str, float]] = {}
        if any(self.unusable.values()):
            by_reason["unusable_answers"] = dict(self.unusable)
        for k in billed["dropped"]:
            billed["dropped"][k] += self.unusable[k]
        for r, bill in self.bills.items():
            fate, reason = self.outcomes.get(r, ("errored", "no_result_from_llm_layer"))
            targets = [billed["kept"]] if fate == "kept" else [billed["dropped"],
                                                               by_reason.setdefault(reason or "unknown", _bill())]
            for t in targets:
                for k in t:
                    t[k] += bill[k]
        billed["dropped_by_reason"] = dict(sorted(by_reason.items()))
        fidelity = {t: {name: round(sum(v) / len(v), 4) for name, v in figs.items() if v}
                    for t, figs in sorted(self.figures.items())}
        return {"outcomes": {str(r): list(v) for r, v in sorted(self.outcomes.items())},
                "requests": dict(self.requests), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "billed": billed, "diversity": self.guard.stats(),
                "fidelity_mean_of_kept": fidelity, "contamination": contamination,
                "kept_words": sum(int(d["meta"].get("words", 0)) for d in self.kept.values())}
