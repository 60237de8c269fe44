"""Data ablations: the same model trained on several shard sets at an equal token budget, several seeds
each, compared on common evaluation sets by per-seed paired differences against a baseline arm.

    name: textbook-vs-web
    out: runs/ablations/textbook-vs-web
    tokens: 2000000                 # training tokens per run, equal for every arm
    seeds: [0, 1, 2]
    pretrain: {preset: cpu}         # the pretrain section every run shares (preset + overrides)
    baseline: web                   # the arm the others are compared with (default: the first arm)
    arms:
      - {name: web, shards: [shards/web]}
      - {name: textbooks, shards: [shards/textbooks]}
    eval_sets:                      # the common yardstick: an arm's own validation split proves little
      - {name: heldout-edu, path: heldout/edu.jsonl}          # documents, bits per byte
      - {task: arc_easy}                                      # multiple choice (pipeline/train/evals.py)
    controls:                       # optional: a positive and a negative control arm from labelled pages
      {labels: labelled.jsonl, score_field: score, high: ">=3", low: "<=1"}

Layout of `out`: `ablation.yaml` (the config), `controls/` (the control arms' and held-out pages' shard sets),
`checks.json` (overlap warnings), `runs/<arm>/seed<k>/` (one trainer output per run, with its own lock file
`runs/<arm>/seed<k>.lock`), `unigram.json`, and the gathered `results.json`, `results.md`, `ablation.png`.

Runs are independent processes' business: `textbook ablate cfg.yaml --arm web --seed 1` in one shell and
`--seed 2` in another (or `--jobs N`) train side by side; a run already trained (same config) is not trained
again, one being trained by another process is skipped, an interrupted one resumes. `--gather` reads
every finished run and writes the results (every invocation that trains also gathers at its end).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from pipeline.config import config_hash, load_yaml_model
from pipeline.config.core import StrictModel
from pipeline.config.pretrain import EvalSetSection, PretrainSection, resolve_pretrain
from pipeline.errors import ConfigError, TextbookError
from pipeline.io import atomic_write_text
from pipeline.train.ablate_report import (
    METRICS,
    describe,
    paired_difference,
    plot,
    results_markdown,
    split_key,
)

Log = Callable[[str], None]
LEVEL = 0.95  # paired t-interval level
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ArmSection(StrictModel):
    name: str = Field(description="label of this data mixture (a directory name under runs/)")
    shards: list[str] = Field(min_length=1, description="shard directories this arm trains on")
    source_weights: dict[str, float] = Field(default_factory=dict, description="per-source weights for this arm")


class ControlsSection(StrictModel):
    """A positive and a negative control: an arm of only high-label pages and one of only low-label pages
    of a labelled set, and an evaluation set of held-out pages (see pipeline/train/ablate_data.py)."""

    labels: str = Field(description="labelled pages: jsonl, json or parquet with a text and a score per record")
    score_field: str = Field(default="score", description="the label field (a number)")
    text_field: str = Field(default="text", description="the text field")
    high: str = Field(default=">=3", description="pages of the positive control arm, e.g. '>=3'")
    low: str = Field(default="<=1", description="pages of the negative control arm, e.g. '<=1'")
    heldout_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="share of the pages (chosen by a hash of the text) kept out of both arms")
    heldout: Literal["hash", "classifier"] = Field(
        default="hash", description="which pages are held out: a hash-chosen heldout_fraction, or exactly the "
        "labelled pages the ablation's `classifier:` was not trained on (its training_hashes.npz)")
    heldout_eval: Literal["high", "all", "none"] = Field(
        default="high", description="evaluation set of the held-out pages: those passing `high`, all, or none")
    eval_name: str = Field(default="heldout-labelled", description="name of that evaluation set")
    balance: bool = Field(
        default=True, description="cut the larger arm to the smaller one's characters (differ in kind, not amount)")
    high_arm: str = Field(default="control-high", description="name of the positive control arm")
    low_arm: str = Field(default="control-low", description="name of the negative control arm")


class AblationConfig(StrictModel):
    name: str = "ablation"
    out: str | None = Field(default=None, description="default runs/ablations/<name>")
    tokens: int = Field(ge=1, description="training tokens per run (the same budget for every arm)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    arms: list[ArmSection] = Field(default_factory=list, description="two or more, counting the controls' two")
    eval_sets: list[EvalSetSection] = Field(
        default_factory=list, description="common evaluation sets (one or more, counting the controls' held-out set)")
    controls: ControlsSection | None = Field(default=None, description="add a positive and a negative control arm")
    baseline: str | None = Field(default=None, description="arm the others are compared with; default the first arm")
    classifier: str | None = Field(
        default=None, description="classifier model dir whose training_hashes.npz the eval sets are checked against "
        "(also found in the arms' shard manifests when their web stage scored pages)")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/ablations/{self.name}")


# --- config ------------------------------------------------------------------------------------------------
def all_arms(cfg: AblationConfig) -> list[ArmSection]:
    """The configured arms, then the control arms (whose shards `prepare` builds under out/controls/)."""
    arms = list(cfg.arms)
    c = cfg.controls
    if c is not None:
        arms += [ArmSection(name=c.high_arm, shards=[str(cfg.out_dir / "controls" / "high")]),
                 ArmSection(name=c.low_arm, shards=[str(cfg.out_dir / "controls" / "low")])]
    return arms


def all_eval_sets(cfg: AblationConfig) -> list[EvalSetSection]:
    """The configured evaluation sets, then the controls' held-out set (a shard set's validation split)."""
    sets = list(cfg.eval_sets)
    c = cfg.controls
    if c is not None and c.heldout_eval != "none":
        sets.append(EvalSetSection(name=c.eval_name, path=str(cfg.out_dir / "controls" / "heldout"),
                                   split="validation"))
    return sets


def baseline_arm(cfg: AblationConfig) -> str:
    return cfg.baseline or all_arms(cfg)[0].name


def load_ablation_config(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    """Load and validate an ablation YAML (with `--set` overrides). Raises ConfigError naming the file when arm
    or eval-set names repeat or are not usable as directory names, when there are fewer than two arms or no
    evaluation set (the controls count), or when `baseline` names no arm."""
    cfg = load_yaml_model(AblationConfig, path, overrides)
    names = [a.name for a in all_arms(cfg)]
    if len(set(names)) != len(names):  # arm names are directory names under runs/
        raise ConfigError(f"{path}: arms: names must be unique (the controls add "
                          f"{', '.join(names[len(cfg.arms):]) or 'none'})")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ConfigError(f"{path}: arms: {', '.join(map(repr, bad))}: use letters, digits, '.', '_', '-'")
    if len(names) < 2:
        raise ConfigError(f"{path}: arms: an ablation compares two or more arms (or add controls:)")
    sets = [e.name for e in all_eval_sets(cfg)]
    if not sets:
        raise ConfigError(f"{path}: eval_sets: at least one common evaluation set is needed")
    if len(set(sets)) != len(sets) or "validation" in sets:
        raise ConfigError(f"{path}: eval_sets: names must be unique and not 'validation' (got {', '.join(sets)})")
    if cfg.baseline is not None and cfg.baseline not in names:
        raise ConfigError(f"{path}: baseline: {cfg.baseline!r} is not an arm ({', '.join(names)})")
    return cfg


def run_config(cfg: AblationConfig, arm: ArmSection, seed: int) -> PretrainSection:
    """One run's pretrain section: the shared one, this arm's data, this seed, the common eval sets (also
    evaluated at step 0), max_steps set so that every run sees `cfg.tokens` training tokens, and the warm-up
    as the preset's own share of its steps (unless the ablation sets warm-up itself)."""
    base = resolve_pretrain(cfg.pretrain)
    t = base.train
    seq = t.seq_len or base.model.max_seq_len
    per_step = t.batch_size * seq * t.grad_accum
    steps = max(1, math.ceil(cfg.tokens / per_step))
    data = base.model_dump(mode="json")
    data["data"].update(shards=list(arm.shards), source_weights=dict(arm.source_weights))
    data["train"].update(seed=seed, max_steps=steps, checkpoint_every=min(t.checkpoint_every, steps))
    if t.warmup_fraction is None and "warmup_steps" not in cfg.pretrain.train.model_fields_set:
        data["train"]["warmup_fraction"] = round(min(t.warmup_steps / t.max_steps, 1.0), 6)
    data["eval"]["sets"] = [e.model_dump(mode="json") for e in all_eval_sets(cfg)]
    data["eval"]["every"] = min(base.eval.every, steps)
    data["eval"]["initial"] = True
    return PretrainSection.model_validate(data)


