"""Memory of a shard worker stays flat as the input grows 10x (issue 18).

A worker process runs many tasks (Ray reuses worker processes), so what one task leaves behind adds up over
the run: with a `tokenizers.Tokenizer` loaded per task, a worker grew ~3 MB per tokenize task (80 MB more for
10x the input here). The check runs the shard stage's task code (`run.executor: inline`: every task one after
another in one process, as one Ray worker would run them) in a fresh process on 3 and on 30 input files of real
text and compares the peak RSS of the two processes (`ru_maxrss`), so it fails if anything held by a task
grows with the number of tasks or documents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys
from pipeline import run as runmod
from pipeline.config import load_config
stats = runmod.run_pipeline(load_config(None, sys.argv[1:]), log=lambda m: None)["shard"]
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "buckets": stats["shuffle_buckets"], "read": stats["read"], "kept": stats["kept"]}))
"""


def write_inputs(words: list[str], directory: Path, files: int, per_file: int = 30, length: int = 500) -> Path:
    """`files` jsonl files of `per_file` documents, each `length` consecutive words of real text."""
    directory.mkdir(parents=True)
    for k in range(files):
        lines = []
        for i in range(per_file):
            j = ((k * per_file + i) * length) % (len(words) - length)
            lines.append(json.dumps({"id": f"d{k}-{i}", "text": " ".join(words[j:j + length]), "source": "web"}))
        (directory / f"in-{k:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def peak_of_shard_worker(inputs: Path, out: Path) -> dict:
    sets = [f"run.out={out}", "run.stages=[shard]", f"shard.inputs=[{inputs}]", "run.executor=inline",
            "shard.shuffle_buffer_mb=1", "shard.shard_mb=1"]
    env = {k: v for k, v in os.environ.items() if k != "TEXTBOOK_TASK_EVENTS"}
    done = subprocess.run([sys.executable, "-c", CHILD, *sets], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_shard_worker_memory_flat_over_10x_input(shared_data, tmp_path):
    from _dedup_planting import real_documents

    words = " ".join(d["text"] for d in real_documents(shared_data)).split()
    small = peak_of_shard_worker(write_inputs(words, tmp_path / "in-3", 3), tmp_path / "out-3")
    large = peak_of_shard_worker(write_inputs(words, tmp_path / "in-30", 30), tmp_path / "out-30")
    assert (small["read"], large["read"]) == (90, 900) and large["kept"] == 900
    assert large["buckets"] > small["buckets"]  # more buckets and 10x the tasks in the one worker process
    # Measured: +6 to +14 MB over ~230 MB (a bucket of 1 MB written as more buckets appear); one tokenizer
    # per task (the code before this test): +80 MB.
    assert large["peak_mb"] - small["peak_mb"] < 40, (small, large)


GATHER_CHILD = """
import json, sys
import numpy as np
from pipeline.dedup_dist import _read_file_rows

def hwm_mb():
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) / 1024

paths, n, perm = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(1)
rows = [np.sort(rng.choice(n, 40_000, replace=False)) for _ in paths]
before = hwm_mb()
got = [_read_file_rows(p, r, perm, np.uint32) for p, r in zip(paths, rows)]
rise = hwm_mb() - before  # before the check below reads the whole files itself
want = [np.fromfile(p, dtype=np.uint32).reshape(n, perm)[r] for p, r in zip(paths, rows)]
print(json.dumps({"rise_mb": rise, "equal": all(np.array_equal(g, w) for g, w in zip(got, want)),
                  "n": sum(len(r) for r in rows)}))
"""


def _gather_rise(tmp_path, n: int, perm: int = 112) -> dict:
    import numpy as np

    paths = [tmp_path / f"seg-{n}-{k}.sig.u32" for k in range(2)]
    for k, p in enumerate(paths):
        np.random.default_rng(k).integers(0, 8, size=(n, perm), dtype=np.uint32).tofile(p)  # some equal values
    out = subprocess.run([sys.executable, "-c", GATHER_CHILD, ",".join(map(str, paths)), str(n), str(perm)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    for p in paths:
        p.unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gathering_rows_does_not_grow_with_the_signature_files(tmp_path):
    """A dedup cluster task gathers its rows' signatures from the signature files (40,000 random rows from each
    of two files, of 2 x 50,000 and of 2 x 400,000 documents, 112 permutations: 45 and 358 MB). When tasks
    read them memory-mapped, every row left ~64 KB of the file mapped and a task's peak RSS grew with the files
    (+508 MB at 1M documents, benchmarks/results/scale.md; ~+300 MB between these two sizes). It must hold
    the rows it asked for whatever the files' size, and give the same rows."""
    small, large = _gather_rise(tmp_path, 50_000), _gather_rise(tmp_path, 400_000)
    assert small["equal"] and large["equal"] and small["n"] == large["n"] == 80_000
    assert large["rise_mb"] - small["rise_mb"] < 40, (small, large)
