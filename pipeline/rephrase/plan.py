"""Everything the rephrase stage decides before the first request: which pages, which bucket, which rewrites.

    pages    = the web stage's scored pages (kept/ + the edu cut's below_cutoff pages in removed/), or rephrase.inputs
    bucket   = the first bucket (highest min_score first) the page's stored edu_score reaches
    policy   = keep as is? which templates (per_page of them, chosen by a hash of page and template)?
    checks   = source_too_short, source_not_<lang>, source_too_long (chunks > max_chunks), source_contaminated
    rewrites = page x template, each split into chunks (`chunks.split_chunks`), one request per chunk

A page ends in exactly one fate, decided here (dropped: `duplicate_page`, `unscored`, `invalid_edu_score`,
`below_buckets`,
`policy_drop_<bucket>`, a source check) or after the answers (kept as is, rewritten, or dropped because every
rewrite of it was: `rewrite_<reason>`). Request construction depends only on the config, the templates and the
pages, so a re-run after a crash takes every answered request from the ledger.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.config.rephrase import BucketPolicy, RephraseSection
from pipeline.documents import edu_score_of
from pipeline.llm.types import LLMRequest
from pipeline.rephrase.chunks import chunk_budget, estimate_tokens, split_chunks
from pipeline.rephrase.templates import RephraseTemplate, load_templates

BELOW_CUTOFF = "edu: below_cutoff"  # the web stage's reason for pages its edu cut dropped (pipeline/web/edu.py)


@dataclass
class Page:
    """One source page. `doc` is the document as read (passed on unchanged when the policy keeps it)."""

    index: int
    id: str
    text: str
    url: str | None
    edu_score: float | None
    origin: str  # kept (the web stage kept it) | below_cutoff (its edu cut dropped it) | inputs (rephrase.inputs)
    doc: dict[str, Any]
    bucket: str | None = None
    keep: bool = False
    fate: str | None = None  # a drop reason decided before any request (None: still open)
    not_rewritten: str | None = None  # a kept page whose rewrites were not planned: why (a source check)


@dataclass
class Rewrite:
    """One page x template: `chunks` are the source parts, one request each, answers joined in order."""

    index: int
    page: int
    template: str
    audience: str | None
    bucket: str
    chunks: list[str]
    cell: str
    request_keys: list[str] = field(default_factory=list)


@dataclass
class Plan:
    pages: list[Page]
    rewrites: list[Rewrite]
    requests: list[LLMRequest]
    templates: dict[str, RephraseTemplate]
    chunk_tokens: int
    context_tokens: int
    info: dict[str, Any]  # inputs read, input errors, contamination, notes


def _rank(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest(), "big")


def bucket_of(section: RephraseSection, score: float) -> BucketPolicy | None:
    """The first bucket, highest min_score first, that `score` reaches (a null min_score takes every score)."""
    for b in section.ordered_buckets():
        if b.min_score is None or score >= b.min_score:
            return b
    return None


def templates_for(bucket: BucketPolicy, page_id: str) -> list[str]:
    """The bucket's templates for this page: all of them, or `per_page` chosen by a hash of page and template
    (deterministic, and spread evenly over pages), in the bucket's order."""
    if bucket.per_page is None or bucket.per_page >= len(bucket.templates):
        return list(bucket.templates)
    chosen = set(sorted(bucket.templates, key=lambda t: _rank(page_id, t))[: bucket.per_page])
    return [t for t in bucket.templates if t in chosen]


def audience_for(section: RephraseSection, page_id: str, template: str) -> str | None:
    if not section.audiences:
        return None
    return section.audiences[_rank(page_id, template, "audience") % len(section.audiences)]


def context_tokens(cfg: RunConfig) -> int:
    """The model's context: rephrase.context_tokens, else llm.local_ctx for a local model, else 8192."""
    r = cfg.rephrase
    if r.context_tokens is not None:
        return r.context_tokens
    return cfg.llm.local_ctx if cfg.llm.provider == "local" else 8192


