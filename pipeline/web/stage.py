"""The web stage: plan units, build the datatrove pipeline from `web:`, run it (local or Ray), account, publish.

Work happens under `<stage>/state/<key>/` (key = config + inputs): datatrove's completions and logs in
`logs/`, per-task outputs in `out/`. A re-run after a crash skips the tasks that completed. When every task is
done, the per-task ledgers are summed into the stage stats and the outputs are linked into `kept/`, `removed/`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from copy import deepcopy
from pathlib import Path
from typing import Any

from pipeline.errors import TextbookError
from pipeline.io import atomic_write_text
from pipeline.stats import StageStats
from pipeline.web.units import Unit, fingerprint, plan_units


def build_pipeline(section: Any, units: list[Unit], out_root: str, edu_model: str | None) -> list[Any]:
    """reader → URL → trafilatura → min length → language → Gopher repetition/quality → C4 → FineWeb → edu score →
    kept (or, with an edu filter, scored: the cut comes after the tasks, `pipeline.web.edu.apply_edu_cut`)."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherRepetitionFilter,
    )

    from pipeline.web.readers import WebReader
    from pipeline.web.steps import (
        CaseFoldedGopherQuality,
        Guarded,
        HtmlExtractor,
        KeepWriter,
        LanguageFilter,
        MinLengthFilter,
    )

    f, rate = section.filters, section.removed_sample_rate
    lang = (f.language.languages or ["en"])[0] if f.language.enabled else "en"

    def guard(inner: Any, name: str, **kw: Any) -> Any:
        return Guarded(inner, name, out_root, rate, **kw)

    steps: list[Any] = [WebReader(units, out_root, section.max_page_bytes, rate)]
    if f.url.enabled:
        steps.append(guard(_url_filter(f.url), "url", needs_url=True))
    steps.append(HtmlExtractor(out_root, section.extract_timeout_s, section.favour_precision, rate))
    if f.min_length.enabled:
        steps.append(guard(MinLengthFilter(f.min_length.min_chars, f.min_length.min_words), "min_length"))
    if f.language.enabled:
        steps.append(guard(LanguageFilter(f.language.languages, f.language.min_score), "language"))
    if f.gopher_repetition.enabled:
        steps.append(guard(GopherRepetitionFilter(**_fields(f.gopher_repetition), language=lang),
                           "gopher_repetition"))
    if f.gopher_quality.enabled:
        steps.append(guard(CaseFoldedGopherQuality(**_fields(f.gopher_quality), language=lang), "gopher_quality"))
    if f.c4_quality.enabled:
        steps.append(guard(C4QualityFilter(**_fields(f.c4_quality), language=lang), "c4_quality"))
    if f.fineweb_quality.enabled:
        steps.append(guard(FineWebQualityFilter(**_fields(f.fineweb_quality), language=lang), "fineweb_quality"))
    if section.edu.enabled:
        from pipeline.classify.datatrove_steps import EduScoreTagger

        steps.append(EduScoreTagger(edu_model, guards=section.edu.guards, summary_dir=str(Path(out_root, "edu"))))
    # with an edu filter, pages are held in scored/ and the cut is taken after every task (pipeline.web.edu)
    steps.append(KeepWriter(out_root, held=section.edu.enabled and section.edu.filter))
    return steps


def _fields(model: Any) -> dict[str, Any]:
    return {k: v for k, v in model.model_dump().items() if k != "enabled"}


def _url_filter(cfg: Any) -> Any:
    from pipeline.web.steps import OfflineURLFilter

    return OfflineURLFilter(cfg.soft_word_threshold, cfg.extra_domains)


# --- execution ---------------------------------------------------------------------------------------------------

