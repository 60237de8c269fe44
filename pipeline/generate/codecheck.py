"""Code in an answer: the ```python blocks, whether they parse (`ast.parse`), and whether their tests pass when run.

Used by `validate.Validator` for the formats `generate.code_checks.formats` lists (python_chapter: its template
promises runnable code and tests). Drop reasons: `code_missing` (fewer than `min_blocks` python blocks),
`code_syntax` (a block that does not parse), `tests_missing` (no block holds a test), `tests_failed` (a test block
raised, a test failed, or the run passed `timeout_s`).

A block that a "common mistakes" passage shows on purpose (its lead-in, up to 200 characters before it, or its
comments say wrong, incorrect, mistake, bug, avoid this, don't do ..., or the block is a traceback) may fail to
parse or raise: the template asks for such passages.
Test blocks are never excused.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.checks import CodeCheckSettings

PYTHON_TAGS = frozenset({"python", "py", "python3", "py3", "pycon", "ipython", "pytest"})
_BLOCK = re.compile(r"^[ \t]*```[ \t]*([\w+.#-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.S | re.M)
# words that show a block as a mistake; bare "avoid", "don't", "invalid" are not among them: "To avoid typing it
# twice:", "Don't forget:" lead into code meant to run, and `raise ValueError("invalid input")` is correct code
_COUNTER_EXAMPLE = re.compile(r"\b(?:wrong|incorrect|mistakes?|bug(?:gy|s)?|broken|avoid (?:this|code like|writing|"
                              r"doing)|(?:don't|do not) (?:do|write)|invalid (?:syntax|code)|pitfalls?|syntaxerror|"
                              r"will (?:raise|fail)|this fails|not work)\b", re.I)
_COMMENT = re.compile(r"#[^\n]*")
_RUNNER = Path(__file__).with_name("code_runner.py")


@dataclass(frozen=True)
class CodeBlock:
    source: str
    start: int  # offset of the fence in the answer
    counter_example: bool  # shown as a mistake: may fail to parse or run

    @property
    def tests(self) -> bool:
        return has_tests(self.source)


def _doctest_source(body: str) -> str:
    """An interactive session (`>>> ` / `... ` lines) as the code it runs; other text unchanged."""
    lines = body.splitlines()
    if not any(line.lstrip().startswith(">>>") for line in lines):
        return body
    code = []
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith((">>> ", "... ")) or stripped in (">>>", "..."):
            code.append(stripped[4:])
    return "\n".join(code)


def python_blocks(text: str) -> list[CodeBlock]:
    """The ```python (py, python3, pycon, ...) blocks of a Markdown answer, dedented, sessions turned into code."""
    out = []
    for m in _BLOCK.finditer(text):
        if m.group(1).lower() not in PYTHON_TAGS:
            continue
        source = textwrap.dedent(_doctest_source(m.group(2)))
        shown = _shown_as_mistake(_lead_in(text, m.start()), source)
        out.append(CodeBlock(source, m.start(), shown))
    return out


def _lead_in(text: str, fence: int) -> str:
    """The text that introduces a block: up to 200 characters before its fence, not reaching back past the end of
    the block before it (that block's words introduce it, not this one)."""
    before = text[max(0, fence - 200):fence]
    end_of_previous = before.rfind("```")
    return before[end_of_previous + 3:] if end_of_previous >= 0 else before


def _shown_as_mistake(lead_in: str, source: str) -> bool:
    """A block shown on purpose as a mistake: its lead-in or its comments say so (not its strings: `raise
    ValueError("invalid input")` is correct code), or it is a traceback."""
    comments = " ".join(_COMMENT.findall(source))
    return bool(_COUNTER_EXAMPLE.search(lead_in + " " + comments)) or \
        source.lstrip().startswith("Traceback (most recent")


