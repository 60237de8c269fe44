"""Rephrasing templates: one Jinja2 file per output format in `prompts/rephrase/<name>.j2`, versioned by content.

A template starts with a YAML header inside a Jinja comment::

    {#---
    description: questions a reader would ask about the passage, each answered from it
    format_words: [q, a, question, answer]     # words the format itself brings: not counted as content
    fidelity: {min_length_ratio: 0.2}          # optional: this format's own bounds (config overrides them)
    ---#}

Files starting with `_` are partials (`{% include "_rules.j2" %}`), not templates. Variables: `chunk` (the source
text of this part), `part`, `parts` (1-based part number, number of parts), `url`, `audience` (empty: a general
reader), `audience_guidance`, `no_content_marker`.

`prompt_id` = `<name>@<first 12 hex of sha256(template + every partial of the directory)>`: editing a template or
a shared partial changes the id, and with it the request keys (the LLM ledger never answers new wording with old
text).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.config.rephrase import FidelityBounds
from pipeline.errors import TextbookError
from pipeline.generate.taxonomy import resolve_path
from pipeline.generate.templates import read_header

_HEADER_KEYS = {"description", "format_words", "fidelity"}


@dataclass(frozen=True)
class RephraseTemplate:
    name: str
    prompt_id: str
    description: str
    format_words: frozenset[str]
    fidelity: FidelityBounds | None
    path: Path

    def render(self, **variables: Any) -> str:
        """The prompt text (jinja2 StrictUndefined: a missing variable is an error)."""
        return _env(str(self.path.parent)).get_template(self.path.name).render(**variables).strip() + "\n"


@lru_cache(maxsize=8)
def _env(directory: str) -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(directory), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def _partials_digest(directory: Path) -> bytes:
    h = hashlib.sha256()
    for p in sorted(directory.glob("_*.j2")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.digest()


def parse_template(path: Path) -> RephraseTemplate:
    """One template file: header checked (unknown keys and bad bounds are errors), body parsed."""
    raw, meta, _ = read_header(path, "rephrasing", _HEADER_KEYS)
    try:
        _env(str(path.parent)).parse(raw)
    except Exception as e:  # jinja2.TemplateSyntaxError, imported lazily
        raise TextbookError(f"{path}: template syntax error: {e}") from None
    try:
        fidelity = FidelityBounds(**meta["fidelity"]) if meta.get("fidelity") else None
    except Exception as e:  # pydantic.ValidationError
        raise TextbookError(f"{path}: header: fidelity: {e}") from None
    digest = hashlib.sha256(raw.encode("utf-8") + _partials_digest(path.parent)).hexdigest()[:12]
    return RephraseTemplate(name=path.stem, prompt_id=f"{path.stem}@{digest}",
                            description=str(meta.get("description", path.stem)),
                            format_words=frozenset(str(w).lower() for w in meta.get("format_words") or []),
                            fidelity=fidelity, path=path)


def load_templates(directory: str | Path, names: list[str]) -> dict[str, RephraseTemplate]:
    """The named templates of `directory` (relative paths: cwd, then the repository), in `names` order."""
    d = resolve_path(directory)
    if not d.is_dir():
        raise TextbookError(f"{directory}: rephrasing template directory not found")
    available = {p.stem: p for p in sorted(d.glob("*.j2")) if not p.name.startswith("_")}
    missing = [n for n in names if n not in available]
    if missing:
        raise TextbookError(f"rephrase.buckets: unknown template(s) {', '.join(missing)} "
                            f"(in {d}: {', '.join(available) or 'none'})")
    return {n: parse_template(available[n]) for n in names}


def template_files(directory: str | Path) -> list[Path]:
    """Every file of the template directory (templates and partials): hashed by the run for resume."""
    d = resolve_path(directory)
    return sorted(p for p in d.glob("*.j2")) if d.is_dir() else []
