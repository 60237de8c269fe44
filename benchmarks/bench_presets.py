"""Pretraining presets on this machine: tokens/s of each preset at its own batch shape, and a compute-budgeted
run of one preset whose held-out bits per byte is set against a unigram model's on the same evaluation text.

    .venv/bin/python benchmarks/bench_presets.py speed --presets tiny cpu small --steps 6 --threads 1
    .venv/bin/python benchmarks/bench_presets.py learn --preset cpu --cpu-minutes 10 --threads 1

Two rates are reported: wall tokens/s (what this machine gave, with whatever else ran on it: the load average
is recorded) and tokens per CPU-second of this process (with one thread: the rate of one core to itself,
which a shared machine does not depress). `learn` budgets CPU time, not wall time, for the same reason.

Text: the 2,800 English FineWeb pages of ../shared/data/edu_labels/fineweb_edu_llama3_sample/llama3_train.jsonl
(real web pages of every educational score), split by a hash of the text: 4/5 to train on, 1/5 held out for
evaluation (the first `eval.tokens` tokens of it). The unigram baseline is a model that knows only the
training split's token frequencies (pipeline/train/ablate_data.py): a run at or above it has learned nothing
but token frequencies. `learn` sets max_steps from a throughput probe so that the run takes about the
budget (CPU seconds of this process); the wall and CPU time it really took are reported. Results go to stdout as JSON lines (and --out DIR).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config.pretrain import PretrainSection, resolve_pretrain
from pipeline.paths import shared_data_dir
from pipeline.shards import ShardSetWriter
from pipeline.tokenizer import load_tokenizer
from pipeline.train.model import ModelArgs, Transformer
from pipeline.train.trainer import cpu_threads, train

LABELS = "edu_labels/fineweb_edu_llama3_sample/llama3_train.jsonl"


def make_shards(out: Path) -> Path:
    """Train/validation shard set of the labelled FineWeb pages, split by a salted hash of the text."""
    data = shared_data_dir()
    if data is None:
        raise SystemExit("../shared/data is absent: the benchmark trains on its pages")
    rows = [json.loads(line) for line in (data / LABELS).read_text().splitlines()]

    def held(text: str) -> bool:
        return int(hashlib.sha256(("bench-presets:" + text).encode()).hexdigest()[:8], 16) % 5 == 0

    w = ShardSetWriter(out, load_tokenizer(), row_group_bytes=1 << 20)
    w.add("train", [{"text": r["text"], "source": "web"} for r in rows if not held(r["text"])])
    w.add("validation", [{"text": r["text"], "source": "web"} for r in rows if held(r["text"])])
    w.finalize()
    return out


def shape(preset: str, overrides: dict | None = None) -> dict:
    """Parameters (with the 16k tokenizer), the blocks' share of them, and the batch shape of a preset."""
    cfg = resolve_pretrain(PretrainSection.model_validate({"preset": preset, **(overrides or {})}))
    args = ModelArgs(vocab_size=16384, **{k: v for k, v in cfg.model.model_dump().items() if k != "vocab_size"})
    n = Transformer(args).num_params()
    emb = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    return {"params": n, "blocks_share": round((n - emb) / n, 3), "batch": cfg.train.batch_size,
            "seq": cfg.train.seq_len or cfg.model.max_seq_len, "grad_accum": cfg.train.grad_accum}


class CpuClock:
    """on_step hook: CPU seconds of this process (all its threads) spent in each optimizer step."""

    def __init__(self) -> None:
        self.last = time.process_time()
        self.steps: list[float] = []

    def __call__(self, step: int, _rec: dict) -> None:
        now = time.process_time()
        self.steps.append(now - self.last)
        self.last = now


def speed(preset: str, shards: Path, steps: int, out: Path, threads: int, overrides: dict | None = None) -> dict:
    """Median and best wall tokens/s and median tokens per CPU-second over `steps` steps (after 2 warm-up
    steps) at the preset's own batch shape (or the shape `overrides` sets, e.g. a smaller batch on a CPU)."""
    over = overrides or {}
    cfg = PretrainSection.model_validate({
        **over, "preset": preset,
        "train": {**over.get("train", {}), "max_steps": steps + 2, "log_every": 1, "checkpoint_every": 100_000,
                  "warmup_steps": 1, "device": "cpu", "compile": False, "threads": threads},
        "eval": {"own_validation": False}})
    t0 = time.perf_counter()
    clock = CpuClock()
    train(cfg, out, shards=[str(shards)], resume="force", progress=False, log=lambda m: None, on_step=clock)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][2:]
    per_step = cfg_tokens_per_step(cfg)
    return {"preset": preset, "overrides": over, **shape(preset, over), "threads": threads, "steps": len(rates),
            "tokens_per_step": per_step, "tokens_per_s_median": round(statistics.median(rates)),
            "tokens_per_s_best": round(max(rates)),
            "tokens_per_cpu_s": round(per_step / statistics.median(clock.steps[2:])),
            "wall_s": round(time.perf_counter() - t0, 1), "loadavg": os.getloadavg()}


