"""Multiple-choice benchmark items read from local files, in the prompt formats of lm-evaluation-harness.

Each task turns one benchmark record into an `MCItem`: a context (the prompt), the answer strings and the
index of the right one. The scorer (`pipeline/train/evals.py`) appends `" " + answer` to the context and
compares the log-likelihoods of the answers. The formats follow EleutherAI/lm-evaluation-harness
(`lm_eval/tasks/<task>/*.yaml`, version 1.0 of each task, zero-shot):

| task | file(s) under the benchmarks folder | context | answers |
|---|---|---|---|
| arc_easy, arc_challenge | `arc/ARC-{Easy,Challenge}-Test.jsonl` (AI2 jsonl) or `*test*.parquet` (HF layout) | `Question: {stem}\\nAnswer:` | the choice texts |
| hellaswag | `hellaswag/hellaswag_val*.jsonl` (original), `hellaswag_val_full.txt.bz2` (llama.cpp text) or `*validation*.parquet` | `{activity}: {ctx}` cleaned as lm-eval's `preprocess` | the 4 endings, cleaned |
| mmlu | `mmlu/test/*.csv` (header `question,choice0..3,answer`, or the original headerless A-D layout) or `*test*.parquet` | `The following are multiple choice questions (with answers) about {subject}.\\n\\n{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:` | `A`..`D` |
| mmlu_cloze | as mmlu | lm-eval's `mmlu_continuation`: `The following are questions (with answers) about {subject}.\\n\\nQuestion: {q}\\nAnswer:` | the choice texts |
| piqa | `piqa/valid.jsonl` + `valid-labels.lst`, a jsonl with `label`, or `*validation*.parquet` | `Question: {goal}\\nAnswer:` | `sol1`, `sol2` |

Known deviation: the llama.cpp HellaSwag text file keeps only `ctx = ctx_a + " " + ctx_b`, so the query cannot
capitalise `ctx_b` as lm-eval does (`ctx_b.capitalize()`); with the original jsonl the query is lm-eval's.
MMLU letters (`mmlu`) are near chance for small models; `mmlu_cloze` scores the answer texts instead.

Items are chosen deterministically: ranked by sha256 of `task:item id` and cut at the limit, so the first 200
items are a subset of the first 500, the choice does not depend on file order, and every run and arm sees
the same items (`mmlu` and `mmlu_cloze` rank by `mmlu:id`: the same questions in two formats). A record that does not make a valid item (no answer key, answer index out of range, fewer
than two answers) raises `TextbookError` naming the file and line: a benchmark must be read whole or not at all.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import TextbookError
from pipeline.paths import shared_data_dir


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    `context` is the full prompt (no trailing space: the scorer joins `context + delimiter + choice`),
    `choices` the answer strings (without the delimiter), `gold` the index of the right one.
    """

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    delimiter: str = " "


@dataclass(frozen=True)
class Task:
    """A benchmark: where its files live under the benchmarks folder and how a record becomes an item."""

    name: str
    patterns: tuple[str, ...]  # glob patterns relative to the benchmarks folder; the first that matches wins
    read: Callable[[Path], Iterator[MCItem]]  # one file -> its items
    source: str  # the lm-evaluation-harness task it follows
    pool: str = ""  # items are chosen by sha256(pool:id): two formats of one benchmark share a pool

    @property
    def rank_key(self) -> str:
        return self.pool or self.name


def default_benchmarks_dir() -> Path | None:
    """$TEXTBOOK_BENCHMARKS, else `../shared/data/benchmarks` beside the checkout; None when neither exists."""
    env = os.environ.get("TEXTBOOK_BENCHMARKS")
    if env:
        return Path(env)
    shared = shared_data_dir()
    return shared / "benchmarks" if shared is not None and (shared / "benchmarks").is_dir() else None


