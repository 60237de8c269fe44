"""Run every benchmark one after another (`make bench`). Each prints its own tables; see RESULTS.md.

Takes tens of minutes on a 2-core machine. Run it on an otherwise idle machine: the figures measure contention
otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_shards.py", "bench_llm_throughput.py", "bench_generate.py", "bench_classifier.py",
           "bench_web.py", "bench_dedup.py", "bench_pretrain.py"]


def main() -> int:
    failed = []
    for name in SCRIPTS:
        print(f"\n===== {name} =====", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
