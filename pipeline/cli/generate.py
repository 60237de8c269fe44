"""`textbook generate` and `textbook topics ...`: synthetic textbooks from the topic taxonomy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from pipeline.cli.common import CONFIG_HELP, SET_HELP, console, run_stage_command, user_errors

topics_app = typer.Typer(help="Inspect and grow the topic taxonomy (prompts/topics).", no_args_is_help=True)


@user_errors
def generate(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    n: int | None = typer.Option(None, "--n", help="Prompt specs to generate (overrides generate.n)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print requests, sample prompts, estimated tokens, "
                                 "cost online and through the batch API, and time; send nothing."),
    force: bool = typer.Option(False, "--force", help="Re-run even when complete (answers still come from the "
                               "ledger)."),
    samples: int = typer.Option(2, "--samples", help="Rendered prompts to show with --dry-run."),
) -> None:
    """Generate synthetic textbook documents through the configured LLM (resumable: re-run after a crash).

    Example: textbook generate configs/quickstart.yaml --n 200 --dry-run
    """
    sets = list(set_) + ([f"generate.n={n}"] if n is not None else [])
    if dry_run:
        _dry_run(config, sets, samples)
        return
    result = run_stage_command("generate", config, sets, force=force)
    for style, label, text in llm_summary_lines(result):
        console.print(Text.assemble((label, style), text) if label else Text(text))
    stopped = (result.get("diversity") or {}).get("cells_stopped") or {}
    for cell, why in stopped.items():
        console.print(f"[yellow]diversity guard[/]: stopped '{cell}' (repeat rate {why['repeat_rate']})")


# what to do about requests a run left unanswered, by reason (`RunSummary.unanswered`)
_RERUN_HINTS = {
    "budget": "run the same command again to send them: budget.max_usd / max_tokens cap each run, so every run may "
              "spend up to the cap again (raise it to go further in one run)",
    "server_wait": "run the same command again once the server's limit has lifted: it sends them",
    "in_open_batch": "they are in batches an earlier llm.mode: batch run left open: run once with --set "
                     "llm.mode=batch to collect them, then this command answers them from the ledger",
}


def llm_summary_lines(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """What `textbook generate` prints after the stage table, as (style, label, text) lines: requests and cost,
    billed-but-unusable spend by outcome, waits, LLM warnings, and a stop: what stopped it, what is left and
    what to do (answered requests always come from the ledger, paid once)."""
    lines: list[tuple[str, str, str]] = []
    llm = result.get("llm") or {}
    if llm:
        lines.append(("", "", f"requests {result.get('requests', 0):,}: sent {llm.get('sent', 0):,}, from ledger "
                              f"{llm.get('cached', 0):,}, failed {llm.get('failed', 0):,}, skipped "
                              f"{llm.get('skipped', 0):,}; cost ${llm.get('cost_usd', 0):.4f}"))
        unusable = llm.get("unusable") or {}
        if unusable.get("answers"):
            by = llm.get("unusable_outcomes") or {}
            parts = ", ".join(f"{k} {v['answers']:,} (${v['cost_usd']:.4f})"
                              for k, v in sorted(by.items(), key=lambda kv: -kv[1]["cost_usd"]))
            lines.append(("", "", f"billed but unusable: {unusable['answers']:,} answer(s), "
                                  f"${unusable.get('cost_usd', 0):.4f}" + (f": {parts}" if parts else "")))
        waits = llm.get("waits") or {}
        if waits.get("count"):
            lines.append(("", "", f"waits: {waits['count']:,} of 2 s or more (rate limits, backoff), longest "
                                  f"{waits.get('longest_s', 0):,.0f} s; {waits.get('wall_s', 0):,.0f} s of wall-clock "
                                  f"time waiting (summed over requests: {waits.get('total_s', 0):,.0f} s)"))
        for warning in llm.get("warnings") or []:
            lines.append(("yellow", "llm warning: ", warning))
    partial = result.get("partial")
    if partial:
        if result.get("stopped_reason"):
            lines.append(("yellow", "stopped early: ", result["stopped_reason"]))
        for reason, n in (partial.get("reasons") or {}).items():
            hint = _RERUN_HINTS.get(reason, "run the same command again to send them")
            lines.append(("yellow", "not answered: ", f"{n:,} request(s) ({reason}): {hint}"))
        lines.append(("", "", "the stage is partial, not complete: what was answered is in the ledger and is not "
                              "paid again"))
    elif result.get("stopped_reason"):
        lines.append(("yellow", "stopped: ", f"{result['stopped_reason']} (every request was answered)"))
    return lines


def _dry_run(config: str, sets: list[str], samples: int) -> None:
    from rich.table import Table

    from pipeline.cli.common import load
    from pipeline.errors import TextbookError
    from pipeline.generate.sampler import coverage
    from pipeline.generate.stage import plan, plan_notes, web_pending
    from pipeline.llm.runner import estimate
    from pipeline.run import resolve_inputs, run_dir_of

    cfg = load(config, sets)
    try:
        inputs, upstream = resolve_inputs(cfg, "generate", run_dir_of(cfg), [s for s in cfg.run.stages])
    except TextbookError:
        inputs, upstream = [], []  # generate.inputs that cannot be read: a dry run plans without web seeds
    p = plan(cfg, inputs, pending_web=web_pending(cfg, inputs, upstream))
    cov = coverage(p.specs, p.grid_cells, p.taxonomy)
    console.print(f"[bold]generate (dry run)[/]: {len(p.specs):,} prompt specs × {cfg.llm.n} sample(s) = "
                  f"{len(p.requests):,} requests to {cfg.llm.model} ({cfg.llm.request_api()} API)")
    console.print(f"grid: {cov['cells_filled']}/{cov['cells_total']} audience × format cells, "
                  f"{cov['subjects_covered']}/{cov['subjects_total']} subjects, "
                  f"{cov['leaves_covered']:,}/{cov['leaves_total']:,} leaf topics, {cov['web_seeded']} web-seeded")
    for note in plan_notes(p):
        console.print(Text.assemble(("note", "yellow"), f": {note}"))
    if cfg.llm.api_note():
        console.print(Text.assemble(("note", "yellow"), f": {cfg.llm.api_note()}"))
    for req in p.requests[: max(samples, 0)]:
        spec = p.specs[req.tag["spec"]]
        body = req.messages[-1]["content"] if req.messages else req.prompt
        console.rule(f"spec {spec.index}: {spec.audience} · {spec.format} · {spec.topic}")
        console.print(body, highlight=False, markup=False)
    est: dict[str, Any] = estimate(p.requests, cfg.llm, cfg.budget, ledger_path=cfg.llm.ledger_path())
    table = Table(title="estimate")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in est.items():
        table.add_row(str(k), f"{v:,.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)
    console.print(f"cost at most: online ${est['est_max_cost_usd_online']:,.4f} vs batch API "
                  f"${est['est_max_cost_usd_batch']:,.4f} ({est['batches']} batch(es), budget.batch_discount "
                  f"{cfg.budget.batch_discount:g}; llm.mode: {cfg.llm.mode})", highlight=False)


@topics_app.command("expand")
@user_errors
def topics_expand(
    subject: str = typer.Argument(..., help="Subject to expand, e.g. 'Marine Biology'."),
    config: str = typer.Option(..., "--config", "-c", help=CONFIG_HELP + " Its llm: section is used."),
    out: Path = typer.Option(..., "--out", "-o", help="Taxonomy YAML file to write (e.g. prompts/topics/x.yaml)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    subtopics: int = typer.Option(8, "--subtopics", help="Subtopics to ask for."),
    concepts: int = typer.Option(8, "--concepts", help="Concepts per subtopic to ask for."),
    samples: int = typer.Option(1, "--samples", help="Answers to ask for and merge (more: broader)."),
    domain: str = typer.Option("expanded", "--domain", help="Domain label written in the file."),
    tags: list[str] = typer.Option([], "--tag", help="Tag for the subject, e.g. --tag code (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Ask the LLM for the subtopics and concepts of SUBJECT, deduplicate them and write a taxonomy file.

    Example: textbook topics expand "Marine Biology" --config configs/quickstart.yaml --out prompts/topics/marine.yaml
    """
    from pipeline.cli.common import load
    from pipeline.generate.expand import expand_subject, write_taxonomy

    cfg = load(config, set_)
    outline, info = expand_subject(subject, cfg, subtopics, concepts, samples)
    write_taxonomy(out, subject, outline, domain=domain, tags=tags, overwrite=force)
    n = sum(len(v) for v in outline.values())
    console.print(f"wrote {out}: {subject}: {len(outline)} subtopics, {n} concepts "
                  f"({info['ok']}/{info['requests']} answers used)")


@topics_app.command("stats")
@user_errors
def topics_stats(
    paths: list[str] = typer.Argument(None, help="Taxonomy files or directories (default prompts/topics)."),
) -> None:
    """Validate taxonomy files and print subjects, subtopics and leaf topics per domain.

    Example: textbook topics stats prompts/topics
    """
    from rich.table import Table

    from pipeline.generate.taxonomy import load_taxonomy

    tax = load_taxonomy(paths or ["prompts/topics"])
    table = Table(title="taxonomy")
    for col in ("subject", "domain", "tags", "subtopics", "leaves"):
        table.add_column(col, justify="right" if col in ("subtopics", "leaves") else "left")
    for s in tax.subjects.values():
        table.add_row(s.name, s.domain, ",".join(sorted(s.tags)), str(len(s.subtopics)), str(len(s.leaves)))
    console.print(table)
    summary = tax.summary()
    console.print(f"{summary['subjects']} subjects, {summary['subtopics']} subtopics, {summary['leaves']:,} leaf topics")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.add_typer(topics_app, name="topics")
