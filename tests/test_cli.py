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
