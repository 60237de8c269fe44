"""Stage registry and resumable execution.

A stage is a function `run_stage(ctx: StageContext) -> StageStats` in its own module. It reads
`ctx.inputs` (document files), writes kept documents to `ctx.kept_dir` and removed ones to
`ctx.removed_dir`, and may keep private resume state in `ctx.state_dir`. After it returns, this module
writes `stats.json` and `_SUCCESS.json` (the stage's content hash). A stage whose `_SUCCESS.json` carries
the same hash (resolved section + run-level settings + inputs) is skipped, so a re-run after a crash resumes.

A stage that stopped early with work a re-run can still do (an LLM stage stopped by the budget cap or a server
wait above llm.max_wait_s: its stats carry `partial` = {"unanswered": n, "reasons": {reason: n}, "message": str})
gets `_PARTIAL.json` instead of `_SUCCESS.json`: it is not complete, so the same command runs it again (the LLM
ledger answers what was answered, for nothing; the rest is sent). Its kept documents still feed later stages, under
a hash of their own per attempt (`output_hash`), so those re-run once it has gone further. `run_pipeline` goes on
past a partial stage only when the budget alone stopped it (the user's own limit: a legitimate end, said so);
any other stop (a server wait, requests in an open batch) ends the run there, the later stages not run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import RunConfig, config_hash
from pipeline.errors import NoInputDocuments, ResourceUnavailable, TextbookError
from pipeline.io import atomic_write_text
from pipeline.stats import StageStats


@dataclass(frozen=True)
class StageSpec:
    name: str
    target: str  # "module:function"
    # Groups of upstream stages, in order of preference: the first group with a stage in this run feeds it.
    upstream: tuple[tuple[str, ...], ...] = ()
    # Config sections (besides its own) whose values change this stage's output.
    depends_on: tuple[str, ...] = ()
    help: str = ""
    # "module:function(section) -> list[Path]": files read besides `inputs` (hashed for resume)
    input_files: str | None = None
    # the stage reads its `inputs` itself (raw WARC/HTML/hub names), not as document files
    raw_inputs: bool = False
    # "module:NAME" constants whose value changes the stage's output (a new text normalisation re-runs it)
    code_versions: tuple[str, ...] = ()
    # "module:function(cfg, stats) -> list[str]": why this stage kept nothing, naming the settings to change
    # (asked when a later stage has no input; see `explain_no_input`)
    explain_empty: str | None = None
    # stages whose documents this one passes on (those it keeps) in their place: a later stage reading both
    # reads only this one (rephrase passes on the web pages it keeps, so dedup never reads a page twice)
    supersedes: tuple[str, ...] = ()


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("web", "pipeline.web:run_stage", depends_on=("classifier",),
                  input_files="pipeline.web.units:input_files", raw_inputs=True,
                  explain_empty="pipeline.web.hints:explain_empty",
                  help="read, extract, filter and score web pages (datatrove)"),
        StageSpec("generate", "pipeline.generate.stage:run_stage", upstream=(("web",),),
                  input_files="pipeline.generate.stage:input_files",
                  depends_on=("llm",), help="synthetic textbooks from a topic taxonomy through an LLM"),
        StageSpec("rephrase", "pipeline.rephrase.stage:run_stage", upstream=(("web",),),
                  input_files="pipeline.rephrase.stage:input_files", depends_on=("llm", "budget", "decontaminate"),
                  supersedes=("web",), explain_empty="pipeline.rephrase.stage:explain_empty",
                  help="rephrase the web stage's scored pages by edu-score bucket: keep, rewrite, or drop"),
        StageSpec("dedup", "pipeline.dedup:run_stage", upstream=(("generate", "rephrase", "web"),),
                  code_versions=("pipeline.minhash:NORMALIZATION_VERSION",),
                  help="exact and MinHash near-duplicate removal across sources"),
        StageSpec("decontaminate", "pipeline.decontam:run_stage",
                  upstream=(("dedup",), ("generate", "rephrase", "web")),
                  code_versions=("pipeline.minhash:NORMALIZATION_VERSION",),
                  help="remove benchmark n-gram overlaps"),
        StageSpec("shard", "pipeline.mix:run_stage",
                  upstream=(("decontaminate",), ("dedup",), ("generate", "rephrase", "web")), depends_on=("tokenizer",),
                  help="mix, tokenize and write the final parquet shards"),
        StageSpec("pretrain", "pipeline.train.stage:run_stage", upstream=(("shard",),),
                  help="short pretraining run on the shards"),
        StageSpec("report", "pipeline.report:run_stage", help="static HTML report of the run"),
    ]
}
# The generate stage only uses the web stage's output for web-seeded prompts; it is optional: until web has
# completed, generate plans its topic prompts and leaves the web-seeded share for later (pipeline/generate/stage.py).
OPTIONAL_UPSTREAM = {"generate"}


@dataclass
class StageContext:
    name: str
    cfg: RunConfig
    run_dir: Path
    inputs: list[Path]
    upstream: list[str] = field(default_factory=list)
    force: bool = False

    @property
    def out_dir(self) -> Path:
        return self.run_dir / "stages" / self.name

    @property
    def kept_dir(self) -> Path:
        return self.out_dir / "kept"

    @property
    def removed_dir(self) -> Path:
        return self.out_dir / "removed"

    @property
    def state_dir(self) -> Path:
        """Private resume state of a stage (kept across a crashed attempt)."""
        return self.out_dir / "state"

    @property
    def section(self) -> Any:
        return getattr(self.cfg, self.name, None)

    def stage_dir(self, other: str) -> Path:
        return self.run_dir / "stages" / other


def run_dir_of(cfg: RunConfig) -> Path:
    """The run directory the stages write: `run.out`, or for a URL its local mirror (`remote_run`)."""
    remote = remote_run(cfg)
    return remote.mirror if remote is not None else Path(cfg.run.out_dir)


def remote_run(cfg: RunConfig) -> Any:
    """`pipeline.scale.rundir.RemoteRun` when `run.out` is an fsspec URL (outputs and markers live there), else None."""
    from pipeline.scale.storage import is_url

    if not is_url(cfg.run.out_dir):
        return None
    from pipeline.scale.rundir import RemoteRun

    return RemoteRun(cfg.run.out_dir)


def _success_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / stage / "_SUCCESS.json"


def _partial_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / stage / "_PARTIAL.json"


def completed_hash(run_dir: Path, stage: str) -> str | None:
    p = _success_path(run_dir, stage)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())["hash"]
    except (ValueError, KeyError, OSError):
        return None


def partial_marker(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """`_PARTIAL.json` of a stage that stopped early (hash, attempt, partial), None when there is none."""
    p = _partial_path(run_dir, stage)
    if not p.is_file() or _success_path(run_dir, stage).is_file():
        return None
    try:
        marker = json.loads(p.read_text())
        return marker if isinstance(marker, dict) and "hash" in marker else None
    except (ValueError, OSError):
        return None


def output_hash(run_dir: Path, stage: str) -> str | None:
    """What a later stage's hash records of this upstream stage: its completed hash, or for a partial stage its
    hash and attempt (each attempt's output differs); None when it has no output to read."""
    done = completed_hash(run_dir, stage)
    if done is not None:
        return done
    marker = partial_marker(run_dir, stage)
    return None if marker is None else f"{marker['hash']}:partial:{marker.get('attempt', '')}"


def _hash_files(paths: list[Path]) -> str:
    from pipeline.scale.storage import is_url, url_fingerprint

    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode())
        if is_url(p):  # a remote object: its size and ETag/checksum, not its bytes (never downloaded for this)
            h.update(url_fingerprint(str(p)).encode())
            continue
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_inputs(cfg: RunConfig, name: str, run_dir: Path, planned: list[str],
                   skipped: frozenset[str] = frozenset()) -> tuple[list[Path], list[str]]:
    """The stage's input document files and the upstream stages they come from (skipped stages left out)."""
    from pipeline.documents import list_document_files  # here: pyarrow is not needed by every stage's driver

    spec = STAGES[name]
    section = getattr(cfg, name, None)
    explicit = list(getattr(section, "inputs", []) or [])
    if explicit:
        # A stage that reads raw inputs itself (web: WARC, HTML folders, hub names) lists them via input_files.
        return ([] if spec.raw_inputs else list_document_files(explicit)), []
    if not spec.upstream:
        return [], []
    for group in spec.upstream:
        present = [s for s in group
                   if s not in skipped and (s in planned or output_hash(run_dir, s) is not None)]
        if name in OPTIONAL_UPSTREAM:  # an optional upstream feeds the stage once it has completed, not before
            present = [s for s in present if output_hash(run_dir, s) is not None]
        present = [s for s in present if not any(s in STAGES[o].supersedes for o in present)]
        if present:
            files: list[Path] = []
            remote = remote_run(cfg)
            for s in present:
                kept = run_dir / "stages" / s / "kept"
                if output_hash(run_dir, s) is None:
                    raise TextbookError(f"stage {name}: upstream stage '{s}' has not completed in {run_dir} "
                                        f"(run it first, or list {name}.inputs)")
                if remote is not None:  # the published kept/ objects (URLs), never the mirror's copies
                    from pipeline.documents import DOC_SUFFIXES

                    files.extend(remote.kept_urls(s, DOC_SUFFIXES))  # type: ignore[arg-type]
                elif kept.is_dir():
                    files.extend(list_document_files([kept]))
            return files, present
    if name in OPTIONAL_UPSTREAM:
        return [], []
    upstream_skipped = [s for g in spec.upstream for s in g if s in skipped]
    if upstream_skipped:
        raise ResourceUnavailable(f"no input, because {', '.join(upstream_skipped)} could not run (see above)")
    # a stage that stands in for another (rephrase for web) is not named: the plain upstream is what is missing
    wanted = " or ".join("+".join(s for s in g if not STAGES[s].supersedes) for g in spec.upstream)
    raise TextbookError(f"stage {name}: no input: run {wanted} first in {run_dir}, or set {name}.inputs")