# --- file layouts -----------------------------------------------------------------------------------------
def _open_text(path: Path) -> Any:
    name = path.name.lower()
    opener: Any = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
    return opener(path, "rt", encoding="utf-8", newline="")


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSON-lines file (gz/bz2 too) or of a JSON array file."""
    with _open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        data = json.loads(text)
        yield from ((i + 1, r) for i, r in enumerate(data))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line.removeprefix("\ufeff"))
            except json.JSONDecodeError as e:
                raise TextbookError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
            yield lineno, rec


def _parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    return _parquet(path) if path.name.lower().endswith(".parquet") else _jsonl(path)


def _item(path: Path, where: int | str, rid: Any, context: str, choices: list[Any], gold: Any) -> MCItem:
    """An item, checked: at least two non-empty answers and a gold index among them."""
    if not isinstance(context, str) or not context.strip():
        raise TextbookError(f"{path}:{where}: no question text")
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise TextbookError(f"{path}:{where}: needs two or more non-empty answers (got {choices!r})")
    try:
        g = int(gold)
    except (TypeError, ValueError):
        raise TextbookError(f"{path}:{where}: answer {gold!r} is not an index") from None
    if not 0 <= g < len(choices):
        raise TextbookError(f"{path}:{where}: answer index {g} outside 0..{len(choices) - 1}")
    stem = path.name.split(".")[0]
    return MCItem(id=f"{stem}:{rid if rid not in (None, '') else where}", context=context,
                  choices=tuple(choices), gold=g)


# --- ARC (lm_eval/tasks/arc/arc_easy.yaml, arc_challenge.yaml) ------------------------------------------
def _read_arc(path: Path) -> Iterator[MCItem]:
    for where, r in _records(path):
        q = r.get("question")
        if isinstance(q, dict):  # original AI2 jsonl: question.stem, question.choices[{text, label}]
            stem, texts = q.get("stem"), [c.get("text") for c in q.get("choices") or []]
            labels = [str(c.get("label")) for c in q.get("choices") or []]
        else:  # HF allenai/ai2_arc: question, choices {text: [...], label: [...]}
            ch = r.get("choices") or {}
            stem, texts, labels = q, list(ch.get("text") or []), [str(x) for x in ch.get("label") or []]
        key = str(r.get("answerKey", "")).strip()
        if key not in labels:
            raise TextbookError(f"{path}:{where}: answerKey {key!r} is not one of the labels {labels}")
        yield _item(path, where, r.get("id"), f"Question: {stem}\nAnswer:", texts, labels.index(key))


# --- HellaSwag (lm_eval/tasks/hellaswag/utils.py) --------------------------------------------------------
def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag clean-up: strip, ' [title]' -> '. ', drop other [bracketed] WikiHow markers,
    one double space -> one space (a single pass, as lm-eval)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(path: Path, where: int | str, rid: Any, query: str, endings: list[Any], label: Any) -> MCItem:
    return _item(path, where, rid, hellaswag_clean(query),
                 [hellaswag_clean(e) if isinstance(e, str) else e for e in endings], label)


def _read_hellaswag(path: Path) -> Iterator[MCItem]:
    if path.name.lower().endswith(".txt.bz2") or path.name.lower().endswith(".txt"):
        yield from _read_hellaswag_txt(path)
        return
    for where, r in _records(path):  # original jsonl / HF parquet: activity_label, ctx_a, ctx_b, endings, label
        ctx_b = str(r.get("ctx_b") or "")
        ctx = f"{r.get('ctx_a') or ''} {ctx_b.capitalize()}"
        yield _hellaswag_item(path, where, r.get("ind"), f"{r.get('activity_label') or ''}: {ctx}",
                              list(r.get("endings") or []), r.get("label"))


def _read_hellaswag_txt(path: Path) -> Iterator[MCItem]:
    """llama.cpp's layout: 6 lines per task (`activity_label: ctx`, gold label 0-3, four endings)."""
    with _open_text(path) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TextbookError(f"{path}: {len(lines)} lines, not a multiple of 6 (a truncated task at the end)")
    for k in range(0, len(lines), 6):
        query, label, *endings = (s.rstrip("\r") for s in lines[k:k + 6])
        if not label.strip().isdigit():
            raise TextbookError(f"{path}:{k + 2}: gold label {label!r} is not a number")
        yield _hellaswag_item(path, k + 1, k // 6, query, endings, label.strip())


# --- MMLU (lm_eval/tasks/mmlu/default, mmlu/continuation) -----------------------------------------------
LETTERS = ("A", "B", "C", "D")


def _mmlu_rows(path: Path) -> Iterator[tuple[int, str, str, list[str], Any]]:
    """(line, subject, question, 4 choices, answer index) of an MMLU file."""
    if path.name.lower().endswith(".parquet"):  # cais/mmlu: question, subject, choices, answer
        for where, r in _parquet(path):
            yield where, str(r.get("subject") or ""), r.get("question"), list(r.get("choices") or []), r.get("answer")
        return
    subject = re.sub(r"_(test|dev|val)$", "", path.name.split(".")[0])
    with _open_text(path) as f:
        rows = list(csv.reader(f))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if header[:1] == ["question"]:  # HF layout re-exported with a header: question,choice0..3,answer (0-based)
        col = {name: i for i, name in enumerate(header)}
        for n, row in enumerate(rows[1:], 2):
            yield n, subject, row[col["question"]], [row[col[f"choice{i}"]] for i in range(4)], row[col["answer"]]
        return
    for n, row in enumerate(rows, 1):  # the original headerless layout: question, A, B, C, D, letter
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise TextbookError(f"{path}:{n}: expected question, 4 choices and a letter A-D")
        yield n, subject, row[0], row[1:5], LETTERS.index(row[5].strip())


def _read_mmlu(path: Path, cloze: bool = False) -> Iterator[MCItem]:
    for where, subject, question, choices, answer in _mmlu_rows(path):
        if len(choices) != 4:
            raise TextbookError(f"{path}:{where}: MMLU needs 4 choices (got {len(choices)})")
        topic = subject.replace("_", " ")
        q = str(question).strip()
        if cloze:
            context = f"The following are questions (with answers) about {topic}.\n\nQuestion: {q}\nAnswer:"
            answers = [str(c) for c in choices]
        else:
            listed = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices, strict=True))
            context = (f"The following are multiple choice questions (with answers) about {topic}.\n\n"
                       f"{q}{listed}\nAnswer:")
            answers = list(LETTERS)
        yield _item(path, where, None, context, answers, answer)


