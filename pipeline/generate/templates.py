"""Prompt formats: one Jinja2 template per format in `prompts/formats/<name>.j2`, versioned by content.

A template starts with a YAML header inside a Jinja comment::

    {#---
    description: textbook section with worked examples
    audiences: [middle school, high school]   # optional: the only audiences it suits
    requires_tags: [code]                     # optional: only subjects whose taxonomy file has these tags
    seeded: false                             # true: needs a web page extract (web-seeded prompts)
    ---#}

`prompt_id` = `<name>@<first 12 hex of sha256(template file)>`, so editing a template changes the id (and so
the request keys: the LLM ledger will not serve answers to the old wording).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import TextbookError
from pipeline.generate.taxonomy import resolve_path
from pipeline.io import YAML_LOADER

AUDIENCE_GUIDANCE = {
    "young children": "children aged 5 to 8: very short sentences, everyday words, concrete examples from home, "
                      "school and play, no jargon",
    "middle school": "students aged 11 to 14: clear explanations, relatable examples, new terms defined when "
                     "first used",
    "high school": "students aged 14 to 18: precise explanations, some formal notation where it helps, "
                   "examples that build step by step",
    "college": "undergraduate students: rigorous definitions, derivations or arguments where relevant, "
               "connections to related ideas",
    "professional": "practitioners and researchers: concise, technically deep, focused on practice, "
                    "trade-offs and common pitfalls",
}

_HEADER = re.compile(r"\A\{#---\n(.*?)\n---#\}\n?", re.S)
_HEADER_KEYS = {"description", "audiences", "requires_tags", "seeded"}


@dataclass(frozen=True)
class Format:
    name: str
    prompt_id: str
    description: str
    audiences: frozenset[str] | None  # None: any audience
    requires_tags: frozenset[str]
    seeded: bool
    source: str  # template body without the header
    path: Path

    def suits_audience(self, audience: str) -> bool:
        return self.audiences is None or audience in self.audiences

    def suits_subject(self, tags: frozenset[str]) -> bool:
        return self.requires_tags <= tags

    def render(self, **variables: Any) -> str:
        return _compiled(self.source).render(**variables).strip() + "\n"


@lru_cache(maxsize=64)
def _compiled(source: str) -> Any:
    return _env().from_string(source)


@lru_cache(maxsize=1)
def _env() -> Any:
    """One environment for every template (building one per template parse cost a planning run ~0.1 s)."""
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, autoescape=False)


def read_header(path: Path, kind: str, known: frozenset[str] | set[str]) -> tuple[str, dict[str, Any], int]:
    """(raw text, header dict, offset where the body starts) of a `{#--- YAML ---#}` template (prompts/, formats
    and rephrasing templates alike). Errors: TextbookError naming the file for a missing header, invalid YAML or
    a key outside `known`."""
    raw = path.read_text(encoding="utf-8")
    m = _HEADER.match(raw)
    if not m:
        raise TextbookError(f"{path}: a {kind} template must start with a '{{#---' ... '---#}}' YAML header")
    try:
        meta = yaml.load(m.group(1), Loader=YAML_LOADER) or {}
    except yaml.YAMLError as e:
        raise TextbookError(f"{path}: header: invalid YAML: {e}") from None
    unknown = set(meta) - set(known)
    if unknown:
        raise TextbookError(f"{path}: header: unknown key(s) {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(known))})")
    return raw, meta, m.end()


def parse_template(path: Path) -> Format:
    raw, meta, start = read_header(path, "format", _HEADER_KEYS)
    body = raw[start:]
    try:
        _env().parse(body)
    except Exception as e:  # jinja2.TemplateSyntaxError, imported lazily
        raise TextbookError(f"{path}: template syntax error: {e}") from None
    audiences = meta.get("audiences")
    bad = [a for a in audiences or [] if a not in AUDIENCE_GUIDANCE]
    if bad:
        raise TextbookError(f"{path}: header: unknown audience(s) {', '.join(bad)} "
                            f"(known: {', '.join(AUDIENCE_GUIDANCE)})")
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:12]
    return Format(
        name=path.stem, prompt_id=f"{path.stem}@{digest}", description=str(meta.get("description", path.stem)),
        audiences=frozenset(audiences) if audiences else None,
        requires_tags=frozenset(meta.get("requires_tags") or []), seeded=bool(meta.get("seeded", False)),
        source=body, path=path,
    )


def load_formats(directory: str | Path, names: list[str] | None = None) -> dict[str, Format]:
    """All templates of a directory (or just `names`, in that order)."""
    d = resolve_path(directory)
    if not d.is_dir():
        raise TextbookError(f"{directory}: format template directory not found")
    available = {p.stem: p for p in sorted(d.glob("*.j2"))}
    if not available:
        raise TextbookError(f"{d}: no *.j2 format templates")
    if names:
        missing = [n for n in names if n not in available]
        if missing:
            raise TextbookError(f"generate.formats: unknown format(s) {', '.join(missing)} "
                                f"(available: {', '.join(available)})")
        return {n: parse_template(available[n]) for n in names}
    return {n: parse_template(p) for n, p in available.items()}


def audience_guidance(audience: str) -> str:
    return AUDIENCE_GUIDANCE.get(audience, audience)
