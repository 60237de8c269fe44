"""Every way `textbook` ends stops the local LLM server it started (issue 20), checked in the process table:
SIGTERM and SIGHUP (handlers unwind like Ctrl-C), an exception in the driver (the `with` block), SIGKILL of the
driver (no handler runs: the kernel's parent-death signal). And a server that fails requests (HTTP 500) has its
log kept in the run's state directory, its last lines printed with the request errors.

The driver is the real CLI (`pipeline.cli.main`, `textbook generate`) in a subprocess; only the server binary
is a stand-in (a small HTTP server that hangs on, answers or fails completions), so each case takes seconds."""

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
import yaml

FAKE_SERVER = textwrap.dedent("""
    import http.server, json, os, sys, time
    mode = sys.argv[2]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b'{"data": []}')
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            print("request received", flush=True)
            if mode == "hang":
                time.sleep(3600)
            if mode == "fail":
                print("Traceback: ValueError: Cannot use chat template functions because "
                      "tokenizer.chat_template is not set", flush=True)
                self.send_response(500); self.end_headers(); self.wfile.write(b'{"error": "Internal Server Error"}')
                return
            body = {"choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "Energy is the capacity to do work."}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 8}}
            self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
            self.wfile.write(json.dumps(body).encode())
        def log_message(self, *a):
            pass
    print(f"fake server pid={os.getpid()}", flush=True)
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")

# The driver: `textbook generate CONFIG` with the local server's command replaced by FAKE_SERVER (argv: tests dir,
# server mode, config, crash). crash=1: the driver raises on its first result, inside the server's `with` block.
DRIVER = textwrap.dedent("""
    import sys
    tests, mode, config, crash = sys.argv[1:5]
    sys.path.insert(0, tests)
    import pipeline.llm.server as server
    from pathlib import Path
    from test_cli_signals import FAKE_SERVER

    script = Path(config).parent / "fake_server.py"
    script.write_text(FAKE_SERVER)

    class Fake(server.LocalServer):
        name = "fake server"
        def prepare(self):
            pass
        def command(self):
            return [sys.executable, str(script), str(self.port), mode]

    server.local_server = lambda model, **kw: Fake(model, log_dir=kw["log_dir"], startup_timeout_s=120)
    if crash == "1":
        import pipeline.generate.judge as judge
        def put(self, result):
            raise RuntimeError("driver crashed on a result")
        judge.JudgeProcess.put = put
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as from a terminal (a background job ignores it)
    sys.argv = ["textbook", "generate", config]
    from pipeline.cli import main
    main()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie has exited
    try:
        return stat.read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, limit_s: float, what: str, driver: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {limit_s:.0f} s waiting for {what}")


def _config(tmp_path: Path, workers: int = 0) -> Path:
    cfg = {"run": {"name": "sig", "out": str(tmp_path / "out"), "stages": ["generate"]},
           "llm": {"provider": "local", "model": "fake-model", "workers": workers, "concurrency": 1, "max_tokens": 16,
                   "timeout_s": 600, "max_retries": 0, "ledger": str(tmp_path / "ledger.sqlite")},
           "generate": {"n": 2, "min_tokens": 1, "web_seed_fraction": 0, "subjects": ["Physics"]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _server_log(tmp_path: Path) -> Path:
    return tmp_path / "out" / "stages" / "generate" / "state" / "llm-server" / "server.log"


def _said(log: Path) -> str:
    """What the server printed (its log without the command line)."""
    if not log.exists():
        return ""
    return "\n".join(line for line in log.read_text().splitlines() if not line.startswith("$ "))


def _server_pid(log: Path) -> int:
    for line in _said(log).splitlines():
        if line.startswith("fake server pid="):
            return int(line.split("=", 1)[1])
    raise AssertionError(f"no pid in {log}")


def _start(tmp_path: Path, mode: str, crash: bool = False, workers: int = 0) -> subprocess.Popen:
    """The driver, its output in files (a pipe nobody reads while it runs could fill and block it)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    with open(tmp_path / "driver.out", "w") as out, open(tmp_path / "driver.err", "w") as err:
        return subprocess.Popen([sys.executable, "-c", DRIVER, str(Path(__file__).parent), mode,
                                 str(_config(tmp_path, workers)), "1" if crash else "0"], stdout=out, stderr=err,
                                cwd=Path(__file__).parent.parent, env=env)


def _finish(driver: subprocess.Popen, tmp_path: Path, timeout: float) -> tuple[str, str]:
    """Wait for the driver (killed if it overstays); its stdout and stderr."""
    try:
        driver.wait(timeout)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    return (tmp_path / "driver.out").read_text(), (tmp_path / "driver.err").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux-only")
@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, 0), (signal.SIGHUP, 0), (signal.SIGINT, 0),
                                         (signal.SIGKILL, 0), (signal.SIGTERM, 1)])
def test_the_server_goes_when_textbook_is_signalled(sig, workers, tmp_path):
    """workers=1: Ray's driver installs its own SIGTERM handler (`ray.init`); ours is put back after it."""
    driver = _start(tmp_path, "hang", workers=workers)
    log = _server_log(tmp_path)
    try:
        # a request is in flight (the stand-in hangs on it): the driver is in the middle of its run
        _wait_for(lambda: "request received" in _said(log), 180, "the first request", driver)
        pid = _server_pid(log)
        assert _alive(pid)
        driver.send_signal(sig)
    finally:
        out, err = _finish(driver, tmp_path, 120)
    _wait_for(lambda: not _alive(pid), 60, f"server {pid} to exit after {sig.name}")
    if sig == signal.SIGKILL:
        assert driver.returncode == -signal.SIGKILL  # no handler ran: the parent-death signal stopped the server
    elif sig == signal.SIGINT:  # Ctrl-C: Python's KeyboardInterrupt, unwound by the CLI
        assert driver.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    else:
        assert driver.returncode == 128 + sig, err  # our handler ran the clean-up, then exited
        assert f"terminated ({sig.name})" in err and "Traceback" not in err
    assert "request received" in _said(log)  # the log stays in the run's state directory


def test_the_server_goes_when_the_driver_raises(tmp_path):
    driver = _start(tmp_path, "answer", crash=True)
    out, err = _finish(driver, tmp_path, 300)
    assert driver.returncode == 1 and "driver crashed on a result" in err
    pid = _server_pid(_server_log(tmp_path))
    _wait_for(lambda: not _alive(pid), 60, f"server {pid} to exit after the exception")


def test_requests_failing_on_the_server_print_its_log_tail(tmp_path):
    """HTTP 500 on every request (not at start-up): the run ends, the errors are counted, and the server's
    last log lines are printed with them; the log is kept under the run's state directory."""
    driver = _start(tmp_path, "fail")
    out, err = _finish(driver, tmp_path, 300)
    assert driver.returncode == 0, err
    log = _server_log(tmp_path)
    assert "chat_template is not set" in _said(log)
    both = out + err
    assert "2 request(s) to the local server failed" in both and str(log) in both
    assert "chat_template is not set" in both  # the log's tail, printed with the errors
    stats = json.loads((tmp_path / "out" / "stages" / "generate" / "stats.json").read_text())
    assert sum(stats["errored"].values()) == 2 and stats["kept"] == 0
    assert any("chat_template is not set" in w for w in stats["llm"]["warnings"])
