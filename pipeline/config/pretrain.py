"""`pretrain:` section of a run config (owned by the pretraining issue)."""

from __future__ import annotations

from pipeline.config.core import StrictModel


class PretrainSection(StrictModel):
    preset: str = "tiny"
