"""Issue 18 benchmark: dedup and shard as Ray tasks, 1 vs 2 workers, and memory per worker as the input grows.

For each size N (documents) and each path, a fresh subprocess runs one stage on the same input:

- local      `run.executor: local`, the single-process code (the baseline, as fast as before issue 18);
- ray-1      `run.executor: ray` on a local Ray with 1 CPU (one task at a time);
- ray-2      the same with 2 CPUs.

Documents are synthetic but realistic: `bench_dedup.corpus` cuts 100-600-word windows from real text
(../shared/data: Dolma CC, FineWeb-Edu sample, OpenStax), resamples 15 % of the words so windows are distinct
and adds 10 % near-copies (5 % of words changed), written as parquet files of 10,000 documents (the size of
an upstream stage's kept parts).

Figures: documents/s (wall clock of the stage), the driver's peak RSS, and the peak RSS of each Ray worker
process (every task writes its worker's ru_maxrss through the engine's event hook; a worker runs many tasks,
so this is the peak over all of them); the idle worker's RSS (Ray + numpy + pyarrow imported) is reported
beside it. The bucket tasks of dedup hold at most `--rows-per-task` rows of one band (default 50,000 here, so
the bound is reached at these sizes as it would be at 2M rows per task on a large corpus).

    .venv/bin/python benchmarks/bench_scale.py --sizes 20000 200000 [--stages dedup shard] [--paths local ray-1 ray-2]

The issue's full run (1M documents, 1 vs 2 workers, and the 10x memory check; on an idle 2-core machine it
takes a few hours, see benchmarks/results/scale.md for the exact command) ends with a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def corpus_stream(n: int, per_file: int, seed: int = 0, pool: int = 20_000) -> Iterator[list[dict]]:
    """`bench_dedup.corpus`'s documents (100-600-word windows of real text, 15 % of words resampled; 10 %
    near-copies with 5 % of words changed), one file's worth at a time: memory stays at `pool` documents (the
    near-copies' originals are drawn from the last `pool` ones), so 1M documents fit on a laptop."""
    from bench_dedup import real_word_stream

    stream = real_word_stream()
    rng = random.Random(seed)
    recent: list[str] = []
    for first in range(0, n, per_file):
        docs = []
        for i in range(first, min(n, first + per_file)):
            if recent and rng.random() < 0.1:
                ws = [w if rng.random() > 0.05 else rng.choice(stream) for w in rng.choice(recent).split()]
            else:
                length = rng.randint(100, 600)
                start = rng.randrange(len(stream) - length)
                ws = [w if rng.random() > 0.15 else rng.choice(stream) for w in stream[start:start + length]]
            text = " ".join(ws)
            docs.append({"id": f"d{i}", "text": text, "source": "web", "edu_score": rng.random() * 5})
            recent.append(text)
            if len(recent) > pool:
                recent.pop(rng.randrange(len(recent)))
        yield docs


def make_input(n: int, dest: Path, per_file: int = 10_000) -> Path:
    """n documents as parquet files of `per_file` (generated file by file; progress on stderr)."""
    from pipeline.documents import DocumentWriter

    dest.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for k, docs in enumerate(corpus_stream(n, per_file)):
        with DocumentWriter(dest, prefix=f"in-{k:05d}", rows_per_file=per_file) as w:
            w.write_many(docs)
        if k % 10 == 9:
            print(f"input: {(k + 1) * per_file:,} of {n:,} documents ({time.perf_counter() - t:.0f} s)",
                  file=sys.stderr, flush=True)
    return dest