def run_executor(section: Any, steps: list[Any], logs_dir: Path) -> None:
    if section.executor == "ray":
        _run_ray(section, steps, logs_dir)
    else:
        _run_local(section, steps, logs_dir)
    done = {p.name for p in (logs_dir / "completions").glob("*")} if (logs_dir / "completions").is_dir() else set()
    missing = [r for r in range(section.tasks) if f"{r:05d}" not in done]
    if missing:
        logs = ", ".join(str(logs_dir / "logs" / f"task_{r:05d}.log") for r in missing[:3])
        raise TextbookError(f"web: {len(missing)} of {section.tasks} datatrove tasks did not complete "
                            f"(ranks {missing[:10]}); see {logs}. Completed tasks are kept: re-run to resume")


_ACTIVE: Any = None  # the executor a forked worker runs ranks of


def _run_rank(rank: int) -> int:
    _ACTIVE.pipeline = deepcopy(_ACTIVE.pipeline)  # fresh step state per task, as datatrove does
    _ACTIVE._run_for_rank(rank)
    return rank


def _run_local(section: Any, steps: list[Any], logs_dir: Path) -> None:
    """datatrove's LocalPipelineExecutor; with several workers its ranks run in a process pool that reports a dead
    worker (BrokenProcessPool) and a stuck one (time limit) instead of waiting forever like multiprocessing.Pool."""
    import concurrent.futures as cf
    import multiprocessing

    from datatrove.executor import LocalPipelineExecutor

    executor = LocalPipelineExecutor(steps, tasks=section.tasks, workers=section.workers, logging_dir=str(logs_dir),
                                     skip_completed=True)
    ranks = executor.get_incomplete_ranks()
    if not ranks:
        return
    executor.save_executor_as_json()
    if section.workers == 1:
        original = executor.pipeline
        for rank in ranks:
            executor.pipeline = deepcopy(original)
            _task(executor, rank)
        return
    _warm_imports(section)
    global _ACTIVE
    _ACTIVE = executor
    rounds = -(-len(ranks) // section.workers)
    pool = cf.ProcessPoolExecutor(section.workers, mp_context=multiprocessing.get_context("fork"))
    failures: list[str] = []
    try:
        futures = {pool.submit(_run_rank, r): r for r in ranks}
        done, pending = cf.wait(futures, timeout=section.task_timeout_s * rounds)
        for fut in done:
            try:
                fut.result()
            except cf.process.BrokenProcessPool:
                failures.append(f"task {futures[fut]}: a worker process died (killed, out of memory?)")
            except Exception as e:  # noqa: BLE001
                failures.append(f"task {futures[fut]}: {type(e).__name__}: {e}")
        if pending:
            failures.append(f"{len(pending)} task(s) still running after {section.task_timeout_s * rounds}s "
                            "(web.task_timeout_s per round of tasks): stopped")
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        _ACTIVE = None
    if failures:
        raise TextbookError(f"web: {failures[0]}" + (f" (+{len(failures) - 1} more)" if len(failures) > 1 else "")
                            + f"; logs in {logs_dir / 'logs'}. Completed tasks are kept: re-run to resume")


def _warm_imports(section: Any) -> None:
    """Import the heavy libraries once in the parent: forked workers inherit them instead of each paying for it."""
    import trafilatura  # noqa: F401

    f = section.filters
    if f.url.enabled:  # the block lists (~10 s to load) land in a module cache the forked workers share
        _url_filter(f.url).download_data()
    if f.gopher_quality.enabled or f.gopher_repetition.enabled or f.c4_quality.enabled or f.fineweb_quality.enabled:
        import spacy  # noqa: F401


def _task(executor: Any, rank: int) -> None:
    try:
        executor._run_for_rank(rank)
    except TextbookError:
        raise
    except Exception as e:
        raise TextbookError(f"web: task {rank} failed: {type(e).__name__}: {e}; log: "
                            f"{executor.logging_dir.path}/logs/task_{rank:05d}.log. Re-run to resume") from e


def _run_ray(section: Any, steps: list[Any], logs_dir: Path) -> None:
    import ray
    from datatrove.executor import RayPipelineExecutor

    started = False
    if not ray.is_initialized():
        from pipeline.scale.engine import check_ray_address
        from pipeline.signals import keep_signal_handlers

        # web.ray_address, else $RAY_ADDRESS (a cluster: CPUs are its own), else a Ray of our own
        address = section.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        check_ray_address(address)
        with keep_signal_handlers():  # ray.init sets SIGTERM to sys.exit(15): `textbook`'s handlers stay
            ray.init(address=address, num_cpus=section.workers if address == "local" else None,
                     include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        started = True
    try:
        RayPipelineExecutor(steps, tasks=section.tasks, workers=section.workers, logging_dir=str(logs_dir),
                            cpus_per_task=1, mem_per_cpu_gb=1, time=section.task_timeout_s,
                            skip_completed=True).run()
    finally:
        if started:
            ray.shutdown()


# --- accounting and publishing -----------------------------------------------------------------------------------

def _file_row() -> dict[str, Any]:
    return {"read": 0, "kept": 0, "dropped": Counter(), "errored": Counter()}


def collect(out_root: Path, units: list[Unit]) -> tuple[StageStats, dict[str, Any]]:
    """Sum the per-task ledgers; read per file must equal kept + dropped + errored per file."""
    stats = StageStats("web")
    read: Counter[str] = Counter()
    non_docs: Counter[str] = Counter()
    repaired: dict[str, Counter[str]] = defaultdict(Counter)
    for p in sorted((out_root / "read").glob("*.json")):
        d = json.loads(p.read_text())
        read.update(d["read"])
        non_docs.update(d.get("non_document_records", {}))
        for label, reasons in d.get("repaired", {}).items():
            repaired[label].update(reasons)
            for reason, n in reasons.items():
                stats.repair(reason, n)
    files: dict[str, dict[str, Any]] = {u.label: _file_row() for u in units}
    scored: Counter[str] = Counter()
    filters: dict[str, dict[str, Any]] = defaultdict(lambda: {"dropped": 0, "reasons": Counter()})
    for p in sorted((out_root / "ledger").glob("*.json")):
        d = json.loads(p.read_text())
        for file, fate, reason, n in d["counts"]:
            row = files.setdefault(file, _file_row())
            if fate == "scored":  # held for the edu cut, whose own ledger gives these pages their fate
                scored[file] += n
                continue
            if fate == "kept":
                row["kept"] += n
                stats.keep(n)
            elif fate == "dropped":
                row["dropped"][reason] += n
                stats.drop(reason, n)
                filters[reason]["dropped"] += n
            else:
                row["errored"][reason] += n
                stats.error(reason, n)
        for key, n in d.get("detail", {}).items():
            name, _, why = key.partition(": ")
            filters[name]["reasons"][why] += n
    for label, row in files.items():
        row["read"] = read.get(label, 0)
        stats.read(row["read"])
        ended = row["kept"] + sum(row["dropped"].values()) + sum(row["errored"].values())
        if ended < row["read"]:  # never expected: a record that vanished is reported, not hidden
            row["errored"]["unaccounted"] += row["read"] - ended
            stats.error("unaccounted", row["read"] - ended)
    per_file = {k: {"read": v["read"], "kept": v["kept"], "dropped": dict(sorted(v["dropped"].items())),
                    "errored": dict(sorted(v["errored"].items())),
                    **({"repaired": dict(sorted(repaired[k].items()))} if repaired.get(k) else {})}
                for k, v in sorted(files.items())}
    per_filter = {k: {"dropped": v["dropped"], "reasons": dict(v["reasons"].most_common())}
                  for k, v in sorted(filters.items())}
    return stats, {"files": per_file, "filters": per_filter, "non_document_records": sum(non_docs.values()),
                   "scored": dict(scored)}


def edu_summary(out_root: Path) -> dict[str, Any]:
    """The tagger's per-task summaries (`out/edu/r*.json`) summed: scored, gated per gate, training overlap."""
    from pipeline.classify.datatrove_steps import SUMMARY_COUNTS

    total: Counter[str] = Counter()
    gated: Counter[str] = Counter()
    model, hashes, guards = None, True, True
    for p in sorted((out_root / "edu").glob("*.json")):
        d = json.loads(p.read_text())
        total.update({k: d.get(k, 0) for k in SUMMARY_COUNTS})
        gated.update(d.get("gated", {}))
        model, hashes, guards = d.get("model"), hashes and d.get("has_training_hashes", False), d.get("guards", True)
    n = total["scored"]
    out: dict[str, Any] = {"model": model, "scored": n, "guards": guards, "gated": dict(sorted(gated.items())),
                           **{k: total[k] for k in SUMMARY_COUNTS if k != "scored"}}
    out["training_overlap"] = ({"documents": n, "in_training": total["in_training"],
                                "fraction": total["in_training"] / n if n else 0.0} if hashes else None)
    return out


def publish(out_root: Path, ctx: Any) -> list[dict[str, Any]]:
    """Link the per-task outputs into kept/ and removed/ (the state copy stays for resume); gather error lines."""
    for sub, dest in (("kept", ctx.kept_dir), ("removed", ctx.removed_dir)):
        dest.mkdir(parents=True, exist_ok=True)
        for p in sorted((out_root / sub).glob("*.parquet")):
            target = dest / p.name
            target.unlink(missing_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)
    errors: list[dict[str, Any]] = []
    for p in sorted((out_root / "errors").glob("*.jsonl")):
        errors += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    atomic_write_text(ctx.out_dir / "errors.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    return errors


def run_stage(ctx: Any) -> StageStats:
    section = ctx.section
    units, ignored = plan_units(section, section.tasks)
    edu_model = None
    if section.edu.enabled:
        from pipeline.classify.model import resolve_model_dir

        edu_model = str(resolve_model_dir(section.edu.model or ctx.cfg.classifier.model))
        if not Path(edu_model).exists():
            raise TextbookError(f"web.edu: classifier model {edu_model} not found (train one with "
                                "`textbook classifier train`, or set web.edu.model / web.edu.enabled=false)")
    # the edu cut is taken after the tasks: changing it reuses the scored pages (score once, filter many ways)
    scoring = section.model_copy(update={"edu": section.edu.model_copy(
        update={"threshold": None, "keep_top": None, "keep_top_of": "run"})})
    key = fingerprint(units, scoring, {"edu_model": edu_model})
    work = ctx.state_dir / key
    if ctx.force and work.exists():
        shutil.rmtree(work)
    out_root = work / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    steps = build_pipeline(section, units, str(out_root), edu_model)
    run_executor(section, steps, work / "logs")
    edu: dict[str, Any] | None = None
    if section.edu.enabled:
        edu = edu_summary(out_root)
        if section.edu.filter:
            from pipeline.web.edu import apply_edu_cut

            edu["filter"] = apply_edu_cut(out_root, section.edu, edu_model, section.removed_sample_rate)
    stats, detail = collect(out_root, units)
    if section.edu.enabled and section.edu.filter:
        from pipeline.web.edu import check_reconciled

        check_reconciled(detail["scored"], out_root)
    errors = publish(out_root, ctx)
    stats.set("executor", section.executor)
    stats.set("tasks", section.tasks)
    stats.set("workers", section.workers)
    stats.set("input_units", len(units))
    stats.set("ignored_files", {"count": len(ignored), "first": ignored[:10]})
    stats.set("filters", detail["filters"])
    stats.set("files", detail["files"])
    stats.set("non_document_warc_records", detail["non_document_records"])
    stats.set("errors_sample", errors[:20])
    if edu is not None:
        stats.set("edu", edu)
    stats.set("state_dir", str(work))
    return stats