def source_files(cfg: RunConfig, inputs: list[Path], upstream: list[str], web_dir: Path | None) -> dict[str, list[Path]]:
    """{origin: files}: rephrase.inputs as given; else the web stage's kept pages and (recycle_below_cutoff) the
    pages its edu cut dropped, which the web stage writes to removed/edu-*.parquet."""
    if not upstream:
        return {"inputs": list(inputs)}
    out: dict[str, list[Path]] = {"kept": list(inputs)}
    if cfg.rephrase.recycle_below_cutoff and web_dir is not None and "web" in upstream:
        out["below_cutoff"] = sorted((web_dir / "removed").glob("edu-*.parquet"))
    return out


def read_pages(files: dict[str, list[Path]], on_error: Callable[[str, str], None]) -> tuple[list[Page], Counter[str]]:
    """The pages of `files` in order (below_cutoff files: only rows the edu cut dropped for their score; guard
    and unscored drops are not pages to recycle) and counts of the removed rows left out, by reason."""
    from tqdm import tqdm

    from pipeline.documents import iter_documents

    pages: list[Page] = []
    left_out: Counter[str] = Counter()
    for origin, paths in files.items():
        if not paths:
            continue
        for doc in tqdm(iter_documents(paths, on_error=on_error), desc=f"rephrase: reading pages ({origin})",
                        unit="page", mininterval=1.0, file=sys.stderr, leave=False):
            if origin == "below_cutoff" and doc.get("reason") != BELOW_CUTOFF:
                left_out[str(doc.get("reason"))] += 1
                continue
            meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
            score, bad_score = edu_score_of(doc.get("edu_score"))
            pages.append(Page(index=len(pages), id=str(doc["id"]), text=doc["text"],
                              url=doc.get("url") or meta.get("url"), edu_score=score, origin=origin,
                              doc={k: v for k, v in doc.items() if k != "reason"},
                              fate="invalid_edu_score" if bad_score else None))
    return pages, left_out


def _overhead_tokens(cfg: RunConfig, templates: dict[str, RephraseTemplate]) -> int:
    """The largest prompt a template makes around an empty chunk (system prompt included), in estimated tokens
    (a 100-character URL assumed)."""
    r = cfg.rephrase
    worst = 0
    for t in templates.values():
        text = t.render(chunk="", part=2, parts=9, url="x" * 100, audience="professional",
                        audience_guidance="x" * 120, no_content_marker=r.no_content_marker)
        worst = max(worst, estimate_tokens(text + (r.system_prompt or ""), r.chars_per_token) + 16)
    return worst


