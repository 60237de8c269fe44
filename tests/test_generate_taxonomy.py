"""The committed topic taxonomy and format templates: size, breadth, validation, versioning."""

from __future__ import annotations

import pytest

from pipeline.errors import TextbookError
from pipeline.generate.taxonomy import load_taxonomy, parse_file
from pipeline.generate.templates import AUDIENCE_GUIDANCE, load_formats, parse_template
from pipeline.paths import repo_path


def test_committed_taxonomy_is_broad_enough():
    tax = load_taxonomy([repo_path("prompts", "topics")])
    summary = tax.summary()
    assert summary["subjects"] >= 40
    assert summary["leaves"] >= 1500
    domains = summary["leaves_per_domain"]
    for domain in ("science", "mathematics", "computing", "humanities", "everyday", "social_reasoning"):
        assert domains.get(domain, 0) >= 100, (domain, domains)
    code = [s for s in tax.subjects.values() if "code" in s.tags]
    assert len(code) >= 5 and sum(len(s.leaves) for s in code) >= 100  # phi-1 style Python topics
    assert "Theory of Mind" in tax.subjects
    paths = [leaf.path for leaf in tax.leaves]
    assert len(paths) == len(set(paths))
    assert all(p.count("/") == 2 for p in paths)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("subjects: {A: {B: [x, y, x]}}", "duplicate concept"),
    ("subjects: {A: {B: [x/y]}}", "contains '/'"),
    ("subjects: {A: {B: []}}", "non-empty list"),
    ("subjects: {A: [x]}", "non-empty mapping"),
    ("subject: {A: {B: [x]}}", "subjects"),
    ("subjects: {A: {B: [x]}}\nextra: 1", "unknown key"),
    ("subjects: {A: {B: [x]\n", "invalid YAML"),
])
def test_bad_taxonomy_files_are_errors_naming_file_and_key(tmp_path, text, message):
    p = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(TextbookError, match=message) as e:
        parse_file(p)
    assert "bad.yaml" in str(e.value)


def test_subject_defined_twice_across_files_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", "subjects: {Physics: {Waves: [Sound]}}")
    _write(tmp_path, "b.yaml", "subjects: {Physics: {Heat: [Conduction]}}")
    with pytest.raises(TextbookError, match="also defined"):
        load_taxonomy([tmp_path])


def test_restrict_and_unknown_subject(tmp_path):
    _write(tmp_path, "a.yaml", "tags: [code]\nsubjects: {P: {W: [s, t]}, Q: {H: [c]}}")
    tax = load_taxonomy([tmp_path])
    assert tax.subjects["P"].tags == frozenset({"code"})
    assert list(tax.restrict(["Q"]).subjects) == ["Q"]
    with pytest.raises(TextbookError, match="unknown subject"):
        tax.restrict(["Nope"])


def test_committed_formats_parse_render_and_declare_their_audiences():
    formats = load_formats(repo_path("prompts", "formats"))
    assert {"textbook_section", "exercises", "python_chapter", "children_story", "socratic_dialogue",
            "web_seeded_section"} <= set(formats)
    assert formats["children_story"].audiences == frozenset({"young children"})
    assert formats["python_chapter"].requires_tags == frozenset({"code"})
    assert formats["web_seeded_section"].seeded
    for f in formats.values():
        assert f.prompt_id.startswith(f.name + "@") and len(f.prompt_id) == len(f.name) + 13
        vars_ = {"audience": "college", "audience_guidance": AUDIENCE_GUIDANCE["college"], "topic": "A/B/C",
                 "subject": "Physics", "subtopic": "Waves", "concept": "Standing waves on a string",
                 "extract": "Some page text about tides.", "url": "https://example.org/tides"}
        text = f.render(**vars_)
        assert AUDIENCE_GUIDANCE["college"] in text
        if not f.seeded:
            assert "Standing waves on a string" in text
        else:
            assert "Some page text about tides." in text


def test_prompt_id_changes_with_the_template_and_missing_variables_fail(tmp_path):
    src = "{#---\ndescription: t\n---#}\nWrite about {{ concept }} for {{ audience }}.\n"
    p = _write(tmp_path, "t.j2", src)
    a = parse_template(p)
    p.write_text(src.replace("Write", "Explain"))
    b = parse_template(p)
    assert a.prompt_id != b.prompt_id and a.name == b.name == "t"
    with pytest.raises(Exception, match="audience"):
        b.render(concept="x")  # StrictUndefined: a template never silently renders an empty slot


def test_template_header_is_validated(tmp_path):
    with pytest.raises(TextbookError, match="header"):
        parse_template(_write(tmp_path, "a.j2", "no header {{ concept }}"))
    with pytest.raises(TextbookError, match="unknown audience"):
        parse_template(_write(tmp_path, "b.j2", "{#---\naudiences: [toddlers]\n---#}\nx"))
    with pytest.raises(TextbookError, match="syntax"):
        parse_template(_write(tmp_path, "c.j2", "{#---\ndescription: c\n---#}\n{% if %}"))
    with pytest.raises(TextbookError, match="unknown format"):
        load_formats(tmp_path, ["nope"])
