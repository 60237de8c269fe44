"""`LocalServer`: `transformers serve MODEL` on a free loopback port for the duration of a run.

Used for `llm.provider: local` (the quickstart needs no API key). MODEL is a hub name (downloaded on first use
where online) or a local model directory (works offline). The server is healthy when `/v1/models` answers;
its log goes to a file whose tail is shown if it dies or never becomes healthy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import ResourceUnavailable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _serve_command() -> list[str]:
    exe = Path(sys.executable).parent / "transformers"
    if exe.exists():
        return [str(exe), "serve"]
    found = shutil.which("transformers")
    if found:
        return [found, "serve"]
    return [sys.executable, "-m", "transformers.cli.transformers", "serve"]


class LocalServer:
    """`with LocalServer("HuggingFaceTB/SmolLM2-360M-Instruct") as srv: srv.base_url` (…/v1)."""

    def __init__(self, model: str, *, port: int | None = None, device: str = "auto",
                 startup_timeout_s: float = 600.0, extra_args: tuple[str, ...] = ()) -> None:
        self.model = model
        self.port = port
        self.device = device
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def _ensure_model(self) -> None:
        """Fail early, in one line, when the model is neither a local directory nor cached nor downloadable:
        `transformers serve` loads models lazily, so otherwise every request would fail instead."""
        if Path(self.model).is_dir():
            return
        if Path(self.model).exists() or self.model.startswith((".", "/")):
            raise ResourceUnavailable(f"llm.model {self.model}: not a model directory")
        try:
            from huggingface_hub import snapshot_download
        except ImportError:  # pragma: no cover - transformers depends on it
            return
        try:
            snapshot_download(self.model, local_files_only=True)
            return
        except Exception:  # noqa: BLE001 - not cached: try the hub below
            pass
        how = ("set TEXTBOOK_LLM_MODEL (llm.model) to a local Hugging Face model directory, or point "
               "OPENAI_BASE_URL (llm.base_url) at an OpenAI-compatible server")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ResourceUnavailable(f"LLM {self.model}: not in the Hugging Face cache and HF_HUB_OFFLINE=1; {how}")
        try:
            snapshot_download(self.model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                          "*.jinja", "*.py"], etag_timeout=10)
        except Exception as e:  # noqa: BLE001 - any failure: the model cannot be had, say so in one line
            raise ResourceUnavailable(f"LLM {self.model}: not cached and not downloadable "
                                      f"({type(e).__name__}); {how}") from None

    def __enter__(self) -> LocalServer:
        self._ensure_model()
        # `/v1/models` fails until the Hugging Face cache directory exists, even for a local model directory
        _hf_cache_dir().mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        fd, log = tempfile.mkstemp(prefix="textbook-serve-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        cmd = [*_serve_command(), self.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--device", self.device, "--log-level", "warning", *self.extra_args]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                self._stop()
                raise ResourceUnavailable(
                    f"`transformers serve {self.model}` exited with code {self.proc.returncode} before becoming "
                    f"healthy (is the model name/directory right, and online or cached?). Log tail:\n{tail}")
            if self._healthy():
                return self
            time.sleep(0.5)
        tail = self._log_tail()
        self._stop()
        raise ResourceUnavailable(f"`transformers serve {self.model}` not healthy after {self.startup_timeout_s:.0f}s "
                                  f"(llm.local_startup_timeout_s). Log tail:\n{tail}")

    def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
