"""`textbook classifier annotate|train|evaluate|score`: the educational-value classifier loop."""

from __future__ import annotations

import json

import typer

from pipeline.cli.common import CONFIG_HELP, SET_HELP, console, fail, load, user_errors

app = typer.Typer(help="Educational-value classifier: annotate with an LLM, train, evaluate, score.\n\n"
                  "Example: textbook classifier train configs/classifier/edu-en.yaml", no_args_is_help=True)


def parse_fraction(value: str | None) -> float | None:
    """'10%' or '0.1' → 0.1."""
    if value is None:
        return None
    v = value.strip()
    try:
        f = float(v[:-1]) / 100 if v.endswith("%") else float(v)
    except ValueError:
        fail(f"--keep-top expects a percentage like 10% or a fraction like 0.1, got {value!r}")
    if not 0 < f <= 1:
        fail(f"--keep-top must be in (0%, 100%], got {value!r}")
    return f


@app.command("annotate")
@user_errors
def annotate_cmd(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only estimate requests, tokens, cost and time."),
) -> None:
    """Score a sample of documents with an LLM and a rubric prompt (resumable through the request ledger).

    Example: textbook classifier annotate configs/classifier/annotate.yaml --set classifier.annotate.sample=200
    """
    from pipeline.classify.annotate import annotate

    cfg = load(config, set_)
    out = annotate(cfg, dry_run=dry_run, log=lambda m: console.print(m, highlight=False))
    console.print_json(json.dumps({k: v for k, v in out.items() if k != "llm"}, default=str))


@app.command("train")
@user_errors
def train_cmd(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    keep_top: str | None = typer.Option(None, "--keep-top", help="Calibrate and record a keep-top cut-off, e.g. 10%."),
    out_dir: str | None = typer.Option(None, "--out-dir", help="Parent directory of the model (default train.out_dir)."),
) -> None:
    """Train a classifier from annotation files and write classifiers/<name>/ (model, metrics, card).

    Example: textbook classifier train configs/classifier/edu-en.yaml --keep-top 10%
    """
    from pipeline.classify.train import train_classifier

    cfg = load(config, set_)
    m = train_classifier(cfg.classifier.train, keep_top=parse_fraction(keep_top), out_dir=out_dir,
                         log=lambda s: console.print(s, highlight=False))
    _print_metrics(m)


def _print_metrics(m: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{m.get('name', m.get('model'))}: evaluation")
    for col in ("set", "n", "precision", "recall", "F1", "macro-F1", "Spearman"):
        table.add_column(col, justify="left" if col == "set" else "right")

    def row(name: str, b: dict) -> None:
        s = b.get("spearman")
        table.add_row(name, str(b["n"]), f"{b['binary']['precision']:.3f}", f"{b['binary']['recall']:.3f}",
                      f"{b['binary']['f1']:.3f}", f"{b['macro_f1']:.3f}", "n/a" if s is None else f"{s:.3f}")

    if "binary" in m:
        row("all", m)
    for name in ("cv", "holdout"):  # cross-validated (calibration cross-fitted); the shipped model on its holdout
        if name in m:
            row(name, m[name])
    for name, b in m.get("eval_sets", {}).items():
        row(name, b)
    console.print(table)


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    model: str = typer.Argument(..., help="Model directory, e.g. classifiers/edu-en."),
    data: list[str] = typer.Argument(..., help="Labelled files (parquet/jsonl/csv/json)."),
    text_column: str = typer.Option("text", help="Column with the text."),
    score_column: str = typer.Option("score", help="Column with the annotator's score."),
    id_column: str | None = typer.Option(None, help="Column identifying a document (repeats are merged)."),
    threshold: float | None = typer.Option(None, help="Binary cut-off (default: the model's)."),
    keep_top: str | None = typer.Option(None, "--keep-top", help="Calibrate a keep-top cut-off on DATA, e.g. 10%."),
    record: bool = typer.Option(False, "--record", help="With --keep-top: store the cut-off in the model."),
    out: str | None = typer.Option(None, "--out", help="Write the metrics JSON here."),
    no_guards: bool = typer.Option(False, "--no-guards", help="The model's own scores, without the keyword-list "
                                   "/ word-salad / repetition gates and the pasted-training-text rule."),
) -> None:
    """Evaluate a trained model on labelled data: P/R/F1 at the threshold, macro-F1, confusion, Spearman.

    Example: textbook classifier evaluate classifiers/edu-en data.csv --score-column score --keep-top 10%
    """
    from pipeline.classify.model import load_classifier
    from pipeline.classify.train import evaluate_model, record_keep_top
    from pipeline.config.classifier import LabelSource
    from pipeline.io import atomic_write_text

    clf = load_classifier(model)
    sources = [LabelSource(path=p, text_column=text_column, score_column=score_column, id_column=id_column)
               for p in data]
    m = evaluate_model(clf, sources, threshold, guards=not no_guards)
    _warn_overlap(m.get("training_overlap"), "labelled documents")
    frac = parse_fraction(keep_top)
    if frac is not None:
        from pipeline.classify.data import LoadReport, load_source

        texts = [e.text for s in sources for e in load_source(s, clf.score_min, clf.score_max, LoadReport())]
        if record:
            cutoff = record_keep_top(clf, texts, frac, sample=", ".join(data))["keep_top_cutoff"]
        else:
            from pipeline.classify.metrics import keep_top_cutoff

            cutoff = keep_top_cutoff(clf.score(texts), frac)
        m["keep_top"] = {"fraction": frac, "cutoff": cutoff, "recorded": record}
        console.print(f"keep top {frac:.1%}: cut-off {m['keep_top']['cutoff']:.3f}"
                      f"{' (recorded in the model)' if record else ''}")
    _print_metrics(m)
    if out:
        from pathlib import Path

        atomic_write_text(Path(out), json.dumps(m, indent=2, default=float) + "\n")
        console.print(f"metrics: {out}")


