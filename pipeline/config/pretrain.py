"""`pretrain:` section of a run config, and the standalone pretrain YAML (`textbook pretrain CONFIG`).

One pydantic model serves both: a run config's `pretrain:` section and a pretrain YAML file hold the same
fields. `preset` names a file in `configs/pretrain/` (or a YAML path) whose values fill in every key the user
did not set; `resolve_pretrain()` does the merge. Model dimensions live under `model:`, the data under `data:`,
the optimisation under `train:`, evaluation under `eval:`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pipeline.config.core import StrictModel
from pipeline.errors import ConfigError
from pipeline.paths import repo_path

PRESET_DIR = repo_path("configs", "pretrain")


class ModelSection(StrictModel):
    """A Llama-style decoder (RoPE, RMSNorm, SwiGLU, no biases)."""

    vocab_size: int | None = Field(
        default=None, ge=2,
        description="embedding rows; default: the shards' tokenizer vocab rounded up to a multiple of 64",
    )
    dim: int = Field(default=64, ge=8, description="hidden size")
    n_layers: int = Field(default=2, ge=1, description="transformer blocks")
    n_heads: int = Field(default=4, ge=1, description="attention heads (dim must divide by it)")
    n_kv_heads: int | None = Field(default=None, ge=1, description="key/value heads (GQA); default n_heads")
    ffn_dim: int | None = Field(default=None, ge=1, description="SwiGLU hidden size; default 8/3*dim rounded to 64")
    max_seq_len: int = Field(default=256, ge=8, description="context length (tokens per training sequence)")
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    tie_embeddings: bool = Field(default=True, description="share the input embedding and the output head")
    init_std: float = Field(default=0.02, gt=0)


EVAL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "mmlu", "mmlu_cloze", "piqa")  # pipeline/train/benchmarks.py


class EvalSetSection(StrictModel):
    """One evaluation set: bits per byte on text (a shard directory, or jsonl/parquet documents read
    directly), or a multiple-choice benchmark (`task:`) scored by log-likelihood (pipeline/train/evals.py).

    Kinds: `task` set -> multiple choice, `path` optional (a benchmark file or folder; default the benchmarks
    folder, $TEXTBOOK_BENCHMARKS or ../shared/data/benchmarks); else `path` a directory with manifest.json ->
    shard set (its `split`); else `path` document files or a folder of them (.jsonl, .json, .parquet, .gz/.zst).
    """

    name: str = Field(default="", description="label in logs and tables, e.g. heldout-edu; default the task")
    path: str | None = Field(
        default=None,
        description="a shard directory (with manifest.json), jsonl/parquet documents (file or folder), or, "
        "with task:, a benchmark file or folder")
    split: str = Field(default="validation", description="shard sets: which split to evaluate on")
    text_field: str = Field(default="text", description="document sets: the field holding the text")
    tokens: int | None = Field(default=None, ge=64, description="text sets: tokens evaluated; default eval.tokens")
    task: Literal[EVAL_TASKS] | None = Field(  # type: ignore[valid-type]
        default=None, description="multiple-choice benchmark: " + ", ".join(EVAL_TASKS))
    items: int | None = Field(default=None, ge=1, description="task sets: items scored; default eval.items")

    @model_validator(mode="after")
    def _kind(self) -> EvalSetSection:
        if self.task is None and not self.path:
            raise ValueError("an eval set needs a path (shards or documents) or a task (multiple choice)")
        if self.task is None and self.items is not None:
            raise ValueError(f"eval set {self.name or self.path}: items: applies to task sets only")
        if self.task is not None and self.tokens is not None:
            raise ValueError(f"eval set {self.name or self.task}: tokens: applies to text sets only (use items:)")
        if not self.name:
            self.name = self.task or Path(str(self.path)).name.split(".")[0]
        return self


class DataSection(StrictModel):
    shards: list[str] = Field(
        default_factory=list,
        description="shard directories to train on; empty in a run: the run's own shards (run.out)",
    )
    split: str = Field(default="train", description="split trained on")
    source_weights: dict[str, float] = Field(
        default_factory=dict,
        description="per-source sampling weight (e.g. {web: 0.5, synthetic: 2}): documents of a source are "
        "kept with probability w<1 or repeated w times; sources not listed have weight 1",
    )
    prefetch: int = Field(default=2, ge=0, description="batches prepared ahead by a background thread (0: none)")


class TrainSection(StrictModel):
    max_steps: int = Field(default=200, ge=1, description="optimizer steps")
    batch_size: int = Field(default=8, ge=1, description="sequences per micro-batch per device")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    seq_len: int | None = Field(default=None, ge=8, description="training sequence length; default model.max_seq_len")
    lr: float = Field(default=3e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="final lr as a fraction of the peak")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        default="cosine", description="warmup then cosine decay, or warmup-stable-decay, or constant after warmup")
    warmup_steps: int = Field(default=20, ge=0)
    warmup_fraction: float | None = Field(
        default=None, ge=0, le=1,
        description="warm-up as a share of max_steps (rounded); wins over warmup_steps when set, so the warm-up "
        "scales with the budget (textbook ablate sets it from the preset's own share)")
    decay_fraction: float = Field(default=0.2, gt=0, le=1, description="WSD: share of steps in the final decay")
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0, description="max global grad norm (0: off)")
    seed: int = 0
    threads: int | None = Field(
        default=None, ge=1,
        description="torch CPU threads for this process; default $OMP_NUM_THREADS, else the CPUs this process may "
        "run on (os.sched_getaffinity). On a CPU shared with other jobs, fewer threads can be faster")
    device: str = Field(default="auto", description="auto (cuda if present, else cpu), cpu, cuda, cuda:1, mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="autocast dtype; auto: bfloat16 on a GPU that supports it, else float32")
    compile: bool = Field(default=False, description="torch.compile the model (GPU; minutes of warm-up)")
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=100, ge=1, description="steps between periodic checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1, description="periodic checkpoints kept (the final one always)")
    peak_flops: float | None = Field(
        default=None, gt=0, description="device peak FLOP/s for MFU; default: the table in trainer.py (GPU only)")


class EvalSection(StrictModel):
    every: int = Field(default=100, ge=1, description="steps between evaluations (and at the end)")
    tokens: int = Field(default=65536, ge=64, description="tokens evaluated per text evaluation set")
    items: int = Field(default=300, ge=1, description="items scored per multiple-choice set (task:), chosen "
                       "deterministically (pipeline/train/benchmarks.py)")
    batch_size: int | None = Field(default=None, ge=1, description="default train.batch_size")
    sets: list[EvalSetSection] = Field(
        default_factory=list,
        description="extra evaluation sets: shard sets, jsonl/parquet documents (e.g. a held-out educational "
        "set shared by ablation arms) and multiple-choice benchmarks ({task: arc_easy})")
    own_validation: bool = Field(default=True, description="also evaluate on the training shards' validation split")
    initial: bool = Field(
        default=False, description="also evaluate before the first step (step 0, the untrained model): "
        "learning curves that start at 0 tokens (textbook ablate turns it on)")


class GrowSection(StrictModel):
    init_from: str | None = Field(default=None, description="checkpoint of a smaller model to grow from")
    depth: Literal["stack", "identity"] = Field(
        default="stack",
        description="new layers: copies of the old ones (stack) or copies with zeroed output projections "
        "(identity: the grown model computes the same function)")


class PretrainSection(StrictModel):
    preset: str | None = Field(
        default="tiny",
        description="configs/pretrain/<preset>.yaml (or a YAML path) supplying every key not set here")
    out: str | None = Field(
        default=None, description="checkpoints and logs; default: stages/pretrain/ of the run, or runs/pretrain")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    grow: GrowSection = Field(default_factory=GrowSection)

    @property
    def inputs(self) -> list[str]:
        """For `textbook run`: named shard directories stand in for the shard stage (and are hashed);
        empty means the run's own shards, made by its shard stage."""
        return list(self.data.shards)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(preset: str) -> Path:
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = PRESET_DIR / f"{preset}.yaml"
    if cand.is_file():
        return cand
    known = ", ".join(sorted(f.stem for f in PRESET_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(f"pretrain.preset: unknown preset '{preset}' (presets: {known}; or give a YAML path)")


def resolve_pretrain(section: PretrainSection) -> PretrainSection:
    """The section with its preset chain applied: keys the user set win over the preset's values."""
    from pipeline.config import _format_error, read_yaml_mapping  # pipeline.config imports this module

    data = section.model_dump(mode="json", exclude_unset=True)
    preset, seen = section.preset, set()
    while preset:
        path = preset_path(preset)
        if path.resolve() in seen:
            raise ConfigError(f"{path}: preset cycle")
        seen.add(path.resolve())
        loaded = read_yaml_mapping(path, str(path))
        data = _deep_merge(loaded, data)
        preset = loaded.get("preset")
    data["preset"] = None
    try:
        return PretrainSection.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, f"pretrain (preset {section.preset})")) from None


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainSection:
    """A standalone pretrain YAML (the fields of PretrainSection at top level) with `--set` overrides.

    Overrides are relative to the section: `--set train.max_steps=500 --set model.dim=128`.
    """
    from pipeline.config import load_yaml_model

    return load_yaml_model(PretrainSection, path, overrides)
