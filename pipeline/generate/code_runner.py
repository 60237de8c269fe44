"""Run the Python blocks of one answer, in order, in one namespace (the child process of `codecheck.run_tests`).

Standard library only and self-contained: it runs as `python -I code_runner.py DIR MEMORY_MB CPU_S`, with
nothing of the project on the import path. DIR holds `blocks.json` ([{"source": str, "tests": bool}, ...]); after
every block the report so far is written to DIR/report.json ({"blocks": [{"block", "ok", "error"?}], "done"}), so
a run killed at its timeout still says which block it was in. A block marked `tests` also runs the `test_*`
functions (without parameters) and unittest.TestCase classes it defines, as pytest and unittest would.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import sys
import types
import unittest


def _limit(memory_mb: int, cpu_s: int) -> None:
    import resource

    for which, value in ((resource.RLIMIT_AS, memory_mb * 2**20), (resource.RLIMIT_CPU, cpu_s),
                         (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):  # a hard limit already lower: keep it
            pass


def _run_tests_defined(ns: dict, before: dict) -> None:
    """Call the new test functions and run the new TestCase classes; raise AssertionError on the first failure."""
    for name, obj in list(ns.items()):
        if before.get(name) is obj:
            continue
        if isinstance(obj, types.FunctionType) and name.startswith("test"):
            params = inspect.signature(obj).parameters.values()
            if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
                obj()
        elif isinstance(obj, type) and issubclass(obj, unittest.TestCase) and obj is not unittest.TestCase:
            result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
                unittest.defaultTestLoader.loadTestsFromTestCase(obj))
            problems = result.failures + result.errors
            if problems:
                test, trace = problems[0]
                raise AssertionError(f"{test}: {trace.strip().splitlines()[-1]}")


def _error(e: BaseException, source: str) -> str:
    """'AssertionError (line 4: assert add(-1, -1) == 5): message': the deepest line of the block that raised."""
    line = None
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<block"):
            line = tb.tb_lineno
        tb = tb.tb_next
    lines = source.splitlines()
    where = f" (line {line}: {lines[line - 1].strip()[:80]})" if line and line <= len(lines) else ""
    return f"{type(e).__name__}{where}: {e}"[:300]


def main(directory: str, memory_mb: int, cpu_s: int) -> None:
    _limit(memory_mb, cpu_s)
    with open(os.path.join(directory, "blocks.json"), encoding="utf-8") as f:
        blocks = json.load(f)
    report: dict = {"blocks": [], "done": False}
    module = types.ModuleType("__main__")  # `if __name__ == "__main__"` and unittest.main() see the blocks
    sys.modules["__main__"] = module
    sys.argv = ["blocks"]  # unittest.main() reads test names from argv: not this runner's own arguments
    ns = module.__dict__
    sink = io.StringIO()
    for i, block in enumerate(blocks):
        entry: dict = {"block": i, "ok": True}
        before = dict(ns)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                exec(compile(block["source"], f"<block {i}>", "exec"), ns)  # noqa: S102 - the point of this file
                if block["tests"]:
                    _run_tests_defined(ns, before)
        except SystemExit as e:  # unittest.main() / sys.exit(): a non-zero code is a failure
            if e.code not in (None, 0):
                entry.update(ok=False, error=f"SystemExit: {e.code} (unittest.main() or sys.exit: tests failed)")
        except BaseException as e:  # noqa: BLE001 - every error of the model's code is a finding
            entry.update(ok=False, error=_error(e, block["source"]))
        sink.seek(0)
        sink.truncate()
        report["blocks"].append(entry)
        _write(directory, report)
    report["done"] = True
    _write(directory, report)


def _write(directory: str, report: dict) -> None:
    tmp = os.path.join(directory, "report.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f)
    os.replace(tmp, os.path.join(directory, "report.json"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