# --- PIQA (lm_eval/tasks/piqa/piqa.yaml) ----------------------------------------------------------------
def _read_piqa(path: Path) -> Iterator[MCItem]:
    labels: list[str] | None = None
    lst = path.with_name(path.name.split(".")[0] + "-labels.lst")  # the original release: valid-labels.lst
    if lst.is_file():
        labels = lst.read_text(encoding="utf-8").split()
    for n, (where, r) in enumerate(_records(path)):
        label = r.get("label")
        if label is None and labels is not None:
            if n >= len(labels):
                raise TextbookError(f"{lst}: fewer labels ({len(labels)}) than records in {path}")
            label = labels[n]
        if label is None:
            raise TextbookError(f"{path}:{where}: no label (a `label` field or {lst.name} beside the file)")
        yield _item(path, where, r.get("id"), f"Question: {r.get('goal')}\nAnswer:",
                    [r.get("sol1"), r.get("sol2")], label)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", ("arc/ARC-Easy-Test.jsonl", "arc/ARC-Easy/*test*.parquet", "arc_easy/*test*"), _read_arc,
         "lm_eval/tasks/arc/arc_easy.yaml"),
    Task("arc_challenge", ("arc/ARC-Challenge-Test.jsonl", "arc/ARC-Challenge/*test*.parquet",
                           "arc_challenge/*test*"), _read_arc, "lm_eval/tasks/arc/arc_challenge.yaml"),
    Task("hellaswag", ("hellaswag/hellaswag_val*.jsonl*", "hellaswag/*validation*.parquet",
                       "hellaswag/hellaswag_val_full.txt.bz2"), _read_hellaswag, "lm_eval/tasks/hellaswag"),
    Task("mmlu", ("mmlu/test/*.csv", "mmlu/*test*.parquet", "mmlu/all/*test*.parquet"), _read_mmlu,
         "lm_eval/tasks/mmlu/default"),
    Task("mmlu_cloze", ("mmlu/test/*.csv", "mmlu/*test*.parquet", "mmlu/all/*test*.parquet"),
         lambda p: _read_mmlu(p, cloze=True), "lm_eval/tasks/mmlu/continuation", pool="mmlu"),
    Task("piqa", ("piqa/valid.jsonl", "piqa/*valid*.jsonl", "piqa/*validation*.parquet"), _read_piqa,
         "lm_eval/tasks/piqa/piqa.yaml"),
]}


def task_files(task: str, path: str | Path | None = None) -> list[Path]:
    """The files of `task`: `path` itself when it is a file, else the task's patterns under `path` (or under
    the default benchmarks folder). Raises TextbookError when there are none."""
    spec = _task(task)
    if path is not None and Path(path).is_file():
        return [Path(path)]
    root = Path(path) if path is not None else default_benchmarks_dir()
    if root is None:
        raise TextbookError(f"benchmark {task}: no benchmarks folder (give a path, set $TEXTBOOK_BENCHMARKS, or "
                            "place ../shared/data/benchmarks beside the checkout)")
    for pattern in spec.patterns:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found
    raise TextbookError(f"benchmark {task}: no file in {root} matching {', '.join(spec.patterns)}")


def _task(task: str) -> Task:
    spec = TASKS.get(task)
    if spec is None:
        raise TextbookError(f"unknown benchmark task {task!r} (known: {', '.join(TASKS)})")
    return spec


def item_rank(task: str, item_id: str) -> str:
    """The sort key that decides which items a limit keeps: sha256 of `pool:item id`, hex (the pool is the
    task's name, or the benchmark it shares with another format: mmlu_cloze asks mmlu's questions)."""
    return hashlib.sha256(f"{_task(task).rank_key}:{item_id}".encode()).hexdigest()


def read_task(task: str, path: str | Path | None = None, limit: int | None = None) -> list[MCItem]:
    """The items of `task` (all of them, or the `limit` first by `item_rank`), from `path` (a file or a
    benchmarks folder) or the default benchmarks folder. Duplicate item ids are an error."""
    spec = _task(task)
    items: list[MCItem] = []
    for f in task_files(task, path):
        items.extend(spec.read(f))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise TextbookError(f"benchmark {task}: item id {dup!r} occurs twice (two copies of one file?)")
    items.sort(key=lambda it: item_rank(task, it.id))
    return items if limit is None else items[:limit]
