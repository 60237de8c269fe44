"""`llm:` and `budget:` sections: how to reach the model, how hard to push it, and what we may spend.

Only fields that change *what* is asked (model, api, sampling params, n) enter a request's ledger key;
everything else (concurrency, workers, limits, retries, ledger path) can change between runs and the ledger
is reused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config.core import StrictModel


class LLMSection(StrictModel):
    provider: Literal["openai", "local"] = Field(
        default="openai",
        description="openai: any OpenAI-compatible endpoint at base_url; local: start a server on a free loopback "
        "port for the run: llama.cpp's for a GGUF model, `transformers serve` for a Hugging Face model",
    )
    base_url: str | None = Field(
        default=None, description="endpoint, e.g. http://host:8000/v1; default $OPENAI_BASE_URL, then OpenAI's"
    )
    model: str = Field(
        default="HuggingFaceTB/SmolLM2-360M-Instruct",
        description="model name sent to the endpoint (provider local: a GGUF file path, the file name of a GGUF "
        "shipped in an installed package such as SmolLM2-135M-Instruct.Q4_1.gguf, a hub name or a local model "
        "directory)",
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="name of the environment variable holding the API key (the key itself never goes in config)",
    )
    api: Literal["chat", "completions"] = Field(
        default="chat", description="chat: /v1/chat/completions with messages; completions: /v1/completions"
    )
    temperature: float = Field(default=0.8, ge=0, le=2, description="sampling temperature")
    top_p: float = Field(default=0.95, gt=0, le=1, description="nucleus sampling")
    max_tokens: int = Field(default=1024, ge=1, description="completion length cap per request")
    seed: int | None = Field(
        default=0, description="sampling seed; request i of a prompt sends seed + sample_index (None: not sent)"
    )
    n: int = Field(default=1, ge=1, description="samples per prompt (n requests with sample_index 0..n-1)")
    concurrency: int = Field(default=64, ge=1, description="requests in flight at once, across all workers")
    workers: int = Field(
        default=1,
        ge=0,
        description="Ray worker actors (asyncio, each keeps concurrency/workers requests in flight); "
        "0 runs the same worker in the driver process without Ray",
    )
    requests_per_minute: int | None = Field(default=None, ge=1, description="shared limit over all workers")
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="shared limit over all workers (prompt estimate + max_tokens, settled on usage)"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="per-attempt HTTP timeout")
    max_retries: int = Field(default=6, ge=0, description="retries after the first attempt (429/5xx/timeouts/drops)")
    backoff_base_s: float = Field(default=0.5, ge=0, description="first backoff; doubles per retry, full jitter")
    backoff_max_s: float = Field(default=30.0, ge=0, description="backoff ceiling (Retry-After may ask for more)")
    cooldown_429_share: float = Field(
        default=0.5, gt=0, le=1,
        description="when this share of a worker's last 20 responses were 429s the endpoint is saturated: the "
        "worker holds all new requests (Retry-After, else cooldown_s); a lone 429 only delays its own request",
    )
    cooldown_s: float = Field(
        default=1.0, ge=0, description="cool-down length when a saturating 429 carries no Retry-After"
    )
    max_wait_s: float = Field(
        default=120.0, gt=0,
        description="ceiling on any single server-directed wait (Retry-After, x-ratelimit-reset-*, ...; 120 s as "
        "the openai SDK): a request asked to wait longer fails with a reason naming the header, and the run stops "
        "dispatching (skipped `server_wait`); a re-run sends what was not answered",
    )
    content_filter_retries: int = Field(
        default=0, ge=0,
        description="extra answers a request may get after an unusable one (finish_reason content_filter, null "
        "content, refusal, no choices); each is billed. Counted across runs in the ledger: a request that used them "
        "up is answered from the ledger as failed, not paid for again; raise this to ask again",
    )
    mode: Literal["online", "batch"] = Field(
        default="online",
        description="online: requests in flight at once (concurrency); batch: the OpenAI-style batch API "
        "(/v1/files + /v1/batches, answers within the completion window at the batch price)",
    )
    batch_max_requests: int = Field(
        default=50_000, ge=1, description="batch mode: requests per batch (OpenAI's limit: 50,000)"
    )
    batch_max_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1024, description="batch mode: bytes per input file (OpenAI's limit: 200 MB)"
    )
    batch_poll_s: float = Field(
        default=30.0, gt=0, description="batch mode: seconds between status polls of a batch in flight"
    )
    batch_completion_window: str = Field(default="24h", description="batch mode: the batch's completion window")
    ray_address: str | None = Field(
        default=None, description="join a Ray cluster (default $RAY_ADDRESS, else a local Ray on this machine)"
    )
    ledger: str | None = Field(
        default=None,
        description="SQLite request ledger (cache + resume); default <cache_dir>/ledger/llm.sqlite, shared by runs",
    )
    local_port: int | None = Field(default=None, ge=1, le=65535, description="provider local: port (default free)")
    local_device: str = Field(default="auto", description="provider local: device for `transformers serve`")
    local_threads: int | None = Field(
        default=None, ge=1, description="provider local, GGUF: llama.cpp threads (default: 1 for a GGUF file under 1 GiB, else the CPUs this process may use)"
    )
    local_ctx: int = Field(
        default=2048, ge=256, description="provider local, GGUF: llama.cpp context (prompt + completion tokens)"
    )
    local_startup_timeout_s: float = Field(
        default=600.0, gt=0, description="provider local: seconds to wait for the server to become healthy"
    )
    send_generation_config: bool | None = Field(
        default=None,
        description="also send the sampling settings as `generation_config` (a JSON string: do_sample, temperature, "
        "top_p) in each request body, which `transformers serve` needs: it decodes greedily unless the model's own "
        "generation config samples, whatever `temperature` says. None: yes exactly when provider local serves a "
        "Hugging Face model (the server started is `transformers serve`); set true for a `transformers serve` you "
        "started yourself (base_url). It enters the ledger key, so greedy answers of earlier runs are not reused",
    )

    def resolved_base_url(self) -> str | None:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None

    def resolved_ray_address(self) -> str | None:
        return self.ray_address or os.environ.get("RAY_ADDRESS") or None

    def ledger_path(self) -> Path:
        if self.ledger:
            return Path(self.ledger).expanduser()
        from pipeline.paths import cache_dir

        return cache_dir() / "ledger" / "llm.sqlite"

    def local_backend(self) -> str | None:
        """The server `provider: local` starts for `model`: "llama.cpp" for a GGUF model (`is_gguf_model`),
        "transformers serve" otherwise; None when no server is started (another provider, or a base_url)."""
        if self.provider != "local" or self.resolved_base_url():
            return None
        return "llama.cpp" if is_gguf_model(self.model) else "transformers serve"

    def sends_generation_config(self) -> bool:
        """Whether requests carry `generation_config` (`send_generation_config`, None: a `transformers serve`
        started for the run)."""
        if self.send_generation_config is not None:
            return self.send_generation_config
        return self.local_backend() == "transformers serve"

    def missing_chat_template(self) -> bool:
        """True when `api` is chat but the server started for the run is `transformers serve` on a local model
        directory without a chat template (a base model, or one we exported before export-hf wrote a template):
        its chat endpoint then fails every request with HTTP 500."""
        if self.api != "chat" or self.local_backend() != "transformers serve":
            return False
        return not has_chat_template(Path(self.model).expanduser())

    def request_api(self) -> str:
        """The API requests are built for: `api`, or "completions" with a plain-text prompt (the system text in
        front; `LLMRequest.for_api`) when the model has no chat template (`missing_chat_template`)."""
        return "completions" if self.missing_chat_template() else self.api

    def api_note(self) -> str | None:
        """What to tell the user when `request_api` differs from `api`."""
        if not self.missing_chat_template():
            return None
        return (f"llm.model {self.model} has no chat template (tokenizer_config.json / chat_template.jinja): "
                "requests go to the completions API with plain-text prompts (the system prompt in front) instead "
                "of the chat API, whose every request would fail (HTTP 500). Set llm.api: completions to say so "
                "yourself, or give the model a chat template")

    def sampling_params(self) -> dict:
        """The request parameters that enter the ledger key (see `LLMRequest.key`). `do_sample` is there only
        for servers that need it spelled out (`sends_generation_config`); `client.request_body` sends it inside
        the `generation_config` field, not as a top-level field (which `transformers serve` rejects, HTTP 422)."""
        params: dict = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.seed is not None:
            params["seed"] = self.seed
        if self.sends_generation_config():
            params["do_sample"] = self.temperature > 0
        return params


def has_chat_template(model_dir: Path) -> bool:
    """A Hugging Face model directory carries a chat template (`chat_template.jinja`, as transformers 5 saves it;
    `chat_template.json`; or the `chat_template` key of tokenizer_config.json). A path that is not a directory
    (a hub name) is taken to have one: it cannot be checked without loading it."""
    if not model_dir.is_dir():
        return True
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    cfg = model_dir / "tokenizer_config.json"
    if not cfg.is_file():
        return False
    import json

    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return True  # unreadable: let the server say what is wrong


def is_gguf_model(model: str) -> bool:
    """`llm.model` names a GGUF model (served by llama.cpp): a `.gguf` file path or bare file name, or a
    directory holding `.gguf` files and no `config.json` (a Hugging Face model directory has one).
    `pipeline.llm.server.resolve_gguf` finds the file, or says why it cannot."""
    if model.endswith(".gguf"):
        return True
    p = Path(model).expanduser()
    return p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf"))


class BudgetSection(StrictModel):
    price_input_per_1m: float = Field(default=0.0, ge=0, description="USD per 1M prompt tokens")
    price_output_per_1m: float = Field(default=0.0, ge=0, description="USD per 1M completion tokens")
    max_usd: float | None = Field(
        default=None, gt=0,
        description="cap on what one run spends, USD (a re-run may spend it again): no request goes out unless its "
                    "worst case fits; overshoot bounded by the requests in flight (README, 'Waits, money')",
    )
    max_tokens: int | None = Field(
        default=None, gt=0, description="cap on the prompt + completion tokens one run is billed (a re-run may again)"
    )
    batch_discount: float = Field(
        default=0.5, ge=0, lt=1,
        description="share taken off both prices for llm.mode: batch (OpenAI and most batch APIs: 0.5, half price)",
    )

    def cost(self, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        """USD for that many tokens at the configured prices per 1M; `batch=True` applies `batch_discount`."""
        usd = (prompt_tokens * self.price_input_per_1m + completion_tokens * self.price_output_per_1m) / 1e6
        return usd * (1 - self.batch_discount) if batch else usd
