"""Multiple-choice evaluation (issue 15 part A): accuracy against chance, time per set, and agreement with
lm-evaluation-harness on the same items.

    .venv/bin/python benchmarks/bench_eval_mc.py --train-tiny 600            # train the tiny preset, score it
    .venv/bin/python benchmarks/bench_eval_mc.py runs/pretrain/small hf/x    # score given checkpoints / HF dirs
    PYTHONPATH=/path/to/lm_eval_pkgs .venv/bin/python benchmarks/bench_eval_mc.py --train-tiny 600 --lm-eval

- Every model is scored by `textbook eval-mc`'s code (pipeline/train/evals.py) on each task's first `--items`
  items (deterministic choice), with the seconds each set took (reading, tokenizing, scoring) at `--threads`.
- `--train-tiny N`: the tiny preset trained N steps on the OpenStax Python book + the FineWeb sample of
  ../shared/data (held-out text: none needed here), scored at step 0 (untrained) and at step N.
- `--lm-eval`: lm-evaluation-harness (not a dependency of this project: install it in a folder of its own and
  put it on PYTHONPATH) scores the last model's Hugging Face export on the same items through local task
  YAMLs written here (ARC-Easy from the AI2 jsonl with lm-eval's arc prompt, MMLU per subject with lm-eval's
  default and continuation templates; HellaSwag from our cleaned items, so that one checks the scorer only).
  Reported: items whose prompt lm-eval built identically, the largest |log-likelihood difference| per
  answer, and both harnesses' acc / acc_norm.
Writes benchmarks/results/eval_mc.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.train.benchmarks import default_benchmarks_dir, read_task
from pipeline.train.evals import (
    encode_mc,
    evaluate_tasks,
    load_scoring_model,
    row_loglikelihoods,
    set_threads,
)

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ["arc_easy", "arc_challenge", "hellaswag", "mmlu", "mmlu_cloze"]


def train_tiny(steps: int, out: Path, report: dict) -> Path:
    """The tiny preset trained `steps` steps on the shared book + web text; returns the run directory."""
    from pipeline.config.pretrain import PretrainSection
    from pipeline.paths import shared_data_dir
    from pipeline.shards import ShardSetWriter
    from pipeline.tokenizer import load_tokenizer
    from pipeline.train.trainer import train

    data = shared_data_dir()
    if data is None:
        raise SystemExit("../shared/data is absent: --train-tiny trains on its text")
    book = [json.loads(line)["text"] for line in
            (data / "textbooks/openstax_intro_python/modules_plaintext.jsonl").read_text().splitlines()]
    web = [r["text"] for r in json.loads((data / "web/fineweb_sample_300/fineweb_subset.json").read_text())]
    shards = out / "shards"
    w = ShardSetWriter(shards, load_tokenizer())
    w.add("train", [{"text": t, "source": "book"} for t in book] + [{"text": t, "source": "web"} for t in web])
    w.finalize()
    cfg = PretrainSection.model_validate({
        "preset": "tiny", "train": {"max_steps": steps, "checkpoint_every": steps, "keep_checkpoints": 1,
                                    "warmup_steps": max(1, steps // 20), "device": "cpu"},
        "eval": {"own_validation": False}})
    run = out / "run"
    t0 = time.perf_counter()
    s = train(cfg, run, shards=[str(shards)], resume="force", progress=False, log=lambda m: None)
    report["training"] = (f"tiny preset, {steps} steps, {s['tokens']:,} tokens of the OpenStax Python book + "
                          f"FineWeb sample, final train loss {s['final_loss']}, {time.perf_counter() - t0:.0f} s")
    print(report["training"], flush=True)
    return run


def untrained_copy(run: Path, out: Path) -> Path:
    """The run's checkpoint with the weights of a freshly initialised model (seed 0): the step-0 baseline."""
    from pipeline.train.model import ModelArgs, Transformer
    from pipeline.train.trainer import load_checkpoint

    ckpt = load_checkpoint(run)
    torch.manual_seed(0)
    ckpt["model"] = Transformer(ModelArgs(**ckpt["model_args"])).state_dict()
    ckpt["step"], ckpt["tokens_seen"] = 0, 0
    path = out / "untrained.pt"
    torch.save({k: v for k, v in ckpt.items() if k != "path"}, path)
    return path


# --- lm-evaluation-harness on the same items --------------------------------------------------------------
MMLU_DEFAULT = ("The following are multiple choice questions (with answers) about {topic}.\n\n",
                "{{question.strip()}}\nA. {{choice0}}\nB. {{choice1}}\nC. {{choice2}}\nD. {{choice3}}\nAnswer:",
                '["A", "B", "C", "D"]')
MMLU_CLOZE = ("The following are questions (with answers) about {topic}.\n\n",
              "Question: {{question.strip()}}\nAnswer:", "{{[choice0, choice1, choice2, choice3]}}")


