"""`textbook pretrain`, `textbook export-hf`, `textbook ablate`, `textbook eval-mc`."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.cli.common import SET_HELP, console, user_errors


def _is_run_config(path: Path) -> bool:
    """A run config has run-level sections (run:, pretrain:, shard:...); a pretrain YAML has model:, train:..."""
    from pipeline.config import RunConfig, read_yaml_mapping
    from pipeline.config.pretrain import PretrainSection
    from pipeline.errors import ConfigError

    try:
        keys = set(read_yaml_mapping(path, str(path)))
    except ConfigError:
        return False  # the pretrain loader reports the same error
    run_only = set(RunConfig.model_fields) - set(PretrainSection.model_fields)
    return bool(keys & run_only) and keys <= set(RunConfig.model_fields)


@user_errors
def pretrain(
    config: str = typer.Argument(..., help="A pretrain YAML (configs/pretrain/*.yaml or your own), a preset "
                                 "name (tiny, small, gpt2-124m, 350m), or a run config (runs its pretrain stage)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " In a pretrain YAML keys are relative: "
                                   "--set train.max_steps=500 --set model.dim=128."),
    shards: list[str] = typer.Option([], "--shards", help="Shard directory to train on (repeatable); "
                                     "overrides data.shards."),
    out: str | None = typer.Option(None, "--out", help="Checkpoints and logs (default: out: in the config, "
                                   "else runs/pretrain/<config name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output directory."),
    force: bool = typer.Option(False, "--force", help="Start over, deleting earlier checkpoints in the output directory."),
    init_from: str | None = typer.Option(None, "--init-from", help="Grow this smaller checkpoint into the "
                                         "configured model (width doubling is function-preserving)."),
    grow_depth: str | None = typer.Option(None, "--grow-depth", help="New layers when growing: stack (copies) "
                                          "or identity (copies with zeroed output projections)."),
) -> None:
    """Pretrain a Llama-style model on textbook shards (one process, or several GPUs through torchrun).

    Example: textbook pretrain configs/pretrain/small.yaml --shards shards/quickstart --set train.max_steps=500

    Several GPUs: torchrun --nproc_per_node 8 -m pipeline.cli pretrain my.yaml
    """
    import json

    from pipeline.config.pretrain import load_pretrain_config, preset_path
    from pipeline.errors import TextbookError

    if resume and force:
        raise TextbookError("--resume and --force exclude each other")
    # the options are --set overrides in disguise: the same validation, and the preset fills the rest
    extra = [f"data.shards={json.dumps(list(shards))}"] if shards else []
    extra += [f"grow.init_from={json.dumps(init_from)}"] if init_from else []
    extra += [f"grow.depth={grow_depth}"] if grow_depth else []
    path = Path(config)
    if not path.is_file() and (path.suffix in (".yaml", ".yml") or os.sep in config):
        raise TextbookError(f"{config}: config file not found")
    if path.is_file() and _is_run_config(path):
        from pipeline.cli.common import run_stage_command

        run_stage_command("pretrain", config, [*set_, *(f"pretrain.{e}" for e in extra)], force=force)
        return
    # the same PretrainSection model serves a run config's pretrain: section and this standalone file
    section = load_pretrain_config(path if path.is_file() else preset_path(config), [*set_, *extra])
    name = path.stem if path.is_file() else config
    out_dir = Path(out or section.out or f"runs/pretrain/{name}")
    from pipeline.train.trainer import is_main_process, list_checkpoints, train

    try:
        summary = train(section, out_dir, resume="force" if force else resume,
                        log=lambda m: console.print(m, highlight=False))
    except KeyboardInterrupt:
        ckpts = list_checkpoints(out_dir)
        raise TextbookError(f"interrupted; newest checkpoint {ckpts[-1]}: continue with the same command and --resume"
                            if ckpts else f"interrupted before the first checkpoint in {out_dir}: run again") from None
    if is_main_process():  # under torchrun, rank 0 speaks
        _print_summary(summary)


def _print_summary(s: dict) -> None:
    from rich.table import Table

    table = Table(title="pretrain")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [("steps", f"{s['steps']:,}"), ("tokens", f"{s['tokens']:,}"), ("parameters", f"{s['params']:,}"),
            ("final train loss", s.get("final_loss")), ("tokens/s", s.get("tokens_per_s")),
            ("MFU", "n/a (no peak known for this device)" if s.get("mfu") is None else f"{s['mfu']:.1%}"),
            ("data epochs", s.get("data_epochs"))]
    rows += [(k.removeprefix("eval/"), v) for k, v in s.get("evals", {}).items()]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    console.print(f"checkpoint: {s['checkpoint']}\nlog: {s['log']}\n"
                  f"export: textbook export-hf {s['checkpoint']} DIR", highlight=False)


@user_errors
def export_hf(
    checkpoint: str = typer.Argument(..., help="A checkpoint file (step_*.pt) or a pretrain output directory (newest)."),
    out_dir: str = typer.Argument(..., help="Directory to write (replaced if it exists)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
) -> None:
    """Write a Hugging Face LlamaForCausalLM directory (config.json, model.safetensors, tokenizer files).

    Example: textbook export-hf runs/pretrain/small hf/small && python -c "from transformers import
    AutoModelForCausalLM as M; M.from_pretrained('hf/small')"
    """
    import json

    from pipeline.train.export import export_hf as do_export

    out = do_export(checkpoint, out_dir, dtype=dtype)
    template = json.loads((out / "textbook_export.json").read_text()).get("chat_template")
    console.print(f"exported {checkpoint} -> {out} (LlamaForCausalLM); chat template: {template or 'none'} "
                  f"(see {out / 'README.md'})", highlight=False)


@user_errors
def eval_mc(
    model: str = typer.Argument(..., help="A checkpoint (step_*.pt), a pretrain output directory (newest "
                                "checkpoint) or a Hugging Face model directory (e.g. from export-hf)."),
    sets: str = typer.Option("arc_easy,arc_challenge,hellaswag,mmlu", "--sets",
                             help="Comma-separated tasks: arc_easy, arc_challenge, hellaswag, mmlu, mmlu_cloze, piqa."),
    items: int = typer.Option(300, "--items", min=0, help="Items per task, chosen deterministically (0: all)."),
    benchmarks: str | None = typer.Option(None, "--benchmarks", help="Benchmarks folder (default "
                                          "$TEXTBOOK_BENCHMARKS or ../shared/data/benchmarks)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Answers per forward pass."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default $OMP_NUM_THREADS "
                                       "or the CPUs this process may run on)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, auto."),
    dtype: str = typer.Option("float32", "--dtype", help="Hugging Face models: float32, bfloat16 or float16."),
    out: str | None = typer.Option(None, "--out", help="Also write the results as JSON here."),
) -> None:
    """Multiple-choice accuracy (acc, acc_norm) and bits per byte of the right answer, lm-evaluation-harness
    conventions, on our checkpoint or an exported Hugging Face model (so figures can be checked with lm-eval).

    Example: textbook eval-mc runs/pretrain/small --sets arc_easy,hellaswag --items 500
    """
    import json

    from rich.table import Table

    from pipeline.train.evals import evaluate_tasks, load_scoring_model, set_threads

    n_threads = set_threads(threads)
    lm = load_scoring_model(model, device=device, dtype=dtype)
    tasks = [t.strip() for t in sets.split(",") if t.strip()]
    results = evaluate_tasks(lm, tasks, items=items or None, path=benchmarks, batch_size=batch_size,
                             log=lambda m: console.print(m, highlight=False))
    table = Table(title=f"eval-mc: {lm.label} ({n_threads} threads)")
    for col in ("task", "items", "acc", "acc_norm", "± stderr", "chance", "answer bpb", "seconds"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, r in results.items():
        table.add_row(task, str(r["n"]), f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}", f"{r['acc_stderr']:.4f}",
                      f"{r['chance']:.4f}", f"{r['answer_bpb']:.4f}", f"{r['seconds']:.1f}")
    console.print(table)
    if out:
        from pipeline.io import atomic_write_text

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), json.dumps({"model": lm.info, "threads": n_threads, "items": items,
                                                 "tasks": results}, indent=2) + "\n")
        console.print(f"results: {out}", highlight=False)


@user_errors
def ablate(
    config: str = typer.Argument(..., help="Ablation YAML: arms (shard sets), seeds, token budget, common eval sets, "
                                 "optional controls."),
    set_: list[str] = typer.Option([], "--set", help="Override a key of the ablation YAML: --set tokens=2000000."),
    arm: list[str] = typer.Option([], "--arm", help="Train only this arm (repeatable; control arms too)."),
    seed: list[int] = typer.Option([], "--seed", help="Train only this seed (repeatable)."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Runs trained at the same time, each in its own process "
                             "(CPU threads split between them unless pretrain.train.threads is set)."),
    gather_only: bool = typer.Option(False, "--gather", help="Train nothing: read the finished runs and write "
                                     "results.md, results.json, ablation.png."),
    no_gather: bool = typer.Option(False, "--no-gather", help="Train, but leave the results to a later --gather "
                                   "(used by --jobs for its worker processes)."),
) -> None:
    """Train the same model on each arm's shards (equal token budget, several seeds) and compare the arms on
    the common evaluation sets by per-seed paired differences against the baseline arm: results.md,
    results.json, ablation.png in the output directory.

    Example: textbook ablate configs/pretrain/ablations/example.yaml --set tokens=500000

    In parallel: run `textbook ablate cfg.yaml --seed 0` and `--seed 1` in two shells (or --jobs 2); each run
    has its own directory and lock; `textbook ablate cfg.yaml --gather` then writes the table.
    """
    from pipeline.errors import TextbookError
    from pipeline.train.ablate import (
        gather,
        load_ablation_config,
        prepare,
        run_one,
        run_parallel,
        select_runs,
    )

    if gather_only and no_gather:
        raise TextbookError("--gather and --no-gather exclude each other")
    cfg = load_ablation_config(config, set_)
    log = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731 - "[arm seed 1]" is text
    todo = select_runs(cfg, arm or None, seed or None)
    prepare(cfg, log, None if gather_only else arm or None)
    failed: list[str] = []
    if not gather_only:
        if jobs > 1 and len(todo) > 1:
            failed = run_parallel(config, set_, todo, jobs, cfg, log)
        else:
            for a, s in todo:
                run_one(cfg, a, s, log)
    if not no_gather:
        results = gather(cfg, log)
        _print_ablation(results)
        console.print(f"results: {cfg.out_dir / 'results.md'}  plot: {cfg.out_dir / 'ablation.png'}",
                      highlight=False, markup=False)
    if failed:
        raise TextbookError(f"{len(failed)} run(s) failed: " + "; ".join(failed))


def _print_ablation(results: dict) -> None:
    """The headline figures (bits per byte, length-normalised accuracy) in one table: per arm the mean over
    seeds (± std with two or more), the paired Δ against the baseline with its 95 % interval, the verdict;
    every figure is in results.md."""
    from rich.table import Table

    from pipeline.train.ablate_report import METRICS, fmt_paired, split_key

    st = results["status"]
    base = results["baseline"]
    n = len(results["seeds"])
    table = Table(title=f"ablation {results['name']}: {st['finished']} of {st['expected']} runs finished; "
                        f"baseline {base}; " + ("1 seed: no spread measured" if n == 1 else f"{n} seeds"))
    for col in ("figure", "arm", "mean" if n == 1 else "mean ± std", f"Δ vs {base} [95 % CI]", "verdict", "unigram"):
        table.add_column(col, justify="left" if col in ("figure", "arm", "verdict") else "right")
    for key in results["metrics"]:
        name, metric = split_key(key)
        if metric not in ("bpb", "acc_norm"):
            continue
        for i, (a, row) in enumerate(results["arms"].items()):
            c = row["metrics"].get(key)
            cell = "n/a" if not c else f"{c['mean']:.4f}" + (f" ± {c['std']:.4f}" if c["std"] is not None else "")
            diff, verdict = ("(baseline)", "") if a == base else fmt_paired(results["paired"][key].get(a), base)
            u = (row.get("unigram") or {}).get(name) if metric == "bpb" else None
            label = f"{name} {'bpb' if metric == 'bpb' else 'acc_norm'} ({METRICS[metric][0]} better)" if i == 0 else ""
            table.add_row(label, a, cell, diff, verdict, "" if u is None else f"{u:.4f}")
    console.print(table)
    c = results.get("controls")
    if c and c.get("eval_set"):
        p = c["paired"].get(f"eval/{c['eval_set']}/bpb")
        diff = fmt_paired(p, c["low"])[0] if p else "n/a"
        word = {True: "separated", False: "NOT separated (do not read arm differences as data effects)",
                None: "not known yet"}[c.get("separated")]
        console.print(f"controls on {c['eval_set']} bpb, {c['high']} - {c['low']}: {diff}: {word}",
                      highlight=False, markup=False)
    for line in results.get("checks") or []:
        console.print(line, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
    app.command("export-hf")(export_hf)
    app.command("ablate")(ablate)
    app.command("eval-mc")(eval_mc)