def run_dir(cfg: AblationConfig, arm: str, seed: int) -> Path:
    return cfg.out_dir / "runs" / arm / f"seed{seed}"


# --- locks ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock (fcntl.flock) on `path`, held until the block ends or the process dies.
    Yields False at once when `blocking` is False and another process holds it; the holder's pid is in the file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        pid = path.read_text().strip()
        if pid:
            return f"pid {pid}"
    return "another process"


# --- up-front checks, controls, overlap ------------------------------------------------------------------------
def _tokenizer_sha(shard_dir: str | Path) -> str:
    return json.loads((Path(shard_dir) / "manifest.json").read_text())["tokenizer"]["sha256"]


def check_arms(cfg: AblationConfig, arms: list[str] | None = None) -> None:
    """Before any training: every configured arm's shard directories exist and share one tokenizer, every
    configured evaluation set is found and readable with that tokenizer (a shard set with its split, document
    files, a benchmark's files: `pipeline.train.evals.check_eval_set`), and the controls' labels file exists.
    With `arms` (the --arm selection) only those arms are checked, plus the first configured arm when there are
    controls (they are tokenized with its tokenizer), so arms can be trained while others are still being built.
    Raises TextbookError with the arm or set named."""
    from pipeline.train.evals import check_eval_set

    sha = None
    for arm in _arms_to_check(cfg, arms):
        for s in arm.shards:
            if not (Path(s) / "manifest.json").is_file():
                raise TextbookError(f"arm {arm.name}: {s} is not a shard directory (no manifest.json)")
            mine = _tokenizer_sha(s)
            if sha is not None and mine != sha:
                raise TextbookError(f"arm {arm.name}: {s} was made with another tokenizer than {cfg.arms[0].shards[0]}:"
                                    " arms must share one tokenizer to be compared in bits per byte")
            sha = sha or mine
    for e in cfg.eval_sets:
        try:
            check_eval_set(e, sha)
        except TextbookError as err:
            raise TextbookError(f"ablation {cfg.name}: {err}") from None
    if cfg.controls is not None and not Path(cfg.controls.labels).is_file():
        raise TextbookError(f"controls: labels file {cfg.controls.labels} not found")


