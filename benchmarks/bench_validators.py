"""Precision of the output checks (issue 20): how often each drop reason fires, and how often it is right.

    # 1. real model output: generate with the local model (keep every answer, dropped ones too) ...
    textbook generate configs/quickstart.yaml --set run.out=/tmp/v20/a --set generate.n=30 \\
        --set generate.web_seed_fraction=0 --set llm.max_tokens=500   # validators_header.md has both runs
    # 2. ... list every reason that fires on every answer (all checks, not just the first) for hand-labelling
    python benchmarks/bench_validators.py fired /tmp/v20/a/stages/generate /tmp/v20/b/stages/generate \\
        --out benchmarks/results/validators_outputs.jsonl
    # 3. the labelled table: per reason fired / right / precision, and every labelled answer
    python benchmarks/bench_validators.py table benchmarks/results/validators_outputs.jsonl \\
        benchmarks/results/validators_labels.json --out benchmarks/results/validators.md \\
        --header benchmarks/results/validators_header.md
    # false alarms on real human text (no model needed): OpenStax's Python textbook as Markdown with fenced
    # code (checked as a python_chapter that only promises code that parses), FineWeb-Edu and FineWeb pages
    python benchmarks/bench_validators.py human --data ../shared/data

`fired` re-judges every answer the generate stage wrote (kept/ and removed/) with `Validator.reasons`,
which evaluates every check, so a reason that an earlier one shadows (a loop cut off at max_tokens is `length`
first) is measured too. Labels: {"<id>": {"<reason>": "right" | "wrong"}, ...} written by a person who read the
answer.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CNX = "{http://cnx.rice.edu/cnxml}"
PATTERN_AND_REPETITION = ("refusal", "preamble", "meta_talk", "placeholder", "repetition")


def _validator(fmt_kind: str | None = None) -> Any:
    from pipeline.config.generate import GenerateSection
    from pipeline.generate.validate import Validator

    formats = {"python_chapter": fmt_kind} if fmt_kind else {"python_chapter": "tests"}
    return Validator(GenerateSection(min_tokens=0, token_counter="whitespace", language=None,
                                     code_checks={"formats": formats}))


# ------------------------------------------------------------------ fired: every reason on every answer
def read_answers(stage_dirs: list[Path]) -> list[dict[str, Any]]:
    """Every answer a generate stage wrote (kept/ and removed/), with the reason the stage dropped it for."""
    from pipeline.documents import iter_documents, list_document_files

    out = []
    for stage in stage_dirs:
        for sub in ("kept", "removed"):
            root = stage / sub
            if not root.exists():
                continue
            for doc in iter_documents(list_document_files([root])):
                meta = doc["meta"] if isinstance(doc["meta"], dict) else json.loads(doc["meta"] or "{}")
                reason = doc.get("reason") if sub == "removed" else None
                if reason and reason.startswith(("failed_", "skipped_")):
                    continue  # no answer to judge
                out.append({"stage_dir": str(stage), "doc": doc, "meta": meta, "stage_reason": reason})
    return out


def fired(stage_dirs: list[Path], out: Path) -> None:
    v = _validator()
    rows = []
    for a in read_answers(stage_dirs):
        doc, meta = a["doc"], a["meta"]
        text = doc["text"] or ""
        reasons = v.reasons(text, meta.get("finish_reason"), doc.get("format"))
        rows.append({"id": doc["id"][:12], "format": doc.get("format"), "audience": doc.get("audience"),
                     "topic": doc.get("topic"), "finish_reason": meta.get("finish_reason"),
                     "completion_tokens": (meta.get("usage") or {}).get("completion_tokens"),
                     "stage_reason": a["stage_reason"], "fired": reasons, "text": text})
    rows.sort(key=lambda r: (r["format"] or "", r["id"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = Counter(reason for r in rows for reason, _ in r["fired"])
    print(f"{len(rows)} answers -> {out}; fired: {dict(counts)}")


# ------------------------------------------------------------------ table: precision per reason
def _excerpt(text: str, detail: str, width: int = 110) -> str:
    flat = " ".join(text.split())
    i = flat.lower().find(detail.lower()[:40]) if detail and not re.match(r"^[\w_]+ [\d.]+ [<>]", detail) else -1
    start = max(0, i - 30) if i >= 0 else 0
    s = flat[start:start + width]
    return ("…" if start else "") + s.replace("|", "\\|") + ("…" if start + width < len(flat) else "")


def table(outputs: Path, labels_path: Path, out: Path, header: str) -> None:
    rows = [json.loads(line) for line in outputs.open(encoding="utf-8")]
    labels = json.loads(labels_path.read_text(encoding="utf-8"))
    per: dict[str, Counter[str]] = defaultdict(Counter)
    lines = ["| id | format | finish | reason | detail | label | excerpt |", "|---|---|---|---|---|---|---|"]
    missing = []
    for r in rows:
        mine = labels.get(r["id"], {})
        note = mine.get("_note", "")
        if not r["fired"]:
            lines.append(f"| {r['id']} | {r['format']} | {r['finish_reason']} | (kept) | | "
                         f"{mine.get('_kept', 'unlabelled')} | {_excerpt(r['text'], '')} |")
        for reason, detail in r["fired"]:
            label = mine.get(reason)
            if label is None:
                missing.append(f"{r['id']}:{reason}")
                label = "unlabelled"
            per[reason][label] += 1
            lines.append(f"| {r['id']} | {r['format']} | {r['finish_reason']} | {reason} | "
                         f"{(detail or '').replace('|', '/')[:60]} | {label} | {_excerpt(r['text'], detail)} |")
        if note:
            lines[-1] += f" {note}"
    summary = ["| reason | fired | right | wrong | precision |", "|---|---|---|---|---|"]
    for reason in sorted(per, key=lambda k: -sum(per[k].values())):
        c = per[reason]
        n = c["right"] + c["wrong"]
        precision = f"{c['right'] / n:.2f}" if n else "–"
        summary.append(f"| {reason} | {sum(c.values())} | {c['right']} | {c['wrong']} | {precision} |")
    kept = [r for r in rows if not r["fired"]]
    text = "\n".join([header.rstrip(), "", f"{len(rows)} answers, {len(kept)} with no reason fired.", "",
                      "## Precision per drop reason", "", *summary, "", "## Every answer", "", *lines, ""])
    out.write_text(text, encoding="utf-8")
    print("\n".join(summary))
    if missing:
        print(f"unlabelled: {len(missing)}: {' '.join(missing[:40])}")


# ------------------------------------------------------------------ human: false alarms on real human text
def _cnxml_text(el: ET.Element) -> str:
    """Inline text of a CNXML element: inline code as `code`, newlines kept."""
    parts = [el.text or ""]
    for child in el:
        tag = child.tag.removeprefix(CNX)
        inner = _cnxml_text(child)
        if tag == "code":
            parts.append(f"`{inner.strip()}`" if "\n" not in inner.strip() else f"\n```\n{inner.strip()}\n```\n")
        elif tag == "newline":
            parts.append("\n")
        else:
            parts.append(inner)
        parts.append(child.tail or "")
    return "".join(parts)


def cnxml_markdown(path: Path) -> str:
    """An OpenStax CNXML module as Markdown: headings, paragraphs, lists, tables as rows, python code fenced."""
    root = ET.parse(path).getroot()
    out: list[str] = []

    def walk(el: ET.Element, depth: int) -> None:
        for child in el:
            tag = child.tag.removeprefix(CNX)
            if tag == "title":
                out.append("#" * min(depth + 1, 4) + " " + " ".join(_cnxml_text(child).split()))
            elif tag == "para":
                out.append(_cnxml_text(child).strip())
            elif tag == "item":
                out.append("- " + " ".join(_cnxml_text(child).split()))
            elif tag == "code" and "inline" not in (child.get("class") or ""):
                code = "".join(child.itertext()).replace("\u00a0", " ").strip("\n")
                lang = "python" if "python" in (child.get("class") or child.get("lang") or "") else ""
                out.append(f"```{lang}\n{_dedent(code)}\n```")
            elif tag == "row":
                out.append("| " + " | ".join(" ".join(_cnxml_text(e).split()) for e in child) + " |")
            elif tag in ("metadata", "media"):
                continue
            else:
                walk(child, depth + (tag == "section"))

    content = root.find(f"{CNX}content")
    title = root.find(f"{CNX}title")
    if title is not None:
        out.append("# " + (title.text or ""))
    walk(content if content is not None else root, 1)
    return "\n\n".join(p for p in out if p.strip())


def _dedent(code: str) -> str:
    import textwrap

    return textwrap.dedent(code)


def human(data: Path) -> None:
    import csv

    csv.field_size_limit(10**8)
    corpora: dict[str, list[tuple[str, str | None]]] = {}
    cnx = sorted((data / "textbooks/openstax_intro_python/cnxml").glob("*.cnxml"))
    corpora["OpenStax Intro to Python (Markdown, fenced code)"] = [(cnxml_markdown(p), "python_chapter") for p in cnx]
    with open(data / "edu_labels/fineweb_edu_llama33_150/training_data.csv", encoding="utf-8") as f:
        corpora["FineWeb-Edu pages (Llama-3.3 labels)"] = [(r["text"], None) for r in csv.DictReader(f)]
    fw = json.loads((data / "web/fineweb_sample_300/fineweb_subset.json").read_text(encoding="utf-8"))
    corpora["FineWeb pages (raw sample)"] = [(d["original_text"], None) for d in fw]
    v = _validator("parse")
    print("| corpus | texts | " + " | ".join(PATTERN_AND_REPETITION) + " | code_syntax |")
    print("|---|---|" + "---|" * (len(PATTERN_AND_REPETITION) + 1))
    examples: dict[str, list[str]] = defaultdict(list)
    for name, texts in corpora.items():
        c: Counter[str] = Counter()
        for text, fmt in texts:
            for reason, detail in v.reasons(text, "stop", fmt):
                c[reason] += 1
                examples[reason].append(f"{name[:8]}: {detail[:80]}")
        cells = [str(c[r]) for r in (*PATTERN_AND_REPETITION, "code_syntax")]
        print(f"| {name} | {len(texts)} | " + " | ".join(cells) + " |")
    for reason, ex in examples.items():
        print(f"\n{reason}: " + "; ".join(ex[:12]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fired")
    f.add_argument("stage_dirs", nargs="+", type=Path)
    f.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("table")
    t.add_argument("outputs", type=Path)
    t.add_argument("labels", type=Path)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--header", type=Path, help="Markdown put above the tables (command, machine state)")
    h = sub.add_parser("human")
    h.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data")
    a = ap.parse_args()
    if a.cmd == "fired":
        fired(a.stage_dirs, a.out)
    elif a.cmd == "table":
        table(a.outputs, a.labels, a.out, a.header.read_text(encoding="utf-8") if a.header else "# Validators")
    else:
        human(a.data)


if __name__ == "__main__":
    main()
