"""Issue 12 benchmark: what per-record resilience costs the readers.

(a) The shared document reader (`pipeline.documents.iter_documents`: member-by-member gzip, per-line repair)
    vs the plain library loop it replaced (`gzip.open` + `json.loads` per line), on real jsonl text.
(b) The web stage's WARC framing (`pipeline.web.warc.iter_warc` + HTTP payload decoding) vs warcio's
    `ArchiveIterator` reading every record's content, on the real Common Crawl WARC samples.

    .venv/bin/python benchmarks/bench_readers.py [--copies 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _best(fn, rounds: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(rounds):
        t = time.process_time()
        n = fn()
        times.append(time.process_time() - t)
    return min(times), n


def bench_documents(data: Path, copies: int, rounds: int, tmp: Path) -> list[dict]:
    from pipeline.documents import iter_documents

    raw = gzip.decompress((data / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz").read_bytes())
    rows = []
    for name, payload in (("plain.jsonl", raw * copies), ("one-member.jsonl.gz", gzip.compress(raw * copies))):
        path = tmp / name
        path.write_bytes(payload)
        mb = len(raw) * copies / 1e6

        def ours(path=path) -> int:
            return sum(1 for _ in iter_documents([path]))

        def baseline(path=path) -> int:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                return sum(1 for line in f if line.strip() and isinstance(json.loads(line).get("text"), str))

        t_ours, n_ours = _best(ours, rounds)
        t_base, n_base = _best(baseline, rounds)
        rows.append({"file": name, "MB": round(mb, 1), "docs": n_ours, "ours_MB_per_cpu_s": round(mb / t_ours, 1),
                     "baseline_MB_per_cpu_s": round(mb / t_base, 1), "ratio": round(t_base / t_ours, 2),
                     "same_count": n_ours == n_base})
    return rows


def bench_warc(data: Path, rounds: int) -> list[dict]:
    from warcio.archiveiterator import ArchiveIterator

    from pipeline.web.warc import WarcRecord, decode_body, iter_warc, split_http

    files = sorted((data / "web/dolma_cc/warc").glob("*.warc.gz")) + [data / "web/cc_whirlwind/whirlwind.warc.gz"]

    def ours() -> int:
        n = 0
        for f in files:
            for r in iter_warc(f, 10_000_000):
                if isinstance(r, WarcRecord) and r.type == "response":
                    _, headers, body = split_http(r.block)
                    n += len(decode_body(body, headers)) > 0
        return n

    def baseline() -> int:
        n = 0
        for f in files:
            with open(f, "rb") as fh:
                for r in ArchiveIterator(fh):
                    if r.rec_type == "response":
                        n += len(r.content_stream().read()) > 0
        return n

    size = sum(f.stat().st_size for f in files)
    t_ours, n_ours = _best(ours, rounds * 5)
    t_base, n_base = _best(baseline, rounds * 5)
    return [{"files": len(files), "compressed_MB": round(size / 1e6, 2), "responses": n_ours,
             "ours_cpu_ms": round(t_ours * 1000, 1), "warcio_cpu_ms": round(t_base * 1000, 1),
             "ratio": round(t_base / t_ours, 2), "same_count": n_ours == n_base}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from pipeline.paths import shared_data_dir

    data = shared_data_dir()
    if data is None:
        sys.exit("../shared/data is absent")
    with tempfile.TemporaryDirectory() as tmp:
        docs = bench_documents(data, args.copies, args.rounds, Path(tmp))
    warc = bench_warc(data, args.rounds)
    print(json.dumps({"documents": docs, "warc": warc}, indent=1))
    print(f"ratio = baseline CPU s / ours CPU s (above 1: ours is faster); best of {args.rounds} rounds")


if __name__ == "__main__":
    main()
