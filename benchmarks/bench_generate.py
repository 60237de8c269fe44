"""Generate stage throughput: the whole `generate` stage (sampler, templates, LLM layer with Ray workers and
ledger, validation with the tokenizer and fastText language id, MinHash diversity guard, parquet output) vs a
plain `AsyncOpenAI` + `asyncio.Semaphore` loop over the same rendered prompts, in the same process run, against
the FaultyOpenAIServer (separate process) with lognormal latency (median 0.5 s, sigma 0.5).

    .venv/bin/python benchmarks/bench_generate.py              # 3,000 requests, concurrency 128
    .venv/bin/python benchmarks/bench_generate.py --n 600 --rounds 1 --workers 2   # quicker

Goal: ratio (stage req/s / plain req/s) >= 0.95, without and with 10 % 429 responses.
The stage's time is its whole wall time (planning, Ray start, validation, writing); the plain loop only sends.

Whole commands (`--command`): `textbook generate CONFIG` as a process (interpreter start, imports, planning, the
judging process, Ray if llm.workers > 0, every answer judged and written, exit) against the plain loop as a
process (`plain_openai_loop.py`: interpreter start, `import openai`, the loop over the same prompts, exit), in
alternating order, one ratio per round per size; prints the 3,000- and 10,000-request ratios:

    .venv/bin/python benchmarks/bench_generate.py --command --sizes 3000 10000 --workers 0 1 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from bench_llm_throughput import plain_loop

from pipeline.config import load_config
from pipeline.generate.stage import plan
from pipeline.llm.runner import run_requests
from pipeline.llm.testserver import FaultyOpenAIServer
from pipeline.run import run_one


def stage_run(srv: FaultyOpenAIServer, args: argparse.Namespace, workers: int, llm_only: bool) -> dict:
    """One timed `generate` stage (fresh output dir and ledger), optionally preceded by run_requests alone."""
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(None, settings(srv, args, workers, d))
        only = None
        if llm_only:
            reqs = plan(cfg, []).requests
            t0 = time.perf_counter()
            run_requests(reqs, cfg.llm, cfg.budget, Path(d) / "llm-only.sqlite", progress=False)
            only = args.n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats = run_one(cfg, "generate", log=lambda m: None)
        secs = time.perf_counter() - t0
    llm = stats["llm"]
    return {"workers": workers, "stage_rps": round(args.n / secs, 1), "stage_seconds": round(secs, 2),
            "llm_elapsed_s": llm["elapsed_s"], "llm_startup_s": llm.get("startup_s"), "kept": stats["kept"],
            "dropped": stats["dropped"], "errored": stats["errored"], "retries": llm["retries"],
            "llm_only_rps": round(only, 1) if only else None}


def settings(srv: FaultyOpenAIServer, args: argparse.Namespace, workers: int, d: str) -> list[str]:
    return [f"run.out={d}/run", "run.stages=[generate]", f"generate.n={args.n}", f"llm.base_url={srv.base_url}",
            "llm.model=test-model", f"llm.concurrency={args.concurrency}", f"llm.workers={workers}",
            f"llm.ledger={d}/ledger.sqlite", "llm.api_key_env=BENCH_NO_KEY", "llm.max_tokens=400",
            "llm.backoff_base_s=0.1"]


def _nested(sets: list[str]) -> dict:
    """--set style "a.b=value" pairs as a config mapping (values read as YAML, as `--set` does)."""
    import yaml

    cfg: dict = {}
    for item in sets:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def _timed(cmd: list[str], pythonpath: str | None = None) -> float:
    """Wall seconds of a whole process, start to exit; its output is kept only to show on failure.
    `pythonpath`: import `pipeline` from there (another checkout's code: --compare)."""
    import os
    import resource
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the process and every descendant it waited for (the judge; Ray's processes where reaped):
    # on a shared machine the figure that compares, where wall clock mostly measures the other jobs
    _timed.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # type: ignore[attr-defined]
    if done.returncode != 0:
        sys.exit(f"{cmd[:3]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return secs


def command_rounds(args: argparse.Namespace) -> list[dict]:
    """`--command`: per size and round, the plain loop process and `textbook generate` (once per --workers value)
    in alternating order (even rounds plain first, odd rounds ours first: drift of the shared machine cancels)."""
    import os
    import sys

    import yaml

    here = Path(__file__).resolve().parent
    textbook = str(Path(sys.executable).parent / "textbook")
    rows = []
    with FaultyOpenAIServer(mode="process", latency="lognormal", latency_s=0.5, sigma=0.5, words=args.words,
                            seed=1) as srv, tempfile.TemporaryDirectory() as d:
        for n in args.sizes:
            args.n = n
            cfg = load_config(None, settings(srv, args, 0, d))
            prompts = Path(d) / f"prompts-{n}.json"
            prompts.write_text(json.dumps([list(r.messages) for r in plan(cfg, []).requests]))
            plain_cmd = [sys.executable, str(here / "plain_openai_loop.py"), str(prompts), srv.base_url,
                         str(args.concurrency), json.dumps(cfg.llm.sampling_params())]
            variants = [("this checkout", None)] + ([("--compare", args.compare)] if args.compare else [])
            cases = [(label, path, w) for label, path in variants for w in args.workers]
            for rnd in range(1, args.rounds + 1):
                order = [None, *cases] if rnd % 2 else [*cases[::-1], None]  # None: the plain loop
                secs: dict = {}
                cpu: dict = {}
                for case in order:
                    if case is None:
                        secs["plain"] = _timed(plain_cmd)
                        cpu["plain"] = _timed.cpu_s  # type: ignore[attr-defined]
                        continue
                    label, path, w = case
                    run = Path(d) / f"run-{n}-{rnd}-{w}-{len(secs)}"
                    config = run.with_suffix(".yaml")
                    config.write_text(yaml.safe_dump(_nested(settings(srv, args, w, str(run)))))
                    secs[case] = _timed([textbook, "generate", str(config)], path)
                    cpu[case] = _timed.cpu_s  # type: ignore[attr-defined]
                load = os.getloadavg()[0]
                for case in cases:
                    label, _, w = case
                    row = {"n": n, "round": rnd, "code": label, "workers": w, "plain_s": round(secs["plain"], 2),
                           "textbook_s": round(secs[case], 2), "ratio": round(secs["plain"] / secs[case], 3),
                           "plain_cpu_s": round(cpu["plain"], 2), "textbook_cpu_s": round(cpu[case], 2),
                           "load_1min": round(load, 1)}
                    rows.append(row)
                    print(f"{n} requests round {rnd}: plain loop command {row['plain_s']} s ({row['plain_cpu_s']} "
                          f"CPU s), textbook generate ({label}) workers={w} {row['textbook_s']} s "
                          f"({row['textbook_cpu_s']} CPU s): ratio {row['ratio']:.3f} (load {load:.1f})", flush=True)
    print("\nwhole-command throughput ratio (plain s / textbook s, same round), median over rounds:")
    for n in args.sizes:
        for label in dict.fromkeys(r["code"] for r in rows):
            for w in args.workers:
                mine = [r for r in rows if r["n"] == n and r["workers"] == w and r["code"] == label]
                ratios = sorted(r["ratio"] for r in mine)
                extra_cpu = statistics.median(r["textbook_cpu_s"] - r["plain_cpu_s"] for r in mine)
                print(f"  {n:>6,} requests, {label}, workers={w}: median {statistics.median(ratios):.3f}  "
                      f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)}); CPU s beyond the plain loop's: "
                      f"median {extra_cpu:.1f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 0],
                    help="LLM worker actors per run (0: the in-process thread worker, no Ray)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per case; each round times the plain loop, then the stage once per --workers "
                         "value, and ratios are taken within a round (the VM's speed drifts between minutes)")
    ap.add_argument("--words", type=int, default=200, help="words per answer from the test server")
    ap.add_argument("--llm-only", action="store_true",
                    help="also time run_requests alone on the same requests (the LLM layer without the stage)")
    ap.add_argument("--no-429", action="store_true", help="only the fault-free case")
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    ap.add_argument("--command", action="store_true",
                    help="time whole commands: `textbook generate` vs the plain loop, each as its own process")
    ap.add_argument("--sizes", type=int, nargs="+", default=[3000, 10000], help="--command: requests per run")
    ap.add_argument("--compare", type=str, default=None,
                    help="--command: also time `textbook generate` importing `pipeline` from this directory (an "
                         "older checkout, e.g. from `git archive COMMIT pipeline prompts tokenizers`), same rounds")
    args = ap.parse_args()
    if args.command:
        rows = command_rounds(args)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        return

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the pipeline starts Ray once per run
    ideal = args.concurrency / (0.5 * math.exp(0.5**2 / 2))
    rows = []
    cases = [("no faults", {}), ("10% 429", {"rate_429": 0.10, "retry_after_s": 0.5})]
    for label, faults in cases[:1] if args.no_429 else cases:
        with FaultyOpenAIServer(mode="process", latency="lognormal", latency_s=0.5, sigma=0.5, words=args.words,
                                seed=1, **faults) as srv:
            with tempfile.TemporaryDirectory() as d:  # the same rendered prompts the stage sends
                cfg = load_config(None, settings(srv, args, 0, d))
                msgs = [list(r.messages) for r in plan(cfg, []).requests]
                params = cfg.llm.sampling_params()
            for rnd in range(1, args.rounds + 1):
                base_s, base_failed = asyncio.run(plain_loop(srv.base_url, msgs, params, args.concurrency))
                base = args.n / base_s
                print(f"{label} round {rnd}: plain AsyncOpenAI+Semaphore {base:.1f} req/s ({base / ideal:.2f} of "
                      f"ideal {ideal:.1f}), failed {base_failed}", flush=True)
                for w in args.workers:
                    row = {"case": label, "round": rnd, "n": args.n, "concurrency": args.concurrency,
                           "ideal_rps": round(ideal, 1), "plain_rps": round(base, 1), "plain_failed": base_failed,
                           **stage_run(srv, args, w, args.llm_only)}
                    row["ratio"] = round(row["stage_rps"] / base, 3)
                    only = f", run_requests alone {row['llm_only_rps']} req/s" if row["llm_only_rps"] else ""
                    print(f"{label} round {rnd}: generate stage workers={w}: {row['stage_rps']} req/s, ratio "
                          f"{row['ratio']:.3f} (stage {row['stage_seconds']}s, LLM run {row['llm_elapsed_s']}s incl. "
                          f"startup {row['llm_startup_s']}s){only}; kept {row['kept']}, dropped {row['dropped']}, "
                          f"errored {row['errored']}, retries {row['retries']}", flush=True)
                    rows.append(row)
    print("\nmedian ratio over rounds (stage req/s / plain req/s of the same round):")
    for label in dict.fromkeys(r["case"] for r in rows):
        for w in args.workers:
            ratios = sorted(r["ratio"] for r in rows if r["case"] == label and r["workers"] == w)
            print(f"  {label:10s} workers={w}: median {statistics.median(ratios):.3f}  (rounds: "
                  f"{', '.join(f'{x:.3f}' for x in ratios)})")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
