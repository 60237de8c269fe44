"""The CLI's contract: one-line errors naming the file and the problem, non-zero exit, --help everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def textbook(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(cwd)})


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_missing_config(tmp_path):
    line = one_line_error(textbook("run", str(tmp_path / "nope.yaml")))
    assert line.startswith("error: ") and "nope.yaml: config file not found" in line


def test_unknown_set_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  name: x\n")
    line = one_line_error(textbook("run", str(cfg), "--set", "run.nosuch=1"))
    assert "c.yaml: unknown key 'run.nosuch' (--set)" in line


def test_bad_value_names_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("shard:\n  validation_fraction: lots\n")
    line = one_line_error(textbook("run", str(cfg)))
    assert "c.yaml: shard.validation_fraction:" in line


def test_inspect_corrupt_parquet(tmp_path):
    bad = tmp_path / "train-00000-of-00001.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    line = one_line_error(textbook("inspect", str(bad)))
    assert str(bad) in line and "not a readable parquet file" in line
    line = one_line_error(textbook("inspect", str(tmp_path)))
    assert "no manifest.json" in line


@pytest.mark.parametrize("cmd", [[], ["run"], ["inspect"], ["tokenizer", "train"], ["report"]])
def test_help(cmd):
    proc = textbook(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _docs(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "A page about tides and the Moon."}\n')
    return path


def test_ray_address_where_no_cluster_answers_is_one_line_error(tmp_path):
    """A wrong RAY_ADDRESS / run.ray_address hung in ray.init's connection retries (minutes, no message of
    ours): now a one-line error naming the address. The subprocess timeout only bounds a hang."""
    port = _closed_port()
    proc = textbook("run", "configs/quickstart.yaml", "--stages", "dedup", "--set", f"run.out={tmp_path / 'out'}",
                    "--set", f"dedup.inputs=[{_docs(tmp_path)}]", "--set", "run.executor=ray",
                    "--set", f"run.ray_address=127.0.0.1:{port}")
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert line and f"no Ray cluster answers at 127.0.0.1:{port}" in line[0], proc.stderr


def test_object_store_that_cannot_be_reached_is_one_line_error_naming_the_object(tmp_path):
    """An s3:// input with no server or no credentials ended in a botocore traceback: now one line naming the
    object and where endpoint and credentials come from."""
    port = _closed_port()
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/quickstart.yaml", "--stages",
                           "dedup", "--set", f"run.out={tmp_path / 'out'}", "--set", "dedup.inputs=[s3://nobucket/x.jsonl]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert line and "s3://nobucket/x.jsonl: cannot list input documents" in line[0], proc.stderr
    assert "AWS_ENDPOINT_URL" in line[0]
