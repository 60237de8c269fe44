"""The `decontaminate` stage and its index: n-gram overlap with evaluation benchmarks.

Benchmark texts and documents are normalised the same way (`minhash.words`: Unicode forms, case, whitespace and
LaTeX markup folded, punctuation inside a token joined: `U.S.` = `US`), then every run of `ngram` (default 13)
words is hashed. Each benchmark text is indexed in up to three forms (`index_forms`): as it is, punctuation
stripped, and punctuation replaced by spaces, so both kinds of punctuation-free copy match it word for word.
A text of at least `min_words` words (in its longest form) is indexed; a form shorter than `ngram` words is
matched whole (short items: an MMLU or ARC question of 8-12 words has no 13-gram), also when stripping glued
its tokens below `min_words` (down to half of it). A document containing `min_matches` indexed n-grams is
contaminated: removed (reason `contaminated`) or, with `mode: flag`, kept with `meta.contamination`.

The index is a sorted uint64 array of n-gram hashes with the benchmark item each came from, and a small one of
the short forms matched whole (searched once per short length: cheap); hashes shared by more than
`max_items_per_ngram` items are template text (instructions, answer formats) and are left out.
`check_texts(index, texts)` is the same test for prompts and seed texts before any money is spent on them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import NoInputDocuments, ResourceUnavailable, TextbookError
from pipeline.minhash import NORMALIZATION_VERSION, batch_ngram_hashes, ngram_hashes, word_hashes, words
from pipeline.stats import StageStats

INDEX_FORMAT = "textbook-decontam-index"
_NON_WORD = re.compile(r"[^\w\s]")


def index_forms(text: str) -> list[list[str]]:
    """The word sequences a benchmark text is indexed under (distinct ones; the text's own `words` first).

    `words` joins punctuation inside a token (`U.S.` -> us, `3.14` -> 314, `don't` -> dont), so a copy with
    that punctuation deleted gives the item's own words. A copy with punctuation replaced by spaces (`U S`,
    `3 14`, `don t`) cannot give the same words as well (that would erase word boundaries), and a stripper
    also deletes the separators `words` splits on (`1/2` -> 12, `f(x)` -> fx): so the stripped and the
    punctuation-to-space copies of the text are indexed too. A document is normalised once, as always.
    """
    forms = [words(text)]
    for repl in ("", " "):
        ws = words(_NON_WORD.sub(repl, text))
        if ws not in forms:
            forms.append(ws)
    return forms


@dataclass
class Match:
    """What one text shares with the benchmarks."""

    ngrams: int  # matched n-gram positions
    benchmarks: dict[str, list[str]]  # benchmark -> item ids
    examples: dict[str, list[str]]  # benchmark -> matched n-grams (normalised words)

    def as_meta(self) -> dict[str, Any]:
        return {"matched_ngrams": self.ngrams, "benchmarks": self.benchmarks, "examples": self.examples}


@dataclass
class DecontamIndex:
    ngram: int
    min_words: int
    hashes: np.ndarray  # uint64 `ngram`-gram hashes, sorted (a hash repeats once per item it belongs to)
    refs: np.ndarray  # uint32 item number per hash
    items: list[tuple[str, str]]  # (benchmark, item id)
    short_lengths: list[int]  # lengths (< ngram) of benchmark text forms indexed whole
    info: dict[str, Any] = field(default_factory=dict)
    whole_hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # those forms, sorted
    whole_refs: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))

    # ------------------------------------------------------------------ build / save / load

    @classmethod
    def build(cls, sources: Iterable[tuple[str, str, Iterator[tuple[str, list[str]]]]], ngram: int = 13,
              min_words: int = 8, max_items_per_ngram: int = 10) -> DecontamIndex:
        """`sources`: (benchmark name, where from, items). Items are (item id, texts)."""
        from tqdm import tqdm

        hash_parts: list[np.ndarray] = []
        ref_parts: list[np.ndarray] = []
        whole_parts: list[np.ndarray] = []
        whole_ref_parts: list[np.ndarray] = []
        items: list[tuple[str, str]] = []
        short: set[int] = set()
        per_bench: dict[str, dict[str, Any]] = {}
        pending: list[np.ndarray] = []  # word hashes of texts waiting for one vectorised pass
        pending_refs: list[int] = []

        def flush() -> None:
            h, owner, _ = batch_ngram_hashes(pending, ngram)
            hash_parts.append(h)
            ref_parts.append(np.asarray(pending_refs, dtype=np.uint32)[owner])
            for wh, ref in zip(pending, pending_refs, strict=True):
                if len(wh) < ngram:  # a short text (or form of one) is matched whole
                    short.add(len(wh))
                    whole_parts.append(ngram_hashes(wh, len(wh)))
                    whole_ref_parts.append(np.full(1, ref, dtype=np.uint32))
            pending.clear()
            pending_refs.clear()

        for name, origin, it in sources:
            fig = per_bench.setdefault(name, {"source": origin, "items": 0, "texts": 0, "too_short": 0})
            for item_id, texts in tqdm(it, desc=f"index {name}", unit="item", mininterval=1.0, file=sys.stderr):
                ref = len(items)
                items.append((name, str(item_id)))
                fig["items"] += 1
                for t in texts:
                    fig["texts"] += 1
                    forms = index_forms(t)
                    if max(map(len, forms)) < min_words:
                        fig["too_short"] += 1
                        continue
                    # A form may be shorter than the text's longest one where stripping glued tokens together
                    # (`\dbinom{85}{82}` -> dbinom8582): rarer words, no less specific; tiny ones are left out.
                    for ws in (ws for ws in forms if len(ws) >= max(1, min_words // 2)):
                        pending.append(word_hashes(ws))
                        pending_refs.append(ref)
                if len(pending) >= 4096:
                    flush()
            flush()
        hashes, refs, common = _item_pairs(hash_parts, ref_parts, max_items_per_ngram)
        whole_hashes, whole_refs, whole_common = _item_pairs(whole_parts, whole_ref_parts, max_items_per_ngram)
        bench_names = list(per_bench)
        bench_of_item = np.array([bench_names.index(b) for b, _ in items], dtype=np.int32) if items else \
            np.empty(0, np.int32)
        all_refs = np.concatenate([refs, whole_refs])
        per_item_bench = bench_of_item[all_refs] if len(all_refs) else np.empty(0, np.int32)
        for k, name in enumerate(bench_names):
            per_bench[name]["ngrams"] = int((per_item_bench == k).sum())
        info = {"benchmarks": per_bench, "template_ngrams_dropped": common + whole_common,
                "ngrams": len(all_refs), "whole": len(whole_refs), "items": len(items),
                "max_items_per_ngram": max_items_per_ngram}
        return cls(ngram, min_words, hashes, refs, items, sorted(short), info, whole_hashes, whole_refs)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        tmp = d.with_name(f".{d.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "hashes.npy", self.hashes)
        np.save(tmp / "refs.npy", self.refs)
        np.save(tmp / "whole_hashes.npy", self.whole_hashes)
        np.save(tmp / "whole_refs.npy", self.whole_refs)
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for b, i in self.items:
                f.write(json.dumps([b, i]) + "\n")
        meta = {"format": INDEX_FORMAT, "normalization": NORMALIZATION_VERSION, "ngram": self.ngram,
                "min_words": self.min_words, "short_lengths": self.short_lengths, **self.info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> DecontamIndex:
        d = Path(directory)
        meta_path = d / "index.json"
        if not meta_path.is_file():
            raise TextbookError(f"{d}: not a decontamination index (no index.json); build one with "
                                "`textbook decontaminate index`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise TextbookError(f"{d}: not a decontamination index (format {meta.get('format')!r}, expected "
                                f"{INDEX_FORMAT!r}); build one with `textbook decontaminate index --out {d}`")
        if meta.get("normalization") != NORMALIZATION_VERSION:
            raise TextbookError(f"{d}: stale decontamination index: built with text normalisation "
                                f"v{meta.get('normalization')}, this version normalises with v{NORMALIZATION_VERSION} "
                                f"and would miss what the index holds; rebuild it with `textbook decontaminate index "
                                f"--out {d}` (same --benchmarks/--file/--ngram)")
        items = [tuple(json.loads(line)) for line in (d / "items.jsonl").read_text(encoding="utf-8").splitlines()]
        info = {k: v for k, v in meta.items() if k not in ("format", "normalization", "ngram", "min_words",
                                                            "short_lengths", "created")}
        return cls(meta["ngram"], meta["min_words"], np.load(d / "hashes.npy"), np.load(d / "refs.npy"),
                   items, list(meta["short_lengths"]), info,  # type: ignore[arg-type]
                   np.load(d / "whole_hashes.npy"), np.load(d / "whole_refs.npy"))

    # ------------------------------------------------------------------ matching

    def _table(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The sorted hashes (and item refs) that runs of `n` words are looked up in."""
        return (self.hashes, self.refs) if n == self.ngram else (self.whole_hashes, self.whole_refs)

    def match(self, text: str, max_examples: int = 5) -> Match | None:
        return self.match_many([text], max_examples)[0]

    def match_many(self, texts: list[str], max_examples: int = 5) -> list[Match | None]:
        """Benchmark overlap of each text; all texts are hashed together in one vectorised pass per length."""
        out: list[Match | None] = [None] * len(texts)
        if not (len(self.hashes) or len(self.whole_hashes)) or not texts:
            return out
        ws_list = [words(t) for t in texts]
        wh_list = [word_hashes(ws) for ws in ws_list]
        hits: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # text -> (length, position, hash slot)
        for n in (self.ngram, *self.short_lengths):
            table = self._table(n)[0]
            if not len(table):
                continue
            h, owner, pos = batch_ngram_hashes(wh_list, n)
            if not len(h):
                continue
            slot = np.searchsorted(table, h)
            slot[slot >= len(table)] = len(table) - 1
            hit = np.nonzero(table[slot] == h)[0]
            for i in hit.tolist():
                hits[int(owner[i])].append((n, int(pos[i]), int(slot[i])))
        for t, found in hits.items():
            benchmarks: dict[str, set[str]] = defaultdict(set)
            examples: dict[str, list[str]] = defaultdict(list)
            for n, p, slot in found:
                gram = " ".join(ws_list[t][p:p + n])
                table, table_refs = self._table(n)
                h = table[slot]
                hi = int(np.searchsorted(table, h, side="right"))
                for ref in table_refs[slot:hi].tolist():  # searchsorted gave the leftmost slot of this hash
                    bench, item = self.items[ref]
                    benchmarks[bench].add(item)
                    if len(examples[bench]) < max_examples and gram not in examples[bench]:
                        examples[bench].append(gram)
            out[t] = Match(len(found), {b: sorted(v) for b, v in sorted(benchmarks.items())}, dict(examples))
        return out


