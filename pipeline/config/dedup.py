"""`dedup:`, `decontaminate:` and `shard:` sections (owned by the dedup/decontamination/shard issue)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.core import StageSection


class DedupSection(StageSection):
    pass


class DecontamSection(StageSection):
    pass


class ShardSection(StageSection):
    validation_fraction: float = Field(default=0.01, ge=0.0, lt=1.0)
