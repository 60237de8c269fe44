"""Evaluation benchmarks as text items, for decontamination.

One adapter per benchmark the Phi-2 post reports: where a local copy lives in its original layout (a folder
such as ../shared/data/benchmarks), which Hugging Face dataset holds it online, and which fields of a record
are text worth indexing. `iter_items` yields `(item_id, [texts])`; a broken record is reported through
`on_error` and skipped, never fatal.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.documents import iter_json_lines
from pipeline.errors import ResourceUnavailable, TextbookError

Item = tuple[str, list[str]]
OnError = Callable[[str, str], None]


class HubUnreachable(ResourceUnavailable):
    """No local copy, and the Hugging Face hub failed or is off limits: the caller stops asking it."""


BBH_TASKS = [
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
]


def _choices_text(choices: Any) -> str:
    if isinstance(choices, dict):  # HF ARC / OpenBookQA: {"text": [...], "label": [...]}
        return " ".join(map(str, choices.get("text", [])))
    if isinstance(choices, list):
        return " ".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in choices)
    return ""


def _get(rec: dict[str, Any], dotted: str) -> Any:
    cur: Any = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _texts(rec: dict[str, Any], fields: list[str]) -> list[str]:
    return [str(v) for f in fields if (v := _get(rec, f)) not in (None, "")]


# Each `texts` function turns one record into the texts to index: the prompt alone (what a generator would
# copy) and prompt + answer (what a solution page would contain).
def _humaneval(r: dict) -> list[str]:
    return _texts(r, ["prompt"]) + [r.get("prompt", "") + r.get("canonical_solution", "")]


def _mbpp(r: dict) -> list[str]:
    return _texts(r, ["text", "prompt", "code"])


def _gsm8k(r: dict) -> list[str]:
    return _texts(r, ["question", "answer"])


def _mmlu(r: dict) -> list[str]:
    q = str(r.get("question", ""))
    choices = r.get("choices") or [r.get(f"choice{i}") for i in range(4) if r.get(f"choice{i}") is not None]
    return [q, q + " " + _choices_text(choices)]


def _arc(r: dict) -> list[str]:
    q = r.get("question")
    if isinstance(q, dict):  # original AI2 jsonl
        return [q.get("stem", ""), q.get("stem", "") + " " + _choices_text(q.get("choices"))]
    return [str(q or ""), f"{q} {_choices_text(r.get('choices'))}"]


def _hellaswag(r: dict) -> list[str]:
    ctx = r.get("ctx") or f"{r.get('ctx_a', '')} {r.get('ctx_b', '')}"
    endings = r.get("endings") or []
    label = r.get("label")
    gold = endings[int(label)] if endings and str(label).strip().isdigit() and int(label) < len(endings) else ""
    return [str(ctx), f"{ctx} {gold}"]


def _piqa(r: dict) -> list[str]:
    return [f"{r.get('goal', '')} {r.get('sol1', '')}", f"{r.get('goal', '')} {r.get('sol2', '')}"]


def _openbookqa(r: dict) -> list[str]:
    stem = r.get("question_stem") or _get(r, "question.stem") or ""
    return [stem, f"{stem} {_choices_text(r.get('choices') or _get(r, 'question.choices'))}"]


def _siqa(r: dict) -> list[str]:
    return [f"{r.get('context', '')} {r.get('question', '')}"]


@dataclass(frozen=True)
class Adapter:
    name: str
    texts: Callable[[dict[str, Any]], list[str]]
    local: tuple[str, ...] = ()  # glob patterns relative to local_dir, first that matches wins
    hf: tuple[str, str | None, str] | None = None  # (dataset, config, split)
    hf_configs: tuple[str, ...] = field(default_factory=tuple)  # several configs (BBH tasks)
    id_field: str | None = None


ADAPTERS: dict[str, Adapter] = {a.name: a for a in [
    Adapter("humaneval", _humaneval, ("humaneval/HumanEval.jsonl*", "humaneval/*.parquet"),
            ("openai/openai_humaneval", None, "test"), id_field="task_id"),
    Adapter("mbpp", _mbpp, ("mbpp/mbpp.jsonl", "mbpp/sanitized-mbpp.json", "mbpp/*.parquet"),
            ("google-research-datasets/mbpp", "full", "test"), id_field="task_id"),
    Adapter("gsm8k", _gsm8k, ("gsm8k/test.jsonl", "gsm8k/*test*.parquet"), ("openai/gsm8k", "main", "test")),
    Adapter("mmlu", _mmlu, ("mmlu/test/*.csv", "mmlu/*test*.parquet"), ("cais/mmlu", "all", "test")),
    Adapter("arc_easy", _arc, ("arc/ARC-Easy-Test.jsonl", "arc/ARC-Easy/*test*.parquet"),
            ("allenai/ai2_arc", "ARC-Easy", "test"), id_field="id"),
    Adapter("arc_challenge", _arc, ("arc/ARC-Challenge-Test.jsonl", "arc/ARC-Challenge/*test*.parquet"),
            ("allenai/ai2_arc", "ARC-Challenge", "test"), id_field="id"),
    Adapter("hellaswag", _hellaswag, ("hellaswag/hellaswag_val*.jsonl", "hellaswag/hellaswag_val_full.txt.bz2",
                                      "hellaswag/*validation*.parquet"), ("Rowan/hellaswag", None, "validation"),
            id_field="ind"),
    Adapter("piqa", _piqa, ("piqa/*valid*.jsonl", "piqa/*validation*.parquet"), ("ybisk/piqa", None, "validation")),
    Adapter("winogrande", lambda r: _texts(r, ["sentence"]), ("winogrande/*dev*.jsonl", "winogrande/*validation*"),
            ("allenai/winogrande", "winogrande_xl", "validation")),
    Adapter("openbookqa", _openbookqa, ("openbookqa/*test*.jsonl", "openbookqa/*test*.parquet"),
            ("allenai/openbookqa", "main", "test"), id_field="id"),
    Adapter("siqa", _siqa, ("siqa/*dev*.jsonl", "siqa/*validation*.parquet"), ("allenai/social_i_qa", None,
                                                                                 "validation")),
    Adapter("boolq", lambda r: _texts(r, ["passage", "question"]), ("boolq/*dev*.jsonl", "boolq/*validation*"),
            ("google/boolq", None, "validation")),
    Adapter("squad_v2", lambda r: _texts(r, ["context", "question"]), ("squad_v2/*dev*.json*",
                                                                       "squad_v2/*validation*.parquet"),
            ("rajpurkar/squad_v2", None, "validation"), id_field="id"),
    Adapter("bbh", lambda r: _texts(r, ["input"]), ("bbh/*.json", "bbh/*.jsonl"), ("lukaemon/bbh", None, "test"),
            hf_configs=tuple(BBH_TASKS)),
]}


def _records_from_file(path: Path, on_error: OnError) -> Iterator[dict[str, Any]]:
    """Records of a local benchmark file in any of the layouts the adapters know."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    if name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            yield from csv.DictReader(f)
        return
    if name.endswith(".txt.bz2"):
        yield from _hellaswag_txt(path, on_error)
        return
    opener = gzip.open if name.endswith(".gz") else (bz2.open if name.endswith(".bz2") else open)
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        head = f.read(1)
        f.seek(0)
        if head == "[" or (name.endswith(".json") and head == "{"):
            data = json.load(f)
            yield from _json_records(data)
            return
        for _, rec in iter_json_lines(f, path, on_error, "malformed_line"):
            yield rec


