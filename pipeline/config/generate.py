"""`generate:` section: what to ask the LLM for (taxonomy × audience × format grid) and how to judge the answers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.checks import (
    DEFAULT_META_TALK,
    DEFAULT_PLACEHOLDERS,
    DEFAULT_PREAMBLES,
    DEFAULT_REFUSALS,
    CodeCheckSettings,
    RepetitionSettings,
)
from pipeline.config.core import StageSection, StrictModel

DEFAULT_AUDIENCES = ["young children", "middle school", "high school", "college", "professional"]


class WeightsSettings(StrictModel):
    """Relative weights of grid values; a value left out weighs 1. Quotas are filled in proportion."""

    audience: dict[str, float] = Field(default_factory=dict, description="e.g. {college: 2, young children: 0.5}")
    format: dict[str, float] = Field(default_factory=dict, description="e.g. {python_chapter: 3}")
    subject: dict[str, float] = Field(default_factory=dict, description="e.g. {Python Programming: 4}")

    @field_validator("audience", "format", "subject")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in v.items() if w < 0]
        if bad:
            raise ValueError(f"weights must be >= 0 (got negative for {', '.join(bad)})")
        return v


class DiversitySettings(StrictModel):
    enabled: bool = Field(default=True, description="stop spending on grid cells that keep repeating themselves")
    cell_by: list[str] = Field(default_factory=lambda: ["audience", "format"],
                               description="which spec fields make a grid cell for the guard "
                                           "(any of subject, audience, format)")
    max_repeat_rate: float = Field(default=0.5, ge=0, le=1,
                                   description="a cell whose outputs are near-duplicates or reuse an opening "
                                               "at more than this rate is stopped")
    min_docs: int = Field(default=8, ge=1, description="outputs a cell needs before the guard may stop it")
    near_dup_threshold: float = Field(default=0.7, gt=0, le=1, description="MinHash Jaccard for a near-duplicate")
    num_perm: int = Field(default=64, ge=16, description="MinHash permutations")
    shingle_words: int = Field(default=5, ge=1, description="word n-gram size of the MinHash shingles")
    opening_words: int = Field(default=8, ge=1, description="words of the first sentence compared as the opening")


class GenerateSection(StageSection):
    n: int = Field(default=32, ge=1, description="prompt specs to generate (each becomes llm.n requests)")
    taxonomy: list[str] = Field(default_factory=lambda: ["prompts/topics"],
                                description="taxonomy YAML files or directories (relative paths: cwd, then repo)")
    subjects: list[str] = Field(default_factory=list, description="restrict to these subjects; empty: all")
    formats_dir: str = Field(default="prompts/formats", description="directory of the Jinja2 format templates")
    formats: list[str] = Field(default_factory=list,
                               description="format templates to use (file stems); empty: every template that is "
                                           "not web-seeded")
    audiences: list[str] = Field(default_factory=lambda: list(DEFAULT_AUDIENCES),
                                 description="audiences of the grid")
    weights: WeightsSettings = Field(default_factory=WeightsSettings)
    seed: int | None = Field(default=None, description="sampler seed; default run.seed")
    system_prompt: str | None = Field(
        default="You are an expert educator who writes clear, accurate, engaging textbooks.",
        description="system message for the chat API (null: none)")
    # validation
    min_tokens: int = Field(default=150, ge=0, description="outputs shorter than this are dropped (too_short)")
    token_counter: str = Field(default="tokenizer",
                               description="tokenizer (the run's tokenizer) or whitespace (words x 1.3)")
    drop_length_finish: bool = Field(default=True, description="drop outputs cut off at max_tokens")
    language: str | None = Field(default="en", description="required output language (fastText lid); null: any")
    min_language_score: float = Field(default=0.5, ge=0, le=1, description="lid confidence needed for `language`")
    # pattern families: case-insensitive regular expressions (pipeline/config/checks.py says how they are read)
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS),
                                        description="the model refusing or speaking as an AI (refusal)")
    preamble_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PREAMBLES),
                                         description="an assistant's opening to the requester (preamble)")
    meta_talk_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_META_TALK),
                                          description="talk about the request or the text itself (meta_talk)")
    placeholder_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PLACEHOLDERS),
                                            description="unfilled text, searched in the prose (placeholder)")
    repetition: RepetitionSettings = Field(default_factory=RepetitionSettings)
    code_checks: CodeCheckSettings = Field(default_factory=CodeCheckSettings)
    diversity: DiversitySettings = Field(default_factory=DiversitySettings)
    # web seeding
    seed_inputs: list[str] = Field(default_factory=list,
                                   description="scored web documents for web-seeded prompts (default: the web "
                                               "stage's kept output when it ran)")
    web_seed_fraction: float = Field(default=0.0, ge=0, le=1,
                                     description="share of the n specs seeded by a web page (when pages exist)")
    decontaminate_seeds: bool = Field(default=False, description="check web seed extracts against the "
                                      "decontaminate section's benchmark index and drop overlapping ones before "
                                      "generating (always on when the run's stages include decontaminate)")
    seed_format: str = Field(default="web_seeded_section", description="template used for web-seeded specs")
    seed_min_score: float = Field(default=3.0, description="edu_score a page needs to seed a prompt")
    seed_extract_chars: int = Field(default=1500, ge=200, description="length of the extract put in the prompt")
    seed_shortfall: Literal["topics", "skip"] = Field(
        default="topics",
        description="when fewer pages qualify as seeds than the web-seeded share of n asks for: topics: topic "
        "prompts fill the gap (n specs in all); skip: the plan is that many specs short. Either way the dry run and "
        "the stats (web_seeds.shortfall) say how many were asked, made, and why not")

    @field_validator("token_counter")
    @classmethod
    def _counter(cls, v: str) -> str:
        if v not in ("tokenizer", "whitespace"):
            raise ValueError("must be 'tokenizer' or 'whitespace'")
        return v

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one audience is needed")
        if len(set(v)) != len(v):
            raise ValueError("audiences must be distinct")
        return v
