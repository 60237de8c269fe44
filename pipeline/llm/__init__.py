"""Calling an OpenAI-compatible LLM at scale: Ray worker actors, shared rate limits, retries, a request ledger.

Knows nothing of textbooks. Entry points:
- `types.LLMRequest` / `types.LLMResult` / `types.RunSummary`
- `runner.run_requests(requests, llm, budget, ledger_path, should_send=, on_result=)` and `runner.estimate(...)`;
  `llm.mode: batch` runs the same requests through the OpenAI-style batch API (`batch.BatchDriver`)
- `waits.server_wait(headers, status)`: the wait a response asks for, in any rate-limit header form
- `server.LocalServer` (`transformers serve` on a free loopback port) and `testserver.FaultyOpenAIServer`.
Heavy imports (ray, openai) happen inside those modules, not here.
"""

from pipeline.llm.types import LLMRequest, LLMResult, RunSummary

__all__ = ["LLMRequest", "LLMResult", "RunSummary"]
