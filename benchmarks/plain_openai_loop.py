"""The baseline command for `bench_generate.py --command`: what a user would write instead of `textbook generate`,
as a whole process (interpreter start, `import openai`, the loop): one AsyncOpenAI client, a semaphore, gather,
over prompts rendered beforehand (a JSON file of chat message lists). Imports nothing of ours.

    python benchmarks/plain_openai_loop.py PROMPTS.json BASE_URL CONCURRENCY PARAMS_JSON
"""

import asyncio
import json
import sys


async def main(prompts: str, base_url: str, concurrency: int, params: dict) -> int:
    from openai import AsyncOpenAI

    with open(prompts, encoding="utf-8") as f:
        messages = json.load(f)
    client = AsyncOpenAI(api_key="EMPTY", base_url=base_url, max_retries=6, timeout=60)
    sem = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(msgs: list) -> None:
        nonlocal failed
        async with sem:
            try:
                await client.chat.completions.create(model="test-model", messages=msgs, **params)
            except Exception:  # noqa: BLE001 - counted, as a user's loop would
                failed += 1

    await asyncio.gather(*(one(m) for m in messages))
    await client.close()
    return failed


if __name__ == "__main__":
    n_failed = asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])))
    print(json.dumps({"failed": n_failed}))
