"""Language-ID quality of the web stage's `LanguageFilter`: precision / recall / F1 on a labelled set built from
real pages in ../shared/data, for the old behaviour (first 4,000 characters, case as written) and the current one,
side by side in one run, with ablations of the new one (each changes one design choice).

    .venv/bin/python benchmarks/bench_langid.py             # prints the tables (markdown), ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_langid.py --rebuild   # re-extract the HTML pages (cached otherwise)

The first run extracts ~1,750 HTML pages (3-11 min on 2 shared cores) into ~/.cache/textbook/bench_langid/.

The labelled set. Most labels come from something other than lid.176; FineWeb's and CCNet's come from lid.176
itself (on the whole document), so those groups measure agreement with the field's practice on clean pages:

- `fineweb_300` (en): the 300 raw FineWeb rows of web/fineweb_sample_300. Label: FineWeb's own `language` field
  (lid.176 on the whole text, score >= 0.65).
- `fineweb_human` (en): edu_labels/fineweb_edu_llama3_sample/human511_train.jsonl, English FineWeb pages that three
  human annotators each read and scored against the English FineWeb-Edu rubric.
- `ccnet_head` (en): web/dolma_cc/cc_en_head, CCNet "head" docs, label from CCNet's `language` field (fastText
  lid.176 on the whole document after CCNet's boilerplate-line dedup).
- `sqlite_docs` (en): web/sqlite_doc_html, the English SQLite documentation site (provenance), run through the
  project's extraction (`HtmlExtractor`: trafilatura, favour_precision; here with a 120 s time limit instead of
  the stage's 5 s, so a loaded machine loses no page) and the stage's default min-length filter.
- `traf_main` (de, en, es, fr, pl, ...): web/trafilatura_pages, each page run through the project's extraction and
  min-length filter. Label: the page's own `<html lang>` declaration, kept only where an independent
  function-word count on the extracted text (no fastText) names the same language; pages where the two disagree
  or either is missing are left out (counted in the output).
- `traf_wet`: the same labelled pages as all their visible text, one line per HTML block element (menus, footers,
  cookie notes included): what a WET record or an unextracted jsonl gives the filter.
- `danish_fw2` (da): edu_labels/fineweb2_danish_gemini, FineWeb-2 pages labelled dan_Latn by GlotLID (a different
  model from lid.176).
- `danish_human` (da): edu_labels/fineweb_c_danish_human, the dan_Latn pages of FineWeb-C (chosen by GlotLID for
  FineWeb-2), each read by 2-3 human annotators of the Danish subset; rows the annotators flagged as problematic
  are left out (spam, often not running text).
- `wikipedia` (xx): web/dolma_cc Common Crawl documents from `<xx>.wikipedia.org`; label = the subdomain.

Variants, each built from the real text above only:

- `en_navhead` (en): an English page (FineWeb / human-read FineWeb, 2,000+ characters) preceded by the real
  navigation of a German page: the link texts (`<a>`) of a `de`-labelled trafilatura page, one per line, in page
  order, cut at the first line end past 5,000 characters (pages with fewer link characters are not used).
- `de_enhead` (de): a German extracted main text preceded by the real navigation of an English page (link texts of
  an `en`-labelled trafilatura page, cut past 1,500 characters): an English menu head on a German page.
- `de_cookiehead` (de): a German extracted main text preceded by a real English cookie notice: the 18 distinct
  lines of the trafilatura pages' visible text that start "We use cookies", "This website uses cookies",
  "By clicking Accept Cookies" or the like (cycled through). `de_wet_cookiehead`: the same notices on top of the
  German pages' whole visible text (`traf_wet`).
- `*_upper`, `*_title`: ALL-CAPS and Title-Case copies of the English groups and of the German and Danish ones
  (case must not decide the language in either direction).

Per language L the filter is run with `languages=[L]` at the stage's default `min_score` (0.65): recall = share of
pages labelled L that are kept, precision = share of kept pages that are labelled L.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import multiprocessing as mp
import re
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_CHARS, MIN_WORDS = 200, 30  # the stage's MinLengthFilter defaults: shorter texts never reach language ID
csv.field_size_limit(1 << 30)

# Function words, for the independent check of `<html lang>` (no fastText). Short, frequent, mostly unambiguous.
FUNCTION_WORDS = {
    "en": "the and of to is that for with was are this be it by have from not which but they you were their has "
          "been would there what when will can more about into than".split(),
    "de": "der die und das nicht ist mit sich dem den ein eine auch auf für von sie zu wir ich bei nach wie "
          "oder aber wird sind noch werden einer durch über".split(),
    "da": "og det er til en af på med som for ikke den har at de jeg kan var vi om der skal også eller men fra "
          "efter havde være".split(),
    "fr": "le la les des est et une dans pour que qui pas sur avec sont au du par nous vous mais ont cette "
          "ce leur été aux".split(),
    "es": "el la los las del que y en es por para con una se al su como pero más sus fue este esta son también "
          "entre cuando".split(),
    "it": "il di che la è per con non una sono della del gli alla anche nel le più come dei ma questo delle "
          "questa hanno".split(),
    "pl": "i w na nie z się do że jest to jak dla po od przez oraz jego tak są ale być może tylko które który "
          "tym".split(),
    "pt": "o a de que e do da em um para com não uma os no se na por mais as dos como mas foi ao ele das "
          "também são".split(),
    "nl": "de het een van en in is dat op te zijn met voor niet aan er ook als bij door maar om naar dan "
          "wordt deze".split(),
}
WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
# English cookie notices: a line of a page's visible text that starts like this (see `de_cookiehead`)
COOKIE = re.compile(r"(?:We use cookies|This website uses cookies|This site uses cookies|By clicking Accept Cookies|"
                    r"By using this (?:site|website)|We and our partners use cookies)\b")
TITLE = re.compile(r"(?<![\w'’])(\w)")


def function_word_language(text: str) -> str | None:
    """The language whose function words cover the most tokens, when that is clear (else None)."""
    words = [w.lower() for w in WORD.findall(text[:50_000])]
    if len(words) < MIN_WORDS:
        return None
    counts = Counter(words)
    share = {lang: sum(counts[w] for w in set(ws)) / len(words) for lang, ws in FUNCTION_WORDS.items()}
    ranked = sorted(share.items(), key=lambda kv: -kv[1])
    (best, s1), (_, s2) = ranked[0], ranked[1]
    return best if s1 >= 0.08 and s1 >= 1.5 * s2 else None


def html_lang(html: str) -> str | None:
    m = re.search(r"<html[^>]*?\blang\s*=\s*[\"']?([A-Za-z]{2,3})\b", html[:100_000], re.I)
    return m.group(1).lower() if m else None


def title_case(text: str) -> str:
    """Every word capitalised (str.title() would also capitalise after apostrophes: "Don'T")."""
    return TITLE.sub(lambda m: m.group(1).upper(), text)


def passes_min_length(text: str) -> bool:
    return len(text.strip()) >= MIN_CHARS and len(text.split()) >= MIN_WORDS


# --------------------------------------------------------------------------- HTML extraction (cached)

BLOCKS = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "td", "th",
          "table", "section", "article", "header", "footer", "nav", "aside", "main", "form", "blockquote", "pre",
          "figure", "figcaption", "address", "option", "label", "button", "title"}


def wet_text(tree: Any) -> str:
    """All visible text, one line per block element, as a Common Crawl WET record renders a page."""
    for el in tree.iter():
        if not isinstance(el.tag, str):
            continue
        if el.tag in BLOCKS:
            el.text = "\n" + (el.text or "")
            el.tail = "\n" + (el.tail or "")
        elif el.tag == "br":
            el.tail = "\n" + (el.tail or "")
    lines = (" ".join(line.split()) for line in tree.text_content().split("\n"))
    return "\n".join(line for line in lines if line)


def _extract_chunk(args: tuple[list[tuple[str, str]], str]) -> list[dict[str, Any]]:
    """The project's extraction step on a chunk of (key, html); also the page's WET-like text and its link texts."""
    from datatrove.data import Document
    from loguru import logger
    from lxml import html as lxml_html

    from pipeline.web.fates import FORMAT_KEY
    from pipeline.web.steps import HtmlExtractor

    logger.remove()  # the extractor sandbox logs every start and stop
    items, tmp = args
    ext = HtmlExtractor(tmp, timeout=120.0)  # the stage allows 5 s; on a shared 2-core machine start-up alone can take that
    docs = [Document(text=h, id=k, metadata={FORMAT_KEY: "html"}) for k, h in items]
    main = {d.id: d.text for d in ext.run(iter(docs))}
    out = []
    for key, html in items:
        links, full = [], ""
        try:
            tree = lxml_html.fromstring(html.encode("utf-8", "replace"))
            for bad in tree.xpath("//script|//style|//noscript|//template|//svg"):
                bad.drop_tree()
            links = [" ".join(a.text_content().split()) for a in tree.iter("a")]
            full = wet_text(tree)
        except Exception:  # noqa: BLE001 - a page lxml cannot parse has no WET-like text and no links
            pass
        out.append({"key": key, "main": main.get(key, ""), "full": full, "links": [s for s in links if s]})
    return out


def extract_pages(pages: dict[str, str], cache: Path, jobs: int, rebuild: bool) -> dict[str, dict[str, Any]]:
    digest = hashlib.sha256("\n".join(sorted(pages)).encode()).hexdigest()[:12]
    path = cache / f"extracted-{digest}.jsonl.gz"
    if path.exists() and not rebuild:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return {r["key"]: r for r in map(json.loads, f)}
    keys = sorted(pages)
    chunks = [keys[i:i + 25] for i in range(0, len(keys), 25)]
    t = time.perf_counter()
    # not a multiprocessing.Pool: its daemonic workers cannot start the extractor's sandbox process
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(jobs, mp.get_context("spawn")) as pool:
        rows = [r for part in pool.map(_extract_chunk, [([(k, pages[k]) for k in c], tmp) for c in chunks])
                for r in part]
    print(f"extracted {len(rows)} pages in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {r["key"]: r for r in rows}


def read_html(path: Path) -> str:
    return decode_html(path.read_bytes())


def decode_html(raw: bytes) -> str:
    for enc in ("utf-8", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", "replace")


# --------------------------------------------------------------------------- labelled set

def build_examples(shared: Path, cache: Path, jobs: int = 2, rebuild: bool = False) -> tuple[list[dict], dict]:
    ex: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}

    def add(group: str, label: str, text: str, id_: str) -> None:
        if passes_min_length(text):
            ex.append({"group": group, "label": label, "text": text, "id": id_})

    web, edu = shared / "web", shared / "edu_labels"
    for r in json.loads((web / "fineweb_sample_300" / "fineweb_subset.json").read_text()):
        add("fineweb_300", r["language"], r["original_text"], f"fw300/{r['id']}")
    with open(edu / "fineweb_edu_llama3_sample" / "human511_train.jsonl", encoding="utf-8") as f:
        for r in map(json.loads, f):
            add("fineweb_human", "en", r["text"], f"human511/{r['id']}")
    for p in sorted((web / "dolma_cc" / "cc_en_head").glob("*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for r in map(json.loads, f):
                add("ccnet_head", r["metadata"]["language"], r["text"], f"ccnet/{r['id']}")
    for r in json.loads((edu / "fineweb2_danish_gemini" / "danish_filtered_labelled_data.json").read_text()):
        add("danish_fw2", {"dan": "da"}.get(r["language"], r["language"]), r["text"], f"fw2da/{r['id']}")
    with open(edu / "fineweb_c_danish_human" / "labels.csv", encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            if r["problematic_content_label_present"].strip().lower() != "true":
                add("danish_human", "da", r["text"], f"fwcda/{i}")
    with gzip.open(web / "dolma_cc" / "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz", "rt") as f:
        for r in map(json.loads, f):
            host = urlparse(r["metadata"]["warc_url"]).hostname or ""
            m = re.fullmatch(r"([a-z]{2})\.(?:m\.)?wikipedia\.org", host)
            if m:
                add("wikipedia", m.group(1), r["text"], f"dolma/{r['id']}")

    # HTML pages through the project's extraction
    pages: dict[str, str] = {}
    sqlite = web / "sqlite_doc_html"
    for p in sorted(sqlite.rglob("*.html")):
        pages[f"sqlite/{p.relative_to(sqlite)}"] = read_html(p)
    traf = web / "trafilatura_pages"
    evaldata = json.loads((traf / "evaldata.json").read_text())
    wanted = {meta["file"] for meta in evaldata.values()}
    in_tar: dict[str, bytes] = {}
    with tarfile.open(traf / "tests_eval_html.tar.xz") as tar:  # read in order: xz cannot seek
        for m in tar:
            name = Path(m.name).name
            if m.isfile() and name in wanted:
                fh = tar.extractfile(m)
                if fh is not None:
                    in_tar[name] = fh.read()
    traf_files: dict[str, str] = {}
    for url, meta in evaldata.items():
        if (traf / "cache" / meta["file"]).is_file():
            traf_files[url] = read_html(traf / "cache" / meta["file"])
        elif meta["file"] in in_tar:
            traf_files[url] = decode_html(in_tar[meta["file"]])
    for url, html in traf_files.items():
        pages[f"traf/{url}"] = html
    extracted = extract_pages(pages, cache, jobs, rebuild)

    for key in sorted(k for k in pages if k.startswith("sqlite/")):
        add("sqlite_docs", "en", extracted[key]["main"], key)

    agree = Counter()
    traf_labelled: dict[str, str] = {}
    for url, html in sorted(traf_files.items()):
        key = f"traf/{url}"
        declared, main = html_lang(html), extracted[key]["main"]
        counted = function_word_language(main) if main else None
        if not passes_min_length(main or ""):
            agree["too short after extraction"] += 1
        elif declared is None or counted is None:
            agree["html lang or function words missing"] += 1
        elif declared != counted:
            agree["html lang and function words disagree"] += 1
        else:
            agree["labelled"] += 1
            traf_labelled[key] = declared
            add("traf_main", declared, main, key)
            add("traf_wet", declared, extracted[key]["full"], key)
    notes["trafilatura pages"] = dict(agree)

    # variants: navigation heads (real link texts), case
    def nav_text(keys: list[str], at_least: int) -> list[str]:
        """Real navigation: a page's link texts, one per line in page order, cut at the first line boundary past
        `at_least` characters (pages with fewer link characters are not used)."""
        blocks = []
        for k in keys:
            lines, size = [], 0
            for s in extracted[k]["links"]:
                lines.append(s)
                size += len(s) + 1
                if size >= at_least:
                    blocks.append("\n".join(lines))
                    break
        return blocks

    de_pages = [k for k, lang in traf_labelled.items() if lang == "de"]
    en_pages = [k for k, lang in traf_labelled.items() if lang == "en"]
    de_navs = nav_text(de_pages, 5000)
    en_navs = nav_text(en_pages, 1500)
    en_bodies = [e for e in ex if e["group"] in ("fineweb_300", "fineweb_human") and len(e["text"]) >= 2000]
    for i, e in enumerate(en_bodies):
        nav = de_navs[i % len(de_navs)]
        ex.append({"group": "en_navhead", "label": "en", "text": nav + "\n" + e["text"], "id": e["id"]})
    de_bodies = [e for e in ex if e["group"] == "traf_main" and e["label"] == "de"]
    for i, e in enumerate(de_bodies):
        nav = en_navs[i % len(en_navs)]
        ex.append({"group": "de_enhead", "label": "de", "text": nav + "\n" + e["text"], "id": e["id"]})
    banners = sorted({line for r in extracted.values() for line in r["full"].split("\n")
                      if COOKIE.match(line) and len(line) <= 800})
    for i, e in enumerate(de_bodies):
        ex.append({"group": "de_cookiehead", "label": "de", "text": banners[i % len(banners)] + "\n" + e["text"],
                   "id": e["id"]})
    de_wet = [e for e in ex if e["group"] == "traf_wet" and e["label"] == "de"]
    for i, e in enumerate(de_wet):
        ex.append({"group": "de_wet_cookiehead", "label": "de", "text": banners[i % len(banners)] + "\n" + e["text"],
                   "id": e["id"]})
    notes["cookie notices"] = len(banners)
    notes["navigation blocks"] = {"de (>= 5,000 chars)": len(de_navs), "en (>= 1,500 chars)": len(en_navs)}

    base = [e for e in ex if e["group"] in ("fineweb_300", "fineweb_human", "sqlite_docs", "danish_fw2")
            or (e["group"] == "traf_main" and e["label"] in ("en", "de"))]
    for e in base:
        ex.append({"group": f"{e['group']}_upper", "label": e["label"], "text": e["text"].upper(), "id": e["id"]})
        ex.append({"group": f"{e['group']}_title", "label": e["label"], "text": title_case(e["text"]), "id": e["id"]})
    return ex, notes


# --------------------------------------------------------------------------- the filters compared

OLD_MAX_CHARS = 4000


def old_predict(model: Any, text: str) -> tuple[str, float]:
    """`LanguageFilter` before issue 12, verbatim: the first 4,000 characters, case as written."""
    labels, scores = model.predict(" ".join(text[:OLD_MAX_CHARS].split()), k=1)
    lang = labels[0].removeprefix("__label__") if labels else "unknown"
    return lang, float(min(scores[0], 1.0)) if len(scores) else 0.0


def make_methods(model: Any) -> dict[str, tuple[str, Any]]:
    """name -> (what it is, predict(text) -> (lang, score)). `new` is the product's filter; the others are
    ablations of it, each changing one design choice."""
    from pipeline.web.steps import LanguageFilter

    class KeepCase(LanguageFilter):
        @staticmethod
        def normalise(text: str) -> str:
            return " ".join(text.split())

    class BothCases(LanguageFilter):
        def predict(self, text: str) -> tuple[str, float]:
            if not hasattr(self, "as_written"):
                self.as_written = KeepCase(sorted(self.languages))
                self.as_written._model = self._model
            return max(super().predict(text), self.as_written.predict(text), key=lambda p: p[1])

    class WindowVote(LanguageFilter):
        def predict(self, text: str) -> tuple[str, float]:
            sample = self.lid_text(text)
            size = self.max_chars // self.windows
            chunks = [sample[i:i + size] for i in range(0, len(sample), size)] or [""]
            votes: dict[str, float] = defaultdict(float)
            for c in chunks:
                labels, scores = self.model.predict(c, k=5)
                for lab, sc in zip(labels, scores, strict=True):
                    votes[lab.removeprefix("__label__")] += float(sc) * len(c)
            lang = max(votes, key=lambda k: votes[k])
            return lang, votes[lang] / max(1, len(sample))

    def built(cls: type, **kw: Any) -> Any:
        f = cls(["en"], **kw)
        f._model = model
        return f.predict

    return {
        "old": ("before: first 4,000 chars, case as written", lambda t: old_predict(model, t)),
        "new": ("now: running-text lines, 20k chars spread head-to-tail, lower-cased", built(LanguageFilter)),
        "new, no line selection": ("ablation: every line", built(LanguageFilter, min_prose_chars=10**12)),
        "new, case kept": ("ablation: not lower-cased", built(KeepCase)),
        "new, both casings": ("ablation: as written and lower-cased, the surer", built(BothCases)),
        "new, window vote": ("ablation: 4k windows predicted apart, char-weighted mean", built(WindowVote)),
    }


class CountingModel:
    """The real model, counting the calls and characters it is given."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls, self.chars = model, 0, 0

    def predict(self, text: str, k: int = 1) -> Any:
        self.calls += 1
        self.chars += len(text)
        return self.model.predict(text, k=k)


