"""`run_requests`: send every request once, keep `concurrency` in flight, record each result in the ledger."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.llm.types import LLMRequest, LLMResult, RunSummary


def run_requests(
    requests: Iterable[LLMRequest],
    llm: LLMSection,
    budget: BudgetSection,
    ledger_path: Path,
    *,
    should_send: Callable[[LLMRequest], str | None] | None = None,
    on_result: Callable[[LLMResult], None] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run every request (ledger hits are returned without a call); `on_result` gets exactly one result each."""
    raise NotImplementedError("being written")


def estimate(requests: Iterable[LLMRequest], llm: LLMSection, budget: BudgetSection) -> dict:
    """For --dry-run: n requests, estimated tokens, cost and time at the configured concurrency."""
    raise NotImplementedError("being written")
