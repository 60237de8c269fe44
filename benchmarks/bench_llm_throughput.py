"""LLM layer throughput: `run_requests` (Ray worker actors, ledger, limiter, retries) vs a plain
`AsyncOpenAI` + `asyncio.Semaphore` loop over the same prompts, in the same process run, against the
FaultyOpenAIServer (separate process) with lognormal latency (median 0.5 s, sigma 0.5).

    .venv/bin/python benchmarks/bench_llm_throughput.py            # 3,000 requests, concurrency 128
    .venv/bin/python benchmarks/bench_llm_throughput.py --n 600    # quicker

Goal: ratio (ours req/s / plain req/s) >= 0.95, without and with 10 % 429 responses.
Ideal req/s = concurrency / mean latency = 128 / (0.5 * e^(0.5^2/2)) = 225.7.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from pathlib import Path

from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.llm.runner import run_requests
from pipeline.llm.testserver import FaultyOpenAIServer
from pipeline.llm.types import LLMRequest


def prompts(n: int, salt: str) -> list[str]:
    return [f"[{salt}] Write a textbook section about topic number {i} for high school students." for i in range(n)]


async def plain_loop(base_url: str, messages: list[list[dict]], params: dict, concurrency: int) -> tuple[float, int]:
    """The baseline a user would write: one client, a semaphore, gather. Built-in retries honour Retry-After.
    (bench_generate.py uses it too, over the stage's rendered prompts.)"""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="EMPTY", base_url=base_url, max_retries=6, timeout=60)
    sem = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(msgs: list[dict]) -> None:
        nonlocal failed
        async with sem:
            try:
                await client.chat.completions.create(model="test-model", messages=msgs, **params)
            except Exception:  # noqa: BLE001
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m) for m in messages))
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed, failed


def ours(base_url: str, texts: list[str], concurrency: int, max_tokens: int, workers: int) -> tuple[float, dict]:
    llm = LLMSection(base_url=base_url, model="test-model", concurrency=concurrency, workers=workers,
                     max_tokens=max_tokens, timeout_s=60, api_key_env="BENCH_NO_KEY", backoff_base_s=0.1)
    reqs = [LLMRequest(messages=({"role": "user", "content": t},), params=llm.sampling_params()) for t in texts]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = run_requests(reqs, llm, BudgetSection(), Path(d) / "ledger.sqlite", progress=False)
        elapsed = time.perf_counter() - t0
    return elapsed, {"ok": s.ok, "failed": s.failed, "retries": s.retries, "startup_s": s.startup_s,
                     "latency": s.latency_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the pipeline starts Ray once per run
    mean_latency = 0.5 * math.exp(0.5**2 / 2)
    ideal = args.concurrency / mean_latency
    rows = []
    for label, faults in (("no faults", {}), ("10% 429", {"rate_429": 0.10, "retry_after_s": 0.5})):
        with FaultyOpenAIServer(mode="process", latency="lognormal", latency_s=0.5, sigma=0.5, words=args.max_tokens,
                                seed=1, **faults) as srv:
            texts = prompts(args.n, label)
            base_s, base_failed = asyncio.run(plain_loop(
                srv.base_url, [[{"role": "user", "content": t}] for t in texts],
                {"max_tokens": args.max_tokens, "temperature": 0.8, "top_p": 0.95, "seed": 0}, args.concurrency))
            base_rps = args.n / base_s
            row = {"case": label, "n": args.n, "concurrency": args.concurrency, "ideal_rps": round(ideal, 1),
                   "plain_rps": round(base_rps, 1), "plain_failed": base_failed, "ours": {}}
            print(f"{label}: plain AsyncOpenAI+Semaphore {base_rps:.1f} req/s ({base_rps / ideal:.2f} of ideal "
                  f"{ideal:.1f}), failed {base_failed}", flush=True)
            for w in args.workers:
                secs, info = ours(srv.base_url, texts, args.concurrency, args.max_tokens, w)
                rps = args.n / secs
                # the same run without its one-time start (Ray actor process + importing openai in it)
                steady = args.n / (secs - info["startup_s"])
                row["ours"][f"workers={w}"] = {"rps": round(rps, 1), "ratio": round(rps / base_rps, 3),
                                               "rps_after_startup": round(steady, 1),
                                               "ratio_after_startup": round(steady / base_rps, 3), **info}
                print(f"{label}: run_requests workers={w}: {rps:.1f} req/s, ratio {rps / base_rps:.3f} "
                      f"(startup {info['startup_s']:.1f}s; without it {steady:.1f} req/s, ratio "
                      f"{steady / base_rps:.3f}), ok {info['ok']} failed {info['failed']} retries {info['retries']}",
                      flush=True)
            rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
