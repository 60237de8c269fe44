"""`web:` section (owned by the web issue): inputs, filters with thresholds, educational-value scoring, executor."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.core import StageSection, StrictModel

InputType = Literal["auto", "warc", "jsonl", "json", "parquet", "html", "hf"]


class WebSource(StrictModel):
    """One typed input: a file, a folder (with a glob), or a Hugging Face dataset."""

    path: str = Field(description="file, folder, or (type: hf) a local dataset dir or a hub name")
    type: InputType = Field(
        default="auto",
        description="auto infers from the suffix: .warc(.gz)/.wet(.gz) warc, .jsonl(.gz/.zst) jsonl, .json (array or "
        "jsonl), .parquet, .html/.htm; a folder is searched recursively",
    )
    glob: str | None = Field(default=None, description="pattern relative to a folder path, e.g. '**/*.html'")
    text_key: str | None = Field(default=None, description="text field of jsonl/parquet/hf records; default web.text_key")
    id_key: str | None = Field(default=None, description="id field of jsonl/parquet/hf records; default web.id_key")
    url_key: str | None = Field(default=None, description="url field; default web.url_key")
    # Hugging Face datasets only
    name: str | None = Field(default=None, description="hf: dataset config name (e.g. sample-10BT)")
    split: str = Field(default="train", description="hf: split")
    streaming: bool = Field(default=True, description="hf: stream instead of downloading the whole split")
    limit: int | None = Field(default=None, ge=1, description="hf: read at most this many records in total")


class UrlFilterConfig(StrictModel):
    enabled: bool = True
    soft_word_threshold: int = Field(default=2, ge=1, description="soft-banned words in a URL that drop it")
    extra_domains: list[str] = Field(default_factory=list, description="more blocked domains")


class LanguageConfig(StrictModel):
    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep")
    min_score: float = Field(default=0.65, ge=0, le=1, description="fastText lid.176 confidence needed to keep")


class MinLengthConfig(StrictModel):
    enabled: bool = True
    min_chars: int = Field(default=200, ge=0, description="extracted text shorter than this is dropped")
    min_words: int = Field(default=30, ge=0, description="fewer whitespace-separated words than this is dropped")


class GopherRepetitionConfig(StrictModel):
    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2


class GopherQualityConfig(StrictModel):
    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class C4QualityConfig(StrictModel):
    enabled: bool = True
    filter_no_terminal_punct: bool = Field(default=False, description="C4 drops lines without terminal punctuation "
                                           "(FineWeb turned it off: it removes too much)")
    min_num_sentences: int = Field(default=5, description="-1 disables")
    min_words_per_line: int = Field(default=3, description="-1 disables")
    max_word_length: int = Field(default=1000, description="-1 disables")
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualityConfig(StrictModel):
    enabled: bool = True
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class WebFilters(StrictModel):
    """Applied in this order; each can be switched off, and each drop is recorded under the filter's name."""

    url: UrlFilterConfig = Field(default_factory=UrlFilterConfig)
    min_length: MinLengthConfig = Field(default_factory=MinLengthConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4_quality: C4QualityConfig = Field(default_factory=C4QualityConfig)
    fineweb_quality: FineWebQualityConfig = Field(default_factory=FineWebQualityConfig)


class EduConfig(StrictModel):
    """Educational-value scoring: the score is stored on every kept document; filtering on it is optional.

    The cut is taken after every page is scored (`pipeline.web.edu`), so changing threshold/keep_top reuses the
    scores of a completed run."""

    enabled: bool = Field(default=False, description="score documents with the edu classifier (metadata edu_score)")
    model: str | None = Field(default=None, description="classifier model dir; default classifier.model")
    filter: bool = Field(default=False, description="drop documents below the cut-off (else only score them)")
    threshold: float | None = Field(default=None, description="cut-off on the rubric scale (e.g. 3)")
    keep_top: float | None = Field(default=None, gt=0, le=1, description="or: keep this top fraction of the pages "
                                   "(see keep_top_of); neither: the model's recorded default cut-off")
    keep_top_of: Literal["run", "calibration"] = Field(
        default="run", description="run: the top keep_top of the pages this run scored (exactly, ties broken by "
        "provenance); calibration: the score keeping keep_top of the model's calibration sample (the share of "
        "this run it keeps varies)")
    guards: bool = Field(default=True, description="keyword-list / word-salad / repetition gates and the "
                         "pasted-training-text rule (pipeline.classify.guards); gated pages are never kept")

    @model_validator(mode="after")
    def _one_cut(self) -> EduConfig:
        if self.threshold is not None and self.keep_top is not None:
            raise ValueError("web.edu: set threshold or keep_top, not both")
        return self


class WebSection(StageSection):
    sources: list[WebSource] = Field(
        default_factory=list,
        description="typed inputs (warc/jsonl/json/parquet/html folder/hf dataset) besides the plain paths in `inputs`",
    )
    text_key: str = Field(default="text", description="text field of jsonl/parquet/hf records")
    id_key: str = Field(default="id", description="id field of jsonl/parquet/hf records (kept in meta.source_id)")
    url_key: str = Field(default="url", description="url field of records (also looked up in record['metadata'])")
    executor: Literal["local", "ray"] = Field(default="local", description="datatrove executor")
    tasks: int = Field(default=2, ge=1, description="datatrove tasks (input files are split between them)")
    workers: int = Field(default=1, ge=1, description="tasks run at the same time")
    ray_address: str | None = Field(default=None, description="executor ray: connect to this cluster, "
                                    "default a local Ray (outputs must be on a filesystem the workers share)")
    task_timeout_s: int = Field(default=3600, ge=1, description="workers > 1 or ray: a task running longer is "
                                "killed and reported (one-line error; re-run resumes). Each page is also bounded "
                                "by extract_timeout_s")
    max_page_bytes: int = Field(default=5_000_000, ge=1, description="records larger than this are dropped "
                                "before extraction (reason too_large)")
    extract_timeout_s: float = Field(default=5.0, gt=0, description="trafilatura time limit per page")
    favour_precision: bool = Field(default=True, description="trafilatura: less text, less boilerplate")
    filters: WebFilters = Field(default_factory=WebFilters)
    edu: EduConfig = Field(default_factory=EduConfig)
    removed_sample_rate: float = Field(default=1.0, ge=0, le=1, description="share of dropped documents written "
                                       "to removed/ for inspection (counts always cover all of them)")

    @model_validator(mode="after")
    def _workers_le_tasks(self) -> WebSection:
        if self.workers > self.tasks:
            self.__dict__["workers"] = self.tasks  # more workers than tasks would idle
        return self
