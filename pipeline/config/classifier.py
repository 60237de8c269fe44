"""`classifier:` section: which model scores documents, and how to annotate, train and evaluate one.

The run's web stage reads `model`, `max_chars`, `batch_size`, `threshold`/`keep_top`. The `classifier`
commands (`textbook classifier annotate|train|evaluate|score`) read the `annotate:` and `train:` blocks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.core import StrictModel


class LabelSource(StrictModel):
    """One file/directory/data set of labelled (or fixed-label) documents."""

    path: str = Field(description="parquet/jsonl(.gz)/csv/json file or directory, or `hf:NAME[:split]` (needs network)")
    format: Literal["auto", "parquet", "jsonl", "csv", "json", "text"] = Field(
        default="auto", description="auto from the extension; `text`: every file under a directory is one document"
    )
    glob: str = Field(default="**/*", description="format text: which files under the directory")
    name: str | None = Field(default=None, description="label in metrics and the model card (default: file name)")
    text_column: str = Field(default="text", description="column with the document text")
    score_column: str | None = Field(default="score", description="column with the annotator's score")
    target_column: str | None = Field(
        default=None, description="fit on this column instead (e.g. the mean of several annotators' labels when "
        "score_column is their rounded majority); metrics and calibration still use score_column",
    )
    id_column: str | None = Field(
        default=None, description="column identifying a document (repeated annotations share it); default: text hash"
    )
    label: float | None = Field(
        default=None, description="fixed score for every row (DCLM-style positives/negatives); overrides score_column"
    )
    label_map: dict[str, float] | None = Field(
        default=None, description="map string labels to scores, e.g. {None: 0, Minimal: 1, ...}"
    )
    where: dict[str, Any] | None = Field(
        default=None, description="keep only rows whose columns equal these values, e.g. {score: 0}"
    )
    limit: int | None = Field(default=None, ge=1, description="at most this many documents (deterministic sample)")
    chunk_chars: int | None = Field(
        default=None, ge=200, description="split long documents into paragraph-aligned chunks of about this size"
    )
    markup: Literal["none", "rst"] = Field(default="none", description="strip reST roles/directives before use")
    train_only: bool = Field(
        default=False,
        description="extra training signal only (weak labels, another annotator, a skewed sample): fitted on, "
        "never used to measure the model or to calibrate its scores; a document also in a measured source is "
        "dropped from this one",
    )


class HoldoutRule(StrictModel):
    """Documents whose text hashes to `remainder` modulo `modulo` are never fitted on, only measured.

    Hash: `int(sha256(text)[:8], 16)` over the UTF-8 document text as read (the rule `../shared/data` uses for
    its own hidden splits), so the held-out documents are the same in every run, on every machine, for every
    model trained on the same files."""

    modulo: int = Field(default=5, ge=2, description="number of hash buckets")
    remainder: int = Field(default=1, ge=0, description="the bucket held out (0 <= remainder < modulo)")

    @model_validator(mode="after")
    def _bucket(self) -> HoldoutRule:
        if self.remainder >= self.modulo:
            raise ValueError(f"holdout.remainder must be below modulo ({self.modulo}), got {self.remainder}")
        return self


class TrainSection(StrictModel):
    name: str = Field(default="edu-en", description="model name; written to <out_dir>/<name>/")
    out_dir: str = Field(default="classifiers", description="parent directory of the model directory")
    sources: list[LabelSource] = Field(
        default_factory=list, description="labelled documents: cross-validated, then all fitted on (but the holdout)"
    )
    eval_sets: list[LabelSource] = Field(
        default_factory=list, description="extra evaluation-only sets (documents the model was fitted on are excluded)"
    )
    backend: Literal["fasttext", "sklearn"] = Field(default="fasttext")
    mode: Literal["expected", "binary", "regression"] = Field(
        default="expected",
        description="expected: multi-class, score = expectation over label probabilities; binary: score >= "
        "threshold vs not, score = score_max * P(positive); regression: sklearn ridge",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="backend hyperparameters (fasttext: lr, epoch, wordNgrams, dim, minCount, bucket, quantize, "
        "cutoff; sklearn: features tfidf|hashing, head logistic|ridge, ngram_max, max_features, C, alpha, "
        "char_ngrams [lo, hi] (adds character n-grams inside words), char_max_features)",
    )
    score_min: float = Field(default=0, description="lowest valid score of the rubric")
    score_max: float = Field(default=5, description="highest valid score of the rubric")
    threshold: float = Field(default=3, description="binary cut-off on the rubric scale (score >= threshold)")
    keep_top: float | None = Field(
        default=None, gt=0, le=1, description="calibrate the cut-off keeping this fraction and record it as default"
    )
    calibration: list[LabelSource] = Field(
        default_factory=list,
        description="documents representative of what will be scored (labels not needed) for keep-top cut-offs; "
        "default: the cross-validated scores of the labelled documents (and the holdout's). Documents the model "
        "was fitted on are excluded",
    )
    max_chars: int = Field(default=4000, ge=0, description="score only this prefix (0: whole document)")
    lowercase: bool = Field(default=True, description="lower-case text before features")
    cv_folds: int = Field(
        default=5, ge=2, le=20,
        description="k-fold cross-validation over the labelled documents (folds by hash of the document id): "
        "every document is scored by a model that did not see it; those scores measure the model and fit its "
        "score calibration, then the shipped model is refit on all of them",
    )
    holdout: HoldoutRule | None = Field(
        default=None, description="documents never fitted on (not even by the final refit), measured as `holdout`"
    )
    calibrate: Literal["label_share", "none"] = Field(
        default="label_share",
        description="label_share: a monotone map of the model's raw scores onto the rubric scale such that, on "
        "the cross-validated scores, score >= t keeps the share of documents the labels put at >= t (for each "
        "integer t and the threshold); none: raw backend scores (expected value, score_max x P, or regression)",
    )
    strict: bool = Field(
        default=False, description="bad rows (non-numeric or out-of-range scores) are an error instead of counted"
    )
    rubric: str | None = Field(default=None, description="rubric file the labels came from (for the model card)")
    annotator: str | None = Field(default=None, description="who labelled the data (for the model card)")
    language: str = Field(default="en", description="language of the training data (for the model card)")
    description: str = Field(default="", description="a paragraph for the model card: data, intended use, caveats")
    limits: str = Field(default="", description="a paragraph for the model card's limits: known biases, ceilings")


class AnnotateSection(StrictModel):
    inputs: list[str] = Field(default_factory=list, description="documents to sample (jsonl/parquet files or dirs)")
    text_column: str = Field(default="text")
    id_column: str = Field(default="id")
    sample: int | None = Field(default=1000, ge=1, description="documents to annotate (deterministic sample); None: all")
    rubric: str = Field(default="prompts/rubrics/edu_additive_v1.md", description="rubric prompt file ({text} slot)")
    max_chars: int = Field(default=6000, ge=100, description="document prefix shown to the annotator")
    repeats: int = Field(default=1, ge=1, description="annotations per document (agreement ceiling)")
    score_pattern: str = Field(
        default=r"Educational score:\s*\**\s*(\d+(?:\.\d+)?)",
        description="regex whose group 1 is the score, searched on the answer's final non-blank line only (a "
        "score the page itself states is text, not the answer); no match there or several different values = failed",
    )
    score_min: float = Field(default=0, description="lowest valid score")
    score_max: float = Field(default=5, description="highest valid score")
    out: str = Field(default="annotations/edu.parquet", description="output parquet (id, text, score, ...)")


class ClassifierSection(StrictModel):
    model: str = Field(default="classifiers/edu-en", description="model directory used for scoring")
    max_chars: int | None = Field(
        default=None, ge=0, description="score only this prefix of each document (default: the model's own)"
    )
    batch_size: int = Field(default=512, ge=1, description="documents scored per call")
    threshold: float | None = Field(
        default=None, description="keep documents with edu_score >= threshold (default: the model's threshold)"
    )
    keep_top: float | None = Field(
        default=None, gt=0, le=1, description="keep this fraction instead, using the cut-off calibrated with the model"
    )
    annotate: AnnotateSection = Field(default_factory=AnnotateSection)
    train: TrainSection = Field(default_factory=TrainSection)
