"""Data ablations: the same model trained on several shard sets at an equal token budget, several seeds
each, compared by bits per byte on common evaluation sets (table + plot with the seed spread).

    name: textbook-vs-web
    out: runs/ablations/textbook-vs-web
    tokens: 2000000                 # training tokens per run, equal for every arm
    seeds: [0, 1]
    pretrain: {preset: tiny}        # the pretrain section every run shares (preset + overrides)
    arms:
      - {name: textbooks, shards: [shards/textbooks]}
      - {name: web, shards: [shards/web]}
    eval_sets:                      # the common yardstick: an arm's own validation split proves little
      - {name: heldout-edu, path: shards/heldout, split: validation}

Runs are resumable: a finished run (same config) is not trained again; an interrupted one resumes.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from pipeline.config import config_hash, load_yaml_model
from pipeline.config.core import StrictModel
from pipeline.config.pretrain import EvalSetSection, PretrainSection, resolve_pretrain
from pipeline.errors import ConfigError, TextbookError
from pipeline.io import atomic_write_text


class ArmSection(StrictModel):
    name: str = Field(description="label of this data mixture")
    shards: list[str] = Field(min_length=1, description="shard directories this arm trains on")
    source_weights: dict[str, float] = Field(default_factory=dict, description="per-source weights for this arm")


class AblationConfig(StrictModel):
    name: str = "ablation"
    out: str | None = Field(default=None, description="default runs/ablations/<name>")
    tokens: int = Field(ge=1, description="training tokens per run (the same budget for every arm)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    arms: list[ArmSection] = Field(min_length=2)
    eval_sets: list[EvalSetSection] = Field(min_length=1)

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/ablations/{self.name}")


def load_ablation_config(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    cfg = load_yaml_model(AblationConfig, path, overrides)
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names):  # arm names are directory names under runs/
        raise ConfigError(f"{path}: arms: names must be unique")
    return cfg


def run_config(cfg: AblationConfig, arm: ArmSection, seed: int) -> PretrainSection:
    """One run's pretrain section: the shared one, this arm's data, this seed, the common eval sets, and
    max_steps set so that every run sees `cfg.tokens` training tokens."""
    base = resolve_pretrain(cfg.pretrain)
    t = base.train
    seq = t.seq_len or base.model.max_seq_len
    per_step = t.batch_size * seq * t.grad_accum
    steps = max(1, math.ceil(cfg.tokens / per_step))
    data = base.model_dump(mode="json")
    data["data"].update(shards=list(arm.shards), source_weights=dict(arm.source_weights))
    data["train"].update(seed=seed, max_steps=steps, checkpoint_every=min(t.checkpoint_every, steps))
    data["eval"]["sets"] = [e.model_dump(mode="json") for e in cfg.eval_sets]
    data["eval"]["every"] = min(base.eval.every, steps)
    return PretrainSection.model_validate(data)


def _run(cfg: AblationConfig, arm: ArmSection, seed: int, log: Any) -> tuple[dict[str, Any], Path]:
    from pipeline.train.trainer import train

    section = run_config(cfg, arm, seed)
    out = cfg.out_dir / "runs" / arm.name / f"seed{seed}"
    digest = config_hash(section)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        done = json.loads(summary_path.read_text())
        if done.get("config_hash") == digest and done.get("steps") == section.train.max_steps:
            log(f"[{arm.name} seed {seed}] already trained: {out}")
            return done, out
    log(f"[{arm.name} seed {seed}] {section.train.max_steps} steps -> {out}")
    return train(section, out, resume="auto", log=log), out


def _curves(log_path: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    if not log_path.is_file():
        return curves
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k.startswith("eval/") and k.endswith("/bpb"):
                curves.setdefault(k.split("/")[1], []).append((rec["tokens"], v))
    return curves


def run_ablation(cfg: AblationConfig, log: Any = print) -> dict[str, Any]:
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    runs: list[dict[str, Any]] = []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            summary, run_out = _run(cfg, arm, seed, log)
            runs.append({"arm": arm.name, "seed": seed, "summary": summary,
                         "curves": _curves(run_out / "log.jsonl")})
    results = summarise(cfg, runs)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(cfg, results))
    plot(cfg, runs, out / "ablation.png")
    return results


def summarise(cfg: AblationConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    sets = [e.name for e in cfg.eval_sets] + ["validation"]
    table: dict[str, dict[str, Any]] = {}
    for arm in cfg.arms:
        mine = [r for r in runs if r["arm"] == arm.name]
        row: dict[str, Any] = {"data_epochs": max((r["summary"].get("data_epochs") or 0) for r in mine),
                               "train_tokens_available": mine[0]["summary"].get("train_tokens_available")}
        for s in sets:
            vals = [r["summary"]["evals"].get(f"eval/{s}/bpb") for r in mine]
            vals = [v for v in vals if v is not None]
            if vals:
                row[s] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          "min": min(vals), "max": max(vals), "seeds": vals}
        table[arm.name] = row
    return {"name": cfg.name, "tokens_per_run": cfg.tokens, "seeds": cfg.seeds,
            "eval_sets": [e.name for e in cfg.eval_sets], "arms": table}


def results_markdown(cfg: AblationConfig, results: dict[str, Any]) -> str:
    sets = results["eval_sets"]
    lines = [f"# Ablation {cfg.name}", "",
             f"Bits per byte (lower is better) after {cfg.tokens:,} training tokens per run; mean ± std over "
             f"seeds {', '.join(map(str, cfg.seeds))} (each seed in brackets). `own validation` is each arm's own "
             "held-out split: not comparable across arms.", "",
             "| arm | " + " | ".join(sets) + " | own validation | data epochs |",
             "|---|" + "---:|" * (len(sets) + 2)]
    for arm, row in results["arms"].items():
        cells = []
        for s in [*sets, "validation"]:
            c = row.get(s)
            cells.append("n/a" if c is None else
                         f"{c['mean']:.4f} ± {c['std']:.4f} [{', '.join(f'{v:.4f}' for v in c['seeds'])}]")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {row['data_epochs']} |")
    lines += ["", "Signal vs noise per common set: gap between the best and the worst arm's mean, and the "
              "largest seed std (a gap well above the std is a real difference).", ""]
    for s in sets:
        cells = {a: r[s] for a, r in results["arms"].items() if s in r}
        if len(cells) >= 2:
            means = sorted((c["mean"], a) for a, c in cells.items())
            gap = means[-1][0] - means[0][0]
            noise = max(c["std"] for c in cells.values())
            lines.append(f"- {s}: best {means[0][1]} ({means[0][0]:.4f}); gap {gap:.4f} bpb; max seed std {noise:.4f}")
    if any(r["data_epochs"] > 1 for r in results["arms"].values()):
        lines += ["", "Note: an arm with data epochs > 1 repeated its data to reach the token budget."]
    return "\n".join(lines) + "\n"


def plot(cfg: AblationConfig, runs: list[dict[str, Any]], path: Path) -> None:
    """One panel per common eval set: mean bpb over seeds against training tokens, shaded min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = [e.name for e in cfg.eval_sets]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.8), squeeze=False)
    for ax, s in zip(axes[0], sets, strict=True):
        for arm in cfg.arms:
            curves = [dict(r["curves"].get(s, [])) for r in runs if r["arm"] == arm.name]
            xs = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
            if not xs:
                continue
            ys = np.array([[c[x] for x in xs] for c in curves])
            line, = ax.plot(xs, ys.mean(0), marker="o", label=f"{arm.name} (n={len(curves)})")
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
        ax.set_title(s)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("bits per byte")
        ax.legend()
    fig.suptitle(f"{cfg.name}: mean over seeds, band = seed min..max")
    fig.tight_layout()
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def check_arms(cfg: AblationConfig) -> None:
    for arm in cfg.arms:
        for s in arm.shards:
            if not (Path(s) / "manifest.json").is_file():
                raise TextbookError(f"arm {arm.name}: {s} is not a shard directory (no manifest.json)")
