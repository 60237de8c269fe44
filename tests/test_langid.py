"""Language ID of the web stage (`LanguageFilter`, issue 12) on real text from ../shared: case must not decide the
language, a page is judged on its running text beyond the head, and the work per page is bounded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from datatrove.data import Document

from pipeline.paths import REPO_ROOT, shared_data_dir
from pipeline.web.steps import HtmlExtractor, LanguageFilter, is_running_text, load_lid_model

# shared/cases sits beside shared/data (../shared/cases from the repo root, or next to $TEXTBOOK_SHARED_DATA)
_DATA = shared_data_dir()
CASES = (_DATA.parent if _DATA else REPO_ROOT.parent / "shared") / "cases" / "langid" / "case_variants.jsonl"


@pytest.fixture(scope="module")
def model() -> Any:
    return load_lid_model()


@pytest.fixture
def english(model: Any) -> LanguageFilter:
    flt = LanguageFilter(["en"])  # the stage's defaults (min_score 0.65)
    flt._model = model
    return flt


class CountingModel:
    """The real model, recording every text it is asked about."""

    def __init__(self, model: Any) -> None:
        self.model, self.texts = model, []

    def predict(self, text: str, k: int = 1) -> Any:
        self.texts.append(text)
        return self.model.predict(text, k=k)


def page(shared_data: Path, name: str) -> str:
    path = shared_data / "web" / "trafilatura_pages" / "cache" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path.read_text(encoding="utf-8")


def link_texts(html: str) -> list[str]:
    """A page's navigation as a WET record prints it: each link's text on its own line, in page order."""
    from lxml import html as lxml_html

    tree = lxml_html.fromstring(html)
    for bad in tree.xpath("//script|//style|//noscript"):
        bad.drop_tree()
    return [t for t in (" ".join(a.text_content().split()) for a in tree.iter("a")) if t]


def first_chars(lines: list[str], at_least: int) -> str:
    out, size = [], 0
    for line in lines:
        out.append(line)
        size += len(line) + 1
        if size >= at_least:
            return "\n".join(out)
    raise AssertionError(f"only {size} characters of lines")


def test_case_variants_all_kept_as_english(english: LanguageFilter) -> None:
    """shared/cases/langid: one English paragraph in normal, ALL CAPS and Title Case; ALL CAPS was dropped
    (en 0.29) before issue 12."""
    if not CASES.is_file():
        pytest.skip(f"{CASES} is absent (shared/cases is present in CI)")
    rows = [json.loads(line) for line in CASES.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert {r["id"] for r in rows} == {"normal_case", "all_caps", "title_case"}
    for r in rows:
        doc = Document(text=r["text"], id=r["id"])
        assert english.filter(doc) is True, (r["id"], doc.metadata)
        assert doc.metadata["language"] == "en" and doc.metadata["language_score"] >= 0.9, (r["id"], doc.metadata)
    # lower-casing is the normalisation: every casing is one input to the model, so one answer
    assert len({english.lid_text(r["text"]) for r in rows}) == 1


def test_all_caps_german_stays_german(english: LanguageFilter, shared_data: Path, tmp_path: Path) -> None:
    """Normalising case must not turn other languages into English either (a real German article, upper-cased)."""
    text = HtmlExtractor(str(tmp_path)).extract(page(shared_data, "adac.de.kindersitze.html"))
    doc = Document(text=text.upper(), id="adac-upper")
    assert english.filter(doc) == (False, "lang_de") and doc.metadata["language_score"] > 0.9


def test_english_page_under_5000_chars_of_german_navigation_is_english(english: LanguageFilter,
                                                                        shared_data: Path) -> None:
    """A real German site's menu (its link texts, ~5,000 characters) on top of a real English FineWeb page."""
    nav = first_chars(link_texts(page(shared_data, "rnz.de.witzel.html")), 5000)
    rows = json.loads((shared_data / "web" / "fineweb_sample_300" / "fineweb_subset.json").read_text())
    body = next(r["original_text"] for r in rows if 3000 <= len(r["original_text"]) <= 8000)
    text = nav + "\n" + body
    assert len(nav) >= 5000 and len(body) < 2 * len(nav)  # the German menu is no small part of the page
    head = Document(text=text[:5000], id="head-only")
    assert english.filter(head) == (False, "lang_de")  # the head alone (all the old filter read) is German
    doc = Document(text=text, id="nav-then-english")
    assert english.filter(doc) is True, doc.metadata
    assert doc.metadata["language"] == "en"


def test_german_page_with_english_cookie_banner_is_not_english(english: LanguageFilter, shared_data: Path,
                                                               tmp_path: Path) -> None:
    """A real English cookie notice and English site menu (theverge.com) on top of a short real German news
    text (rnz.de): the English head is longer than the German article, and the page is still German."""
    from lxml import html as lxml_html

    verge = page(shared_data, "theverge.com.ios13.html")
    notice = lxml_html.fromstring(verge).xpath('//*[starts-with(normalize-space(.), "We use cookies")]')[-1]
    banner = " ".join(notice.text_content().split())
    menu = first_chars(link_texts(verge), 1500)
    article = HtmlExtractor(str(tmp_path)).extract(page(shared_data, "rnz.de.witzel.html"))
    assert banner.startswith("We use cookies") and len(banner) > 300
    assert 300 < len(article) < len(banner) + len(menu)
    doc = Document(text=banner + "\n" + menu + "\n" + article, id="cookie-banner-on-german")
    assert english.filter(doc) == (False, "lang_de"), doc.metadata
    german = LanguageFilter(["de"])
    german._model = english.model
    assert german.filter(Document(text=doc.text, id="same-page-for-de")) is True


def test_huge_page_is_read_in_a_bounded_sample(model: Any, shared_data: Path) -> None:
    """A 3-million-character page: one model call on at most max_chars characters, taken from head to tail,
    with no newline (fastText refuses them)."""
    rows = json.loads((shared_data / "web" / "fineweb_sample_300" / "fineweb_subset.json").read_text())
    english_text = "\n".join(r["original_text"] for r in rows[:60])
    nav = first_chars(link_texts(page(shared_data, "rnz.de.witzel.html")), 5000)
    huge = nav + "\n" + english_text * (3_000_000 // len(english_text) + 1)
    assert len(huge) > 3_000_000
    counting = CountingModel(model)
    flt = LanguageFilter(["en"])
    flt._model = counting
    doc = Document(text=huge, id="huge")
    assert flt.filter(doc) is True and doc.metadata["language"] == "en"
    assert len(counting.texts) == 1
    sent = counting.texts[0]
    assert 0.9 * flt.max_chars <= len(sent) <= flt.max_chars and "\n" not in sent
    last_line = next(line for line in reversed(huge.split("\n")) if is_running_text(line))
    assert flt.normalise(last_line)[-60:] in sent  # the sample reaches the end of the page, not only its head
    # the line picking itself looks at a bounded view of the page, not all 3 MB
    assert len(flt.lid_text(huge)) <= flt.max_chars


def test_empty_text_is_unknown_not_english(english: LanguageFilter) -> None:
    doc = Document(text=" \n\t ", id="blank")
    assert english.filter(doc) == (False, "lang_unknown") and doc.metadata["language_score"] == 0.0