def child(args: argparse.Namespace) -> None:
    """One stage, one path, in this fresh process; prints a JSON line of figures."""
    from pipeline import dedup_dist
    from pipeline import run as runmod
    from pipeline.config import load_config

    dedup_dist.ROWS_PER_TASK = args.rows_per_task
    events = Path(args.work) / "events"
    os.environ["TEXTBOOK_TASK_EVENTS"] = str(events)
    sets = [f"run.out={args.work}/out", f"run.stages=[{args.stage}]", f"{args.stage}.inputs=[{args.input}]"]
    if args.stage == "dedup":
        sets.append("dedup.keep_index=false")
    if args.stage == "shard" and args.shuffle_mb:
        sets.append(f"shard.shuffle_buffer_mb={args.shuffle_mb}")
    if args.path.startswith("ray"):
        import ray

        workers = int(args.path.split("-")[1])
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=1 << 30)
        # a worker that has only started (Ray, numpy, pyarrow imported): its RSS and CPU are subtracted/beside
        idle, idle_cpu = ray.get(ray.remote(num_cpus=1)(_usage).remote())
        sets.append("run.executor=ray")
    else:
        idle, idle_cpu = None, 0.0
    cfg = load_config(None, sets)
    t, c = time.perf_counter(), time.process_time()
    stats = runmod.run_pipeline(cfg, log=lambda m: None)[args.stage]
    seconds, driver_cpu = time.perf_counter() - t, time.process_time() - c
    workers_kb: dict[str, int] = {}
    workers_cpu: dict[str, float] = {}
    # ru_maxrss only grows: in one worker's tasks, in the order they ended, the rise during a task is what that
    # task kind added to the peak (the largest rise over workers per kind says which task sets the bound)
    growth_kb: dict[str, int] = {}
    for f in sorted(events.glob("*.done"), key=lambda f: f.stat().st_mtime_ns):
        pid = f.name.rsplit("-", 1)[1].split(".")[0]
        kind = f.name.split("-", 1)[0]
        kb, cpu = f.read_text().split()
        rise = int(kb) - workers_kb.get(pid, int(idle or 0))
        if rise > 0:
            growth_kb[kind] = max(growth_kb.get(kind, 0), rise)
        workers_kb[pid] = max(workers_kb.get(pid, 0), int(kb))
        workers_cpu[pid] = max(workers_cpu.get(pid, 0.0), float(cpu))  # cumulative per worker process
    cpu = driver_cpu + sum(workers_cpu.values()) - (idle_cpu * len(workers_cpu) if idle else 0.0)
    print(json.dumps({"stage": args.stage, "path": args.path, "docs": stats["read"], "seconds": round(seconds, 2),
                      "docs_per_s": round(stats["read"] / seconds, 1), "cpu_s": round(cpu, 2),
                      "docs_per_cpu_s": round(stats["read"] / cpu, 1) if cpu > 0 else None,
                      "driver_cpu_s": round(driver_cpu, 2), "driver_peak_mb": round(_peak_mb(), 1),
                      "worker_peak_mb": round(max(workers_kb.values()) / 1024, 1) if workers_kb else None,
                      "worker_idle_mb": round(idle / 1024, 1) if idle else None, "workers": len(workers_kb),
                      "kept": stats["kept"], "engine": stats.get("engine"),
                      "peak_rise_by_task_mb": {k: round(v / 1024, 1) for k, v in sorted(growth_kb.items())},
                      # wall seconds per phase (what does not shrink with more workers is what serialises)
                      "phases": {k: stats.get(k) for k in ("seconds_hash", "seconds_exact", "seconds_buckets",
                                                           "seconds_cluster", "seconds_tokenize") if k in stats}}))


def _usage() -> tuple[int, float]:
    import resource

    from pipeline import dedup, mix  # noqa: F401  (what a task imports: counted in the idle figures)

    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_maxrss, use.ru_utime + use.ru_stime


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--stages", nargs="+", default=["dedup", "shard"])
    ap.add_argument("--paths", nargs="+", default=["local", "ray-1", "ray-2"])
    ap.add_argument("--rows-per-task", type=int, default=50_000)
    ap.add_argument("--shuffle-mb", type=int, default=0, help="shard.shuffle_buffer_mb (a write task's bound); "
                    "0: the default 512")
    ap.add_argument("--per-file", type=int, default=10_000, help="documents per input file (one hash/tokenize task)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    fresh: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in args.sizes:
            t = time.perf_counter()
            inp = make_input(n, Path(tmp) / f"in-{n}", args.per_file)
            print(f"input: {n:,} documents in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            for stage in args.stages:
                for path in args.paths:
                    work = Path(tmp) / f"{stage}-{path}-{n}"
                    cmd = [sys.executable, __file__, "--child", "--stage", stage, "--path", path, "--input", str(inp),
                           "--work", str(work), "--rows-per-task", str(args.rows_per_task),
                           "--shuffle-mb", str(args.shuffle_mb)]
                    load = os.getloadavg()[0]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
                    if out.returncode or not lines:
                        print(out.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"{stage} {path} {n}: failed")
                    row = {**json.loads(lines[-1]), "n": n, "load_before": round(load, 1),
                           "shuffle_mb": args.shuffle_mb or 512, "rows_per_task": args.rows_per_task,
                           "load_after": round(os.getloadavg()[0], 1),
                           "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
                    print(json.dumps(row), flush=True)
                    results.append(row)
                    fresh.append(row)
                    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(fresh))


def summary(rows: list[dict]) -> str:
    """Markdown: documents/s and worker peak per (stage, size, path); speed-up 1 -> 2 workers; the worker peak
    at the largest size against the smallest (the memory bound: flat means the same within noise)."""
    out = ["| stage | documents | path | docs/s | CPU s | worker peak MB | driver peak MB | load before |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    by = {(r["stage"], r["n"], r["path"]): r for r in rows}
    for (stage, n, path), r in sorted(by.items()):
        out.append(f"| {stage} | {n:,} | {path} | {r['docs_per_s']:,} | {r['cpu_s']} | {r['worker_peak_mb'] or '-'} "
                   f"| {r['driver_peak_mb']} | {r['load_before']} |")
    sizes = sorted({r["n"] for r in rows})
    for stage in sorted({r["stage"] for r in rows}):
        for n in sizes:
            one, two = by.get((stage, n, "ray-1")), by.get((stage, n, "ray-2"))
            if one and two:
                out.append(f"- {stage}, {n:,} documents: 1 -> 2 workers {two['docs_per_s'] / one['docs_per_s']:.2f}x")
        for path in ("ray-1", "ray-2"):
            lo, hi = by.get((stage, sizes[0], path)), by.get((stage, sizes[-1], path))
            if lo and hi and len(sizes) > 1 and lo["worker_peak_mb"] and hi["worker_peak_mb"]:
                out.append(f"- {stage}, {path}: worker peak {lo['worker_peak_mb']} MB at {sizes[0]:,} documents, "
                           f"{hi['worker_peak_mb']} MB at {sizes[-1]:,} ({hi['n'] / lo['n']:.0f}x the input)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