def cfg_tokens_per_step(cfg: PretrainSection) -> int:
    full = resolve_pretrain(cfg)
    return full.train.batch_size * (full.train.seq_len or full.model.max_seq_len) * full.train.grad_accum


def learn(preset: str, shards: Path, cpu_minutes: float, out: Path, threads: int, eval_tokens: int,
          overrides: dict) -> dict:
    """Train `preset` for about `cpu_minutes` of this process's CPU time (max_steps from a 6-step probe of
    tokens per CPU-second), then compare its held-out bits per byte with the untrained model's (step 0) and
    the unigram baseline's on the same tokens."""
    from pipeline.train.ablate_data import token_counts, unigram_bpb
    from pipeline.train.data import eval_data, open_sets

    base = {"preset": preset, **overrides}
    probe = PretrainSection.model_validate({**base, "train": {**base.get("train", {}), "max_steps": 8,
                                                              "log_every": 1, "threads": threads},
                                            "eval": {"own_validation": False}})
    clock = CpuClock()
    train(probe, out / "probe", shards=[str(shards)], resume="force", progress=False, log=lambda m: None,
          on_step=clock)
    full = resolve_pretrain(PretrainSection.model_validate(base))
    seq = full.train.seq_len or full.model.max_seq_len
    per_step = full.train.batch_size * seq * full.train.grad_accum
    rate = per_step / statistics.median(clock.steps[2:])  # tokens per CPU-second
    steps = max(10, int(rate * cpu_minutes * 60 / per_step))
    warm = full.train.warmup_steps / full.train.max_steps
    cfg = PretrainSection.model_validate({
        **base, "train": {**base.get("train", {}), "max_steps": steps, "warmup_fraction": round(warm, 4),
                          "log_every": 10, "checkpoint_every": steps, "threads": threads},
        "eval": {**base.get("eval", {}), "every": max(steps // 5, 1), "tokens": eval_tokens, "initial": True}})
    t0, c0 = time.perf_counter(), time.process_time()
    summary = train(cfg, out / "run", shards=[str(shards)], resume="force", progress=False, log=lambda m: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    sets = open_sets([shards])
    ev = eval_data("validation", sets, "validation", eval_tokens, seq)
    vocab = int(sets[0].manifest["tokenizer"]["vocab_size"])
    uni = unigram_bpb(token_counts([shards], "train", vocab), ev.y, ev.tokens_per_byte)
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    curve = [(r["tokens"], r["eval/validation/bpb"]) for r in log if "eval/validation/bpb" in r]
    rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    return {"preset": preset, "overrides": overrides, **shape(preset, overrides), "threads": threads, "steps": steps,
            "tokens": summary["tokens"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "probe_tokens_per_cpu_s": round(rate),
            "tokens_per_s_median": round(statistics.median(rates)), "heldout_bpb": curve[-1][1],
            "untrained_bpb": curve[0][1], "unigram_bpb": round(uni, 4),
            "below_unigram_bpb": round(uni - curve[-1][1], 4), "curve": curve, "loadavg": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--presets", nargs="+", default=["tiny", "cpu", "small"])
    sp.add_argument("--steps", type=int, default=6)
    sp.add_argument("--set", dest="sets", default="{}", help="JSON of pretrain overrides for every preset, e.g. "
                    "'{\"train\": {\"batch_size\": 1}}'")
    lp = sub.add_parser("learn")
    lp.add_argument("--preset", default="cpu")
    lp.add_argument("--cpu-minutes", type=float, default=10.0, help="CPU time of the run (this process)")
    lp.add_argument("--eval-tokens", type=int, default=65536)
    lp.add_argument("--set", dest="sets", default="{}", help="JSON of pretrain overrides, e.g. '{\"train\": {\"lr\": 0.006}}'")
    for p in (sp, lp):
        p.add_argument("--threads", type=int, default=None, help="default: $OMP_NUM_THREADS or the CPUs")
        p.add_argument("--out", default=None)
    a = ap.parse_args()
    threads = cpu_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "shards")
        results = []
        if a.cmd == "speed":
            for preset in a.presets:
                results.append(speed(preset, shards, a.steps, Path(tmp) / preset, threads, json.loads(a.sets)))
                print(json.dumps(results[-1]), flush=True)
        else:
            results.append(learn(a.preset, shards, a.cpu_minutes, Path(tmp) / "learn", threads, a.eval_tokens,
                                 json.loads(a.sets)))
            print(json.dumps(results[-1]), flush=True)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / f"presets-{a.cmd}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
