"""The run report: one static HTML page with PNG plots, built from what a run left on disk.

It reads only files (stats.json of every stage, kept/removed parquet, manifest.json, pretraining logs), so it
works on any run directory, finished or not, and on runs where some stages were skipped.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.documents import list_document_files
from pipeline.io import atomic_write_text
from pipeline.run import gather_stage_stats
from pipeline.stats import StageStats

STAGE_ORDER = ["web", "generate", "rephrase", "dedup", "decontaminate", "shard", "pretrain", "report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_column(files: list[Path], column: str, limit: int = 200_000) -> list[Any]:
    values: list[Any] = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError):
            continue
        if column not in pf.schema_arrow.names:
            continue
        values.extend(pf.read(columns=[column]).column(0).to_pylist())
        if len(values) >= limit:
            break
    return values[:limit]


def _chars(files: list[Path]) -> int:
    total = 0
    for f in files:
        try:
            col = pq.read_table(f, columns=["text"]).column(0)
        except (pa.ArrowException, OSError, KeyError):
            continue
        total += int(pc.sum(pc.utf8_length(col)).as_py() or 0)
    return total


def _files(d: Path) -> list[Path]:
    return [f for f in list_document_files([d]) if f.suffix == ".parquet"] if d.is_dir() else []


class Report:
    def __init__(self, run_dir: Path, out_dir: Path) -> None:
        self.run_dir = run_dir
        self.out = out_dir
        self.stats = gather_stage_stats(run_dir)
        mpath = run_dir / "manifest.json"
        self.manifest = json.loads(mpath.read_text()) if mpath.is_file() else None
        self.parts: list[str] = []
        self.plots: list[str] = []

    # -- helpers ------------------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    def chars_per_token(self) -> float:
        """Measured on the final shards when present (tokens are estimated from characters elsewhere)."""
        if not self.manifest:
            return 4.0
        chars = _chars([self.run_dir / f["path"] for s in self.manifest["splits"].values() for f in s["files"]])
        return chars / max(self.manifest["totals"]["tokens"], 1) if chars else 4.0

    def save(self, fig: Any, name: str, caption: str) -> None:
        path = self.out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        _plt().close(fig)
        self.plots.append(name)
        self.parts.append(f'<figure><img src="{name}" alt="{html.escape(caption)}"><figcaption>'
                          f"{html.escape(caption)}</figcaption></figure>")

    def h2(self, title: str) -> None:
        self.parts.append(f"<h2>{html.escape(title)}</h2>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>")

    def note(self, text: str) -> None:
        self.parts.append(f"<p class='note'>{html.escape(text)}</p>")

    # -- sections -----------------------------------------------------------------------------------------
    def summary(self) -> None:
        self.h2("Summary")
        if self.manifest:
            t = self.manifest["totals"]
            tok = self.manifest["tokenizer"]
            self.note(f"Final shards: {t['documents']:,} documents, {t['tokens']:,} tokens "
                      f"(tokenizer {tok['name']}, vocab {tok['vocab_size']}).")
            rows = [[split, src, f"{c['documents']:,}", f"{c['tokens']:,}"]
                    for split, s in self.manifest["splits"].items() for src, c in s["sources"].items()]
            self.table(["split", "source", "documents", "tokens"], rows)
        else:
            self.note("No final shards in this run directory (the shard stage did not run or did not finish).")
        skipped = [s for s in self.stats.values() if s.get("skipped")]
        for s in skipped:
            self.note(f"Stage {s['stage']} was skipped: {s.get('skipped')}")

    def funnel(self) -> None:
        self.h2("Funnel: documents and tokens through every stage")
        names = [n for n in STAGE_ORDER if n in self.stats and self.stats[n].get("read")]
        names += [n for n in self.stats if n not in names and self.stats[n].get("read")]
        if not names:
            self.note("No stage has processed documents yet.")
            return
        cpt = self.chars_per_token()
        rows = []
        for n in names:
            s = self.stats[n]
            kept_tokens = _chars(_files(self.stage_dir(n) / "kept")) / cpt
            removed_tokens = _chars(_files(self.stage_dir(n) / "removed")) / cpt
            rows.append([n, f"{s['read']:,}", f"{s['kept']:,}", f"{sum(s.get('dropped', {}).values()):,}",
                         f"{sum(s.get('errored', {}).values()):,}", f"{kept_tokens:,.0f}", f"{removed_tokens:,.0f}"])
        self.table(["stage", "read", "kept", "dropped", "errored", "tokens kept (est.)", "tokens removed (est.)"], rows)
        self.note(f"Token figures of intermediate stages are estimated at {cpt:.2f} characters per token, measured on "
                  "the final shards; document counts are exact.")
        plt = _plt()
        fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(names)))
        y = list(range(len(names)))[::-1]
        ax.barh(y, [self.stats[n]["read"] for n in names], color="#cfd8e3", label="read")
        ax.barh(y, [self.stats[n]["kept"] for n in names], color="#2b6cb0", label="kept")
        ax.set_yticks(y, names)
        ax.set_xlabel("documents")
        ax.legend(loc="lower right")
        self.save(fig, "funnel.png", "Documents read and kept per stage")
        reason_rows = []
        for n in names:
            s = self.stats[n]
            for kind in ("dropped", "errored"):
                for reason, c in sorted(s.get(kind, {}).items(), key=lambda kv: -kv[1]):
                    reason_rows.append([n, kind, reason, f"{c:,}"])
        if reason_rows:
            self.h2("Why documents were removed")
            self.table(["stage", "state", "reason", "documents"], reason_rows)

    def scores(self) -> None:
        kept = [v for v in _read_column(_files(self.stage_dir("web") / "kept"), "edu_score") if v is not None]
        removed = [v for v in _read_column(_files(self.stage_dir("web") / "removed"), "edu_score") if v is not None]
        final = []
        if self.manifest:
            final = [v for v in _read_column([self.run_dir / f["path"] for s in self.manifest["splits"].values()
                                              for f in s["files"]], "edu_score") if v is not None]
        if not (kept or removed or final):
            return
        self.h2("Educational-value scores before and after filtering")
        self.edu_cut()
        plt = _plt()
        fig, ax = plt.subplots(figsize=(8, 3.5))
        bins = [i / 4 for i in range(0, 21)]
        for values, label, color in ((removed, "web: removed", "#e53e3e"), (kept, "web: kept", "#2b6cb0"),
                                     (final, "final shards", "#38a169")):
            if values:
                ax.hist(values, bins=bins, alpha=0.55, label=f"{label} ({len(values):,})", color=color)
        ax.set_xlabel("edu_score")
        ax.set_ylabel("documents")
        ax.legend()
        self.save(fig, "edu_scores.png", "edu_score distribution of web pages removed and kept, and in the shards")

    def edu_cut(self) -> None:
        """The web stage's edu figures (stats `edu`): the cut's rule and realised keep rate, the guards, the
        pages that were training texts of the classifier."""
        edu = (self.stats.get("web") or {}).get("edu")
        if not edu:
            return
        rows: list[list[Any]] = [["classifier", edu.get("model")], ["pages scored", f"{edu.get('scored', 0):,}"]]
        cut = edu.get("filter")
        if cut:
            rate = cut.get("keep_rate")
            rows += [["cut", cut.get("rule")], ["pages kept", f"{cut.get('kept', 0):,}"],
                     ["realised keep rate", "n/a" if rate is None else f"{rate:.1%}"]]
            if cut.get("keep_top") is not None:
                rows.append(["keep_top asked", f"{cut['keep_top']:.1%} of {cut.get('keep_top_of')}"])
            rows += [[f"dropped: {k}", f"{v:,}"] for k, v in cut.get("dropped", {}).items()]
        else:
            rows.append(["cut", "none (scores stored, nothing filtered on them)"])
        gated = edu.get("gated") or {}
        rows.append(["stopped by a guard", ", ".join(f"{k} {v:,}" for k, v in gated.items()) or "none"
                     if edu.get("guards", True) else "guards off"])
        overlap = edu.get("training_overlap")
        rows.append(["training texts of the classifier", "not known (no training hashes)" if overlap is None
                     else f"{overlap['in_training']:,} ({overlap['fraction']:.1%})"])
        self.table(["edu", "value"], rows)

    def generation(self) -> None:
        files = _files(self.stage_dir("generate") / "kept")
        g = self.stats.get("generate")
        if not files and not g:
            return
        self.h2("Synthetic generation: coverage, cost and latency")
        audiences = _read_column(files, "audience")
        formats = _read_column(files, "format")
        topics = [str(t).split("/")[0] for t in _read_column(files, "topic") if t]
        if audiences and formats:
            a_names = sorted({a for a in audiences if a})
            f_names = sorted({f for f in formats if f})
            grid = Counter(zip(audiences, formats, strict=False))
            import numpy as np

            m = np.array([[grid[(a, f)] for f in f_names] for a in a_names])
            plt = _plt()
            fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(f_names), 1.2 + 0.5 * len(a_names)))
            im = ax.imshow(m, cmap="Blues")
            ax.set_xticks(range(len(f_names)), f_names, rotation=30, ha="right")
            ax.set_yticks(range(len(a_names)), a_names)
            for i in range(len(a_names)):
                for j in range(len(f_names)):
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8)
            fig.colorbar(im, ax=ax)
            self.save(fig, "coverage.png", "Documents kept per audience × format")
        if topics:
            self.table(["subject", "documents"], [[t, c] for t, c in Counter(topics).most_common(15)])
        if g:
            scalars = [[k, v] for k, v in g.items() if isinstance(v, int | float | str) and k not in
                       ("stage", "read", "kept", "reconciled")]
            nested = {k: v for k, v in g.items() if isinstance(v, dict) and k not in ("dropped", "errored")}
            if scalars:
                self.table(["figure", "value"], scalars)
            for k, v in nested.items():
                flat = [[kk, json.dumps(vv, default=str)[:200]] for kk, vv in list(v.items())[:30]]
                if flat:
                    self.parts.append(f"<h3>{html.escape(k)}</h3>")
                    self.table(["key", "value"], flat)

    def rephrasing(self, samples: int = 6) -> None:
        """The rephrase stage: pages per bucket and fate, rewrites per template and why they were dropped, and
        source vs rewrite side by side (from the final shards when they hold rewrites, else from the stage)."""
        r = self.stats.get("rephrase")
        if not r or r.get("skipped") or not r.get("read"):
            return
        self.h2("Rephrased web: pages by edu-score bucket, rewrites by template")
        pages = r.get("pages") or {}
        self.note(f"{r['read']:,} pages: {pages.get('kept', 0):,} kept as is, {pages.get('rewritten', 0):,} "
                  f"rewritten, {pages.get('dropped', 0):,} dropped, {pages.get('errored', 0):,} errored; "
                  f"{(r.get('documents_out') or {}).get('rewrites', 0):,} rewrites kept.")
        self.table(["bucket", "pages", "kept as is", "rewritten", "dropped", "errored"],
                   [[b, v["pages"], v["kept"], v["rewritten"],
                     ", ".join(f"{k} {n}" for k, n in sorted(v["dropped"].items(), key=lambda kv: -kv[1])) or "0",
                     ", ".join(f"{k} {n}" for k, n in v["errored"].items()) or "0"]
                    for b, v in (r.get("buckets") or {}).items()])
        self.table(["template", "rewrites planned", "kept", "pages rewritten", "dropped", "errored"],
                   [[t, v["planned"], v["kept"], (r.get("rewritten_per_template") or {}).get(t, 0),
                     ", ".join(f"{k} {n}" for k, n in sorted(v["dropped"].items(), key=lambda kv: -kv[1])) or "0",
                     ", ".join(f"{k} {n}" for k, n in v["errored"].items()) or "0"]
                    for t, v in (r.get("rewrites") or {}).items()])
        files, where = [], "the rephrase stage's kept rewrites"
        if self.manifest:
            files = [self.run_dir / f["path"] for s in self.manifest["splits"].values() for f in s["files"]]
            where = "the final shards"
        rows = _rephrase_pairs(files, samples) if files else []
        if not rows:
            rows = _rephrase_pairs(_files(self.stage_dir("rephrase") / "kept"), samples)
            where = "the rephrase stage's kept rewrites"
        if rows:
            self.note(f"Source and rewrite side by side (one per template, from {where}; every rewrite carries "
                      "source_id, source_url, bucket, template and prompt_id in its meta).")
            self.table(["template", "bucket", "source (page opening)", "rewrite (opening)"], rows)

    def removed_examples(self, stage: str, title: str) -> None:
        files = _files(self.stage_dir(stage) / "removed")
        s = self.stats.get(stage)
        if not s:
            return
        self.h2(title)
        extras = [[k, json.dumps(v, default=str)[:300]] for k, v in s.items()
                  if k not in ("stage", "read", "kept", "dropped", "errored", "reconciled", "audit")]
        if extras:
            self.table(["figure", "value"], extras)
        if s.get("audit"):
            self.threshold_audit(s["audit"])
        rows = []
        for f in files:
            t = pq.read_table(f, columns=[c for c in ("id", "source", "reason", "meta", "text")
                                          if c in pq.read_schema(f).names])
            for rec in t.slice(0, 5).to_pylist():
                rows.append([rec.get("id", ""), rec.get("source", ""), rec.get("reason", ""),
                             (rec.get("meta") or "")[:240], (rec.get("text") or "")[:240].replace("\n", " ")])
            if len(rows) >= 10:
                break
        if rows:
            self.table(["id", "source", "reason", "details", "text (start)"], rows)
        else:
            self.note("Nothing was removed.")

    def threshold_audit(self, audit: dict[str, Any]) -> None:
        """The removals with the lowest verified similarity and the closest pairs left apart."""
        self.note(f"Pairs nearest the verify threshold ({audit.get('verify_threshold')}): check that the removed "
                  "ones are copies and the ones left apart are not. Every removal is in pairs.parquet.")
        rows = [["removed", f"{p['similarity']:.3f}", p["removed_id"], p["kept_id"],
                 p["removed_text"][:160].replace("\n", " "), p["kept_text"][:160].replace("\n", " ")]
                for p in audit.get("lowest_removed", [])]
        rows += [["kept apart", f"{p['similarity']:.3f}", p["a_id"], p["b_id"],
                  p["a_text"][:160].replace("\n", " "), p["b_text"][:160].replace("\n", " ")]
                 for p in audit.get("highest_not_removed", [])]
        if rows:
            self.table(["decision", "similarity", "document A (removed)", "document B (kept)", "text A", "text B"],
                       rows)

    def pretraining(self) -> None:
        logs = sorted(self.stage_dir("pretrain").rglob("*.jsonl")) if self.stage_dir("pretrain").is_dir() else []
        points: list[dict[str, Any]] = []
        for f in logs:
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "step" in rec:
                    points.append(rec)
        train = [(p["step"], p["loss"]) for p in points if "loss" in p]
        val = [(p["step"], p.get("val_loss", p.get("val/loss"))) for p in points
               if p.get("val_loss", p.get("val/loss")) is not None]
        if not train and not val:
            return
        self.h2("Pretraining")
        plt = _plt()
        fig, ax = plt.subplots(figsize=(8, 3.5))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", color="#2b6cb0")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="#dd6b20")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        self.save(fig, "pretrain.png", "Pretraining loss curves")

    def render(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.summary()
        self.funnel()
        self.scores()
        self.generation()
        self.rephrasing()
        self.removed_examples("dedup", "Duplicates found")
        self.removed_examples("decontaminate", "Benchmark contamination found")
        self.pretraining()
        title = f"textbook run report: {self.run_dir.name}"
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #1a202c; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #cbd5e0; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #edf2f7; }} img {{ max-width: 100%; }} .note {{ color: #4a5568; }}
figcaption {{ font-size: 0.85em; color: #4a5568; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Run directory: {html.escape(str(self.run_dir))}</p>
{''.join(self.parts)}
</body></html>
"""
        index = self.out / "index.html"
        atomic_write_text(index, page)
        return index


