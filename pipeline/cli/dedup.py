"""`textbook dedup`, `textbook decontaminate` (+ `decontaminate index`) and `textbook shard`."""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperGroup

from pipeline.cli.common import CONFIG_HELP, SET_HELP, console, run_stage_command, user_errors


class _DefaultToRun(TyperGroup):
    """`textbook decontaminate CONFIG` means `textbook decontaminate run CONFIG`; `index` is a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


decontam_app = typer.Typer(
    cls=_DefaultToRun, no_args_is_help=True,
    help="Remove (or flag) documents that overlap evaluation benchmarks (13-gram overlap by default).\n\n"
         "Examples:\n\n  textbook decontaminate configs/quickstart.yaml\n\n"
         "  textbook decontaminate index --local-dir ../shared/data/benchmarks --out indexes/bench13")


@user_errors
def dedup_cmd(config: str = typer.Argument(..., help=CONFIG_HELP),
              set_: list[str] = typer.Option([], "--set", help=SET_HELP),
              force: bool = typer.Option(False, "--force", help="Re-run even when complete.")) -> None:
    """Exact + MinHash-LSH near-duplicate removal across all sources; prints the LSH threshold curve.

    Example: textbook dedup configs/quickstart.yaml --set dedup.index_in='[shards/run1/stages/dedup/index]'
    """
    run_stage_command("dedup", config, set_, force)


@decontam_app.command("run", hidden=True)
@user_errors
def decontam_run(config: str = typer.Argument(..., help=CONFIG_HELP),
                 set_: list[str] = typer.Option([], "--set", help=SET_HELP),
                 force: bool = typer.Option(False, "--force", help="Re-run even when complete.")) -> None:
    """Run the decontaminate stage of CONFIG.

    Example: textbook decontaminate configs/quickstart.yaml --set decontaminate.mode=flag
    """
    run_stage_command("decontaminate", config, set_, force)


@decontam_app.command("index")
@user_errors
def decontam_index(
    out: str = typer.Option(..., "--out", "-o", help="Directory to write the index to."),
    benchmarks: str | None = typer.Option(None, "--benchmarks", "-b",
                                          help="Comma-separated adapter names (default: all known)."),
    local_dir: str | None = typer.Option(None, "--local-dir", help="Folder with local benchmark copies "
                                         "(e.g. ../shared/data/benchmarks); others come from the HF hub."),
    file: list[str] = typer.Option([], "--file", help="Extra benchmark file NAME=PATH[:field1,field2] (repeatable)."),
    ngram: int = typer.Option(13, "--ngram", help="Words per n-gram."),
    min_words: int = typer.Option(8, "--min-words", help="Shorter benchmark texts (>= this) are matched whole."),
    max_items: int = typer.Option(10, "--max-items-per-ngram", help="Drop n-grams shared by more items."),
) -> None:
    """Build a reusable decontamination index (then set decontaminate.index to it).

    Example: textbook decontaminate index --local-dir ../shared/data/benchmarks --benchmarks gsm8k,humaneval -o idx
    """
    from pipeline.benchmarks_data import ADAPTERS
    from pipeline.config.dedup import BenchmarkFile
    from pipeline.decontam import build_index
    from pipeline.errors import TextbookError

    names = [b.strip() for b in benchmarks.split(",") if b.strip()] if benchmarks else list(ADAPTERS)
    unknown = [b for b in names if b not in ADAPTERS]
    if unknown:
        raise TextbookError(f"unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(ADAPTERS)}; "
                            "other files: --file NAME=PATH:fields)")
    files: list[Any] = []
    for spec in file:
        if "=" not in spec:
            raise TextbookError(f"--file expects NAME=PATH[:fields], got {spec!r}")
        name, rest = spec.split("=", 1)
        path, _, fields = rest.partition(":")
        files.append(BenchmarkFile(name=name, path=path, fields=[f for f in fields.split(",") if f]))
    index = build_index(names, local_dir, files, ngram, min_words, max_items,
                        log=lambda m: console.print(m, highlight=False))
    where = index.save(out)
    from rich.table import Table

    table = Table(title=f"decontamination index {where} ({ngram}-grams)")
    for col in ("benchmark", "source", "items", "n-grams", "errors"):
        table.add_column(col)
    for name, b in index.info["benchmarks"].items():
        table.add_row(name, str(b.get("source", "")), f"{b.get('items', 0):,}", f"{b.get('ngrams', 0):,}",
                      str(sum(b.get("errors", {}).values())))
    for name, why in index.info.get("unavailable", {}).items():
        table.add_row(name, f"[yellow]unavailable[/]: {why}", "", "", "")
    console.print(table)


@user_errors
def shard_cmd(config: str = typer.Argument(..., help=CONFIG_HELP),
              set_: list[str] = typer.Option([], "--set", help=SET_HELP),
              force: bool = typer.Option(False, "--force", help="Re-run even when complete.")) -> None:
    """Mix sources by weight, tokenize, shuffle and write the final shards + manifest + dataset card.

    Example: textbook shard configs/quickstart.yaml --set shard.weights.synthetic=3 --set shard.target_tokens=1000000
    """
    run_stage_command("shard", config, set_, force)


def register(app: typer.Typer) -> None:
    app.command("dedup")(dedup_cmd)
    app.add_typer(decontam_app, name="decontaminate")
    app.command("shard")(shard_cmd)
