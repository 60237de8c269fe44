"""`classifier:` section: which model scores documents and how (owned by the classifier issue)."""

from __future__ import annotations

from pipeline.config.core import StrictModel


class ClassifierSection(StrictModel):
    model: str = "classifiers/edu-fasttext"
