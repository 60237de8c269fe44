"""Web stage throughput: documents/s of the whole stage (read → extract → all filters → write) on the shared
Common Crawl samples, local executor with 1 and 2 workers vs Ray with 1 and 2 workers, in one run.

Each configuration runs in a fresh Python process (no warm caches carried over) with the same tasks, so the
outputs must be identical; the script checks that. Ray start-up is timed separately from the stage.

    .venv/bin/python benchmarks/bench_web.py                 # all four, writes benchmarks/results/web.md
    .venv/bin/python benchmarks/bench_web.py --only local:1  # one configuration, prints JSON
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ["local:1", "local:2", "ray:1", "ray:2"]


def web_section(shared: Path) -> dict:
    web = shared / "web"
    return {
        "inputs": [str(web / "dolma_cc" / "warc"), str(web / "dolma_cc" / "cc_en_head"),
                   str(web / "dolma_cc" / "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz")],
        "sources": [{"path": str(web / "fineweb_sample_300" / "fineweb_subset.json"), "type": "json",
                     "text_key": "original_text"}],
        "tasks": 4,
    }


def run_one_config(spec: str, out: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.paths import shared_data_dir
    from pipeline.run import run_one

    executor, workers = spec.split(":")
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is needed for this benchmark")
    section = web_section(shared) | {"executor": executor, "workers": int(workers)}
    cfg_path = out / "cfg.yaml"
    cfg_path.write_text(json.dumps({"run": {"name": "bench", "out": str(out / "run"), "stages": ["web"]},
                                    "web": section}))
    cfg = load_config(str(cfg_path), [])
    ray_start = 0.0
    if executor == "ray":
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=int(workers), include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t
    t = time.perf_counter()
    stats = run_one(cfg, "web", force=True)
    seconds = time.perf_counter() - t
    from pipeline.documents import iter_documents

    ids = sorted(d["id"] for d in iter_documents([out / "run" / "stages" / "web" / "kept"]))
    return {"config": spec, "seconds": round(seconds, 2), "ray_start_s": round(ray_start, 2),
            "read": stats["read"], "kept": stats["kept"], "docs_per_s": round(stats["read"] / seconds, 2),
            "dropped": stats["dropped"], "errored": stats["errored"], "filters": stats["filters"],
            "files": stats["files"], "kept_ids_hash": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
            "out": str(out / "run" / "stages" / "web")}


def examples(out: str, n: int = 3) -> dict:
    """A few kept and dropped pages (url and first words) for the issue note."""
    import pyarrow.parquet as pq

    res: dict = {"kept": [], "dropped": {}}
    for p in sorted(Path(out, "kept").glob("*.parquet"))[:2]:
        for r in pq.read_table(p, columns=["url", "text"]).to_pylist()[:n]:
            res["kept"].append((r["url"], " ".join(r["text"].split()[:12])))
    for p in sorted(Path(out, "removed").glob("*.parquet")):
        reason = p.name.split("-r0")[0]
        if len(res["dropped"].get(reason, [])) >= 2:
            continue
        for r in pq.read_table(p, columns=["url", "text", "reason"]).to_pylist()[:2]:
            res["dropped"].setdefault(reason, []).append((r["url"], r["reason"], " ".join(r["text"].split()[:10])))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="run one configuration (executor:workers) and print JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "web.md"))
    args = ap.parse_args()
    if args.only:
        with tempfile.TemporaryDirectory() as d:
            res = run_one_config(args.only, Path(d))
            res["examples"] = examples(res["out"])
            print("RESULT " + json.dumps(res))
        return
    results = []
    for spec in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--only", spec], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{spec} failed")
        res = json.loads(line[7:])
        print(f"{spec}: {res['read']} docs in {res['seconds']}s = {res['docs_per_s']} docs/s "
              f"(kept {res['kept']}, ray start {res['ray_start_s']}s)", flush=True)
        results.append(res)
    same = len({(r["kept"], r["kept_ids_hash"], json.dumps(r["dropped"], sort_keys=True)) for r in results}) == 1
    write_report(results, same, Path(args.out))


def write_report(results: list[dict], same: bool, path: Path) -> None:
    base = results[0]
    lines = ["# Web stage benchmark", "",
             "Command: `.venv/bin/python benchmarks/bench_web.py`  ",
             "Machine: 2-core x86-64 CPU, 24 GiB (shared with other engineers' jobs while measured: absolute "
             "numbers are noisy, compare within the table).  ",
             "Input: shared Common Crawl samples: 2 dolma WARC files, the dolma CC-MAIN jsonl.gz (697 docs), "
             "cc_en_head (20), fineweb_sample_300 (300); 4 datatrove tasks; every filter on (URL, min length, "
             "lid.176 language, Gopher repetition + quality, C4, FineWeb), edu scoring off.", "",
             "| executor | workers | documents read | kept | stage seconds | docs/s | vs local 1 worker | Ray start s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ex, w = r["config"].split(":")
        lines.append(f"| {ex} | {w} | {r['read']} | {r['kept']} | {r['seconds']} | {r['docs_per_s']} | "
                     f"{r['docs_per_s'] / base['docs_per_s']:.2f}x | {r['ray_start_s'] or ''} |")
    lines += ["", f"Same kept documents and drop counts in all four configurations: **{same}**.", "",
              "## What each filter removed (shared data, same in every configuration)", "",
              "| state | reason | documents |", "|---|---|---|", f"| read | | {base['read']} |",
              f"| kept | | {base['kept']} |"]
    for k, v in base["dropped"].items():
        top = ", ".join(f"{r} {n}" for r, n in list(base["filters"].get(k, {}).get("reasons", {}).items())[:4])
        lines.append(f"| dropped | {k}{' (' + top + ')' if top else ''} | {v} |")
    for k, v in base["errored"].items():
        lines.append(f"| errored | {k} | {v} |")
    lines += ["", "Per input file:", "", "| file | read | kept | dropped | errored |", "|---|---|---|---|---|"]
    for f, v in base["files"].items():
        lines.append(f"| {Path(f).name} | {v['read']} | {v['kept']} | {sum(v['dropped'].values())} | "
                     f"{sum(v['errored'].values())} |")
    ex = base["examples"]
    lines += ["", "## Examples", "", "Kept (url, first words):", ""]
    lines += [f"- {u or '(no url)'}: \"{t}…\"" for u, t in ex["kept"]]
    lines += ["", "Dropped (url, reason, first words):", ""]
    for items in ex["dropped"].values():
        lines += [f"- {u or '(no url)'} — {why}: \"{t}…\"" for u, why, t in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
