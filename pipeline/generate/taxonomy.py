"""The topic taxonomy: YAML files of subjects → subtopics → concepts (the leaves prompts are seeded with).

File format (`prompts/topics/*.yaml`)::

    domain: science            # free label, reported in coverage
    tags: [code]               # optional; formats may require a tag (the Python chapter needs `code`)
    subjects:
      Physics:
        Mechanics: [Newton's laws of motion, Friction, ...]
        Waves: [...]

A leaf's path is `Subject/Subtopic/Concept`; names may not contain "/". Errors name the file and the key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import TextbookError
from pipeline.io import YAML_LOADER
from pipeline.paths import repo_path


@dataclass(frozen=True)
class Leaf:
    subject: str
    subtopic: str
    concept: str

    @property
    def path(self) -> str:
        return f"{self.subject}/{self.subtopic}/{self.concept}"


@dataclass
class Subject:
    name: str
    domain: str
    tags: frozenset[str]
    source: Path
    subtopics: dict[str, list[str]] = field(default_factory=dict)

    @property
    def leaves(self) -> list[Leaf]:
        return [Leaf(self.name, st, c) for st, concepts in self.subtopics.items() for c in concepts]


@dataclass
class Taxonomy:
    subjects: dict[str, Subject]

    @property
    def leaves(self) -> list[Leaf]:
        return [leaf for s in self.subjects.values() for leaf in s.leaves]

    def summary(self) -> dict[str, Any]:
        domains: dict[str, int] = {}
        for s in self.subjects.values():
            domains[s.domain] = domains.get(s.domain, 0) + len(s.leaves)
        return {"subjects": len(self.subjects),
                "subtopics": sum(len(s.subtopics) for s in self.subjects.values()),
                "leaves": len(self.leaves), "leaves_per_domain": dict(sorted(domains.items()))}

    def restrict(self, names: Iterable[str]) -> Taxonomy:
        wanted = list(names)
        missing = [n for n in wanted if n not in self.subjects]
        if missing:
            raise TextbookError(f"generate.subjects: unknown subject(s) {', '.join(missing)} "
                                f"(known: {', '.join(sorted(self.subjects)[:20])}, ...)")
        return Taxonomy({n: self.subjects[n] for n in wanted})


def resolve_path(p: str | Path) -> Path:
    """A relative path is looked up in the working directory, then in the repository checkout."""
    path = Path(p)
    if path.is_absolute() or path.exists():
        return path
    alt = repo_path(str(path))
    return alt if alt.exists() else path


def taxonomy_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = resolve_path(p)
        if path.is_dir():
            files.extend(sorted(f for f in path.rglob("*") if f.suffix in (".yaml", ".yml")))
        elif path.is_file():
            files.append(path)
        else:
            raise TextbookError(f"{p}: taxonomy file or directory not found")
    if not files:
        raise TextbookError(f"no taxonomy YAML files in {', '.join(map(str, paths))}")
    return files


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise TextbookError(f"{where}: expected a name, got {type(value).__name__}")
    name = " ".join(str(value).split())
    if not name:
        raise TextbookError(f"{where}: empty name")
    if "/" in name:
        raise TextbookError(f"{where}: '{name}' contains '/', which separates topic path levels")
    return name


def parse_file(path: Path) -> list[Subject]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise TextbookError(f"{path}:{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("subjects"), dict) or not data["subjects"]:
        raise TextbookError(f"{path}: expected a mapping with a non-empty `subjects:` mapping")
    unknown = set(data) - {"domain", "tags", "subjects", "description"}
    if unknown:
        raise TextbookError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    domain = str(data.get("domain") or path.stem)
    tags = data.get("tags") or []
    if not isinstance(tags, list):
        raise TextbookError(f"{path}: tags: expected a list")
    out = []
    for sname, subtopics in data["subjects"].items():
        sname = _name(sname, f"{path}: subjects")
        where = f"{path}: subjects.{sname}"
        if not isinstance(subtopics, dict) or not subtopics:
            raise TextbookError(f"{where}: expected a non-empty mapping of subtopic -> list of concepts")
        subject = Subject(sname, domain, frozenset(map(str, tags)), path)
        for stname, concepts in subtopics.items():
            stname = _name(stname, where)
            if stname in subject.subtopics:
                raise TextbookError(f"{where}.{stname}: duplicate subtopic")
            if not isinstance(concepts, list) or not concepts:
                raise TextbookError(f"{where}.{stname}: expected a non-empty list of concepts")
            names = [_name(c, f"{where}.{stname}") for c in concepts]
            seen: set[str] = set()
            for c in names:
                if c.lower() in seen:
                    raise TextbookError(f"{where}.{stname}: duplicate concept '{c}'")
                seen.add(c.lower())
            subject.subtopics[stname] = names
        out.append(subject)
    return out


def load_taxonomy(paths: Iterable[str | Path]) -> Taxonomy:
    subjects: dict[str, Subject] = {}
    for f in taxonomy_files(list(paths)):
        for s in parse_file(f):
            if s.name in subjects:
                raise TextbookError(f"{f}: subject '{s.name}' is also defined in {subjects[s.name].source}")
            subjects[s.name] = s
    return Taxonomy(subjects)


def dump_subject(subject: str, subtopics: dict[str, list[str]], domain: str = "expanded",
                 tags: Iterable[str] = ()) -> str:
    """YAML text of a one-subject taxonomy file (what `textbook topics expand` writes)."""
    doc: dict[str, Any] = {"domain": domain}
    if tags:
        doc["tags"] = list(tags)
    doc["subjects"] = {subject: subtopics}
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=110)
