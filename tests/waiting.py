"""Wait for something a test OBSERVES (a file, ledger rows, a server's counters), never for a length of time.

A test that sleeps and then asserts, or kills a process after a fraction of a measured run time, races the
clock: on a loaded machine the event comes later (or a run finishes sooner) and the test fails. `wait_until`
polls a condition and fails the test, with what it was waiting for, only after a deadline far beyond any
normal wait: the deadline is a guard against hangs, not a part of the test's logic.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

GENEROUS_S = 300.0  # a hang guard: far beyond what these waits take on a loaded 2-core machine (seconds)


def wait_until(cond: Callable[[], T], what: str, timeout: float = GENEROUS_S,
               proc: subprocess.Popen | None = None, log: Path | None = None, poll_s: float = 0.05) -> T:
    """Return cond()'s first truthy value. Fail the test if `proc` (when given) exits first, or at the deadline;
    the failure shows the tail of `log` (the process's output file) when given."""
    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited (rc={proc.returncode}) before {what}\n{tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail()}")
        time.sleep(poll_s)  # the poll interval: what the test waits for is cond(), not this
