"""Core commands: `textbook inspect PATH` and `textbook tokenizer train`."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import console, user_errors

tokenizer_app = typer.Typer(help="Train or check the tokenizer.", no_args_is_help=True)


def _histogram(values: list[float], bins: int = 10, width: int = 40, label: str = "") -> str:
    import numpy as np

    if not values:
        return f"{label}: (none)"
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    top = max(int(counts.max()), 1)
    rows = [label]
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        rows.append(f"  {lo:>9.1f} – {hi:<9.1f} {'█' * int(round(width * c / top)):<{width}} {c}")
    return "\n".join(rows)


@user_errors
def inspect(
    path: str = typer.Argument(..., help="A shard directory (with manifest.json) or one parquet file."),
    samples: int = typer.Option(3, "--samples", "-n", help="Sample documents to print."),
) -> None:
    """Summarise shards: documents and tokens per split/source, token-length and edu-score histograms, samples.

    Example: textbook inspect shards/quickstart
    """
    from rich.table import Table

    from pipeline.errors import TextbookError
    from pipeline.shards import open_shards

    p = Path(path)
    if not p.exists():
        raise TextbookError(f"{p}: no such file or directory")
    if p.is_file():
        _inspect_file(p, samples)
        return
    shards = open_shards(p)
    m = shards.manifest
    tok = m["tokenizer"]
    console.print(f"[bold]{p}[/]  format v{m['schema_version']}  textbook {m['package_version']}  created {m['created']}")
    console.print(f"tokenizer {tok['name']} vocab {tok['vocab_size']} eos {tok['eos_id']} sha256 {tok['sha256'][:16]}…")
    table = Table(title="documents and tokens")
    for col in ("split", "source", "documents", "tokens", "tokens/doc"):
        table.add_column(col, justify="right" if col not in ("split", "source") else "left")
    for split, s in m["splits"].items():
        for src, c in s["sources"].items():
            table.add_row(split, src, f"{c['documents']:,}", f"{c['tokens']:,}", f"{c['tokens'] / max(c['documents'], 1):,.0f}")
        table.add_row(split, "[bold]all", f"{s['documents']:,}", f"{s['tokens']:,}", "", end_section=True)
    console.print(table)
    df = shards.to_pandas(columns=["num_tokens", "edu_score", "source"])
    console.print(_histogram(df["num_tokens"].tolist(), label="[bold]tokens per document[/]"), highlight=False)
    edu = df["edu_score"].dropna().tolist()
    console.print(_histogram(edu, bins=5, label=f"[bold]edu_score[/] ({len(edu):,} scored of {len(df):,})"),
                  highlight=False)
    for i, doc in enumerate(shards.iter_documents(columns=["id", "source", "topic", "edu_score", "text"])):
        if i >= samples:
            break
        console.rule(f"{doc['id']}  source={doc['source']}  topic={doc['topic']}  edu={doc['edu_score']}")
        console.print(doc["text"][:600] + ("…" if len(doc["text"]) > 600 else ""), highlight=False, markup=False)


def _inspect_file(p: Path, samples: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.errors import TextbookError

    try:
        pf = pq.ParquetFile(p)
        rows = pf.metadata.num_rows
        head = next(pf.iter_batches(batch_size=max(samples, 1)), None)
    except (pa.ArrowException, OSError) as e:
        raise TextbookError(f"{p}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    console.print(f"[bold]{p}[/]: {rows:,} rows, {pf.metadata.num_row_groups} row groups")
    console.print(str(pf.schema_arrow), highlight=False)
    if head is not None:
        for rec in head.to_pylist()[:samples]:
            text = str(rec.get("text", ""))
            console.rule(str(rec.get("id")))
            console.print(text[:600], highlight=False, markup=False)


@tokenizer_app.command("train")
@user_errors
def tokenizer_train(
    inputs: list[str] = typer.Argument(..., help="Text sources: jsonl/parquet document files, .txt/.rst/.md files, or directories."),
    out: str = typer.Option("tokenizers/my-bpe", "--out", help="Directory to write tokenizer.json into."),
    vocab_size: int = typer.Option(16384, "--vocab-size", min=256),
    min_frequency: int = typer.Option(2, "--min-frequency", min=1),
) -> None:
    """Train a byte-level BPE with `<|endoftext|>` as EOS.

    Example: textbook tokenizer train ../shared/data/textbooks/python311_doc --vocab-size 16384 --out tokenizers/mine
    """
    from pipeline.errors import TextbookError
    from pipeline.tokenizer import train_tokenizer

    paths = [Path(i) for i in inputs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise TextbookError(f"{missing[0]}: input path does not exist")
    tok = train_tokenizer(paths, Path(out), vocab_size=vocab_size, min_frequency=min_frequency)
    console.print(f"wrote {tok.path} (vocab {tok.vocab_size}, eos id {tok.eos_id}, sha256 {tok.sha256[:16]}…)")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.add_typer(tokenizer_app, name="tokenizer")
