"""`generate:` section (owned by the generate issue)."""

from __future__ import annotations

from pipeline.config.core import StageSection


class GenerateSection(StageSection):
    n: int = 32
