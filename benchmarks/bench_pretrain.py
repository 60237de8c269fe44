"""Pretraining throughput: tokens/s of the `tiny` and `small` presets through the full trainer (shard
streaming, prefetch thread, logging, clipping, schedule) against a bare PyTorch loop on the same model with
random in-memory tokens (the ceiling: forward + backward + AdamW and nothing else).

    .venv/bin/python benchmarks/bench_pretrain.py                 # tiny and small, 1 and 2 threads
    .venv/bin/python benchmarks/bench_pretrain.py --presets tiny --threads 2 --steps 40

Needs ../shared/data (the OpenStax Python book and the FineWeb sample are the training text).
On a GPU the trainer also reports MFU (see PEAK_BF16_FLOPS in pipeline/train/trainer.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config.pretrain import PretrainSection, resolve_pretrain
from pipeline.paths import shared_data_dir
from pipeline.shards import ShardSetWriter
from pipeline.tokenizer import load_tokenizer
from pipeline.train.model import ModelArgs, Transformer
from pipeline.train.trainer import train

# CPU-sized batches: the presets' own batches (16 x 512 for small) take minutes per step on 2 cores
SHAPES = {"tiny": {"batch_size": 8, "seq": 128}, "small": {"batch_size": 2, "seq": 512}}


def make_shards(out: Path) -> Path:
    data = shared_data_dir()
    if data is None:
        raise SystemExit("../shared/data is absent: the benchmark trains on its text")
    book = [json.loads(line)["text"] for line in
            (data / "textbooks/openstax_intro_python/modules_plaintext.jsonl").read_text().splitlines()]
    web = [r["text"] for r in json.loads((data / "web/fineweb_sample_300/fineweb_subset.json").read_text())]
    w = ShardSetWriter(out, load_tokenizer())
    w.add("train", [{"text": t, "source": "book"} for t in book] + [{"text": t, "source": "web"} for t in web])
    w.add("validation", [{"text": t, "source": "web"} for t in web[-5:]])
    w.finalize()
    return out


def trainer_tokens_per_s(preset: str, shards: Path, steps: int, out: Path) -> tuple[float, float]:
    shape = SHAPES[preset]
    cfg = PretrainSection.model_validate({
        "preset": preset, "model": {"max_seq_len": shape["seq"]},
        "train": {"batch_size": shape["batch_size"], "grad_accum": 1, "max_steps": steps + 2, "log_every": 1,
                  "checkpoint_every": 10_000, "warmup_steps": 1, "device": "cpu", "compile": False},
        "eval": {"own_validation": False}})
    train(cfg, out, shards=[str(shards)], resume="force", progress=False, log=lambda m: None)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][2:]  # skip the warm-up steps
    waits = [r["data_wait"] for r in recs if "data_wait" in r][2:]
    print(f"    data wait share {statistics.fmean(waits):.1%}", flush=True)
    return statistics.median(rates), max(rates)


def bare_tokens_per_s(preset: str, steps: int) -> tuple[float, float]:
    shape = SHAPES[preset]
    m = resolve_pretrain(PretrainSection(preset=preset)).model.model_dump()
    m.update(vocab_size=16384, max_seq_len=shape["seq"])
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**m))
    opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), fused=False)
    x = torch.randint(0, 16384, (shape["batch_size"], shape["seq"]))
    y = torch.randint(0, 16384, (shape["batch_size"], shape["seq"]))
    rates = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            rates.append(x.numel() / (time.perf_counter() - t0))
    return statistics.median(rates), max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "shards")
        rows = []
        for preset in args.presets:
            steps = args.steps if preset == "tiny" else max(args.steps // 4, 4)
            for threads in args.threads:
                torch.set_num_threads(threads)
                print(f"{preset}, {threads} thread(s), {steps} steps", flush=True)
                ours = trainer_tokens_per_s(preset, shards, steps, Path(tmp) / f"run-{preset}-{threads}")
                bare = bare_tokens_per_s(preset, steps)
                rows.append((preset, threads, SHAPES[preset], ours, bare))
                print(f"    trainer {ours[0]:,.0f} tok/s (best step {ours[1]:,.0f})   bare loop {bare[0]:,.0f} "
                      f"(best step {bare[1]:,.0f})", flush=True)
    # On a shared machine the median carries other people's load; the best step is the least disturbed one.
    print("\n| preset | threads | batch x seq | trainer tok/s median | best step | bare loop tok/s median "
          "| best step | trainer / bare (best) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for preset, threads, shape, ours, bare in rows:
        print(f"| {preset} | {threads} | {shape['batch_size']} x {shape['seq']} | {ours[0]:,.0f} | {ours[1]:,.0f} | "
              f"{bare[0]:,.0f} | {bare[1]:,.0f} | {ours[1] / bare[1]:.2f} |")


if __name__ == "__main__":
    main()
