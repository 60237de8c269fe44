"""`textbook topics expand`: ask the LLM for subtopics and concepts of a subject and write a taxonomy file.

The model is asked for a fixed, easy-to-parse outline (`## Subtopic` headings, `- concept` bullets); the parser
also accepts numbered lists, bold headings and `Subtopic: a; b; c` lines, because models drift. Names are cleaned
(markdown, numbering, trailing punctuation, "/"), deduplicated case-insensitively, and subtopics with no concepts
are dropped.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from pipeline.errors import TextbookError

EXPAND_PROMPT = """List the subtopics of the subject "{subject}" that a complete course would teach, from basic to
advanced, and for each subtopic the specific concepts a textbook section could be written about.

Give {n_subtopics} subtopics with {n_concepts} concepts each. Use exactly this format and nothing else:

## <subtopic>
- <concept>
- <concept>

Concept names are short noun phrases (2 to 8 words), specific enough for one textbook section each, with no
explanations."""
EXPAND_VERSION = "topics_expand@" + hashlib.sha256(EXPAND_PROMPT.encode()).hexdigest()[:12]

_BULLET = re.compile(r"^\s*(?:[-*•+]|\d+[.)]|[a-z][.)])\s+(.*)$")
_HEADING = re.compile(r"^\s*(?:#{1,6}\s+(.*?)|\*\*(.+?)\*\*:?|([A-Z][^:]{1,80}):)\s*$")
_INLINE = re.compile(r"^\s*(?:\d+[.)]\s*)?\**([^:*]{2,80}?)\**\s*:\s*(.+[;,].+)$")


def clean_name(raw: str) -> str:
    s = re.sub(r"[*_`#]+", "", raw)
    s = re.sub(r"^\s*(?:\d+[.)]|[-•+])\s*", "", s)
    s = s.replace("/", " or ")
    s = re.split(r"\s+[-–—]\s+|:\s", s, maxsplit=1)[0]  # drop "Concept - explanation" tails
    s = " ".join(s.split()).strip(" .;,")
    return s if 1 < len(s) <= 80 else ""


def parse_outline(text: str) -> dict[str, list[str]]:
    """`## Subtopic` + `- concept` outline (and common variants) → {subtopic: [concepts]}."""
    out: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        inline = _INLINE.match(line)
        if inline and not line.lstrip().startswith(("-", "*", "•")):
            sub = clean_name(inline.group(1))
            if sub:
                out.setdefault(sub, []).extend(c for c in map(clean_name, re.split(r"[;,]", inline.group(2))) if c)
                current = sub
            continue
        heading = _HEADING.match(line)
        bullet = _BULLET.match(line)
        if heading and not bullet:
            name = clean_name(next(g for g in heading.groups() if g))
            if name:
                current = name
                out.setdefault(current, [])
            continue
        if bullet and current is not None:
            concept = clean_name(bullet.group(1))
            if concept:
                out[current].append(concept)
        elif bullet and current is None:
            # A numbered top-level list with no headings yet: treat each item as a subtopic.
            name = clean_name(bullet.group(1))
            if name:
                current = name
                out.setdefault(current, [])
    return out


def merge_outlines(outlines: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    """Union of several answers, deduplicated case-insensitively (a concept appears under one subtopic only)."""
    merged: dict[str, list[str]] = {}
    sub_key: dict[str, str] = {}
    seen_concepts: set[str] = set()
    for outline in outlines:
        for sub, concepts in outline.items():
            key = sub.lower()
            name = sub_key.setdefault(key, sub)
            bucket = merged.setdefault(name, [])
            for c in concepts:
                if c.lower() not in seen_concepts and c.lower() != key:
                    seen_concepts.add(c.lower())
                    bucket.append(c)
    return {k: v for k, v in merged.items() if v}


def expand_subject(subject: str, cfg: Any, n_subtopics: int = 8, n_concepts: int = 8,
                   samples: int = 1) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Ask the configured LLM (through the LLM layer, ledger included) and parse its outline(s)."""
    from pipeline.llm.runner import run_requests
    from pipeline.llm.types import LLMRequest, LLMResult

    prompt = EXPAND_PROMPT.format(subject=subject, n_subtopics=n_subtopics, n_concepts=n_concepts)
    params = cfg.llm.sampling_params()
    reqs = [LLMRequest.for_api(cfg.llm.request_api(), prompt, params=params, sample_index=i, template_version=EXPAND_VERSION,
                               tag={"i": i}) for i in range(samples)]
    results: list[LLMResult] = []
    summary = run_requests(reqs, cfg.llm, cfg.budget, cfg.llm.ledger_path(), on_result=results.append,
                           progress=False)
    outlines = [parse_outline(r.text or "") for r in results if r.ok]
    merged = merge_outlines(outlines)
    info = {"requests": len(reqs), "ok": sum(r.ok for r in results),
            "errors": [r.error or r.skipped for r in results if not r.ok], "cost_usd": summary.cost_usd}
    if not merged:
        why = "; ".join(str(e) for e in info["errors"]) or "no '## subtopic' / '- concept' outline in the answer"
        raise TextbookError(f"topics expand '{subject}': the model gave no usable subtopics ({why})")
    return merged, info


def write_taxonomy(path: Path, subject: str, subtopics: dict[str, list[str]], domain: str = "expanded",
                   tags: list[str] | None = None, overwrite: bool = False) -> None:
    from pipeline.generate.taxonomy import dump_subject, parse_file
    from pipeline.io import atomic_write_text

    if path.exists() and not overwrite:
        raise TextbookError(f"{path}: exists (use --force to overwrite)")
    name = " ".join(subject.replace("/", " or ").split())
    atomic_write_text(path, f"# Generated by `textbook topics expand` ({EXPAND_VERSION}); review before use.\n"
                      + dump_subject(name, subtopics, domain=domain, tags=tags or []))
    parse_file(path)  # what we wrote must load