def _yaml(name: str, loader: str, data_file: Path, text: str, choice: str, target: str,
          description: str = "") -> str:
    q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
    return "\n".join([
        f"task: {name}", f"dataset_path: {loader}", "dataset_kwargs:", "  data_files:", f"    test: {data_file}",
        "test_split: test", "output_type: multiple_choice", f"description: {q(description)}",
        f"doc_to_text: {q(text)}", f"doc_to_choice: {q(choice) if not choice.startswith('[') else choice}",
        f"doc_to_target: {q(target)}",
        "metric_list:", "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}", ""])


def write_lm_eval_tasks(bench: Path, chosen: dict[str, list], d: Path) -> dict[str, list[str]]:
    """Local task YAMLs + data files for the chosen items of each task; {our task: [lm-eval tasks]}."""
    groups: dict[str, list[str]] = {"arc_easy": [], "hellaswag": [], "mmlu": [], "mmlu_cloze": []}
    ids = {it.id.split(":", 1)[1] for it in chosen["arc_easy"]}
    arc = d / "arc_easy.jsonl"
    arc.write_text("".join(line for line in (bench / "arc/ARC-Easy-Test.jsonl").read_text().splitlines(True)
                           if json.loads(line)["id"] in ids))
    (d / "x_arc_easy.yaml").write_text(_yaml(
        "x_arc_easy", "json", arc, "Question: {{question.stem}}\nAnswer:",
        "{{question.choices | map(attribute='text') | list}}",
        "{{(question.choices | map(attribute='label') | list).index(answerKey)}}"))
    groups["arc_easy"].append("x_arc_easy")
    hs = d / "hellaswag.jsonl"
    hs.write_text("".join(json.dumps({"query": it.context, "choices": list(it.choices), "label": it.gold}) + "\n"
                          for it in chosen["hellaswag"]))
    (d / "x_hellaswag.yaml").write_text(_yaml("x_hellaswag", "json", hs, "{{query}}", "{{choices}}", "{{label}}"))
    groups["hellaswag"].append("x_hellaswag")
    by_subject: dict[str, set[int]] = {}
    for it in chosen["mmlu"]:
        stem, line = it.id.rsplit(":", 1)
        by_subject.setdefault(stem.removesuffix("_test"), set()).add(int(line))
    for subject, lines in sorted(by_subject.items()):
        with open(bench / f"mmlu/test/{subject}_test.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        data = d / f"mmlu_{subject}.jsonl"  # json keeps every field a string (csv would guess numbers)
        data.write_text("".join(json.dumps({**dict(zip(rows[0], rows[n - 1], strict=True)),
                                            "answer": int(rows[n - 1][rows[0].index("answer")])}) + "\n"
                                for n in sorted(lines)))
        topic = subject.replace("_", " ")
        for ours, (desc, text, choice) in (("mmlu", MMLU_DEFAULT), ("mmlu_cloze", MMLU_CLOZE)):
            name = f"x_{ours}_{subject}"
            (d / f"{name}.yaml").write_text(_yaml(name, "json", data, text, choice, "{{answer}}",
                                                  desc.format(topic=topic)))
            groups[ours].append(name)
    return groups


def compare_lm_eval(hf_dir: Path, bench: Path, items: int, threads: int) -> dict[str, dict]:
    work = Path(tempfile.mkdtemp(prefix="lmeval-"))
    lm = load_scoring_model(hf_dir)
    # lm-eval stops on an answer longer than the model's window: the items our scorer keeps (all fit)
    encoded = {t: encode_mc(t, t, read_task(t, bench, items), lm.encode, lm.max_length, lm.eos_id)
               for t in ("arc_easy", "hellaswag", "mmlu", "mmlu_cloze")}
    groups = write_lm_eval_tasks(bench, {t: d.items for t, d in encoded.items()}, work)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               HF_DATASETS_CACHE=str(work / "cache"))
    tasks = ",".join(t for g in groups.values() for t in g)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
           "--device", "cpu", "--batch_size", "16", "--include_path", str(work), "--tasks", tasks,
           "--log_samples", "--output_path", str(work / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if not glob.glob(str(work / "out/*/samples_*.jsonl")):
        raise SystemExit(f"lm_eval wrote no samples (is it on PYTHONPATH?):\n{proc.stderr[-3000:]}")
    out: dict[str, dict] = {}
    for ours, names in groups.items():
        data = encoded[ours]
        ll = row_loglikelihoods(lm.forward, data, 16, head=lm.head)
        by_prompt = {it.context: i for i, it in enumerate(data.items)}
        diffs, theirs_acc, theirs_norm, ours_acc, ours_norm, unmatched = [], [], [], [], [], 0
        for name in names:
            for line in open(glob.glob(str(work / f"out/*/samples_{name}_*.jsonl"))[0], encoding="utf-8"):
                s = json.loads(line)
                ctx = s["arguments"]["gen_args_0"]["arg_0"]
                if ctx not in by_prompt:
                    unmatched += 1
                    continue
                i = by_prompt[ctx]
                mine = ll[data.item_of_row == i]
                theirs = np.array([float(r[0]) for r in s["filtered_resps"]])
                diffs.append(float(np.abs(mine - theirs).max()))
                theirs_acc.append(s["acc"])
                theirs_norm.append(s["acc_norm"])
                lens = data.char_len[data.item_of_row == i]
                ours_acc.append(float(np.argmax(mine) == data.items[i].gold))
                ours_norm.append(float(np.argmax(mine / lens) == data.items[i].gold))
        out[ours] = {"items": len(diffs), "unmatched_prompts": unmatched, "max_abs_ll_diff": max(diffs),
                     "acc_ours": float(np.mean(ours_acc)), "acc_lm_eval": float(np.mean(theirs_acc)),
                     "acc_norm_ours": float(np.mean(ours_norm)), "acc_norm_lm_eval": float(np.mean(theirs_norm)),
                     "lm_eval_seconds_all_tasks": round(seconds, 1)}
        print(f"lm-eval {ours}: {out[ours]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="checkpoints, pretrain output directories or HF directories")
    ap.add_argument("--train-tiny", type=int, default=0, help="train the tiny preset this many steps and score it")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--sets", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lm-eval", action="store_true", help="compare with lm-evaluation-harness (last model)")
    ap.add_argument("--lm-eval-items", type=int, default=60)
    args = ap.parse_args()
    bench = default_benchmarks_dir()
    if bench is None:
        raise SystemExit("no benchmarks folder ($TEXTBOOK_BENCHMARKS or ../shared/data/benchmarks)")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the trainer's own thread setting follows it
    threads = set_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-mc-"))
    models = [Path(m) for m in args.models]
    tasks = [t for t in args.sets.split(",") if t]
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"torch {torch.__version__}, {threads} thread(s)", "items": args.items, "models": [],
                    "load_average_start": round(os.getloadavg()[0], 1)}
    if args.train_tiny:
        run = train_tiny(args.train_tiny, work, report)
        models = [untrained_copy(run, work), run, *models]
    if not models:
        raise SystemExit("give models or --train-tiny N")
    for m in models:
        lm = load_scoring_model(m)
        res = evaluate_tasks(lm, tasks, items=args.items, path=bench, progress=False)
        for r in res.values():  # the committed report names files relative to the checkout, not this machine
            r["files"] = [os.path.relpath(f, RESULTS.parent.parent) for f in r.get("files", [])]
        label = "tiny, untrained (step 0)" if m.name == "untrained.pt" else (
            f"tiny, {args.train_tiny} steps" if args.train_tiny and m == models[1] else str(m))
        report["models"].append({"model": label, "info": lm.info, "tasks": res})
        print(label, {t: (r["acc"], r["acc_norm"], r["answer_bpb"], r["seconds"]) for t, r in res.items()},
              flush=True)
    if args.lm_eval:
        from pipeline.train.export import export_hf

        last = models[-1]
        hf = last if (last / "config.json").is_file() else export_hf(last, work / "hf")
        report["lm_eval"] = compare_lm_eval(hf, bench, args.lm_eval_items, threads)
    report["load_average_end"] = round(os.getloadavg()[0], 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_mc.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "eval_mc.md").write_text(markdown(report))
    print(f"wrote {RESULTS / 'eval_mc.md'}")


