"""`rephrase:` section: recycle web pages into textbook-like text by edu-score bucket (the `rephrase` stage).

The policy follows the rephrasing literature: WRAP (Maini et al. 2024, rephrased web in several styles),
Nemotron-CC (Su et al. 2024, rewrite by quality bucket instead of dropping: high-quality pages kept and also
turned into QA/knowledge formats, low-quality ones rewritten Wikipedia-style) and REWIRE (Nguyen et al. 2025,
recycle the pages filters would discard). Buckets, templates, chunking and the fidelity bounds are all here.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pipeline.config.checks import (
    DEFAULT_META_TALK,
    DEFAULT_PLACEHOLDERS,
    DEFAULT_PREAMBLES,
    DEFAULT_REFUSALS,
    RepetitionSettings,
)
from pipeline.config.core import StageSection, StrictModel
from pipeline.config.generate import DiversitySettings


class BucketPolicy(StrictModel):
    """What happens to the pages of one edu-score bucket."""

    name: str = Field(description="bucket name (high, middle, low, ...): in stats, provenance and the report")
    min_score: float | None = Field(description="a page belongs to the first bucket (highest min_score first) "
                                                "whose min_score its edu_score reaches; null: every score (the "
                                                "catch-all bucket, checked last)")
    keep: bool = Field(default=False, description="pass the page on as is (besides any rewrites)")
    templates: list[str] = Field(default_factory=list,
                                 description="rephrasing templates (prompts/rephrase/<name>.j2) applied to each page; "
                                             "empty and keep false: the bucket's pages are dropped (policy_drop_<name>)")
    per_page: int | None = Field(default=None, ge=1,
                                 description="rewrite each page into this many of `templates`, chosen by a hash of "
                                             "the page id (spreads formats, bounds cost); None: all of them")


def _default_buckets() -> list[BucketPolicy]:
    return [
        BucketPolicy(name="high", min_score=3.0, keep=True,
                     templates=["faq", "math_word_problems", "table", "socratic_dialogue"], per_page=2),
        BucketPolicy(name="middle", min_score=2.0, templates=["textbook_section", "tutorial", "wikipedia"],
                     per_page=1),
        BucketPolicy(name="low", min_score=1.0, templates=["recycle"]),
        BucketPolicy(name="junk", min_score=None),
    ]


class FidelityBounds(StrictModel):
    """Bounds a rewrite must stay within to count as a rewrite of its source (each answer against its chunk).

    Unset fields of a per-template override fall back to the template header's `fidelity:`, then to the
    section's `fidelity`."""

    min_overlap: float | None = Field(default=None, ge=0, le=1,
                                      description="share of the answer's distinct content words found in the page "
                                                  "(fidelity_low_overlap)")
    min_length_ratio: float | None = Field(default=None, ge=0,
                                           description="answer words / chunk words at least (fidelity_too_short)")
    max_length_ratio: float | None = Field(default=None, gt=0,
                                           description="answer words / chunk words at most (fidelity_too_long)")
    max_copied_share: float | None = Field(default=None, ge=0, le=1,
                                           description="share of the answer's word 6-grams found in its chunk at "
                                                       "most (fidelity_copied: a copy, not a rewrite)")
    max_invented_entities: int | None = Field(default=None, ge=0,
                                              description="named entities (capitalised names, numbers of 2+ digits) "
                                                          "absent from the page that are tolerated")
    max_invented_share: float | None = Field(default=None, ge=0, le=1,
                                             description="... or this share of the answer's distinct entities, "
                                                         "whichever allows more (fidelity_invented_entities)")


def _default_fidelity() -> FidelityBounds:
    return FidelityBounds(min_overlap=0.5, min_length_ratio=0.25, max_length_ratio=3.0, max_copied_share=0.6,
                          max_invented_entities=2, max_invented_share=0.2)


