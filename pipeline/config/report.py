"""`report:` section (owned by the end-to-end issue)."""

from __future__ import annotations

from pipeline.config.core import StrictModel


class ReportSection(StrictModel):
    enabled: bool = True
