"""Reader fuzzing, the big sweep: every fixture of tests/_fuzz_corpus.py (real files from ../shared/data in every
input format, for the web stage's WebReader and the shared iter_documents), 5x the corruptions of the CI test
under another seed (11,200 by default), and per fixture x corruption kind: tried / passed / lost-untouched /
crashed / hung / other. Writes benchmarks/results/reader_fuzz.json.

    .venv/bin/python benchmarks/bench_reader_fuzz.py                      # the sweep (about 3 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_reader_fuzz.py --findings /tmp/fuzz_findings.md
    .venv/bin/python benchmarks/bench_reader_fuzz.py --only web:warc --seed 20261130 --case 106   # one case
    .venv/bin/python benchmarks/bench_reader_fuzz.py --root /tmp/old-checkout   # another checkout's readers

`--case` prints the corruption, the records it touched, what the reader did and the oracle's verdict, and with
`--keep DIR` leaves the clean and the corrupted file there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(1, str(ROOT))

import _fuzz_corpus as fz  # noqa: E402

VERDICTS = ("passed", "lost", "crashed", "hung", "other")


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


READER_FILES = ("pipeline/web/readers.py", "pipeline/web/warc.py", "pipeline/web/units.py", "pipeline/web/fates.py",
                "pipeline/textio.py", "pipeline/documents.py", "pipeline/io.py")


def reader_tree(root: str | None, imported: str) -> str:
    """Which readers ran: HEAD, the last commit that changed a reader file, and reader files not committed."""
    if root:
        return f"readers imported from {imported} (--root {root})"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", *READER_FILES).splitlines()]
    head = git("rev-parse", "--short", "HEAD")
    last = git("log", "-1", "--format=%h", "--", *READER_FILES)
    return f"HEAD {head} (readers last changed in {last})" + (
        f" + uncommitted changes to {', '.join(dirty)}" if dirty else ", reader files committed")


def shared_data() -> Path:
    from pipeline.paths import shared_data_dir

    d = shared_data_dir()
    if d is None:
        raise SystemExit("../shared/data is needed for this benchmark")
    return d


def one_case(args: argparse.Namespace) -> int:
    corpus = fz.build_corpus(shared_data())
    if not args.only or len(args.only) != 1:
        raise SystemExit("--case needs exactly one --only FIXTURE")
    c = corpus[args.only[0]]
    case = fz.make_case(c, args.seed, args.case)
    print(case.repro)
    print(f"file: {c.filename} ({len(c.data)} bytes -> {len(case.data)}), {len(c.recs)} records "
          f"({len(c.docs)} read as records), {len(c.segments)} members/frames/row groups")
    print(f"touched: {sorted(case.touched)}  must still be read: {sorted(case.must_read)}  whole file may fail: {case.whole}")
    with fz.scratch_dir() as d:
        work = Path(d)
        w = fz.ReaderWorker(timeout=args.timeout, log=work / "worker.log", root=args.root)
        try:
            o = fz.run_case(c, case, w, work / "case", keep=True)
        finally:
            w.close()
        if args.keep:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            (keep / ("clean-" + c.filename)).write_bytes(c.data)
            (keep / c.filename).write_bytes(case.data)
            print(f"kept: {keep / c.filename} and {keep / ('clean-' + c.filename)}")
    res = o.res
    print(f"reader: {res.get('status')} in {o.secs * 1000:.1f} ms; {len(res.get('docs', []))} documents")
    if res.get("exc"):
        print(res["exc"])
    for key in ("read", "ledger", "errors", "repairs"):
        if res.get(key):
            print(f"{key}: {json.dumps(res[key], ensure_ascii=False)[:1500]}")
    print(f"verdict: {o.verdict}")
    for cls, detail in o.problems:
        print(f"  {cls}: {detail}")
    return 0 if o.verdict == "passed" else 1


def table(outcomes: list[fz.Outcome]) -> list[dict]:
    rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for o in outcomes:
        for key in ((o.case.fixture, o.case.kind), (o.case.fixture, "all")):
            rows[key]["tried"] += 1
            rows[key][o.verdict] += 1
    return [{"fixture": f, "kind": k, "tried": n["tried"], **{v: n[v] for v in VERDICTS}}
            for (f, k), n in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1]))]


def print_table(rows: list[dict]) -> None:
    print(f"{'fixture':<26} {'corruption':<15} {'tried':>6} {'passed':>7} {'lost':>5} {'crash':>6} {'hung':>5} {'other':>6}")
    for r in rows:
        if r["kind"] == "all":
            print(f"{r['fixture']:<26} {'= all':<15} {r['tried']:>6} {r['passed']:>7} {r['lost']:>5} "
                  f"{r['crashed']:>6} {r['hung']:>5} {r['other']:>6}")
            print()
        else:
            print(f"{'':<26} {r['kind']:<15} {r['tried']:>6} {r['passed']:>7} {r['lost']:>5} {r['crashed']:>6} "
                  f"{r['hung']:>5} {r['other']:>6}")


def classes(outcomes: list[fz.Outcome], seed: int) -> list[dict]:
    out = []
    for (fx, kind, cls), group in sorted(fz.failure_classes(outcomes).items()):
        o = min(group, key=lambda g: len(g.case.desc))  # the shortest description: usually the smallest corruption
        out.append({"fixture": fx, "kind": kind, "class": cls, "cases": len(group), "example_case": o.case.index,
                    "corruption": o.case.desc, "detail": next(d for k, d in o.problems if k == cls),
                    "reproduce": f".venv/bin/python benchmarks/bench_reader_fuzz.py --only {fx} --seed {seed} "
                                 f"--case {o.case.index}"})
    return out


def findings_md(result: dict) -> str:
    lines = [f"# Reader fuzz findings ({result['date']})", "",
             f"Generated by `{result['command']}`; readers: {result['reader_tree']}; seed {result['seed']}; "
             f"{result['corruptions']} corruptions, {result['failed']} failed.", ""]
    if not result["classes"]:
        lines.append("No failure: every corruption passed (no crash, no hang, reconciled, no untouched record lost).")
        return "\n".join(lines) + "\n"
    lines += ["| fixture | corruption | failure | cases | example (reproduce with the command below) |",
              "|---|---|---|---:|---|"]
    for c in result["classes"]:
        ex = f"case {c['example_case']}: {c['corruption']} → {c['detail']}".replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c['fixture']} | {c['kind']} | {c['class']} | {c['cases']} | {ex[:400]} |")
    lines += ["", "Reproduce one: " + "`.venv/bin/python benchmarks/bench_reader_fuzz.py --only FIXTURE --seed "
              f"{result['seed']} --case N`" + (f" (with `--root {result['root']}`)" if result.get("root") else "")]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=5.0, help="corruptions per fixture = scale x the CI test's")
    ap.add_argument("--only", nargs="*", help="fixtures (entry:format), e.g. web:warc docs:parquet")
    ap.add_argument("--case", type=int, help="run this one case (with one --only) and show everything")
    ap.add_argument("--keep", help="with --case: write the clean and the corrupted file here")
    ap.add_argument("--root", help="import `pipeline` from this checkout instead (e.g. an older commit)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a reader call counts as hung")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reader_fuzz.json"))
    ap.add_argument("--findings", help="also write the failure classes as markdown here")
    ap.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = ap.parse_args()
    if args.case is not None:
        return one_case(args)
    names = args.only or sorted(fz.FIXTURES)
    unknown = set(names) - set(fz.FIXTURES)
    if unknown:
        raise SystemExit(f"unknown fixtures {sorted(unknown)}; known: {', '.join(sorted(fz.FIXTURES))}")
    t0 = time.perf_counter()
    tree = reader_tree(args.root, "")  # before the sweep: others may commit while it runs
    corpus = fz.build_corpus(shared_data())
    outcomes: list[fz.Outcome] = []
    per_fixture_s: dict[str, float] = {}
    with fz.scratch_dir() as d:
        work = Path(d)
        w = fz.ReaderWorker(timeout=args.timeout, log=work / "worker.log", root=args.root)
        imported = w.pipeline
        try:
            for name in names:
                t = time.perf_counter()
                runs = max(1, round(fz.FIXTURES[name] * args.scale))
                got = fz.fuzz(corpus[name], w, args.seed, runs, work / name.replace(":", "_"), max_hangs=10)
                per_fixture_s[name] = round(time.perf_counter() - t, 2)
                outcomes += got
                bad = sum(o.verdict != "passed" for o in got)
                print(f"{name:<26} {len(got):>5} corruptions, {bad:>4} failed, {per_fixture_s[name]:6.1f} s", flush=True)
        finally:
            w.close()
        restarts = w.starts - 1
    total_s = time.perf_counter() - t0
    rows = table(outcomes)
    print()
    print_table(rows)
    secs = [o.secs for o in outcomes if o.verdict != "hung"]
    verdicts = Counter(o.verdict for o in outcomes)
    argv = " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    result = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": f".venv/bin/python benchmarks/bench_reader_fuzz.py {argv}".strip(),
        "commit": git("rev-parse", "--short", "HEAD"), "reader_tree": tree if not args.root else reader_tree(args.root, imported),
        "root": args.root, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                       "python": platform.python_version()},
        "seed": args.seed, "scale": args.scale, "corruptions": len(outcomes),
        "failed": len(outcomes) - verdicts["passed"], "verdicts": {v: verdicts[v] for v in VERDICTS},
        "worker_restarts": restarts, "seconds": round(total_s, 1), "per_fixture_seconds": per_fixture_s,
        "reader_call_ms": {"median": round(statistics.median(secs) * 1000, 2) if secs else None,
                           "p99": round(sorted(secs)[int(0.99 * (len(secs) - 1))] * 1000, 2) if secs else None,
                           "max": round(max(secs) * 1000, 2) if secs else None},
        "by_kind": {k: dict(n) for k, n in sorted(_by_kind(outcomes).items())},
        "rows": rows, "classes": classes(outcomes, args.seed),
    }
    print(f"\n{len(outcomes)} corruptions in {total_s:.1f} s: " + ", ".join(f"{v} {verdicts[v]}" for v in VERDICTS)
          + f"; reader call median {result['reader_call_ms']['median']} ms, max {result['reader_call_ms']['max']} ms")
    print(f"readers: {result['reader_tree']}")
    for c in result["classes"]:
        print(f"  {c['fixture']} / {c['kind']} / {c['class']}: {c['cases']} case(s), e.g. case {c['example_case']}: "
              f"{c['corruption']}\n      -> {c['detail']}")
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")
    if args.findings:
        Path(args.findings).write_text(findings_md(result))
        print(f"wrote {args.findings}")
    return 0 if result["failed"] == 0 else 1


def _by_kind(outcomes: list[fz.Outcome]) -> dict[str, Counter]:
    out: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        out[o.case.kind]["tried"] += 1
        out[o.case.kind][o.verdict] += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