def _json_records(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, list):
        yield from (r for r in data if isinstance(r, dict))
    elif isinstance(data, dict) and isinstance(data.get("examples"), list):  # BBH task files
        yield from data["examples"]
    elif isinstance(data, dict) and isinstance(data.get("data"), list):  # SQuAD json
        for article in data["data"]:
            for para in article.get("paragraphs", []):
                for qa in para.get("qas", []):
                    yield {"id": qa.get("id"), "context": para.get("context"), "question": qa.get("question")}


def _hellaswag_txt(path: Path, on_error: OnError) -> Iterator[dict[str, Any]]:
    """llama.cpp's HellaSwag text layout: 6 lines per task (context, gold label, 4 endings)."""
    with bz2.open(path, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for k in range(0, len(lines) - len(lines) % 6, 6):
        ctx, label, *endings = lines[k:k + 6]
        if not label.strip().isdigit():
            on_error("malformed_line", f"{path}:{k + 2}")
            continue
        yield {"ind": k // 6, "ctx": ctx, "label": label.strip(), "endings": endings}
    if len(lines) % 6:
        on_error("malformed_line", f"{path}:{len(lines)} (truncated task)")


def local_files(adapter: Adapter, local_dir: Path) -> list[Path]:
    for pattern in adapter.local:
        found = sorted(p for p in local_dir.glob(pattern) if p.is_file())
        if found:
            return found
    return []


def iter_items(name: str, *, local_dir: str | Path | None = None, path: str | Path | None = None,
               fields: list[str] | None = None, on_error: OnError | None = None,
               allow_hub: bool = True) -> tuple[str, Iterator[Item]]:
    """(where it was read from, items) of one benchmark: a given file, a local copy, or the HF hub."""
    report = on_error or (lambda reason, where: None)
    adapter = ADAPTERS.get(name)
    if adapter is None and not fields:
        raise TextbookError(f"benchmark {name!r}: no adapter (known: {', '.join(ADAPTERS)}); give `fields` to index")

    def texts_of(rec: dict[str, Any]) -> list[str]:
        return _texts(rec, fields) if fields else adapter.texts(rec)  # type: ignore[union-attr]

    id_field = adapter.id_field if adapter else None
    if path is not None:
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        if not files or not all(f.exists() for f in files):
            raise TextbookError(f"benchmark {name!r}: {p} does not exist")
        return str(p), _items_from_files(files, texts_of, id_field, report)
    if local_dir:
        files = local_files(adapter, Path(local_dir)) if adapter else []
        if files:
            return str(files[0].parent), _items_from_files(files, texts_of, id_field, report)
    if adapter is None or adapter.hf is None:
        raise ResourceUnavailable(f"benchmark {name!r}: no local copy and no hub dataset")
    if not allow_hub:
        raise HubUnreachable(f"benchmark {name!r}: no local copy{' in ' + str(local_dir) if local_dir else ''} "
                                  "and the Hugging Face hub is unreachable")
    return f"hf:{adapter.hf[0]}", _items_from_hub(adapter, texts_of, id_field)


def _items_from_files(files: list[Path], texts_of: Callable[[dict], list[str]], id_field: str | None,
                      report: OnError) -> Iterator[Item]:
    for f in files:
        stem = f.name.split(".")[0]
        try:
            for k, rec in enumerate(_records_from_file(f, report)):
                try:
                    texts = [t for t in texts_of(rec) if t and t.strip()]
                except (TypeError, ValueError, AttributeError):
                    report("malformed_record", f"{f}:{k + 1}")
                    continue
                if not texts:
                    report("no_text", f"{f}:{k + 1}")
                    continue
                rid = rec.get(id_field) if id_field else None
                yield (f"{stem}:{rid if rid is not None else k}", texts)
        except (OSError, ValueError, EOFError, csv.Error) as e:
            report("unreadable_file", f"{f}: {type(e).__name__}: {e}")


def _items_from_hub(adapter: Adapter, texts_of: Callable[[dict], list[str]], id_field: str | None) -> Iterator[Item]:
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ResourceUnavailable(f"benchmark {adapter.name}: `datasets` is not installed ({e})") from None
    assert adapter.hf is not None
    dataset, config, split = adapter.hf
    configs = adapter.hf_configs or (config,)
    loaded = []
    for cfg in configs:
        try:
            loaded.append((cfg, load_dataset(dataset, cfg, split=split)))
        except Exception as e:  # noqa: BLE001 - offline, gated, renamed: all mean "cannot be reached"
            raise HubUnreachable(
                f"benchmark {adapter.name}: cannot load {dataset}{'/' + cfg if cfg else ''} from the Hugging Face "
                f"hub ({type(e).__name__}); set decontaminate.local_dir (e.g. TEXTBOOK_BENCHMARKS=../shared/data/"
                "benchmarks) to a folder with local copies") from None

    def gen() -> Iterator[Item]:
        for cfg, ds in loaded:
            for k, rec in enumerate(ds):
                texts = [t for t in texts_of(rec) if t and t.strip()]
                if texts:
                    rid = rec.get(id_field) if id_field else None
                    yield (f"{cfg or 'default'}:{rid if rid is not None else k}", texts)

    return gen()