def _arms_to_check(cfg: AblationConfig, arms: list[str] | None) -> list[ArmSection]:
    if arms is None:
        return list(cfg.arms)
    return [a for i, a in enumerate(cfg.arms) if a.name in arms or (i == 0 and cfg.controls is not None)]


def _tokenizer(cfg: AblationConfig) -> Any:
    from pipeline.tokenizer import load_tokenizer

    if cfg.arms:
        return load_tokenizer(Path(cfg.arms[0].shards[0]) / "tokenizer.json")
    return load_tokenizer()


def _file_identity(path: str | Path) -> list[Any]:
    """What identifies an input's content cheaply: a shard set's manifest, else a file's path, size, mtime."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return [str(p), hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest()]
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def _unseen_by_classifier(cfg: AblationConfig, records: list[dict[str, Any]]) -> set[int] | None:
    """With `controls.heldout: classifier`: the doc_hash of every labelled page the ablation's classifier was
    not trained on (per its training_hashes.npz); None in hash mode. Raises TextbookError without hashes."""
    from pipeline.classify.overlap import TrainingHashes
    from pipeline.train.ablate_data import classifier_dirs, doc_hash

    if cfg.controls is None or cfg.controls.heldout != "classifier":
        return None
    dirs = classifier_dirs([], cfg.classifier)
    hashes = TrainingHashes.load(dirs[0]) if dirs else None
    if hashes is None:
        raise TextbookError(f"controls.heldout: classifier needs `classifier:` naming a model directory with "
                            f"training_hashes.npz (got {cfg.classifier!r})")
    texts = [r["text"] for r in records]
    trained = hashes.contains_documents(texts)
    return {doc_hash(t) for t, seen in zip(texts, trained, strict=True) if not seen}


def build_controls(cfg: AblationConfig, log: Log = print) -> dict[str, Any] | None:
    """Build (once; under a lock, so parallel invocations wait for one builder) the control arms' shard sets
    `out/controls/high`, `low` and the held-out set `heldout` from the labelled file, with the arms' tokenizer.
    Pages of the configured text evaluation sets are excluded; the held-out pages are hash-chosen or, with
    `heldout: classifier`, the labelled pages the ablation's classifier never saw. Returns the build record (also
    `out/controls/build.json`), None without controls. Raises TextbookError when an arm would be empty."""
    c = cfg.controls
    if c is None:
        return None
    from pipeline.documents import iter_documents
    from pipeline.train.ablate_data import (
        classifier_dirs,
        doc_hash,
        eval_set_texts,
        split_controls,
        write_shard_set,
    )

    root = cfg.out_dir / "controls"
    tok = _tokenizer(cfg)
    exclude_sets = [e for e in cfg.eval_sets if e.task is None]
    clf = [_file_identity(Path(d) / "training_hashes.npz") for d in classifier_dirs([], cfg.classifier)]
    key = config_hash({"controls": c.model_dump(mode="json"), "labels": _file_identity(c.labels),
                       "classifier": clf if c.heldout == "classifier" else None,
                       "tokenizer": tok.sha256, "exclude": [[e.model_dump(mode="json"), _file_identity(e.path)]
                                                            for e in exclude_sets]})
    with file_lock(root / ".lock"):
        record_path = root / "build.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if record.get("key") == key and all((root / d / "manifest.json").is_file() for d in record["sets"]):
                return record
        log(f"controls: building {c.high_arm} ({c.high}) and {c.low_arm} ({c.low}) from {c.labels}")
        exclude = {doc_hash(t) for e in exclude_sets for t in (eval_set_texts(e) or ())}
        problems: list[str] = []
        records = list(iter_documents([c.labels], text_field=c.text_field,
                                      on_error=lambda reason, where: problems.append(f"{reason} at {where}")))
        pages = split_controls(records, score_field=c.score_field, high=c.high, low=c.low,
                               heldout_fraction=c.heldout_fraction, heldout_eval=c.heldout_eval,
                               exclude=exclude, balance=c.balance, heldout_pages=_unseen_by_classifier(cfg, records))
        if not pages.high or not pages.low:
            raise TextbookError(f"controls: {c.labels} gives {len(pages.high)} pages for {c.high_arm} ({c.high}) and "
                                f"{len(pages.low)} for {c.low_arm} ({c.low}) with field {c.score_field!r}: both need "
                                f"pages ({pages.counts['unlabelled']} of {pages.counts['records']} records had no "
                                "usable text or score)")
        sets = {"high": (pages.high, []), "low": (pages.low, [])}
        if c.heldout_eval != "none":
            if not pages.heldout:
                raise TextbookError(f"controls: no held-out pages for the evaluation set {c.eval_name} "
                                    f"(heldout_fraction {c.heldout_fraction}); raise it or set heldout_eval: none")
            sets["heldout"] = ([], pages.heldout)
        made = {}
        for name, (train, val) in sets.items():
            m = write_shard_set(root / name, tok, train, val, source=f"control-{name}")
            made[name] = {s: {"documents": v["documents"], "tokens": v["tokens"]} for s, v in m["splits"].items()}
        record = {"key": key, "labels": c.labels, "sets": made, "counts": pages.counts,
                  "unreadable_records": problems[:20]}
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        log("controls: " + "; ".join(f"{n}: " + ", ".join(f"{s} {v['documents']:,} pages {v['tokens']:,} tokens"
                                                          for s, v in d.items()) for n, d in made.items()))
        return record


def run_checks(cfg: AblationConfig, log: Log = print, selected: list[str] | None = None) -> list[str]:
    """Warnings about evaluation sets sharing documents with an arm's training split or with a classifier's
    training data (pipeline/train/ablate_data.py), computed once per inputs (out/checks.json) and logged.
    With `selected`, only those arms (a later --gather checks them all)."""
    from pipeline.train.ablate_data import classifier_dirs, overlap_checks

    arms = {a.name: list(a.shards) for a in all_arms(cfg) if selected is None or a.name in selected}
    sets = [e for e in all_eval_sets(cfg) if e.task is None]
    classifiers = classifier_dirs([s for a in cfg.arms for s in a.shards], cfg.classifier)
    if cfg.classifier and not classifier_dirs([], cfg.classifier):
        log(f"note: classifier {cfg.classifier} is not a directory: overlap with its training data not checked")
    key = config_hash({"arms": {n: [_file_identity(p) for p in ps] for n, ps in arms.items()},
                       "sets": [[e.model_dump(mode="json"), _file_identity(e.path)] for e in sets],
                       "classifiers": [_file_identity(Path(d) / "training_hashes.npz") for d in classifiers]})
    path = cfg.out_dir / "checks.json"
    with file_lock(cfg.out_dir / ".checks.lock"):
        if path.is_file() and json.loads(path.read_text()).get("key") == key:
            warnings = json.loads(path.read_text())["warnings"]
        else:
            found = overlap_checks(sets, arms, classifiers, log=log)
            warnings = [o.warning() for o in found]
            atomic_write_text(path, json.dumps({"key": key, "arms": sorted(arms), "classifiers": classifiers,
                                                "warnings": warnings,
                                                "overlaps": [o.__dict__ for o in found]}, indent=2) + "\n")
    for w in warnings:
        log(w)
    return warnings


def prepare(cfg: AblationConfig, log: Log = print, arms: list[str] | None = None) -> list[str]:
    """Everything before the runs: up-front checks, the controls' shards, the overlap warnings, ablation.yaml.
    `arms`: the --arm selection (checks restricted to those arms; None = all)."""
    check_arms(cfg, arms)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out_dir / "ablation.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    build_controls(cfg, log)
    return run_checks(cfg, log, arms)


# --- runs ------------------------------------------------------------------------------------------------------
def inputs_key(cfg: AblationConfig, arm: ArmSection) -> str:
    """Identity of a run's data beyond its config: the arm's shard manifests and the evaluation sets' files
    (a shard set rebuilt at the same path, e.g. the controls after a change of rules, is other data)."""
    evals = [_file_identity(e.path) for e in all_eval_sets(cfg) if e.path and Path(e.path).exists()]
    return config_hash({"shards": [_file_identity(s) for s in arm.shards], "eval": evals})


def _inputs_of(out: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((out / "inputs.json").read_text()).get("key")
    return None


def finished_summary(section: PretrainSection, out: Path, inputs: str | None = None) -> dict[str, Any] | None:
    """The run's summary.json when it finished with exactly this config (and, given `inputs`, the same data:
    `inputs_key`, recorded in out/inputs.json), else None."""
    p = out / "summary.json"
    try:
        done = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if inputs is not None and _inputs_of(out) != inputs:
        return None
    if done.get("config_hash") == config_hash(section) and done.get("steps") == section.train.max_steps:
        return done
    return None


def select_runs(cfg: AblationConfig, arms: list[str] | None = None, seeds: list[int] | None = None
                ) -> list[tuple[ArmSection, int]]:
    """(arm, seed) pairs to run, in config order, restricted to the named arms and seeds (errors name unknown ones)."""
    known = {a.name: a for a in all_arms(cfg)}
    for a in arms or []:
        if a not in known:
            raise TextbookError(f"--arm {a}: no such arm (arms: {', '.join(known)})")
    for s in seeds or []:
        if s not in cfg.seeds:
            raise TextbookError(f"--seed {s}: not one of the ablation's seeds ({', '.join(map(str, cfg.seeds))})")
    return [(arm, s) for arm in known.values() if not arms or arm.name in arms
            for s in cfg.seeds if not seeds or s in seeds]


def run_one(cfg: AblationConfig, arm: ArmSection, seed: int, log: Log = print) -> dict[str, Any] | None:
    """Train one run unless it is finished (same config and data) or another process holds its lock (then
    None). Interrupted runs resume from their newest checkpoint; a run with another config or other data
    (`inputs_key`) starts over."""
    from pipeline.train.trainer import train

    section = run_config(cfg, arm, seed)
    out = run_dir(cfg, arm.name, seed)
    tag = f"[{arm.name} seed {seed}]"
    inputs = inputs_key(cfg, arm)
    done = finished_summary(section, out, inputs)
    if done is not None:
        log(f"{tag} already trained: {out}")
        return done
    lock = out.parent / f"seed{seed}.lock"
    with file_lock(lock, blocking=False) as got:
        if not got:
            log(f"{tag} being trained by {_holder(lock)}: skipped here")
            return None
        done = finished_summary(section, out, inputs)  # another process may have finished it meanwhile
        if done is not None:
            log(f"{tag} already trained: {out}")
            return done
        resume = "auto"
        if out.is_dir() and _inputs_of(out) not in (None, inputs):
            log(f"{tag} its shards or evaluation sets changed since it was trained: starting over")
            resume = "force"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "inputs.json", json.dumps({"key": inputs}) + "\n")
        log(f"{tag} {section.train.max_steps} steps -> {out}")
        return train(section, out, resume=resume, log=log)


def run_parallel(config_path: str, overrides: list[str], todo: list[tuple[ArmSection, int]], jobs: int,
                 cfg: AblationConfig, log: Log = print) -> list[str]:
    """Run each (arm, seed) as its own `textbook ablate CONFIG --arm A --seed S --no-gather` process, `jobs` at
    a time; each writes its console output to runs/<arm>/seed<k>.console.log. Without train.threads set, every
    process gets $OMP_NUM_THREADS = CPUs // jobs. Returns one line per failed process."""
    from pipeline.train.trainer import cpu_threads

    env = dict(os.environ)
    if cfg.pretrain.train.threads is None:
        env["OMP_NUM_THREADS"] = str(max(1, cpu_threads() // jobs))
    sets = [x for o in overrides for x in ("--set", o)]

    def one(item: tuple[ArmSection, int]) -> str | None:
        arm, seed = item
        console = run_dir(cfg, arm.name, seed).parent / f"seed{seed}.console.log"
        console.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pipeline.cli", "ablate", config_path, "--arm", arm.name, "--seed", str(seed),
               "--no-gather", *sets]
        log(f"[{arm.name} seed {seed}] started in its own process (output: {console})")
        with open(console, "w", encoding="utf-8") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
        log(f"[{arm.name} seed {seed}] process ended ({'ok' if rc == 0 else f'exit {rc}'})")
        return None if rc == 0 else f"{arm.name} seed {seed}: exit {rc}, see {console}"

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [r for r in pool.map(one, todo) if r]


# --- gathering ---------------------------------------------------------------------------------------------------
def _curves(log_path: Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(training tokens, value)] of every compared figure in a run's log.jsonl (step 0 included)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    if not log_path.is_file():
        return curves
    for line in log_path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        for k, v in rec.items():
            if split_key(k) and isinstance(v, int | float):
                curves.setdefault(k, []).append((rec.get("tokens", 0), v))
    return curves


def collect(cfg: AblationConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The finished runs (arm, seed, summary, curves) and the status: expected, finished, missing, stale."""
    runs: list[dict[str, Any]] = []
    status: dict[str, Any] = {"expected": 0, "finished": 0, "missing": [], "stale": []}
    for arm, seed in select_runs(cfg):
        status["expected"] += 1
        out = run_dir(cfg, arm.name, seed)
        done = finished_summary(run_config(cfg, arm, seed), out, inputs_key(cfg, arm))
        if done is None:
            status["stale" if (out / "summary.json").is_file() else "missing"].append({"arm": arm.name, "seed": seed})
            continue
        status["finished"] += 1
        runs.append({"arm": arm.name, "seed": seed, "summary": done, "curves": _curves(out / "log.jsonl")})
    return runs, status


def unigram_table(cfg: AblationConfig, log: Log = print) -> dict[str, dict[str, float]]:
    """arm -> eval set -> unigram bits per byte (pipeline/train/ablate_data.py), cached in out/unigram.json."""
    from pipeline.train.ablate_data import eval_targets, token_counts, unigram_bpb

    arms = [a for a in all_arms(cfg) if all((Path(s) / "manifest.json").is_file() for s in a.shards)]
    sets = [e for e in all_eval_sets(cfg) if e.task is None and Path(str(e.path)).exists()]
    if not arms or not sets:
        return {}
    base = resolve_pretrain(cfg.pretrain)
    seq = base.train.seq_len or base.model.max_seq_len
    key = config_hash({"arms": {a.name: [_file_identity(s) for s in a.shards] for a in arms},
                       "weights": {a.name: a.source_weights for a in arms if a.source_weights},
                       "sets": [[e.model_dump(mode="json"), _file_identity(e.path)] for e in sets],
                       "tokens": base.eval.tokens, "seq": seq})
    path = cfg.out_dir / "unigram.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())["bpb"]
    tok_file = Path(arms[0].shards[0]) / "tokenizer.json"
    vocab = int(json.loads((Path(arms[0].shards[0]) / "manifest.json").read_text())["tokenizer"]["vocab_size"])
    targets = {e.name: eval_targets(e, tok_file, base.eval.tokens, seq) for e in sets}
    table: dict[str, dict[str, float]] = {}
    for a in arms:
        counts = token_counts(a.shards, base.data.split, vocab, a.source_weights)
        table[a.name] = {n: round(unigram_bpb(counts, d.y, d.tokens_per_byte), 6)
                         for n, d in targets.items() if d is not None}
    atomic_write_text(path, json.dumps({"key": key, "bpb": table}, indent=2) + "\n")
    return table


def _controls_comparison(cfg: AblationConfig, keys: list[str], values: dict[str, dict[str, dict[int, float]]]
                         ) -> dict[str, Any] | None:
    """The controls' own question, whatever the baseline: per compared figure, the high-label arm minus the
    low-label arm paired by seed (`paired_difference`), and whether they separate on the controls' held-out
    set (`separated`: the high arm better beyond the interval on its bits per byte; None before both ran)."""
    c = cfg.controls
    if c is None:
        return None
    paired = {k: paired_difference(values[c.low_arm][k], values[c.high_arm][k], METRICS[split_key(k)[1]][0], LEVEL)
              for k in keys}
    held = paired.get(f"eval/{c.eval_name}/bpb")
    separated = None if held is None or held["ci"] is None else held["verdict"] == "better"
    return {"high": c.high_arm, "low": c.low_arm, "eval_set": c.eval_name if c.heldout_eval != "none" else None,
            "paired": paired, "separated": separated}


def summarise(cfg: AblationConfig, runs: list[dict[str, Any]], status: dict[str, Any],
              unigram: dict[str, dict[str, float]], checks: list[str]) -> dict[str, Any]:
    """results.json: per arm and compared figure the seeds' values (mean, std, min, max), the paired
    differences against the baseline arm (`ablate_report.paired_difference`), unigram bits per byte, the
    arms' own validation figures, run status, model size and the checks' warnings."""
    arms = all_arms(cfg)
    order = {e.name: i for i, e in enumerate(all_eval_sets(cfg))}
    keys = sorted({k for r in runs for k in r["summary"].get("evals", {})
                   if split_key(k) and split_key(k)[0] in order},
                  key=lambda k: (split_key(k)[1] != "bpb", order[split_key(k)[0]], list(METRICS).index(split_key(k)[1])))
    base = baseline_arm(cfg)
    table: dict[str, Any] = {}
    values: dict[str, dict[str, dict[int, float]]] = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm.name]
        per_key = {k: {r["seed"]: r["summary"]["evals"][k] for r in mine if k in r["summary"].get("evals", {})}
                   for k in keys}
        values[arm.name] = per_key
        own = {r["seed"]: r["summary"]["evals"]["eval/validation/bpb"] for r in mine
               if "eval/validation/bpb" in r["summary"].get("evals", {})}
        rates = [r["summary"].get("tokens_per_s") for r in mine if r["summary"].get("tokens_per_s")]
        table[arm.name] = {
            "runs": len(mine),
            "metrics": {k: describe(v) for k, v in per_key.items() if v},
            "own_validation": describe(own) if own else None,
            "unigram": unigram.get(arm.name, {}),
            "data_epochs": max((r["summary"].get("data_epochs") or 0 for r in mine), default=None),
            "train_tokens_available": mine[0]["summary"].get("train_tokens_available") if mine else None,
            "tokens_per_s_median": statistics.median(rates) if rates else None,
        }
    paired = {k: {a.name: paired_difference(values[base][k], values[a.name][k], METRICS[split_key(k)[1]][0], LEVEL)
                  for a in arms if a.name != base} for k in keys}
    controls = _controls_comparison(cfg, keys, values)
    model = None
    if runs:
        s = runs[0]["summary"]
        m = s.get("model") or {}
        emb = m.get("vocab_size", 0) * m.get("dim", 0) * (1 if m.get("tie_embeddings", True) else 2)
        model = {"params": s["params"], "blocks_share": (s["params"] - emb) / s["params"] if s["params"] else 0.0,
                 "n_layers": m.get("n_layers"), "dim": m.get("dim"), "vocab_size": m.get("vocab_size")}
    chance = {k.split("/")[1]: v for r in runs for k, v in r["summary"].get("evals", {}).items()
              if k.startswith("eval/") and k.endswith("/chance")}
    return {"name": cfg.name, "tokens_per_run": cfg.tokens, "seeds": cfg.seeds, "baseline": base, "level": LEVEL,
            "chance": chance,
            "eval_sets": [e.name for e in all_eval_sets(cfg)], "metrics": keys, "arms": table, "paired": paired,
            "status": status, "model": model, "checks": checks, "controls": controls,
            "runs": [{"arm": r["arm"], "seed": r["seed"], "tokens": r["summary"].get("tokens"),
                      "tokens_per_s": r["summary"].get("tokens_per_s"), "data_epochs": r["summary"].get("data_epochs"),
                      "final_loss": r["summary"].get("final_loss")} for r in runs]}


def _checks_of_every_arm(cfg: AblationConfig, log: Log) -> list[str]:
    """The overlap warnings for the table: checks.json when it covers every arm (an --arm run checks only its
    own), else the checks run again over every arm whose shards exist, naming the arms left unchecked."""
    path = cfg.out_dir / "checks.json"
    names = {a.name for a in all_arms(cfg)}
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if names <= set(saved.get("arms", [])):
        return saved["warnings"]
    built = [a.name for a in all_arms(cfg) if all((Path(s) / "manifest.json").is_file() for s in a.shards)]
    warnings = run_checks(cfg, log, built)
    missing = sorted(names - set(built))
    return warnings + ([f"overlap with evaluation sets not checked for arm(s) {', '.join(missing)}: "
                        "their shards are not built"] if missing else [])


def gather(cfg: AblationConfig, log: Log = print) -> dict[str, Any]:
    """Read every finished run and write results.json, results.md and ablation.png (under a lock; a later
    gather sees at least the runs an earlier one saw). Runs not finished yet are listed, not waited for."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    checks = _checks_of_every_arm(cfg, log)
    with file_lock(out / ".gather.lock"):
        runs, status = collect(cfg)
        results = summarise(cfg, runs, status, unigram_table(cfg, log), checks)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(out / "results.md", results_markdown(results))
        curves = {a.name: [r["curves"] for r in runs if r["arm"] == a.name] for a in all_arms(cfg)}
        plot(results, curves, out / "ablation.png")
    return results


def run_ablation(cfg: AblationConfig, log: Log = print, *, arms: list[str] | None = None,
                 seeds: list[int] | None = None, do_gather: bool = True) -> dict[str, Any] | None:
    """In this process: prepare, train the selected runs one after another, then gather (unless told not to)."""
    prepare(cfg, log, arms)
    for arm, seed in select_runs(cfg, arms, seeds):
        run_one(cfg, arm, seed, log)
    return gather(cfg, log) if do_gather else None
