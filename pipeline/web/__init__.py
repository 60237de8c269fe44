"""The web stage: read WARC/WET, jsonl, parquet, HTML folders or a Hugging Face dataset; extract main text with
trafilatura; filter (URL, length, language, Gopher, C4, FineWeb); score educational value; keep the rest.

Built as a datatrove pipeline (`pipeline.web.stage.build_pipeline`) run by datatrove's local or Ray executor.
Every input record ends in exactly one state, counted per input file: kept, dropped by a named filter, or
errored (with file and offset). See `pipeline.web.fates`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.run import StageContext
    from pipeline.stats import StageStats


def run_stage(ctx: StageContext) -> StageStats:
    from pipeline.web.stage import run_stage as _run

    return _run(ctx)
