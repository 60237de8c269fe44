"""`textbook`: the command line. Thin: it parses, loads the config and calls `pipeline.run` or a stage.

Stage-specific commands live in sibling modules (generate.py, rephrase.py, web.py, classifier.py, dedup.py, train.py,
report.py), each exposing `register(app)`. A module that is not built yet leaves a placeholder command.
"""

from __future__ import annotations

import importlib
import sys

import typer

from pipeline.cli.common import CONFIG_HELP, SET_HELP, console, fail, user_errors

app = typer.Typer(
    name="textbook",
    help="Textbook-quality pretraining data: generate, filter, dedup, decontaminate, shard, pretrain.\n\n"
    "Example: textbook run configs/quickstart.yaml --set generate.n=16",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# module -> stage commands it is expected to register (placeholders until it exists)
_MODULES = {
    "pipeline.cli.generate": ["generate"],
    "pipeline.cli.rephrase": ["rephrase"],
    "pipeline.cli.web": ["web"],
    "pipeline.cli.classifier": [],
    "pipeline.cli.dedup": ["dedup", "decontaminate", "shard"],
    "pipeline.cli.train": ["pretrain"],
    "pipeline.cli.report": [],
}


def _placeholder(stage: str) -> None:
    @app.command(stage, help=f"Stage '{stage}' (not built yet).")
    def _cmd(config: str = typer.Argument(..., help=CONFIG_HELP),
             set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
        fail(f"stage '{stage}' is not built yet")


def _register_all() -> None:
    for module_name, stages in _MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            for s in stages:
                _placeholder(s)
            continue
        module.register(app)


@app.command("run")
@user_errors
def run_cmd(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    stages: str | None = typer.Option(None, "--stages", help="Comma-separated subset, e.g. dedup,shard."),
    force: bool = typer.Option(False, "--force", help="Re-run stages even when complete."),
) -> None:
    """Run the stages listed in the config in order; completed stages (same config + inputs) are skipped.

    Example: textbook run configs/quickstart.yaml --set run.name=try2 --stages dedup,shard
    """
    from pipeline.cli.common import load, print_run_summary
    from pipeline.errors import NoInputDocuments
    from pipeline.run import run_pipeline

    cfg = load(config, set_)
    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    try:
        results = run_pipeline(cfg, chosen, force=force, log=lambda m: console.print(m, highlight=False, markup=False))
    except NoInputDocuments as e:
        print_run_summary(cfg, e.results)  # the table, then what emptied the run; the error line comes last
        raise
    print_run_summary(cfg, results)


_register_all()
importlib.import_module("pipeline.cli.core").register(app)


def main() -> None:
    from pipeline.signals import Terminated, install_signal_handlers

    install_signal_handlers()  # SIGTERM/SIGHUP unwind like Ctrl-C: the local server and the judge are stopped
    try:
        app()
    except Terminated as e:  # a command without `user_errors`
        print(f"terminated ({e.name})", file=sys.stderr)
        sys.exit(128 + e.signum)
