"""Config building blocks shared by every section: strict models and the run/tokenizer sections."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageSection(StrictModel):
    """Fields every stage section has: run standalone on files a user names instead of the previous stage."""

    inputs: list[str] = Field(
        default_factory=list,
        description="jsonl/parquet files or directories with `id` and `text`; overrides the previous stage's output",
    )


class RunSection(StrictModel):
    name: str = "run"
    out: str | None = Field(default=None, description="output directory or fsspec URL (s3://...: outputs and "
                             "markers there, see pipeline.scale.rundir); default shards/<name>")
    stages: list[str] = Field(default_factory=lambda: ["generate", "web", "dedup", "decontaminate", "shard"])
    seed: int = 0
    executor: Literal["local", "ray", "inline"] = Field(
        default="local", description="dedup, decontaminate and shard: local = one process (the default); ray = "
        "Ray tasks (pipeline.scale), same outputs; inline = those tasks one by one in this process (one worker)")
    ray_address: str | None = Field(default=None, description="executor ray: join this cluster (else $RAY_ADDRESS, "
                                    "else a local Ray with run.workers CPUs); the run directory must be shared")
    workers: int | None = Field(default=None, ge=1, description="executor ray: CPUs of a Ray started here "
                                "(default: all); dedup/decontaminate/shard tasks run this many at once")
    task_retries: int = Field(default=3, ge=0, description="executor ray: re-runs of a task whose worker or "
                              "node died")

    @property
    def out_dir(self) -> str:
        return self.out or f"shards/{self.name}"


class TokenizerSection(StrictModel):
    path: str | None = Field(
        default=None,
        description="a tokenizer.json path or a Hugging Face tokenizer name; default: the committed textbook BPE",
    )
    batch_size: int = Field(default=256, ge=1)
    workers: int = Field(default=2, ge=1, description="threads used by the tokenizer")
