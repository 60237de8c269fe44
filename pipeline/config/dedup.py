"""`dedup:`, `decontaminate:` and `shard:` sections (owned by the dedup/decontamination/shard issue)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.core import StageSection, StrictModel


class DedupSection(StageSection):
    exact: bool = Field(default=True, description="remove exact duplicates (text equal after folding case, "
                                                  "punctuation and whitespace)")
    near: bool = Field(default=True, description="remove near-duplicates with MinHash-LSH")
    # Defaults chosen on real data (benchmarks/results/dedup_curve.md, issue 13): on two documentation sites
    # (natural non-duplicates sharing boilerplate) they remove no page that is a copy of nothing, keep the
    # chain.jsonl documents apart, and find GSM8K test/test_socratic pairs and planted near-copies; a lower
    # threshold finds more copies but starts removing template-sharing pages of one site.
    shingle_size: int = Field(default=2, ge=1, le=32, description="words per shingle")
    num_perm: int = Field(default=112, ge=8, le=1024, description="MinHash permutations (signature length)")
    bands: int = Field(default=22, ge=1, description="LSH bands; bands * rows <= num_perm")
    rows: int = Field(default=5, ge=1, description="signature values per band")
    verify_threshold: float | None = Field(
        default=0.8, ge=0.0, le=1.0,
        description="estimated Jaccard (from the whole signature) a document needs with a kept document to be "
                    "removed as its near-duplicate; null accepts every band collision (datatrove's behaviour)")
    seed: int = Field(default=1, description="seed of the MinHash functions; an index is only reusable with the same")
    source_priority: list[str] = Field(
        default_factory=lambda: ["synthetic", "web"],
        description="which copy survives when edu_score ties: earlier sources win; unlisted sources come after, by name")
    index_in: list[str] = Field(
        default_factory=list,
        description="dedup indexes of earlier runs (<run>/stages/dedup/index): their documents were already "
                    "emitted, so new copies of them are removed")
    keep_index: bool = Field(default=True, description="write this run's index (kept documents + index_in) to "
                                                       "<run>/stages/dedup/index for later runs")
    batch_size: int = Field(default=512, ge=1, description="documents hashed per batch")
    workers: int = Field(default=1, ge=1, description="processes computing signatures")
    sample_pairs: int = Field(default=20, ge=0, description="removed/kept pairs recorded in stats for inspection")

    @model_validator(mode="after")
    def _bands_fit(self) -> DedupSection:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


class BenchmarkFile(StrictModel):
    name: str = Field(description="benchmark name used in reports; an adapter name (gsm8k, mmlu, ...) picks "
                                  "the fields, any other name needs `fields`")
    path: str = Field(description="local jsonl / json / parquet / csv file or folder")
    fields: list[str] = Field(default_factory=list, description="text fields of a record to index "
                                                                "(default: the adapter's)")


class DecontamSection(StageSection):
    benchmarks: list[str] = Field(
        default_factory=lambda: ["humaneval", "mbpp", "gsm8k", "mmlu", "arc_easy", "arc_challenge", "hellaswag",
                                 "piqa", "winogrande", "openbookqa", "siqa", "boolq", "squad_v2", "bbh"],
        description="benchmarks by adapter name: read from local_dir when a copy is there, else from the "
                    "Hugging Face hub (online)")
    local_dir: str | None = Field(default=None, description="folder with local benchmark copies in their "
                                  "original layouts (e.g. ../shared/data/benchmarks; $TEXTBOOK_BENCHMARKS)")
    files: list[BenchmarkFile] = Field(default_factory=list, description="extra benchmark files to index")
    index: str | None = Field(default=None, description="a prebuilt index directory "
                                                        "(`textbook decontaminate index`); replaces benchmarks/files")
    ngram: int = Field(default=13, ge=3, le=64, description="words per n-gram (after normalisation)")
    min_words: int = Field(default=8, ge=1, description="benchmark texts shorter than `ngram` but at least this "
                                                        "many words are matched whole")
    max_items_per_ngram: int = Field(default=10, ge=1, description="n-grams shared by more benchmark items are "
                                     "template text (instructions, boilerplate) and are not indexed")
    min_matches: int = Field(default=1, ge=1, description="matching n-grams a document needs to count as contaminated")
    mode: Literal["remove", "flag"] = Field(default="remove", description="remove contaminated documents, or keep "
                                            "them with meta.contamination")
    require_all: bool = Field(default=False, description="fail when a listed benchmark cannot be loaded "
                              "(default: go on with the others and list the missing ones in the stats)")
    report_ngrams: int = Field(default=10, ge=0, description="matched n-grams listed per benchmark in the stats")


class ShardSection(StageSection):
    validation_fraction: float = Field(default=0.01, ge=0.0, lt=1.0,
                                       description="share of documents (by id hash) in the validation split")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"synthetic": 2.0, "web": 1.0},
        description="epochs per source in the train split: 2 = every document twice, 0.5 = a deterministic half")
    default_weight: float = Field(default=1.0, ge=0.0, description="weight of sources not listed in weights")
    target_tokens: int | None = Field(default=None, ge=1, description="scale all weights so the train split has "
                                      "about this many tokens (tokenizes first, then samples)")
    seed: int | None = Field(default=None, description="shuffle and sampling seed (default: run.seed)")
    max_chars: int = Field(default=2_000_000, ge=1, description="longer documents are dropped (too_long)")
    shard_mb: int = Field(default=256, ge=1, description="target size of one shard file (MB, in memory)")
    shuffle_buffer_mb: int = Field(default=512, ge=1, description="memory for the global shuffle: the stage "
                                   "spills to this many MB per bucket and shuffles one bucket at a time")
    out: str | None = Field(default=None, description="shard directory (default: run.out)")

    @model_validator(mode="after")
    def _weights_positive(self) -> ShardSection:
        bad = {k: v for k, v in self.weights.items() if v < 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        return self
