"""The training loop: AdamW, warmup + cosine/WSD, clipping, accumulation, autocast, compile, DDP, checkpoints.

Single process:  textbook pretrain configs/pretrain/small.yaml --set data.shards=[shards/quickstart]
Several GPUs:    torchrun --nproc_per_node 8 -m pipeline.cli pretrain my.yaml

Everything a resumed run needs is in each checkpoint (model, optimizer, scheduler, every rank's loader
position and RNG states, resolved config, the tokenizer), written atomically by rank 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import config_hash
from pipeline.config.pretrain import PretrainSection, TrainSection, resolve_pretrain
from pipeline.errors import TextbookError
from pipeline.io import atomic_path, atomic_write_text
from pipeline.train.data import (
    EvalData,
    PackedLoader,
    Prefetcher,
    check_vocab,
    default_vocab_size,
    eval_data,
    open_sets,
    split_tokens,
)
from pipeline.train.model import ModelArgs, Transformer

CKPT_FORMAT = "textbook-pretrain-checkpoint"
CKPT_VERSION = 1

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity), for MFU. Matched by substring of
# torch.cuda.get_device_name(); override with train.peak_flops. CPUs have no entry: MFU is not reported.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,  # SXM
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "L4": 121.0e12,
    "A10G": 70.0e12,
    "A10": 125.0e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71.0e12,
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- devices and processes -------------------------------------------------------------------------------
def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK is set before the process group exists), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TextbookError(f"train.device={spec}: no CUDA device here (use device: auto or cpu)")
    return dev


def setup_distributed(device_spec: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: one process per GPU, NCCL (gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=pick_device(device_spec))
    import torch.distributed as tdist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and device_spec in ("auto", "cuda") or device_spec.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(rank=rank, local_rank=local_rank, world=world, device=device)


def cpu_threads(requested: int | None = None) -> int:
    """torch CPU threads to use: `requested`, else $OMP_NUM_THREADS (a positive integer), else the CPUs this
    process may run on (`os.sched_getaffinity`, which honours taskset/cgroup pinning; os.cpu_count() where
    the platform lacks it)."""
    if requested:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[spec]


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# --- schedule ---------------------------------------------------------------------------------------------
def warmup_steps(t: TrainSection) -> int:
    """Warm-up length in optimizer steps: round(warmup_fraction * max_steps) when the fraction is set (the
    warm-up then scales with the budget), else warmup_steps."""
    if t.warmup_fraction is not None:
        return round(t.warmup_fraction * t.max_steps)
    return t.warmup_steps


def lr_factor(step: int, t: TrainSection) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    warmup = warmup_steps(t)
    if warmup and step < warmup:
        return (step + 1) / warmup
    floor = t.min_lr_ratio
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "cosine":
        span = max(t.max_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: flat at the peak, then a linear decay over the last decay_fraction of the steps
    decay_steps = max(int(t.max_steps * t.decay_fraction), 1)
    decay_start = t.max_steps - decay_steps
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * max(0.0, 1 - (step - decay_start) / decay_steps)


# --- checkpoints ------------------------------------------------------------------------------------------
def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    d = checkpoint_dir(out)
    return sorted(d.glob("step_*.pt")) if d.is_dir() else []


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest one in a run directory or its checkpoints/ folder."""
    p = Path(path)
    if p.is_file():
        return p
    for d in (p, p / "checkpoints"):
        found = sorted(d.glob("step_*.pt")) if d.is_dir() else []
        if found:
            return found[-1]
    raise TextbookError(f"{p}: no checkpoint (a step_*.pt file, or a directory holding checkpoints/step_*.pt)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = find_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TextbookError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TextbookError(f"{p}: not a textbook pretraining checkpoint")
    ckpt["path"] = str(p)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> Transformer:
    model = Transformer(ModelArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the run ----------------------------------------------------------------------------------------------
def _read_tokenizer(sets: list[Any]) -> dict[str, Any]:
    info = dict(sets[0].manifest["tokenizer"])
    tok_file = sets[0].path / "tokenizer.json"
    info["json"] = tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None
    return info


def _model_args(cfg: PretrainSection, sets: list[Any]) -> ModelArgs:
    m = cfg.model.model_dump()
    if m["vocab_size"] is None:
        m["vocab_size"] = default_vocab_size(sets)
    try:
        args = ModelArgs(**m)
    except ValueError as e:
        raise TextbookError(f"pretrain.model: {e}") from None
    check_vocab(sets, args.vocab_size)
    return args


class Trainer:
    def __init__(self, cfg: PretrainSection, out: str | Path, *, shards: list[str] | None = None,
                 resume: bool | str = False, log: Callable[[str], None] = print,
                 on_step: Callable[[int, dict[str, Any]], None] | None = None, progress: bool = True) -> None:
        self.cfg = resolve_pretrain(cfg) if cfg.preset else cfg
        self.out = Path(out)
        self.on_step, self.progress = on_step, progress
        self.log = log if is_main_process() else (lambda _m: None)  # one voice under torchrun
        t = self.cfg.train
        self.seq_len = t.seq_len or self.cfg.model.max_seq_len
        if self.seq_len > self.cfg.model.max_seq_len:
            raise TextbookError(f"train.seq_len {self.seq_len} exceeds model.max_seq_len {self.cfg.model.max_seq_len}")
        self.shard_paths = [str(p) for p in (shards or self.cfg.data.shards)]
        self.sets = open_sets(self.shard_paths)
        self.args = _model_args(self.cfg, self.sets)
        self.evals_cfg = self._eval_sets()
        self.resume = self._resume_policy(resume)

    # -- set-up ------------------------------------------------------------------------------------------
    def _eval_sets(self) -> list[Any]:
        """The evaluation sets, located and checked before training (pipeline/train/evals.py)."""
        from pipeline.config.pretrain import EvalSetSection
        from pipeline.train.evals import EvalSpec, check_eval_set

        out = []
        if self.cfg.eval.own_validation:
            if any("validation" in s.manifest["splits"] for s in self.sets):
                own = EvalSetSection(name="validation", path=self.shard_paths[0], split="validation")
                out.append(EvalSpec("validation", "shards", own, sets=self.sets))
            else:
                self.log("note: the training shards have no validation split; only eval.sets are evaluated")
        sha = self.sets[0].manifest["tokenizer"]["sha256"]
        out += [check_eval_set(e, sha) for e in self.cfg.eval.sets]
        names = [e.name for e in out]
        if len(set(names)) != len(names):
            raise TextbookError(f"eval sets: names must be unique (got {', '.join(names)}; the training shards' "
                                "own split is called validation)")
        return out

    def _resume_policy(self, resume: bool | str) -> Any:
        """The checkpoint to resume from, or None; refuses to silently overwrite an earlier run."""
        existing = list_checkpoints(self.out)
        if resume == "force":
            self.wipe()
            return None
        if not existing:
            if resume is True:
                raise TextbookError(f"{self.out}: no checkpoint to resume from (run without --resume)")
            return None
        if resume is False:
            raise TextbookError(f"{self.out}: holds checkpoints of an earlier run: pass --resume to continue it "
                                "or --force to start over")
        ckpt = load_checkpoint(existing[-1])
        if resume == "auto" and (ckpt["config"] != self.cfg.model_dump(mode="json")
                                 or ckpt["shards"] != self.shard_paths):
            self.log(f"{self.out}: earlier checkpoints were made with another config or shards: starting over")
            self.wipe()
            return None
        if ckpt["model_args"] != self.args.to_dict():
            raise TextbookError(f"{ckpt['path']}: the checkpoint's model differs from the config "
                                f"({ckpt['model_args']} vs {self.args.to_dict()})")
        return ckpt

    def wipe(self) -> None:
        if not is_main_process():  # under torchrun only rank 0 touches the files
            return
        shutil.rmtree(checkpoint_dir(self.out), ignore_errors=True)
        for name in ("log.jsonl", "summary.json", "eval_items.json"):
            (self.out / name).unlink(missing_ok=True)

    # -- the loop --------------------------------------------------------------------------------------------
    def finished_summary(self) -> dict[str, Any] | None:
        """OUT/summary.json when this very run already finished (same config and shards, newest checkpoint at
        train.max_steps, losses recorded), else None. Resuming such a run has nothing to do."""
        ckpt = self.resume
        if ckpt is None or ckpt["step"] < self.cfg.train.max_steps:
            return None
        try:
            done = json.loads((self.out / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        same = (done.get("config_hash") == config_hash(self.cfg) and done.get("shards") == self.shard_paths
                and done.get("steps") == ckpt["step"])
        return done if same and done.get("final_loss") is not None else None

    def _logged(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The last training and evaluation records at or before `step` in OUT/log.jsonl ({} when none): what a
        resumed run reports when it has no step left to train (its summary must not lose them)."""
        last: dict[str, Any] = {}
        last_eval: dict[str, Any] = {}
        p = self.out / "log.jsonl"
        for line in (p.read_text(encoding="utf-8").splitlines() if p.is_file() else []):
            rec = json.loads(line) if line.strip() else {}
            if rec.get("step", step + 1) <= step:
                if "loss" in rec:
                    last = rec
                elif any(k.startswith("eval/") for k in rec):
                    last_eval = rec
        return last, last_eval

    def run(self) -> dict[str, Any]:
        done = self.finished_summary()
        if done is not None:  # resuming a finished run changes nothing (issue 16)
            self.log(f"{self.out}: this run already finished ({done['steps']:,} steps = train.max_steps, same config "
                     "and shards): nothing to train; summary.json and the checkpoints are left as they are")
            return done
        cfg, t = self.cfg, self.cfg.train
        dist = setup_distributed(t.device)
        self.dist = dist
        self.threads = cpu_threads(t.threads)
        torch.set_num_threads(self.threads)  # explicit: torch's own default ignores CPU pinning and shared machines
        dtype = pick_dtype(t.dtype, dist.device)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)
        if dist.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        model = Transformer(self.args)
        ckpt = self.resume
        if ckpt is None and cfg.grow.init_from:
            from pipeline.train.grow import grow_from_checkpoint

            model.load_state_dict(grow_from_checkpoint(cfg.grow.init_from, self.args, depth=cfg.grow.depth))
            self.log(f"initialised from {cfg.grow.init_from} (grown: depth={cfg.grow.depth})")
        model.to(dist.device)
        raw = model
        optimizer = raw.configure_optimizer(t.lr, t.weight_decay, (t.beta1, t.beta2),
                                            fused=dist.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
        loader = PackedLoader(self.sets, cfg.data.split, t.batch_size, self.seq_len, seed=t.seed,
                              rank=dist.rank, world=dist.world, source_weights=cfg.data.source_weights)
        step, tokens_seen = 0, 0
        if ckpt is not None:
            raw.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            loader.load_state_dict(ckpt["loader"][dist.rank])
            set_rng_state(ckpt["rng"][dist.rank])
            step, tokens_seen = ckpt["step"], ckpt["tokens_seen"]
            self._truncate_log(step)
            self.log(f"resumed from {ckpt['path']} at step {step} ({tokens_seen:,} tokens)")
            if step >= t.max_steps:
                self.log(f"already at train.max_steps={t.max_steps}: nothing to train")
        if t.compile:
            model = torch.compile(model)
        if dist.ddp:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
        amp = (torch.autocast(device_type=dist.device.type, dtype=dtype) if dtype != torch.float32
               else contextlib.nullcontext())
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        evals, mc_sets = self._eval_data(raw)

        tokens_per_step = t.batch_size * self.seq_len * t.grad_accum * dist.world
        fpt = raw.flops_per_token(self.seq_len)
        peak = peak_flops(dist.device, dtype, t.peak_flops)
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log(f"model: {raw.num_params():,} parameters ({self.args.n_layers} x {self.args.dim}, vocab "
                     f"{self.args.vocab_size}); {tokens_per_step:,} tokens/step on {dist.world} x {dist.device} "
                     f"{str(dtype).removeprefix('torch.')}, {self.threads} CPU threads; "
                     f"{split_tokens(self.sets, cfg.data.split):,} training tokens")
        if cfg.eval.initial and step == 0 and (evals or mc_sets):  # the untrained model: curves start at 0
            self._write_log(self._evaluate(model, evals, amp, 0, 0, raw=raw, mc_sets=mc_sets))
        prefetch = Prefetcher(loader, cfg.data.prefetch, pin=dist.device.type == "cuda")
        bar = self._bar(step)
        last, last_eval = self._logged(step) if ckpt is not None else ({}, {})
        window = {"wait": 0.0, "tokens": 0, "t0": time.perf_counter()}
        loader_state = loader.state_dict()
        try:
            while step < t.max_steps:
                loss_sum = torch.zeros((), device=dist.device)
                wait = 0.0
                for micro in range(t.grad_accum):
                    t_wait = time.perf_counter()
                    x, y, loader_state = prefetch.next()
                    x = x.to(dist.device, non_blocking=True)
                    y = y.to(dist.device, non_blocking=True)
                    wait += time.perf_counter() - t_wait
                    sync = contextlib.nullcontext() if not dist.ddp or micro == t.grad_accum - 1 else model.no_sync()
                    with sync:
                        with amp:
                            _, loss = model(x, y)
                        loss = loss / t.grad_accum
                        (scaler.scale(loss) if scaler else loss).backward()
                    loss_sum += loss.detach()
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = (torch.nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip) if t.grad_clip
                             else None)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                tokens_seen += tokens_per_step
                window["wait"] += wait
                window["tokens"] += tokens_per_step
                if step % t.log_every == 0 or step == t.max_steps:
                    if dist.device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    elapsed = now - window["t0"]
                    if dist.ddp:
                        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
                    tok_s = window["tokens"] / max(elapsed, 1e-9)
                    last = {"step": step, "tokens": tokens_seen, "loss": round(float(loss_sum), 6),
                            "lr": lr, "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
                            "tokens_per_s": round(tok_s, 1),
                            "mfu": None if peak is None else round(fpt * tok_s / (peak * dist.world), 4),
                            "data_wait": round(window["wait"] / max(elapsed, 1e-9), 4),
                            "epoch": loader_state["epoch"]}
                    window = {"wait": 0.0, "tokens": 0, "t0": now}
                    self._write_log(last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                                    mfu="n/a" if last["mfu"] is None else f"{last['mfu']:.1%}",
                                    wait=f"{last['data_wait']:.0%}")
                bar.update(1)
                final = step == t.max_steps
                if (evals or mc_sets) and (step % cfg.eval.every == 0 or final):
                    last_eval = self._evaluate(model, evals, amp, step, tokens_seen, raw=raw, mc_sets=mc_sets,
                                               final=final)
                    self._write_log(last_eval)
                if step % t.checkpoint_every == 0 or final:
                    self._save(raw, optimizer, scheduler, loader_state, step, tokens_seen)
                if self.on_step is not None:
                    self.on_step(step, last)
        finally:
            prefetch.close()
            bar.close()
        summary = self._summary(raw, step, tokens_seen, last, last_eval, loader_state)
        if dist.main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if dist.ddp:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return summary

    # -- pieces ------------------------------------------------------------------------------------------------
    def _bar(self, step: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.max_steps, initial=step, desc="pretrain", unit="step",
                    disable=not (self.progress and self.dist.main), dynamic_ncols=True)

    def _eval_data(self, raw: Transformer) -> tuple[list[EvalData], list[Any]]:
        """Bits-per-byte sequences of the text sets (each with its own token budget) and the tokenized
        multiple-choice sets (each with its own item budget), built once for the whole run."""
        from pipeline.tokenizer import load_tokenizer
        from pipeline.train.benchmarks import read_task
        from pipeline.train.evals import document_eval_data, encode_mc, tokenizer_encoder

        tok_file = self.sets[0].path / "tokenizer.json"
        texts: list[EvalData] = []
        tasks: list[Any] = []
        for spec in self.evals_cfg:
            sec = spec.section
            if spec.kind == "task":
                encode, eos = tokenizer_encoder(tok_file.read_text(encoding="utf-8"))
                items = read_task(sec.task, sec.path, sec.items or self.cfg.eval.items)
                mc = encode_mc(spec.name, sec.task, items, encode, raw.args.max_seq_len, eos)
                if mc.skipped or mc.truncated:
                    self.log(f"note: eval set {spec.name}: {mc.skipped} of {len(items)} items left out (an answer "
                             f"longer than {raw.args.max_seq_len} tokens), {mc.truncated} contexts cut on the left")
                if mc.items:
                    tasks.append(mc)
                continue
            budget = sec.tokens or self.cfg.eval.tokens
            data = (eval_data(spec.name, spec.sets, sec.split, budget, self.seq_len) if spec.kind == "shards" else
                    document_eval_data(spec.name, spec.files, load_tokenizer(tok_file), budget, self.seq_len,
                                       sec.text_field))
            if data is None:
                self.log(f"note: eval set {spec.name} has fewer than {self.seq_len + 1} tokens: not evaluated")
            else:
                texts.append(data)
        return texts, tasks

    @torch.no_grad()
    def _evaluate(self, model: Any, evals: list[EvalData], amp: Any, step: int, tokens: int,
                  raw: Transformer | None = None, mc_sets: list[Any] | None = None, final: bool = False
                  ) -> dict[str, Any]:
        """Loss (nats/token) and bits per byte of each text set, accuracy of each multiple-choice set
        (pipeline/train/evals.py); ranks split the sequences (answers) and sum."""
        model.eval()
        dist, bs = self.dist, self.cfg.eval.batch_size or self.cfg.train.batch_size
        rec: dict[str, Any] = {"step": step, "tokens": tokens}
        for e in evals:
            total = torch.zeros(2, device=dist.device, dtype=torch.float64)  # loss sum, token count
            for i in range(dist.rank * bs, len(e.x), bs * dist.world):
                x = torch.from_numpy(e.x[i:i + bs]).to(dist.device)
                y = torch.from_numpy(e.y[i:i + bs]).to(dist.device)
                with amp:
                    _, loss = model(x, y)
                total[0] += float(loss) * y.numel()
                total[1] += y.numel()
            if dist.ddp:
                torch.distributed.all_reduce(total)
            loss_mean = float(total[0] / total[1])
            bpb = loss_mean / math.log(2) * e.tokens_per_byte
            rec[f"eval/{e.name}/loss"] = round(loss_mean, 6)
            rec[f"eval/{e.name}/bpb"] = round(bpb, 6)
            if e.name == "validation":
                rec["val_loss"], rec["val_bpb"] = rec[f"eval/{e.name}/loss"], rec[f"eval/{e.name}/bpb"]
        if mc_sets:
            rec.update(self._evaluate_mc(raw if raw is not None else model, mc_sets, amp, bs, final))
        model.train()
        return rec

    def _evaluate_mc(self, raw: Any, mc_sets: list[Any], amp: Any, bs: int, final: bool) -> dict[str, Any]:
        """eval/<set>/{acc, acc_norm, acc_stderr, answer_bpb, chance, n} of each multiple-choice set. The
        uncompiled model runs (answer windows vary in length: a compiled one would recompile); under DDP each
        rank scores every world-th answer and the log-likelihoods are summed. The final evaluation also writes
        each item's outcome to OUT/eval_items.json (for item-level paired comparisons)."""
        from pipeline.train.evals import item_outcomes, mc_metrics, row_loglikelihoods, transformer_hidden

        dist, rec, items = self.dist, {}, {}
        hidden = transformer_hidden(raw)
        for d in mc_sets:
            ll = row_loglikelihoods(hidden, d, bs, dist.device, rows=range(dist.rank, d.rows, dist.world),
                                       amp=amp, progress=self.progress and dist.main, head=raw.output)
            if dist.ddp:
                t = torch.from_numpy(ll).to(dist.device)
                torch.distributed.all_reduce(t)
                ll = t.cpu().numpy()
            for k, v in mc_metrics(d, ll).items():
                rec[f"eval/{d.name}/{k}"] = v
            if final:
                items[d.name] = {"task": d.task, "skipped": d.skipped, **item_outcomes(d, ll)}
        if final and dist.main:
            atomic_write_text(self.out / "eval_items.json", json.dumps(items) + "\n")
        return rec

    def _save(self, raw: Transformer, optimizer: Any, scheduler: Any, loader_state: dict[str, Any],
              step: int, tokens: int) -> None:
        loaders, rngs = [loader_state], [rng_state()]
        if self.dist.ddp:
            loaders = [None] * self.dist.world
            rngs = [None] * self.dist.world
            torch.distributed.all_gather_object(loaders, loader_state)
            torch.distributed.all_gather_object(rngs, rng_state())
        if not self.dist.main:
            return
        ckpt = {
            "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step, "tokens_seen": tokens,
            "model_args": self.args.to_dict(), "model": raw.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "loader": loaders, "rng": rngs, "config": self.cfg.model_dump(mode="json"),
            "shards": self.shard_paths, "tokenizer": _read_tokenizer(self.sets),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        path = checkpoint_dir(self.out) / f"step_{step:07d}.pt"
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
        # keep the newest `keep_checkpoints` periodic ones and the final one
        old = [p for p in list_checkpoints(self.out) if p != path]
        final_name = f"step_{self.cfg.train.max_steps:07d}.pt"
        for p in old[: max(len(old) - (self.cfg.train.keep_checkpoints - 1), 0)]:
            if p.name != final_name:
                p.unlink(missing_ok=True)

    def _write_log(self, rec: dict[str, Any]) -> None:
        if self.dist.main:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop records a crashed attempt logged after the checkpoint we resume from."""
        p = self.out / "log.jsonl"
        if not self.dist.main or not p.is_file():
            return
        keep = [line for line in p.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(p, "".join(line + "\n" for line in keep))

    def _summary(self, raw: Transformer, step: int, tokens: int, last: dict[str, Any],
                 last_eval: dict[str, Any], loader_state: dict[str, Any]) -> dict[str, Any]:
        ckpts = list_checkpoints(self.out)
        return {
            "steps": step, "tokens": tokens, "params": raw.num_params(),
            "model": self.args.to_dict(), "final_loss": last.get("loss"),
            "final_val_loss": last_eval.get("val_loss"), "final_val_bpb": last_eval.get("val_bpb"),
            "evals": {k: v for k, v in last_eval.items() if k.startswith("eval/")},
            "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"),
            "threads": getattr(self, "threads", None),
            "data_epochs": loader_state["epoch"] + 1 if loader_state else None,
            "train_tokens_available": split_tokens(self.sets, self.cfg.data.split),
            "checkpoint": str(ckpts[-1]) if ckpts else None, "log": str(self.out / "log.jsonl"),
            "eval_items": str(self.out / "eval_items.json") if (self.out / "eval_items.json").is_file() else None,
            "shards": self.shard_paths, "config_hash": config_hash(self.cfg),
        }


def train(cfg: PretrainSection, out: str | Path, **kw: Any) -> dict[str, Any]:
    """Resolve the preset, train, return the summary (also written to OUT/summary.json)."""
    return Trainer(cfg, out, **kw).run()