def markdown(r: dict) -> str:
    lines = ["# Multiple-choice evaluation (`textbook eval-mc`, pipeline/train/evals.py)", "",
             f"Machine: {r['machine']}; load average "
             + (r["load"] if "load" in r else f"{r.get('load_average_start')} at the start, "
                f"{r.get('load_average_end')} at the end")
             + " (a shared machine: the seconds, which include reading and tokenizing the files, are upper bounds). "
             f"{r['items']} items per task (the first by sha256 of the item id), zero-shot, lm-evaluation-harness "
             "prompts; acc_norm divides by the answer's characters; answer bpb: bits per byte of the right answer.",
             "", *([f"Model trained here: {r['training']}.", ""] if r.get("training") else []),
             "| model | task | n | acc | acc_norm | ± stderr | chance | answer bpb | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in r["models"]:
        for t, x in m["tasks"].items():
            lines.append(f"| {m['model']} | {t} | {x['n']} | {x['acc']:.3f} | {x['acc_norm']:.3f} | "
                         f"{x['acc_stderr']:.3f} | {x['chance']:.3f} | {x['answer_bpb']:.3f} | {x['seconds']:.1f} |")
    if "lm_eval" in r:
        lines += ["", "## Against lm-evaluation-harness (same model export, same items)", "",
                  "| task | items | prompts not built identically | max abs Δ log-likelihood | acc ours / lm-eval | "
                  "acc_norm ours / lm-eval |", "|---|---:|---:|---:|---:|---:|"]
        for t, x in r["lm_eval"].items():
            lines.append(f"| {t} | {x['items']} | {x['unmatched_prompts']} | {x['max_abs_ll_diff']:.1e} | "
                         f"{x['acc_ours']:.3f} / {x['acc_lm_eval']:.3f} | "
                         f"{x['acc_norm_ours']:.3f} / {x['acc_norm_lm_eval']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
