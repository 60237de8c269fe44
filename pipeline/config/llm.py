"""`llm:` and `budget:` sections (owned by the generate issue; placeholder fields to be extended)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.core import StrictModel


class LLMSection(StrictModel):
    provider: str = Field(default="openai", description="openai (any OpenAI-compatible endpoint) or local")
    base_url: str | None = None
    model: str = "HuggingFaceTB/SmolLM2-360M-Instruct"
    api_key_env: str = "OPENAI_API_KEY"


class BudgetSection(StrictModel):
    max_usd: float | None = None
    max_tokens: int | None = None