@app.command("score")
@user_errors
def score_cmd(
    model: str = typer.Argument(..., help="Model directory, e.g. classifiers/edu-en."),
    inputs: list[str] = typer.Argument(..., help="Document files or directories (parquet/jsonl)."),
    out: str = typer.Option(..., "--out", help="Output directory for parquet documents with edu_score."),
    text_column: str = typer.Option("text", help="Column with the text."),
    batch_size: int = typer.Option(512, help="Documents per model call."),
    max_chars: int | None = typer.Option(None, help="Score this prefix (default: the model's)."),
    no_guards: bool = typer.Option(False, "--no-guards", help="Store the model's own scores (no gates, no "
                                   "pasted-training-text rule)."),
) -> None:
    """Score documents: writes them with `edu_score` (and the model in meta) plus stats.json.

    Example: textbook classifier score classifiers/edu-en ../shared/data/web/dolma_cc --out scored/
    """
    from pipeline.classify.score import score_files

    stats = score_files(model, inputs, out, text_column=text_column, batch_size=batch_size, max_chars=max_chars,
                        guards=not no_guards)
    console.print_json(json.dumps(stats))
    _warn_overlap(stats.get("training_overlap"), "documents")


def _warn_overlap(summary: dict | None, what: str) -> None:
    from pipeline.classify.overlap import overlap_warning

    line = overlap_warning(summary, what) if summary else None
    if line:
        console.print(f"[yellow]{line}[/yellow]", highlight=False)


@app.command("training-hashes")
@user_errors
def training_hashes_cmd(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    model: str | None = typer.Option(None, "--model", help="Model directory (default train.out_dir/train.name)."),
) -> None:
    """Write training_hashes.npz for a model trained before training runs wrote it, from its training config
    (every labelled document but the holdout: what the final fit saw).

    Example: textbook classifier training-hashes configs/classifier/edu-en.yaml --model /path/to/old-model
    """
    from pathlib import Path

    from pipeline.classify.model import resolve_model_dir
    from pipeline.classify.overlap import hashes_from_config

    cfg = load(config, set_)
    t = cfg.classifier.train
    target = resolve_model_dir(model or str(Path(t.out_dir) / t.name))
    info = hashes_from_config(t, target)
    console.print(f"{target}: hashed {info['texts']:,} of {info['labelled']:,} labelled texts "
                  f"({info['held_out']:,} held out): {info['documents']:,} document and {info['shingles']:,} "
                  "shingle hashes", highlight=False)


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="classifier")
