"""Issue 6 benchmark: near-dedup and the shard stage.

(a) Near-dedup of N documents (default 100k) built from real text: our dedup stage (signatures on disk,
    band-by-band clustering) vs `datasketch` MinHashLSH with the same shingles and the same bands x rows as the
    stage's defaults (`DedupParams()`), each in a fresh subprocess: documents/s, CPU seconds, peak RSS.
    datatrove's MinHash steps (same shingles and bands x rows) are run too, since the issue asks for them unless
    our own measures better.
(b) Tokenize + shard throughput: the whole `shard` stage (read, tokenize, spill, bucket shuffle, write through
    ShardSetWriter) vs raw `tokenizers.encode_batch` + one `pyarrow.parquet.write_table`.

    .venv/bin/python benchmarks/bench_dedup.py [--n 100000] [--mb 24]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def real_word_stream() -> list[str]:
    """The words of the real texts the synthetic documents are cut from (Dolma CC, OpenStax, FineWeb-Edu sample)."""
    from pipeline.documents import iter_documents
    from pipeline.paths import shared_data_dir

    data = shared_data_dir()
    if data is None:
        sys.exit("../shared/data is needed for this benchmark")
    texts = [d["text"] for d in iter_documents([data / "web/dolma_cc", data / "textbooks/openstax_intro_python/"
                                                "modules_plaintext.jsonl"])]
    texts += [r["original_text"] for r in json.loads((data / "web/fineweb_sample_300/fineweb_subset.json").read_text())]
    return " ".join(texts).split()


def corpus(n: int, seed: int = 0) -> list[dict]:
    """n documents of 100-600 words cut from real text at random offsets, 15 % of words resampled so they are
    distinct, plus 10 % near-copies (5 % of words changed) of earlier documents."""
    stream = real_word_stream()
    rng = random.Random(seed)
    docs: list[dict] = []
    for i in range(n):
        if docs and rng.random() < 0.1:
            base = rng.choice(docs)["text"].split()
            ws = [w if rng.random() > 0.05 else rng.choice(stream) for w in base]
        else:
            length = rng.randint(100, 600)
            start = rng.randrange(len(stream) - length)
            ws = [w if rng.random() > 0.15 else rng.choice(stream) for w in stream[start:start + length]]
        docs.append({"id": f"d{i}", "text": " ".join(ws), "source": "web", "edu_score": rng.random() * 5})
    return docs


def write_parquet(docs: list[dict], path: Path) -> Path:
    from pipeline.documents import DocumentWriter

    with DocumentWriter(path) as w:
        w.write_many(docs)
    return path


def run_ours(inp: Path, work: Path) -> dict:
    from pipeline import run as runmod
    from pipeline.config import load_config

    cfg = load_config(None, [f"run.out={work}", f"dedup.inputs=[{inp}]", "run.stages=[dedup]",
                             "dedup.keep_index=false"])
    t, c = time.perf_counter(), time.process_time()
    stats = runmod.run_pipeline(cfg, log=lambda m: None)["dedup"]
    return {"seconds": time.perf_counter() - t, "cpu": time.process_time() - c,
            "removed": sum(stats["dropped"].values()), "docs": stats["read"]}


def run_datasketch(inp: Path) -> dict:
    from datasketch import MinHash, MinHashLSH

    from pipeline.dedup import DedupParams
    from pipeline.documents import iter_documents
    from pipeline.minhash import words

    p = DedupParams()
    k = p.shingle_size
    docs = list(iter_documents([inp]))
    t, c = time.perf_counter(), time.process_time()
    lsh = MinHashLSH(num_perm=p.num_perm, params=(p.bands, p.rows))
    removed = 0
    for d in docs:
        ws = words(d["text"])
        sh = {" ".join(ws[i:i + k]).encode() for i in range(max(1, len(ws) - k + 1))}
        m = MinHash(num_perm=p.num_perm, seed=1)
        m.update_batch(list(sh))
        if lsh.query(m):
            removed += 1  # the usual streaming use: the first copy stays
        else:
            lsh.insert(d["id"], m)
    return {"seconds": time.perf_counter() - t, "cpu": time.process_time() - c, "removed": removed,
            "docs": len(docs)}


def run_datatrove(inp: Path, work: Path) -> dict:
    """datatrove's four MinHash steps (signature -> buckets -> cluster -> filter), one task each, in process."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import JsonlWriter

    from pipeline.dedup import DedupParams
    from pipeline.documents import count_rows

    p = DedupParams()
    cfg = MinhashConfig(n_grams=p.shingle_size, num_buckets=p.bands, hashes_per_bucket=p.rows)
    t, c = time.perf_counter(), time.process_time()
    steps = [
        [ParquetReader(str(inp)), MinhashDedupSignature(str(work / "sigs"), config=cfg)],
        [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)],
        [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)],
        [ParquetReader(str(inp)), MinhashDedupFilter(str(work / "remove")), JsonlWriter(str(work / "out"))],
    ]
    for i, pipe in enumerate(steps):
        LocalPipelineExecutor(pipe, tasks=cfg.num_buckets if i == 1 else 1, workers=1,
                              logging_dir=str(work / f"logs{i}")).run()
    removed = sum(1 for f in (work / "remove").glob("*.remove") for _ in range(f.stat().st_size // 4))
    n = count_rows([inp])
    return {"seconds": time.perf_counter() - t, "cpu": time.process_time() - c, "removed": removed, "docs": n}


def peak_rss_mb() -> float:
    """VmHWM: this process's peak resident set (reset by exec, unlike ru_maxrss, which a child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, inp: Path) -> None:
    import pipeline.dedup  # noqa: F401  - imports counted in the baseline, not in the method
    import pipeline.documents  # noqa: F401

    base = peak_rss_mb()
    with tempfile.TemporaryDirectory() as d:
        r = (run_ours(inp, Path(d)) if method == "ours" else run_datasketch(inp) if method == "datasketch"
             else run_datatrove(inp, Path(d)))
    r["peak_rss_mb"] = peak_rss_mb()
    r["rss_before_mb"] = base
    print(json.dumps(r))


def shard_bench(mb: float, d: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_shards import load_texts, raw

    from pipeline import run as runmod
    from pipeline.config import load_config
    from pipeline.documents import DocumentWriter

    texts = load_texts(mb)
    inp = d / "shard-in"
    with DocumentWriter(inp) as w:
        w.write_many({"id": f"t{i}", "text": t, "source": "web"} for i, t in enumerate(texts))
    raw(texts[:200], d)  # warm-up
    rs, rt = raw(texts, d)
    cfg = load_config(None, [f"run.out={d / 'shard-out'}", f"shard.inputs=[{inp}]", "run.stages=[shard]",
                             "shard.validation_fraction=0.01"])
    t = time.perf_counter()
    stats = runmod.run_pipeline(cfg, log=lambda m: None)["shard"]
    os_ = time.perf_counter() - t
    ot = stats["output_tokens"]
    print(f"(b) {len(texts):,} docs, {sum(map(len, texts)) / 1e6:.1f} MB: raw tokenizers+pyarrow {rt / rs:,.0f} tok/s "
          f"({rs:.2f}s)   shard stage {ot / os_:,.0f} tok/s ({os_:.2f}s)   ratio {rs / os_:.2f}x  (tokens equal: {rt == ot})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--mb", type=float, default=24.0)
    ap.add_argument("--child", choices=["ours", "datasketch", "datatrove"])
    ap.add_argument("--methods", default="ours,datasketch,datatrove")
    ap.add_argument("--input")
    ap.add_argument("--skip", choices=["dedup", "shard"])
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.input))
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if args.skip != "dedup":
            t = time.time()
            docs = corpus(args.n)
            inp = write_parquet(docs, d / "docs")
            del docs
            print(f"corpus: {args.n:,} documents ({time.time() - t:.0f}s to build)")
            for method in args.methods.split(","):
                res = subprocess.run([sys.executable, __file__, "--child", method, "--input", str(inp)],
                                     capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr[-2000:])
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"(a) {method:10s} {r['docs'] / r['seconds']:8,.0f} docs/s  ({r['seconds']:.1f}s wall, "
                      f"{r['cpu']:.1f}s CPU)  peak RSS {r['peak_rss_mb']:,.0f} MB (imports {r['rss_before_mb']:,.0f} MB)"
                      f"  removed {r['removed']:,}")
        if args.skip != "shard":
            shard_bench(args.mb, d)


if __name__ == "__main__":
    main()
