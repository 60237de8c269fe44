"""`textbook report RUN_DIR`."""

from __future__ import annotations

import typer

from pipeline.cli.common import console, user_errors


@user_errors
def report(
    run_dir: str = typer.Argument(..., help="A run directory (run.out), e.g. shards/quickstart."),
    out: str | None = typer.Option(None, "--out", help="Where to write index.html and plots (default RUN_DIR/report)."),
) -> None:
    """Write a static HTML report: funnel, score distributions, coverage, cost, duplicates, contamination, curves.

    Example: textbook report shards/quickstart
    """
    from pipeline.report import build_report

    index = build_report(run_dir, out)
    console.print(f"report: {index}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