def stage_hash(cfg: RunConfig, name: str, inputs: list[Path], upstream: list[str], run_dir: Path) -> str:
    spec = STAGES[name]
    parts: dict[str, Any] = {
        "stage": name,
        "section": getattr(cfg, name).model_dump(mode="json") if hasattr(cfg, name) else None,
        "deps": {d: getattr(cfg, d).model_dump(mode="json") for d in spec.depends_on},
        "seed": cfg.run.seed,
        "upstream": {u: output_hash(run_dir, u) for u in upstream},
    }
    if spec.code_versions:
        parts["code_versions"] = {t: _import_target(t) for t in spec.code_versions}
    files = [] if upstream else list(inputs)
    if spec.input_files:
        files = sorted(set(files) | set(_import_target(spec.input_files)(getattr(cfg, name))))
    if files:
        parts["input_files"] = _hash_files(files)
    return config_hash(parts)


def _import_target(target: str) -> Any:
    """The function a "module:function" string names."""
    module_name, fn_name = target.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def load_stage_fn(name: str) -> Callable[[StageContext], StageStats]:
    target = STAGES[name].target
    try:
        return _import_target(target)
    except ModuleNotFoundError as e:
        module_name = target.split(":")[0]
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise TextbookError(f"stage '{name}' is not built yet ({module_name} is missing)") from None
        raise


