"""`pretrain` stage of `textbook run`: a short pretraining run on the run's own shards.

It produces no documents (read = kept = 0); the final losses and bits per byte go into stats.json, the
checkpoints and `log.jsonl` (which the report plots) into `stages/pretrain/`. A crashed attempt resumes
from its last checkpoint when the config and shards are unchanged.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import TextbookError
from pipeline.stats import StageStats


def run_stage(ctx) -> StageStats:  # ctx: pipeline.run.StageContext
    from pipeline.train.trainer import train

    section = ctx.cfg.pretrain
    from pipeline.scale.storage import is_url, remote_manifest

    run_out = ctx.cfg.run.out_dir
    shards = list(section.data.shards) or [run_out if is_url(run_out) else str(ctx.run_dir)]
    for s in shards:
        if not (remote_manifest(s) is not None if is_url(s) else (Path(s) / "manifest.json").is_file()):
            raise TextbookError(f"pretrain: no shards at {s} (run the shard stage first, or set pretrain.data.shards)")
    out = Path(section.out) if section.out else ctx.out_dir
    summary = train(section, out, shards=shards, resume="auto")
    stats = StageStats(ctx.name)
    for key in ("steps", "tokens", "params", "final_loss", "final_val_loss", "final_val_bpb", "evals",
                "tokens_per_s", "mfu", "data_epochs", "checkpoint", "log"):
        stats.set(key, summary.get(key))
    return stats
