"""Helpers shared by the CLI modules: config loading, one-line errors, the generic stage command."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console

from pipeline.errors import TextbookError
from pipeline.signals import Terminated

console = Console(stderr=False)
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

SET_HELP = "Override a config key, typed by the schema: --set generate.n=100 (repeatable)."
CONFIG_HELP = "Run config YAML (see configs/)."


def fail(message: str, code: int = 1) -> None:
    """One line on stderr, non-zero exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn TextbookError (and a few OS errors users cause) into one-line messages."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TextbookError as e:
            fail(str(e))
        except PermissionError as e:
            fail(f"{e.filename}: permission denied")
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                fail(f"{e.filename or 'output'}: no space left on device; earlier outputs were left intact")
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted: completed work is saved; run the same command again to resume")
            sys.exit(130)
        except Terminated as e:
            err_console.print(f"terminated ({e.name}): completed work is saved; run the same command again to "
                              "resume", highlight=False)
            sys.exit(128 + e.signum)

    return wrapper  # type: ignore[return-value]


def load(config: str, sets: list[str] | None) -> Any:
    from pipeline.config import load_config

    return load_config(config, sets or [])


def run_stage_command(stage: str, config: str, sets: list[str] | None, force: bool = False) -> dict[str, Any]:
    """`textbook STAGE CONFIG`: run one stage (skipped when complete for the same config and inputs).

    A stage with no input documents prints the upstream funnel and hints, then fails (`NoInputDocuments`)."""
    from pipeline.errors import NoInputDocuments
    from pipeline.run import STAGES, run_dir_of, run_one, write_resolved_config

    cfg = load(config, sets)
    write_resolved_config(cfg, run_dir_of(cfg))
    try:
        result = run_one(cfg, stage, planned=[s for s in cfg.run.stages if s in STAGES] or [stage], force=force,
                         log=lambda m: console.print(m, highlight=False, markup=False))
    except NoInputDocuments as e:
        print_funnel(e)
        raise
    print_stage_summary(stage, result)
    return result


def print_stage_summary(stage: str, stats: dict[str, Any]) -> None:
    from rich.table import Table

    if not stats:
        return
    table = Table(title=f"{stage}: documents", show_lines=False)
    table.add_column("state")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_row("read", "", str(stats.get("read", 0)))
    table.add_row("kept", "", str(stats.get("kept", 0)))
    for reason, n in stats.get("dropped", {}).items():
        table.add_row("dropped", reason, str(n))
    for reason, n in stats.get("errored", {}).items():
        table.add_row("errored", reason, str(n))
    console.print(table)


def print_funnel(e: Any) -> None:
    """What emptied a stage (`NoInputDocuments`): each upstream stage's read, kept and drops by reason, then hints."""
    from rich.text import Text

    from pipeline.run import funnel_lines

    if e.funnel:
        console.print(Text("what the stages before it did:", style="bold"))
        for line in funnel_lines(e.funnel):
            console.print(Text(f"  {line}"))
    for hint in e.hints:
        console.print(Text.assemble(("hint ", "yellow"), hint))


def print_run_summary(cfg: Any, results: dict[str, dict[str, Any]]) -> None:
    """The table `textbook run` ends with, then where the shards and the report are."""
    from pathlib import Path

    from rich.table import Table

    table = Table(title=f"run {cfg.run.name}")
    for col in ("stage", "read", "kept", "dropped", "errored", "seconds", "note"):
        table.add_column(col, justify="left" if col in ("stage", "note") else "right")
    for stage, s in results.items():
        note = ("[yellow]SKIPPED[/] (reason below)" if s.get("skipped") else
                "[red]NO INPUT[/] (funnel below)" if s.get("no_input") else
                "[yellow]PARTIAL[/] (below)" if s.get("partial") else "")
        table.add_row(stage, f"{s.get('read', 0):,}", f"{s.get('kept', 0):,}",
                      f"{sum(s.get('dropped', {}).values()):,}", f"{sum(s.get('errored', {}).values()):,}",
                      str(s.get("seconds", "")), note)
    console.print(table)
    out = Path(cfg.run.out_dir)
    if (out / "manifest.json").is_file():
        import json

        m = json.loads((out / "manifest.json").read_text())
        console.print(f"shards: {out}/data  ({m['totals']['documents']:,} documents, {m['totals']['tokens']:,} tokens; "
                      f"`textbook inspect {out}`)")
    else:
        console.print(f"run directory: {out} (no final shards yet)")
    if (out / "report" / "index.html").is_file():
        console.print(f"report: {out / 'report' / 'index.html'}")
    skipped = [k for k, v in results.items() if v.get("skipped")]
    for k in skipped:
        from rich.text import Text

        console.print(Text.assemble(("skipped ", "yellow"), f"{k}: {results[k]['skipped']}"))
    if skipped:
        console.print("re-run the same command once the missing pieces are there: completed stages are not redone "
                      "(README, 'Offline use': local web data, a local model directory or endpoint, local benchmarks)")
    from pipeline.run import partial_goes_on

    for k, v in results.items():
        p = v.get("partial")
        if p:
            from rich.text import Text

            later = ("the later stages used the documents it kept" if partial_goes_on(p)
                     else "the run stopped there")
            console.print(Text.assemble(("partial ", "yellow"), f"{k}: {p.get('message')}; "
                                        f"{p.get('unanswered', 0):,} request(s) not answered; {later}. Run the same "
                                        "command again to continue it (answered requests come from the ledger, paid "
                                        "once; budget caps are per run)"))
    for k, v in results.items():
        if v.get("no_input"):
            from types import SimpleNamespace

            from rich.text import Text

            console.print(Text.assemble(("no input ", "red"), f"{k}: the run stopped here"))
            print_funnel(SimpleNamespace(funnel=v.get("funnel") or [], hints=v.get("hints") or []))