def has_tests(source: str) -> bool:
    """An `assert`, a `test_*` function or a TestCase class (pytest and unittest conventions); False if unparsable."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            return True
        if isinstance(node, ast.ClassDef) and any("TestCase" in ast.unparse(b) for b in node.bases):
            return True
    return False


def _fill_skeleton(source: str) -> str:
    """A skeleton's comment-only bodies (`if condition:` / `    # Body`), a textbook idiom for a statement's shape,
    given a `pass` so that the skeleton parses."""
    lines = source.splitlines()
    out = []
    for k, line in enumerate(lines):
        out.append(line)
        code = line.split("#", 1)[0].rstrip()
        if not code.endswith(":"):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for x in lines[k + 1:]:
            if not x.strip():
                continue
            if len(x) - len(x.lstrip()) <= indent and not x.lstrip().startswith("#"):
                break
            body.append(x)
        if body and all(x.lstrip().startswith("#") for x in body):  # no body at all is a real IndentationError
            out.append(" " * (indent + 4) + "pass")
    return "\n".join(out)


def syntax_error(blocks: list[CodeBlock]) -> str | None:
    """'block i line l: message' for the first block (not a counter-example) that does not parse, a skeleton with
    comment-only bodies excepted."""
    for i, b in enumerate(blocks):
        try:
            ast.parse(b.source)
        except SyntaxError as e:
            if b.counter_example:
                continue
            if "expected an indented block" in (e.msg or ""):
                try:
                    ast.parse(_fill_skeleton(b.source))
                    continue
                except SyntaxError:
                    pass
            return f"block {i} line {e.lineno}: {e.msg}"
        except ValueError as e:  # null bytes
            return f"block {i}: {e}"
    return None


def run_tests(blocks: list[CodeBlock], s: CodeCheckSettings) -> str | None:
    """Run the blocks in order in one fresh Python process (`code_runner.py`: one namespace, test functions and
    TestCases called, `timeout_s` wall clock, `memory_mb` address space, a temporary working directory, no stdin);
    return why the tests failed ('block i: AssertionError (line 3): ...', 'timeout after 10 s in block 2') or None.
    A non-test block that raises is tolerated (its names are then missing, so the tests that use it fail)."""
    runnable = [b for b in blocks if not (b.counter_example and not b.tests)]
    payload = [{"source": b.source, "tests": b.tests} for b in runnable]
    # a process the model's code leaves behind may still write there: cleaning up must not raise
    with tempfile.TemporaryDirectory(prefix="textbook-code-", ignore_cleanup_errors=True) as tmp:
        Path(tmp, "blocks.json").write_text(json.dumps(payload), encoding="utf-8")
        timed_out, code, err = _run_runner(tmp, s)
        report_path = Path(tmp, "report.json")
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None
    return _verdict(runnable, report, timed_out, code, err, s.timeout_s)


def _run_runner(tmp: str, s: CodeCheckSettings) -> tuple[bool, int | None, bytes]:
    """Run `code_runner.py` on `tmp`/blocks.json: (timed out, exit code, its stderr). Its stderr goes to a file, not
    a pipe: a process the model's code starts in a session of its own (out of reach of the group kill) would hold
    a pipe open and the wait with it; the wait ends when the test process exits, whatever it left behind."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cpu_s = int(s.timeout_s) + 1
    err_path = Path(tmp, "stderr.txt")
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen([sys.executable, "-I", str(_RUNNER), tmp, str(s.memory_mb), str(cpu_s)], cwd=tmp,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file,
                                start_new_session=True)
    try:
        proc.wait(timeout=s.timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    with contextlib.suppress(ProcessLookupError):  # the session: processes the code started too (or none left)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return timed_out, proc.returncode, err_path.read_bytes()


def _verdict(blocks: list[CodeBlock], report: dict | None, timed_out: bool, code: int | None, err: bytes,
             timeout_s: float) -> str | None:
    done = report["blocks"] if report else []
    if timed_out:
        return f"timeout after {timeout_s:g} s in block {len(done)}"
    for entry in done:
        if not entry["ok"] and blocks[entry["block"]].tests:
            return f"block {entry['block']}: {entry['error']}"
    if report is None or not report["done"]:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {code}"]
        return f"the test process died in block {len(done)}: {last[0][:200]}"
    return None
