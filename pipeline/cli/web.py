"""`textbook web CONFIG`: the web stage (read, extract, filter, score), then its per-filter and per-file tables."""

from __future__ import annotations

from typing import Any

import typer

from pipeline.cli.common import CONFIG_HELP, SET_HELP, console, run_stage_command, user_errors


def register(app: typer.Typer) -> None:
    @app.command("web")
    @user_errors
    def web_cmd(
        config: str = typer.Argument(..., help=CONFIG_HELP),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP),
        force: bool = typer.Option(False, "--force", help="Re-run from scratch, even completed tasks."),
    ) -> None:
        """Read WARC/WET, jsonl, parquet, HTML folders or a HF dataset; extract main text (trafilatura); filter
        (URL, length, language, Gopher, C4, FineWeb); score educational value; keep the rest.

        Example: textbook web configs/quickstart.yaml --set web.executor=ray --set web.workers=2
        """
        stats = run_stage_command("web", config, set_, force=force)
        print_web_tables(stats)


def print_web_tables(stats: dict[str, Any]) -> None:
    from rich.table import Table

    filters = stats.get("filters") or {}
    if filters:
        t = Table(title="web: dropped, by filter")
        t.add_column("filter")
        t.add_column("dropped", justify="right")
        t.add_column("top reasons")
        for name, f in filters.items():
            reasons = ", ".join(f"{r} {n}" for r, n in list(f["reasons"].items())[:3])
            t.add_row(name, str(f["dropped"]), reasons)
        console.print(t)
    edu = stats.get("edu") or {}
    if edu:
        cut = edu.get("filter")
        line = f"edu: {edu.get('scored', 0):,} pages scored"
        if cut:
            rate = "n/a" if cut.get("keep_rate") is None else f"{cut['keep_rate']:.1%}"
            line += f"; {cut['rule']}: kept {cut['kept']:,} ({rate})"
        if edu.get("gated"):
            line += "; stopped by guards: " + ", ".join(f"{k} {v:,}" for k, v in edu["gated"].items())
        overlap = edu.get("training_overlap")
        if overlap and overlap.get("in_training"):
            line += f"; {overlap['in_training']:,} are training texts of the classifier"
        console.print(line, highlight=False)
    files = stats.get("files") or {}
    if files:
        t = Table(title="web: documents, by input file")
        for col in ("file", "read", "kept", "dropped", "errored"):
            t.add_column(col, justify="left" if col == "file" else "right")
        for name, f in files.items():
            t.add_row(name if len(name) < 70 else "…" + name[-69:], str(f["read"]), str(f["kept"]),
                      str(sum(f["dropped"].values())), str(sum(f["errored"].values())))
        console.print(t)