def _item_pairs(hash_parts: list[np.ndarray], ref_parts: list[np.ndarray], max_items: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """One (hash, item) pair each, sorted by hash, without hashes of more than `max_items` items (template
    text); and how many hashes those were."""
    hashes = np.concatenate(hash_parts) if hash_parts else np.empty(0, np.uint64)
    refs = np.concatenate(ref_parts) if ref_parts else np.empty(0, np.uint32)
    order = np.lexsort((refs, hashes))
    hashes, refs = hashes[order], refs[order]
    if len(hashes):
        first = np.concatenate([[True], (hashes[1:] != hashes[:-1]) | (refs[1:] != refs[:-1])])
        hashes, refs = hashes[first], refs[first]
    _, counts = np.unique(hashes, return_counts=True)
    common = counts > max_items
    keep = ~np.repeat(common, counts)
    return hashes[keep], refs[keep], int(common.sum())


def check_texts(index: DecontamIndex, texts: Iterable[str], min_matches: int = 1) -> list[Match | None]:
    """For each text (a rendered prompt, a seed passage): its benchmark overlap, or None when clean.

    The generate stage calls this before sending prompts, so no money is spent on a contaminated seed.
    """
    matches = index.match_many(list(texts))
    return [m if m is not None and m.ngrams >= min_matches else None for m in matches]


# ---------------------------------------------------------------------------------------------- building


def build_index(benchmarks: list[str], local_dir: str | None = None, files: list[Any] | None = None,
                ngram: int = 13, min_words: int = 8, max_items_per_ngram: int = 10, require_all: bool = False,
                log: Any = None) -> DecontamIndex:
    """Index the named benchmarks (local copies first, then the HF hub) and any extra files."""
    from pipeline.benchmarks_data import HubUnreachable, iter_items

    say = log or (lambda m: print(m, file=sys.stderr))
    errors: dict[str, Counter[str]] = defaultdict(Counter)
    error_samples: dict[str, list[str]] = defaultdict(list)
    unavailable: dict[str, str] = {}

    def on_error_for(name: str) -> Any:
        def on_error(reason: str, where: str) -> None:
            errors[name][reason] += 1
            if len(error_samples[name]) < 5:
                error_samples[name].append(f"{reason}: {where}")
        return on_error

    sources = []
    # One failed hub download means offline: the others are not tried (each costs ~20 s of retries).
    hub_ok = not any(os.environ.get(v) in ("1", "true", "True") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    for name in benchmarks:
        try:
            origin, it = iter_items(name, local_dir=local_dir, on_error=on_error_for(name), allow_hub=hub_ok)
        except ResourceUnavailable as e:
            if require_all:
                raise
            hub_ok = hub_ok and not isinstance(e, HubUnreachable)
            unavailable[name] = str(e)
            say(f"decontaminate: skipping {name}: {e}")
            continue
        sources.append((name, origin, it))
    for f in files or []:
        origin, it = iter_items(f.name, path=f.path, fields=list(f.fields) or None, on_error=on_error_for(f.name))
        sources.append((f.name, origin, it))
    if not sources:
        raise ResourceUnavailable("decontaminate: none of the benchmarks could be loaded ("
                                  + "; ".join(unavailable.values()) + ")")
    index = DecontamIndex.build(sources, ngram=ngram, min_words=min_words, max_items_per_ngram=max_items_per_ngram)
    for name, c in errors.items():
        index.info["benchmarks"].setdefault(name, {})["errors"] = dict(c)
        index.info["benchmarks"][name]["error_samples"] = error_samples[name]
    index.info["unavailable"] = unavailable
    return index


def index_for_section(section: Any, cache_dir: Path) -> DecontamIndex:
    """The section's prebuilt index, or one built from its benchmarks (cached by its settings)."""
    if section.index:
        index = DecontamIndex.load(section.index)
        if index.ngram != section.ngram:
            raise TextbookError(f"decontaminate.index {section.index} uses {index.ngram}-grams but "
                                f"decontaminate.ngram is {section.ngram}; rebuild the index or change ngram")
        return index
    from pipeline.config import config_hash

    key = config_hash({"benchmarks": section.benchmarks, "local_dir": section.local_dir,
                       "files": [f.model_dump() for f in section.files], "ngram": section.ngram,
                       "min_words": section.min_words, "max": section.max_items_per_ngram,
                       "norm": NORMALIZATION_VERSION})[:16]
    cached = cache_dir / f"index-{key}"
    if (cached / "index.json").is_file():
        return DecontamIndex.load(cached)
    _drop_stale_caches(cache_dir)
    index = build_index(section.benchmarks, section.local_dir, section.files, section.ngram, section.min_words,
                        section.max_items_per_ngram, section.require_all)
    index.save(cached)
    return index


def _drop_stale_caches(cache_dir: Path) -> None:
    """Remove cached indexes built with another text normalisation: none can be loaded again (their cache key
    holds the version), and saying so explains why this run builds the index afresh."""
    for d in sorted(cache_dir.glob("index-*")):
        try:
            version = json.loads((d / "index.json").read_text()).get("normalization")
        except (OSError, ValueError, AttributeError):
            continue
        if version != NORMALIZATION_VERSION:
            print(f"decontaminate: text normalisation changed (v{version} -> v{NORMALIZATION_VERSION}): removing the "
                  f"stale cached index {d} and building a new one", file=sys.stderr)
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the stage


class _Router:
    """Routes checked documents (kept, flagged or removed as contaminated) and counts what matched."""

    def __init__(self, index: DecontamIndex, section: Any, stats: StageStats, kept: Any, removed: Any) -> None:
        self.index, self.section, self.stats, self.kept, self.removed = index, section, stats, kept, removed
        self.per_bench_docs: Counter[str] = Counter()
        self.per_bench_ngrams: dict[str, Counter[str]] = defaultdict(Counter)
        self.flagged = 0

    def route(self, batch: list[dict[str, Any]]) -> None:
        section, stats = self.section, self.stats
        for doc, m in zip(batch, self.index.match_many([d["text"] for d in batch]), strict=True):
            if m is None or m.ngrams < section.min_matches:
                self.kept.write(doc)
                stats.keep()
                continue
            for bench, grams in m.examples.items():
                self.per_bench_docs[bench] += 1
                self.per_bench_ngrams[bench].update(grams)
                if len(self.per_bench_ngrams[bench]) > 5000:  # bounded: keep the most frequent
                    self.per_bench_ngrams[bench] = Counter(dict(self.per_bench_ngrams[bench].most_common(1000)))
            meta = {**(doc.get("meta") or {}), "contamination": m.as_meta()}
            if section.mode == "flag":
                self.kept.write({**doc, "meta": meta})
                stats.keep()
                self.flagged += 1
            else:
                self.removed.write({**doc, "meta": meta}, "contaminated")
                stats.drop("contaminated")

    def check(self, docs: Iterable[dict[str, Any]]) -> None:
        """Read, drop empty texts, and route in batches bounded by count and characters."""
        batch: list[dict[str, Any]] = []
        batch_chars = 0
        for doc in docs:
            self.stats.read()
            if not doc["text"].strip():
                self.removed.write(doc, "empty_text")
                self.stats.drop("empty_text")
                continue
            batch.append(doc)
            batch_chars += len(doc["text"])
            # bounded by characters too: a batch's n-gram arrays grow with its total text
            if len(batch) >= 256 or batch_chars > 4_000_000:
                self.route(batch)
                batch, batch_chars = [], 0
        if batch:
            self.route(batch)


def run_stage(ctx: Any) -> StageStats:
    """The stage: one pass in this process, or (run.executor ray) one Ray task per input file with the index
    in the object store (`_check_file`); the same kept/removed documents and stats either way."""
    from tqdm import tqdm

    from pipeline.documents import STREAM_ROWS_PER_FILE, DocumentWriter, RemovedWriters, iter_documents
    from pipeline.scale import engine_for

    section = ctx.section
    stats = StageStats(ctx.name)
    if not ctx.inputs:
        raise NoInputDocuments("decontaminate: no input documents (the upstream stages kept nothing, or "
                               "decontaminate.inputs is empty)")
    index = index_for_section(section, ctx.state_dir)
    engine = engine_for(ctx.cfg)
    if engine.distributed:
        return _run_tasks(ctx, engine, index, stats)

    def unreadable(reason: str, where: str) -> None:
        stats.read()
        stats.error_at(reason, where)

    removed = RemovedWriters(ctx.removed_dir, rows_per_file=STREAM_ROWS_PER_FILE)
    with DocumentWriter(ctx.kept_dir, rows_per_file=STREAM_ROWS_PER_FILE) as kept:
        router = _Router(index, section, stats, kept, removed)
        docs = iter_documents(ctx.inputs, on_error=unreadable, on_repair=stats.on_repair)
        router.check(tqdm(docs, desc="decontaminate", unit="doc", mininterval=1.0, file=sys.stderr))
    removed.close()
    _set_stats(stats, section, index, router.flagged, router.per_bench_docs, router.per_bench_ngrams)
    return stats


def _set_stats(stats: StageStats, section: Any, index: DecontamIndex, flagged: int, per_bench_docs: Counter[str],
               per_bench_ngrams: dict[str, Counter[str]]) -> None:
    stats.set("mode", section.mode)
    stats.set("flagged", flagged)
    stats.set("ngram", index.ngram)
    stats.set("index", index.info)
    stats.set("benchmarks_unavailable", index.info.get("unavailable", {}))
    stats.set("matched", {b: {"documents": per_bench_docs[b],
                              "top_ngrams": per_bench_ngrams[b].most_common(section.report_ngrams)}
                          for b in sorted(per_bench_docs)})


def _run_tasks(ctx: Any, engine: Any, index: DecontamIndex, stats: StageStats) -> StageStats:
    """One task per input file; the index is put in Ray's object store once and shared by the tasks of a node.

    Parts are merged in input order, so the counts and the kept/ stream equal one pass. The matched n-gram
    tallies are summed over files; one pass prunes a benchmark's tally to its 1,000 most frequent n-grams when
    it passes 5,000 distinct ones, so past that size the listed top n-grams may differ (the counts do not).
    """
    ref = engine.put(index)
    items = [(k, str(f), ref, ctx.section, str(ctx.kept_dir), str(ctx.removed_dir)) for k, f in enumerate(ctx.inputs)]
    per_bench_docs: Counter[str] = Counter()
    per_bench_ngrams: dict[str, Counter[str]] = defaultdict(Counter)
    flagged = 0
    for part in engine.map(_check_file, items, label="decontaminate"):
        stats.merge(part["counts"])
        flagged += part["flagged"]
        per_bench_docs.update(part["docs"])
        for b, c in part["ngrams"].items():
            per_bench_ngrams[b].update(c)
    _set_stats(stats, ctx.section, index, flagged, per_bench_docs, per_bench_ngrams)
    stats.set("engine", {**engine.describe(), "tasks": len(items)})
    return stats


def _check_file(k: int, path: str, index: Any, section: Any, kept_dir: str, removed_dir: str) -> dict[str, Any]:
    """Task: check one input file; kept/part-<k>-*.parquet and removed/<reason>-<k>-*.parquet (a retry rewrites
    the same names)."""
    from pipeline.documents import STREAM_ROWS_PER_FILE, DocumentWriter, RemovedWriters, iter_documents

    if not isinstance(index, DecontamIndex):  # an ObjectRef when called in-process with a Ray engine
        import ray

        index = ray.get(index)
    stats = StageStats("decontaminate")

    def unreadable(reason: str, where: str) -> None:
        stats.read()
        stats.error_at(reason, where)

    removed = RemovedWriters(removed_dir, rows_per_file=STREAM_ROWS_PER_FILE, tag=f"{k:06d}")
    with DocumentWriter(kept_dir, prefix=f"part-{k:06d}", rows_per_file=STREAM_ROWS_PER_FILE) as kept:
        router = _Router(index, section, stats, kept, removed)
        router.check(iter_documents([path], on_error=unreadable, on_repair=stats.on_repair))
    removed.close()
    return {"counts": stats.counts(), "flagged": router.flagged, "docs": dict(router.per_bench_docs),
            "ngrams": {b: dict(c) for b, c in router.per_bench_ngrams.items()}}