class RephraseSection(StageSection):
    buckets: list[BucketPolicy] = Field(default_factory=_default_buckets,
                                        description="the policy per edu-score bucket; a page below every "
                                                    "min_score (no catch-all bucket) is dropped (below_buckets)")
    templates_dir: str = Field(default="prompts/rephrase", description="directory of the rephrasing templates")
    audiences: list[str] = Field(default_factory=list,
                                 description="audiences the rewrites are written for, one per rewrite chosen by a "
                                             "hash of page and template; empty: a general adult reader")
    system_prompt: str | None = Field(
        default="You rewrite web text into clear, well-organised educational text. You keep to the facts the text "
                "states and never add names, numbers or claims of your own.",
        description="system message for the chat API (null: none)")
    recycle_below_cutoff: bool = Field(
        default=True,
        description="also read the pages the web stage's edu cut dropped (removed/edu-*, reason below_cutoff): "
                    "they still carry their score, and the low buckets are for them (REWIRE); pages a guard "
                    "stopped are never read")
    # sources: checked before any request
    min_source_words: int = Field(default=60, ge=1, description="pages with fewer words are dropped "
                                                                "(source_too_short)")
    max_chunks: int = Field(default=8, ge=1, description="pages needing more chunks are dropped (source_too_long)")
    context_tokens: int | None = Field(
        default=None, ge=256,
        description="the model's context window (prompt + answer); default llm.local_ctx for provider local, "
                    "else 8192")
    chunk_tokens: int | None = Field(
        default=None, ge=32,
        description="source tokens per chunk (estimated at chars_per_token); default: what fits the context next "
                    "to the template and llm.max_tokens, and at most answer_room x llm.max_tokens so a rewrite "
                    "as long as its chunk is not cut off")
    answer_room: float = Field(default=0.6, gt=0, le=4,
                               description="chunk size as a share of llm.max_tokens (see chunk_tokens)")
    chars_per_token: float = Field(default=3.5, gt=0, description="token estimate for chunking: characters per "
                                                                  "token of the model's tokenizer")
    decontaminate_sources: bool = Field(
        default=False,
        description="check every page against the decontaminate section's benchmark index and drop overlapping "
                    "ones before paying (source_contaminated), and every kept rewrite after "
                    "(rewrite_contaminated); always on when run.stages includes decontaminate")
    source_language_check: bool = Field(
        default=True, description="drop pages not in `language` before paying (source_not_<lang>)")
    # answers: the generate stage's validators, then fidelity
    min_tokens: int = Field(default=50, ge=0, description="joined rewrites shorter than this are dropped (too_short)")
    token_counter: str = Field(default="tokenizer",
                               description="tokenizer (the run's tokenizer) or whitespace (words x 1.3)")
    drop_length_finish: bool = Field(default=True, description="drop answers cut off at max_tokens (length)")
    language: str | None = Field(default="en", description="language of sources and rewrites (fastText lid)")
    min_language_score: float = Field(default=0.5, ge=0, le=1, description="lid confidence needed")
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS),
                                        description="the model refusing or speaking as an AI (refusal; regular "
                                                    "expressions, see pipeline/config/checks.py)")
    preamble_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PREAMBLES),
                                         description="an assistant's opening to the requester (preamble)")
    meta_talk_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_META_TALK),
                                          description="talk about the request or the text itself (meta_talk)")
    placeholder_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PLACEHOLDERS),
                                            description="unfilled text, searched in the prose (placeholder)")
    repetition: RepetitionSettings = Field(default_factory=RepetitionSettings,
                                           description="Gopher's repetition rules on the joined rewrite")
    no_content_marker: str = Field(
        default="NO USABLE CONTENT",
        description="templates ask the model to answer exactly this when a chunk has nothing worth keeping; such "
                    "an answer drops the rewrite (no_usable_content)")
    fidelity: FidelityBounds = Field(default_factory=_default_fidelity)
    fidelity_by_template: dict[str, FidelityBounds] = Field(
        default_factory=dict, description="per-template overrides, e.g. {math_word_problems: {min_overlap: 0.3}}")
    diversity: DiversitySettings = Field(
        default_factory=lambda: DiversitySettings(cell_by=["bucket", "template"]),
        description="diversity guard; cells are bucket x template")
    source_excerpt_chars: int = Field(
        default=600, ge=0,
        description="the source's opening carried in each rewrite's meta (source_excerpt), so a shard row shows "
                    "source and rewrite side by side")

    @field_validator("token_counter")
    @classmethod
    def _counter(cls, v: str) -> str:
        if v not in ("tokenizer", "whitespace"):
            raise ValueError("must be 'tokenizer' or 'whitespace'")
        return v

    @model_validator(mode="after")
    def _buckets_ok(self) -> RephraseSection:
        names = [b.name for b in self.buckets]
        if not names:
            raise ValueError("buckets: at least one bucket is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"buckets: names must be distinct (got {names})")
        if sum(b.min_score is None for b in self.buckets) > 1:
            raise ValueError("buckets: only one catch-all bucket (min_score null) is allowed")
        for b in self.buckets:
            if b.per_page is not None and b.per_page > len(b.templates):
                raise ValueError(f"buckets.{b.name}.per_page={b.per_page} exceeds its {len(b.templates)} templates")
            if len(set(b.templates)) != len(b.templates):
                raise ValueError(f"buckets.{b.name}.templates: a template is listed twice")
        bad = [c for c in self.diversity.cell_by if c not in ("bucket", "template", "audience")]
        if bad:
            raise ValueError(f"diversity.cell_by: unknown field(s) {bad} (bucket, template, audience)")
        return self

    def ordered_buckets(self) -> list[BucketPolicy]:
        """Buckets by min_score, highest first: a page goes to the first one it reaches."""
        return sorted(self.buckets, key=lambda b: float("inf") if b.min_score is None else -b.min_score)

    def bounds_for(self, template: str, header: FidelityBounds | None = None) -> FidelityBounds:
        """The fidelity bounds of `template`: section defaults < template header < fidelity_by_template."""
        merged = self.fidelity.model_dump()
        for layer in (header, self.fidelity_by_template.get(template)):
            if layer is not None:
                merged.update({k: v for k, v in layer.model_dump().items() if v is not None})
        return FidelityBounds(**merged)