def _rephrase_pairs(files: list[Path], samples: int, chars: int = 400) -> list[list[str]]:
    """Up to `samples` rewrites (source `rephrase`), one per template first, as [template, bucket, source
    (url + excerpt), rewrite]."""
    picked: dict[str, list[str]] = {}
    extra: list[list[str]] = []
    for f in files:
        names = pq.read_schema(f).names
        if "meta" not in names or "source" not in names:
            continue
        t = pq.read_table(f, columns=["text", "source", "meta"])
        t = t.filter(pc.equal(t.column("source"), "rephrase"))
        for rec in t.to_pylist():
            try:
                meta = json.loads(rec["meta"] or "{}")
            except ValueError:
                continue
            row = [str(meta.get("template")), str(meta.get("bucket")),
                   f"{meta.get('source_url') or meta.get('source_id')}: {str(meta.get('source_excerpt', ''))[:chars]}",
                   rec["text"][:chars]]
            if row[0] not in picked:
                picked[row[0]] = row
            elif len(extra) < samples:
                extra.append(row)
        if len(picked) >= samples:
            break
    return (list(picked.values()) + extra)[:samples]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `<run_dir>/report/index.html` (and its PNGs); returns the page's path."""
    run_dir = Path(run_dir)
    from pipeline.errors import TextbookError

    if not (run_dir / "stages").is_dir() and not (run_dir / "manifest.json").is_file():
        raise TextbookError(f"{run_dir}: not a run directory (no stages/ and no manifest.json)")
    return Report(run_dir, Path(out_dir) if out_dir else run_dir / "report").render()


def run_stage(ctx: Any) -> StageStats:
    stats = StageStats("report")
    index = build_report(ctx.run_dir)
    stats.set("report", str(index))
    return stats
