"""`textbook rephrase`: recycle the web stage's scored pages by edu-score bucket (keep, rewrite, drop)."""

from __future__ import annotations

from typing import Any

import typer

from pipeline.cli.common import CONFIG_HELP, SET_HELP, console, run_stage_command, user_errors


@user_errors
def rephrase(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Read the real pages, plan buckets, rewrites and chunk "
                                 "requests, price them from the pages' token counts (online and batch); send "
                                 "nothing."),
    force: bool = typer.Option(False, "--force", help="Re-run even when complete (answers still come from the "
                               "ledger)."),
    samples: int = typer.Option(1, "--samples", help="Rendered prompts to show with --dry-run."),
) -> None:
    """Rephrase web pages into textbook formats by edu-score bucket (resumable: re-run after a crash).

    Example: textbook rephrase configs/rephrase.yaml --dry-run
    """
    if dry_run:
        _dry_run(config, list(set_), samples)
        return
    result = run_stage_command("rephrase", config, list(set_), force=force)
    pages = result.get("pages") or {}
    if pages:
        console.print(f"pages {result.get('read', 0):,}: kept as is {pages.get('kept', 0):,}, rewritten "
                      f"{pages.get('rewritten', 0):,}, dropped {pages.get('dropped', 0):,}, errored "
                      f"{pages.get('errored', 0):,}")
    for template, row in (result.get("rewrites") or {}).items():
        console.print(f"  {template}: {row['kept']:,} of {row['planned']:,} rewrites kept"
                      + (f"; dropped {row['dropped']}" if row["dropped"] else "")
                      + (f"; errored {row['errored']}" if row["errored"] else ""), highlight=False)
    out = result.get("documents_out") or {}
    if out:
        console.print(f"documents out: {out['total']:,} ({out['as_is']:,} pages as is + {out['rewrites']:,} "
                      f"rewrites); cost ${result.get('cost_usd', 0):.4f}")
    if result.get("stopped_reason"):
        console.print(f"[yellow]stopped early[/]: {result['stopped_reason']} (re-run with a larger budget to go on)")


def dry_run_figures(cfg: Any) -> dict[str, Any]:
    """Plan a rephrase run on the real pages and price it: pages per bucket and fate, rewrites per template,
    requests, the pages' token counts (the run's tokenizer), the LLM layer's estimate (worst case: every answer
    hits max_tokens) and an expected cost from the prompts' token counts with answers as long as their chunks.
    Requests the ledger has already answered cost nothing and are left out of both."""
    from collections import Counter

    from pipeline.llm.ledger import Ledger
    from pipeline.llm.runner import estimate
    from pipeline.rephrase.stage import build_plan
    from pipeline.run import resolve_inputs, run_dir_of
    from pipeline.tokenizer import load_tokenizer

    run_dir = run_dir_of(cfg)
    inputs, upstream = resolve_inputs(cfg, "rephrase", run_dir, [s for s in cfg.run.stages])
    web_dir = run_dir / "stages" / "web" if "web" in upstream else None
    the_plan, read = build_plan(cfg, inputs, upstream, web_dir)
    tok = load_tokenizer(cfg.tokenizer.path)
    rewritten_pages = {rw.page for rw in the_plan.rewrites}
    texts = [p.text for p in the_plan.pages if p.index in rewritten_pages]
    source_tokens = sum(len(x) for x in tok.encode_batch(texts)) if texts else 0
    ledger = cfg.llm.ledger_path()
    answered: set[str] = set()
    if ledger.exists():
        with Ledger(ledger) as led:
            answered = led.ok_keys()
    to_send = [req for req in the_plan.requests if req.key(cfg.llm.model) not in answered]
    prompts = ["\n".join(m["content"] for m in req.messages) if req.messages else req.prompt or ""
               for req in to_send]
    chunks = [the_plan.rewrites[req.tag["rewrite"]].chunks[req.tag["chunk"]] for req in to_send]
    prompt_tokens = sum(len(x) for x in tok.encode_batch(prompts)) if prompts else 0
    answer_tokens = sum(len(x) for x in tok.encode_batch(chunks)) if chunks else 0
    expected = {"prompt_tokens": prompt_tokens, "completion_tokens": answer_tokens,
                "usd_online": round(cfg.budget.cost(prompt_tokens, answer_tokens), 4),
                "usd_batch": round(cfg.budget.cost(prompt_tokens, answer_tokens, batch=True), 4)}
    est = estimate(the_plan.requests, cfg.llm, cfg.budget, ledger_path=ledger)

    def counts(values: Any) -> dict[str, int]:
        return dict(Counter(values).most_common())

    return {"pages": len(the_plan.pages), "read": read, "buckets": counts(p.bucket or "(none)" for p in the_plan.pages),
            "fates_before_requests": counts(p.fate or ("kept" if p.keep else "to_rewrite") for p in the_plan.pages),
            "rewrites": len(the_plan.rewrites), "rewrites_per_template": counts(rw.template for rw in the_plan.rewrites),
            "requests": len(the_plan.requests), "chunk_tokens": the_plan.chunk_tokens,
            "context_tokens": the_plan.context_tokens, "source_tokens_of_rewritten_pages": source_tokens,
            "estimate": est, "expected": expected, "contaminated_sources": len(the_plan.info["contaminated"]),
            "plan": the_plan}


def _dry_run(config: str, sets: list[str], samples: int) -> None:
    from rich.table import Table

    from pipeline.cli.common import load

    cfg = load(config, sets)
    f = dry_run_figures(cfg)
    the_plan = f.pop("plan")
    console.print(f"[bold]rephrase (dry run)[/]: {f['pages']:,} pages -> {f['rewrites']:,} rewrites in "
                  f"{f['requests']:,} requests to {cfg.llm.model} (chunks of <= {f['chunk_tokens']:,} estimated "
                  f"tokens; context {f['context_tokens']:,})", highlight=False)
    console.print(f"pages per bucket: {f['buckets']}", highlight=False)
    console.print(f"page fates before any request: {f['fates_before_requests']}", highlight=False)
    console.print(f"rewrites per template: {f['rewrites_per_template']}", highlight=False)
    for req in the_plan.requests[: max(samples, 0)]:
        rw = the_plan.rewrites[req.tag["rewrite"]]
        page = the_plan.pages[rw.page]
        body = req.messages[-1]["content"] if req.messages else req.prompt
        console.rule(f"page {page.id} ({rw.bucket}, edu {page.edu_score:.2f}) · {rw.template} · part "
                     f"{req.tag['chunk'] + 1}/{len(rw.chunks)}")
        console.print(body, highlight=False, markup=False)
    table = Table(title="estimate")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows: dict[str, Any] = {"source tokens (pages to rewrite, run tokenizer)": f["source_tokens_of_rewritten_pages"],
                            **f["estimate"], **{f"expected_{k}": v for k, v in f["expected"].items()}}
    for k, v in rows.items():
        table.add_row(str(k), f"{v:,.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)
    est, exp = f["estimate"], f["expected"]
    console.print(f"cost at most (every answer at max_tokens): online ${est['est_max_cost_usd_online']:,.4f} vs batch "
                  f"${est['est_max_cost_usd_batch']:,.4f}; expected (answers as long as their chunks): online "
                  f"${exp['usd_online']:,.4f} vs batch ${exp['usd_batch']:,.4f} (llm.mode: {cfg.llm.mode})",
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("rephrase")(rephrase)