def plan(cfg: RunConfig, pages: list[Page], index_loader: Callable[[], Any] | None = None) -> Plan:
    """Buckets, policy and source checks for `pages` (their `fate`, `bucket`, `keep` are set here), then the
    rewrites and their requests. `index_loader()` returns the benchmark index for the source check (None: not
    checked)."""
    from tqdm import tqdm

    r = cfg.rephrase
    names = list(dict.fromkeys(t for b in r.buckets for t in b.templates))
    templates = load_templates(r.templates_dir, names) if names else {}
    ctx_tokens = context_tokens(cfg)
    chunk_tokens = r.chunk_tokens or chunk_budget(ctx_tokens, cfg.llm.max_tokens, _overhead_tokens(cfg, templates),
                                                  r.answer_room)
    info: dict[str, Any] = {"context_tokens": ctx_tokens, "chunk_tokens": chunk_tokens}
    seen: set[str] = set()
    open_pages: list[Page] = []
    for p in pages:
        if p.id in seen:
            p.fate = "duplicate_page"
            continue
        seen.add(p.id)
        if p.fate is not None:  # decided on reading (invalid_edu_score)
            continue
        if p.edu_score is None:
            p.fate = "unscored"
            continue
        b = bucket_of(r, p.edu_score)
        if b is None:
            p.fate = "below_buckets"
            continue
        p.bucket, p.keep = b.name, b.keep
        if not b.keep and not b.templates:
            p.fate = f"policy_drop_{b.name}"
            continue
        open_pages.append(p)

    checked: dict[int, str] = {}  # page index -> failed source check
    chunks_of: dict[int, list[str]] = {}
    buckets = {b.name: b for b in r.buckets}
    lang_ok = _language_checker(r) if r.source_language_check and r.language else None
    for p in tqdm(open_pages, desc="rephrase: checking and chunking pages", unit="page", mininterval=1.0,
                  file=sys.stderr, leave=False):
        if not buckets[p.bucket or ""].templates:
            continue
        failed = source_check(p.text, r, lang_ok)
        if failed is not None:
            checked[p.index] = failed
            continue
        chunks = split_chunks(p.text, chunk_tokens, r.chars_per_token)
        if len(chunks) > r.max_chunks:
            checked[p.index] = "source_too_long"
            continue
        chunks_of[p.index] = chunks
    contaminated: list[dict[str, Any]] = []
    index = index_loader() if index_loader is not None else None
    if index is not None and open_pages:
        from pipeline.decontam import check_texts

        matches = check_texts(index, [p.text for p in open_pages], cfg.decontaminate.min_matches)
        for p, m in zip(open_pages, matches, strict=True):
            if m is not None:
                p.fate = "source_contaminated"
                contaminated.append({"id": p.id, "url": p.url, **m.as_meta()})
    info["contaminated"] = contaminated
    info["decontaminated"] = index is not None

    rewrites: list[Rewrite] = []
    requests: list[LLMRequest] = []
    params, api = cfg.llm.sampling_params(), cfg.llm.request_api()
    for p in open_pages:
        if p.fate is not None:
            continue
        if p.index in checked:
            if p.keep:
                p.not_rewritten = checked[p.index]
            else:
                p.fate = checked[p.index]
            continue
        if p.index not in chunks_of:
            continue  # a keep-only bucket
        chunks = chunks_of[p.index]
        for name in templates_for(buckets[p.bucket or ""], p.id):
            t = templates[name]
            audience = audience_for(r, p.id, name)
            fields = {"bucket": p.bucket or "", "template": name, "audience": audience or "general"}
            rw = Rewrite(index=len(rewrites), page=p.index, template=name, audience=audience, bucket=p.bucket or "",
                         chunks=chunks, cell=" × ".join(fields[c] for c in r.diversity.cell_by))
            for k, chunk in enumerate(chunks):
                text = t.render(chunk=chunk, part=k + 1, parts=len(chunks), url=p.url or "",
                                audience=audience or "", audience_guidance=_guidance(audience),
                                no_content_marker=r.no_content_marker)
                req = LLMRequest.for_api(api, text, system=r.system_prompt, params=params,
                                         template_version=t.prompt_id,
                                         tag={"rewrite": rw.index, "chunk": k, "cell": rw.cell})
                rw.request_keys.append(req.key(cfg.llm.model))
                requests.append(req)
            rewrites.append(rw)
    return Plan(pages, rewrites, requests, templates, chunk_tokens, ctx_tokens, info)


def source_check(text: str, r: RephraseSection, lang_ok: Callable[[str], bool] | None) -> str | None:
    """The length and language checks on a page before paying: `source_too_short`, `source_not_<lang>` or None.
    Language comes before the word count: words are counted between spaces, so a long page in a script written
    without them (Chinese, Japanese, Thai) has "one word" and would otherwise be named too short."""
    if not text.strip():
        return "source_too_short"
    if lang_ok is not None and not lang_ok(text):
        return f"source_not_{r.language}"
    if len(text.split()) < r.min_source_words:
        return "source_too_short"
    return None


def _guidance(audience: str | None) -> str:
    if not audience:
        return ""
    from pipeline.generate.templates import audience_guidance

    return audience_guidance(audience)


def _language_checker(r: RephraseSection) -> Callable[[str], bool]:
    from pipeline.generate.validate import detect_language

    def ok(text: str) -> bool:
        lang, score = detect_language(text)
        return lang == r.language and score >= r.min_language_score

    return ok


def load_index(cfg: RunConfig) -> Any:
    """The decontaminate section's benchmark index (cached on disk), or None with a note on stderr when it cannot
    be had (offline and no local copies): the source check is then skipped, and says so in the stats."""
    from pipeline.decontam import index_for_section
    from pipeline.errors import ResourceUnavailable
    from pipeline.paths import cache_dir

    try:
        return index_for_section(cfg.decontaminate, cache_dir() / "decontam")
    except ResourceUnavailable as e:
        print(f"rephrase: decontamination skipped: {e}", file=sys.stderr)
        return None


def decontaminating(cfg: RunConfig) -> bool:
    return cfg.rephrase.decontaminate_sources or "decontaminate" in cfg.run.stages