def write_resolved_config(cfg: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    atomic_write_text(run_dir / "config.resolved.yaml", yaml.safe_dump(cfg.resolved(), sort_keys=False))


def run_one(cfg: RunConfig, name: str, planned: list[str] | None = None, force: bool = False,
            log: Callable[[str], None] = print, skipped: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run one stage unless its completed output for the same hash is already there."""
    if name not in STAGES:
        raise TextbookError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
    run_dir = run_dir_of(cfg)
    planned = planned if planned is not None else [name]
    inputs, upstream = resolve_inputs(cfg, name, run_dir, planned, skipped)
    digest = stage_hash(cfg, name, inputs, upstream, run_dir)
    out_dir = run_dir / "stages" / name
    if not force and completed_hash(run_dir, name) == digest:
        log(f"[{name}] already complete for this config and inputs: skipped ({out_dir})")
        return json.loads((out_dir / "stats.json").read_text()) if (out_dir / "stats.json").is_file() else {}
    earlier = partial_marker(run_dir, name)
    if earlier is not None and earlier.get("hash") == digest:
        p = earlier.get("partial") or {}
        log(f"[{name}] an earlier attempt stopped early ({p.get('unanswered', '?')} unanswered: "
            f"{_reasons(p)}): continuing it (what was answered comes from the LLM ledger, paid once)")
    for u in upstream:
        if partial_marker(run_dir, u) is not None:
            log(f"[{name}] note: upstream stage '{u}' is partial (it stopped early): reading the documents it kept "
                "so far")
    success = _success_path(run_dir, name)
    success.unlink(missing_ok=True)
    _partial_path(run_dir, name).unlink(missing_ok=True)
    remote = remote_run(cfg)
    if remote is not None:
        remote.begin_stage(name)
    # Outputs of an earlier attempt are rewritten; private state (state/) survives for resume.
    for sub in ("kept", "removed"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    (out_dir / "errors.jsonl").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name=name, cfg=cfg, run_dir=run_dir, inputs=inputs, upstream=upstream, force=force)
    fn = load_stage_fn(name)
    started = time.time()
    try:
        if name not in OPTIONAL_UPSTREAM and upstream and _kept_by(run_dir, upstream) == 0:
            raise NoInputDocuments(f"{name}: no input documents (the upstream stages kept nothing)")
        stats = fn(ctx)
    except NoInputDocuments as e:
        raise explain_no_input(cfg, name, upstream, e) from None
    stats.set("seconds", round(time.time() - started, 3))
    stats.check()
    stats.write(out_dir / "stats.json")
    stats.write_errors(out_dir / "errors.jsonl")
    marker = {"hash": digest, "version": __version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    partial = stats.as_dict().get("partial")
    if partial:  # stopped early: not complete, so the same command runs it again and goes on from the ledger
        path, text = _partial_path(run_dir, name), json.dumps({**marker, "attempt": uuid.uuid4().hex,
                                                                "partial": partial}) + "\n"
    else:
        path, text = success, json.dumps(marker) + "\n"
    if remote is not None:  # outputs uploaded, stale ones removed, the marker last (pipeline.scale.rundir)
        remote.publish_stage(name, (path.name, text))
    atomic_write_text(path, text)
    return stats.as_dict()


def _reasons(partial: dict[str, Any]) -> str:
    """'budget 12, server_wait 2' from a stage's `partial` stats."""
    return ", ".join(f"{k} {v:,}" for k, v in (partial.get("reasons") or {}).items()) or "stopped early"


def partial_goes_on(partial: dict[str, Any]) -> bool:
    """Whether `run_pipeline` runs the later stages after this partial stage: only when the budget cap alone
    stopped it (a limit the user set, so what was kept is a legitimate result)."""
    reasons = set(partial.get("reasons") or {})
    return bool(reasons) and reasons <= {"budget"}


def _kept_by(run_dir: Path, stages: list[str]) -> int | None:
    """Documents the completed `stages` kept, from their stats.json (None when one has no stats.json)."""
    total = 0
    for s in stages:
        p = run_dir / "stages" / s / "stats.json"
        if not p.is_file():
            return None
        total += int(json.loads(p.read_text()).get("kept", 0))
    return total


def upstream_closure(name: str) -> list[str]:
    """Every stage that can feed `name`, directly or through others, in registry order."""
    seen: set[str] = set()
    todo = [s for g in STAGES[name].upstream for s in g]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo += [u for g in STAGES[s].upstream for u in g]
    return [s for s in STAGES if s in seen]


def stage_funnel(cfg: RunConfig, name: str) -> list[dict[str, Any]]:
    """What the stages feeding `name` did in this run, in order: one dict per stage with a stats.json (completed,
    skipped, or itself without input): stage, read, kept, dropped {reason: n}, errored {reason: n}, skipped
    (the reason, or None) and filters {filter: {sub-reason: n}} where the stage records them (web)."""
    run_dir = run_dir_of(cfg)
    rows = []
    for s in upstream_closure(name):
        p = run_dir / "stages" / s / "stats.json"
        if s not in cfg.run.stages or not p.is_file():
            continue
        st = json.loads(p.read_text())
        if output_hash(run_dir, s) is None and not st.get("skipped") and not st.get("no_input"):
            continue  # left over from an attempt that did not finish
        filters = {f: dict(v.get("reasons") or {}) for f, v in (st.get("filters") or {}).items()
                   if isinstance(v, dict) and v.get("reasons")}
        rows.append({"stage": s, "read": st.get("read", 0), "kept": st.get("kept", 0),
                     "dropped": dict(st.get("dropped") or {}), "errored": dict(st.get("errored") or {}),
                     "skipped": st.get("skipped") or st.get("no_input"), "filters": filters})
    return rows


def funnel_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per funnel row: `web: read 20, kept 0; dropped 20 (min_length 20: too_few_chars 20)`."""
    lines = []
    for r in rows:
        if r["skipped"]:
            lines.append(f"{r['stage']}: skipped: {r['skipped']}")
            continue
        line = f"{r['stage']}: read {r['read']:,}, kept {r['kept']:,}"
        for what in ("dropped", "errored"):
            if r[what]:
                parts = []
                for reason, n in sorted(r[what].items(), key=lambda kv: -kv[1]):
                    sub = r["filters"].get(reason) if what == "dropped" else None
                    detail = ", ".join(f"{k} {v:,}" for k, v in sorted(sub.items(), key=lambda kv: -kv[1])) if sub else ""
                    parts.append(f"{reason} {n:,}" + (f": {detail}" if detail else ""))
                line += f"; {what} {sum(r[what].values()):,} ({'; '.join(parts)})"
        lines.append(line)
    return lines


def explain_no_input(cfg: RunConfig, name: str, upstream: list[str], e: NoInputDocuments) -> NoInputDocuments:
    """`e` with the upstream funnel and hints filled in, and a one-line message that says what emptied it."""
    rows = stage_funnel(cfg, name)
    hints: list[str] = []
    for r in rows:
        if r["skipped"] or r["kept"]:
            continue
        spec = STAGES[r["stage"]]
        if spec.explain_empty:
            stats = json.loads((run_dir_of(cfg) / "stages" / r["stage"] / "stats.json").read_text())
            hints += _import_target(spec.explain_empty)(cfg, stats)
        elif r["read"]:
            hints.append(f"{r['stage']}: every document was dropped or errored; the removed ones, with their "
                         f"reasons, are in {run_dir_of(cfg) / 'stages' / r['stage'] / 'removed'}")
    if rows:
        short = [f"{r['stage']} skipped" if r["skipped"] else
                 f"{r['stage']} kept {r['kept']:,} of {r['read']:,}"
                 + (f" (dropped: {', '.join(f'{k} {v:,}' for k, v in sorted(r['dropped'].items(), key=lambda kv: -kv[1]))})"
                    if r["dropped"] else "")
                 for r in rows]
        message = f"{name}: no input documents: {'; '.join(short)}"
    elif not upstream:
        message = f"{name}: no input documents ({name}.inputs holds no document)"
    else:
        message = str(e)
    return NoInputDocuments(message, funnel=rows, hints=hints)


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run `stages` (default run.stages) in order; a stage whose resource is unavailable is skipped and the run
    goes on. A stage with no input documents ends the run: `NoInputDocuments` is raised with the upstream funnel,
    hints and the results so far (its stats.json records them too). A partial stage (see the module docstring)
    ends the run there unless the budget alone stopped it; the results then hold it (with `partial`) and the
    later stages that were not run are left out."""
    planned = stages or list(cfg.run.stages)
    unknown = [s for s in planned if s not in STAGES]
    if unknown:
        raise TextbookError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    run_dir = run_dir_of(cfg)
    write_resolved_config(cfg, run_dir)
    remote = remote_run(cfg)
    if remote is not None:  # resume from what the URL holds, whatever this machine's mirror has
        remote.pull_markers(list(STAGES))
        remote.put_file(run_dir / "config.resolved.yaml", "config.resolved.yaml")
    results: dict[str, dict[str, Any]] = {}
    skipped: set[str] = set()
    for name in planned:
        log(f"[{name}] {STAGES[name].help}")
        try:
            results[name] = run_one(cfg, name, planned=planned, force=force, log=log, skipped=frozenset(skipped))
            partial = results[name].get("partial")
            if partial:
                later = planned[planned.index(name) + 1:]
                if partial_goes_on(partial):
                    log(f"[{name}] PARTIAL: {partial.get('message')}; {partial['unanswered']:,} request(s) not "
                        f"answered. " + (f"The later stages ({', '.join(later)}) use the {results[name].get('kept', 0):,}"
                                         " documents it kept. " if later else "")
                        + "Run the same command again to send the rest (budget caps are per run)")
                else:
                    log(f"[{name}] PARTIAL: {partial.get('message')}; {partial['unanswered']:,} request(s) not "
                        f"answered ({_reasons(partial)}). " + (f"The later stages ({', '.join(later)}) were not run. "
                                                               if later else "")
                        + "Run the same command again later: it sends the rest and goes on")
                    break
        except ResourceUnavailable as e:
            # Offline or unreachable: say what is missing, record it, go on with what can still run.
            skipped.add(name)
            log(f"[{name}] SKIPPED: {e}")
            results[name] = mark_skipped(run_dir, name, str(e))
            if remote is not None:
                remote.begin_stage(name)
                remote.publish_stage(name, None)
        except NoInputDocuments as e:
            # Nothing left to work on: later stages would have nothing either. Record what emptied the run.
            stats = StageStats(name)
            for key, value in (("no_input", str(e)), ("funnel", e.funnel), ("hints", e.hints)):
                stats.set(key, value)
            stats.write(run_dir / "stages" / name / "stats.json")
            if remote is not None:
                remote.publish_stage(name, None)
            results[name] = stats.as_dict()
            e.results = results
            raise
    return results


def mark_skipped(run_dir: Path, name: str, why: str) -> dict[str, Any]:
    """stats.json of a stage that could not run (no _SUCCESS: the next run tries it again)."""
    stats = StageStats(name)
    stats.set("skipped", why)
    out = run_dir / "stages" / name
    out.mkdir(parents=True, exist_ok=True)
    _success_path(run_dir, name).unlink(missing_ok=True)
    _partial_path(run_dir, name).unlink(missing_ok=True)
    for sub in ("kept", "removed"):
        shutil.rmtree(out / sub, ignore_errors=True)
    stats.write(out / "stats.json")
    return stats.as_dict()


def gather_stage_stats(run_dir: Path) -> dict[str, Any]:
    """stats.json of every completed stage in the run (for the manifest and the report)."""
    out: dict[str, Any] = {}
    stages = run_dir / "stages"
    if stages.is_dir():
        for d in sorted(stages.iterdir()):
            p = d / "stats.json"
            if p.is_file():
                out[d.name] = json.loads(p.read_text())
    return out