# --------------------------------------------------------------------------- metrics and report

def prf(preds: list[tuple[str, float]], labels: list[str], lang: str, min_score: float) -> dict[str, float]:
    keep = [p[0] == lang and p[1] >= min_score for p in preds]
    pos = [lab == lang for lab in labels]
    tp = sum(k and p for k, p in zip(keep, pos, strict=True))
    fp = sum(k and not p for k, p in zip(keep, pos, strict=True))
    fn = sum(p and not k for k, p in zip(keep, pos, strict=True))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"p": prec, "r": rec, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "n": sum(pos)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rebuild", action="store_true", help="re-extract the HTML pages (else cached)")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the HTML extraction")
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--min-score", type=float, default=0.65)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from pipeline.paths import cache_dir, shared_data_dir
    from pipeline.web.steps import load_lid_model

    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is needed for this benchmark")
    t0 = time.perf_counter()
    examples, notes = build_examples(shared, cache_dir() / "bench_langid", args.jobs, args.rebuild)
    build_s = time.perf_counter() - t0
    labels = [e["label"] for e in examples]
    groups = sorted({e["group"] for e in examples}, key=lambda g: (g.split("_")[0] != "fineweb", g))

    model = CountingModel(load_lid_model())
    methods = make_methods(model)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()] or list(methods)
    preds: dict[str, list[tuple[str, float]]] = {}
    cost: dict[str, dict[str, float]] = {}
    for name in chosen:
        fn = methods[name][1]
        model.calls = model.chars = 0
        t = time.process_time()
        preds[name] = [fn(e["text"]) for e in examples]
        cpu = time.process_time() - t
        cost[name] = {"cpu_us_per_doc": 1e6 * cpu / len(examples), "chars_per_doc": model.chars / len(examples),
                      "calls_per_doc": model.calls / len(examples)}

    ms = args.min_score
    out: list[str] = []
    n_lang = Counter(labels)
    out.append(f"Labelled set: {len(examples):,} texts in {len(groups)} groups ({build_s:.0f} s to build); "
               f"labels: {', '.join(f'{k} {v:,}' for k, v in n_lang.most_common())}.")
    out.append(f"Trafilatura pages: {notes['trafilatura pages']}; cookie notices: {notes['cookie notices']}; "
               f"navigation blocks: {notes['navigation blocks']}.")
    out.append("")
    out.append(f"**English** (`languages=['en']`, min_score {ms}): positives = {n_lang['en']:,} texts labelled en.")
    out.append("")
    out.append("| filter | precision | recall | F1 | TP | FP | FN | chars to model / doc | model calls / doc "
               "| CPU µs / doc |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in chosen:
        r, c = prf(preds[name], labels, "en", ms), cost[name]
        out.append(f"| {name} ({methods[name][0]}) | {r['p']:.4f} | {r['r']:.4f} | **{r['f1']:.4f}** | {r['tp']:,} "
                   f"| {r['fp']:,} | {r['fn']:,} | {c['chars_per_doc']:,.0f} | {c['calls_per_doc']:.2f} "
                   f"| {c['cpu_us_per_doc']:,.0f} |")
    out.append("")
    langs = [lang for lang, n in n_lang.most_common() if n >= 20]
    cmp = [m for m in ("old", "new") if m in preds]
    out.append(f"**Per language** (each run with `languages=[L]`; languages with 20+ labelled texts), "
               f"{' → '.join(cmp)}:")
    out.append("")
    out.append("| language | texts | precision | recall | F1 |")
    out.append("|---|---:|---:|---:|---:|")
    for lang in langs:
        rs = [prf(preds[m], labels, lang, ms) for m in cmp]
        out.append(f"| {lang} | {n_lang[lang]:,} | " + " | ".join(
            " → ".join(f"{r[k]:.4f}" for r in rs) for k in ("p", "r", "f1")) + " |")
    out.append("")
    out.append("**Per group**: share of texts kept as their own label (recall); for non-English groups also the "
               "share wrongly kept as English.")
    out.append("")
    out.append("| group | label(s) | texts | " + " | ".join(f"{m}: kept as label" for m in chosen)
               + " | " + " | ".join(f"{m}: non-en kept as en" for m in cmp) + " |")
    out.append("|---|---|---:|" + "---:|" * (len(chosen) + len(cmp)))
    for g in groups:
        idx = [i for i, e in enumerate(examples) if e["group"] == g]
        lab = Counter(labels[i] for i in idx)
        cells = []
        for m in chosen:
            ok = sum(preds[m][i][0] == labels[i] and preds[m][i][1] >= ms for i in idx)
            cells.append(f"{ok / len(idx):.3f}")
        non_en = [i for i in idx if labels[i] != "en"]
        for m in cmp:
            bad = sum(preds[m][i][0] == "en" and preds[m][i][1] >= ms for i in non_en)
            cells.append(f"{bad}/{len(non_en)}" if non_en else "")
        lab_s = ", ".join(k for k, _ in lab.most_common(4)) + (", …" if len(lab) > 4 else "")
        out.append(f"| {g} | {lab_s} | {len(idx):,} | " + " | ".join(cells) + " |")
    print("\n".join(out))
    if args.json:
        args.json.write_text(json.dumps({
            "methods": {m: {"what": methods[m][0], "en": prf(preds[m], labels, "en", ms), "cost": cost[m],
                            "per_language": {lang: prf(preds[m], labels, lang, ms) for lang in langs}}
                        for m in chosen},
            "n": len(examples), "labels": dict(n_lang), "notes": notes}, indent=1, default=str))


if __name__ == "__main__":
    main()
