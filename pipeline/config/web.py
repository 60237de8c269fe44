"""`web:` section (owned by the web issue)."""

from __future__ import annotations

from pipeline.config.core import StageSection


class WebSection(StageSection):
    pass
