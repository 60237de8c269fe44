"""Reader fuzzing: small clean files cut from the real shared data in every input format, seeded corruptions,
and the oracle that says which records a corruption left untouched. Those must still be read, with the same text.

Used by tests/test_reader_fuzz.py (the seeded CI sweep) and benchmarks/bench_reader_fuzz.py (a bigger sweep
with a format x corruption table). The readers under test:

* `web`  - `pipeline.web.readers.WebReader` (read = kept + dropped + errored, from its read/ and ledger/ files);
* `docs` - `pipeline.documents.iter_documents` (read = yielded + `on_error` calls).

Each reader call runs in a child process (`ReaderWorker`) with a per-call deadline, so a hang or a hard crash
(segfault, out of memory) is a failed case and never stalls the run. A case is fully described by
(seed, fixture, index): `make_case` rebuilds it byte for byte.

Corruption kinds (each fixture draws from those that apply to it): `truncate`, `flip` (1-8 bytes changed in a
row), `multi_flip` (2-5 single bytes far apart), `insert` (random, printable or structural garbage: newlines,
quotes, braces, gzip/zstd magic, `WARC/1.0`, a copy of other bytes of the file), `zeros` (a run of 64-4,096 NUL bytes), `crlf` (every LF
written as CRLF; touches nothing), `bom`, `surrogate` (a JSON
escape such as `\ud83d` inside a text value), `content_length` (WARC: shorter, longer, zero, huge, missing,
not a number), `gz_member` / `zst_frame` (one member's header, body or checksum broken, or its tail cut). On
compressed files `truncate`, `flip`, `multi_flip` and `insert` hit the compressed bytes; `...@plain` does the
same to the decompressed bytes and recompresses (same member boundaries).

When is a record untouched (the semantics the per-record resilient readers implement)?

* lines (jsonl): a record is a line including its newline. A byte range touches the lines it overlaps; an
  insertion touches the line it falls in and the line before it (adjacent); a truncation touches the line cut
  and removes the rest.
* JSON array: element level, same rules; the element's span runs to the next element (the opening `[` belongs
  to the first element, the closing `]` to the last).
* WARC: record level (header + block + the trailing CRLF CRLF), same rules. A wrong Content-Length touches
  only its record, which must still be read: whole, or flagged with an error.
* gzip members / zstd frames: a corruption of the compressed bytes of member k touches every record with a
  byte in member k (so in a one-member file, all of them); corruptions of the decompressed text
  (`flip@plain`, ...) are recompressed and follow the rules of the text.
* parquet: a corruption inside row group k touches its rows; an insertion also shifts the row groups after
  it; a corruption of the header, the footer, or a truncation may make the whole file unreadable (then an
  error must name the file).
* HTML: one file, one record.
* a UTF-8 BOM at the start touches nothing. A lone surrogate escape touches its record only, which must still
  be read (yielded with U+FFFD in place of the escape, or errored alone).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_PAGE_BYTES = 5_000_000


# ------------------------------------------------------------------------------------------------------------
# Clean files
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rec:
    start: int  # span in the plain (decompressed) bytes; for parquet rows: the row index, end = start + 1
    end: int
    text: str | None  # what a reader must yield for it; None: read but not a document (or text not compared)
    key: str | None = None  # WARC-Record-ID (the WebReader's document id)
    doc: bool = True  # counts as a read record (False: warcinfo / request / metadata WARC records)
    body: tuple[int, int] | None = None  # the JSON object's own bytes (lines: without the newline)


@dataclass(frozen=True)
class Segment:
    raw: tuple[int, int]  # gzip member / zstd frame / parquet row group, in file bytes
    plain: tuple[int, int] | None = None  # the decompressed bytes it holds (gzip, zstd)
    rows: tuple[int, int] | None = None  # parquet: rows [a, b)


@dataclass
class Clean:
    name: str  # entry:format, e.g. web:jsonl.gz-multi
    entry: str  # web | docs
    kind: str  # the WebReader unit kind: warc | jsonl | json | parquet | html
    filename: str
    structure: str  # lines | array | warc | rows | file
    container: str  # plain | gz | zst | parquet
    data: bytes  # the file
    plain: bytes  # its decompressed content (== data for plain files; b"" for parquet)
    recs: list[Rec]
    segments: list[Segment] = field(default_factory=list)
    text_key: str = "text"
    zst_checksum: bool = False
    kinds: dict[str, float] = field(default_factory=dict)  # corruption kind -> weight

    @property
    def docs(self) -> list[int]:
        return [i for i, r in enumerate(self.recs) if r.doc]


def gz_members(data: bytes) -> list[tuple[int, int]]:
    """Raw byte ranges of the gzip members of a clean file."""
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        end = len(data) - len(d.unused_data)
        out.append((pos, end))
        pos = end
    return out


def _zstd():
    import zstandard

    return zstandard


def compress_segments(chunks: list[bytes], container: str, zst_checksum: bool = False) -> tuple[bytes, list[Segment]]:
    """One gzip member / zstd frame per chunk (empty chunks are skipped)."""
    out = bytearray()
    segs: list[Segment] = []
    plain_pos = 0
    for chunk in chunks:
        if not chunk:
            continue
        if container == "gz":
            comp = gzip.compress(chunk, compresslevel=6, mtime=0)
        else:
            comp = _zstd().ZstdCompressor(level=3, write_checksum=zst_checksum).compress(chunk)
        segs.append(Segment(raw=(len(out), len(out) + len(comp)), plain=(plain_pos, plain_pos + len(chunk))))
        out += comp
        plain_pos += len(chunk)
    return bytes(out), segs


def line_recs(plain: bytes, text_key: str) -> list[Rec]:
    """One record per non-blank line (span includes its newline); the oracle strips a leading BOM."""
    recs, pos = [], 0
    while pos < len(plain):
        nl = plain.find(b"\n", pos)
        end = len(plain) if nl < 0 else nl + 1
        raw = plain[pos:end]
        body_end = end - (1 if raw.endswith(b"\n") else 0)
        if raw.strip():
            start = pos + (3 if pos == 0 and raw.startswith(BOM) else 0)
            rec = json.loads(plain[start:body_end])
            recs.append(Rec(pos, end, rec[text_key], body=(start, body_end)))
        pos = end
    return recs


def _array_bytes(items: list[dict], text_key: str = "original_text") -> tuple[bytes, list[Rec], str]:
    """A pretty-printed JSON array (like fineweb_subset.json) and its element spans."""
    out = bytearray(b"[\n")
    bodies = []
    for i, it in enumerate(items):
        body = json.dumps(it, indent=2, ensure_ascii=False).replace("\n", "\n  ").encode()
        out += b"  "
        bodies.append((len(out), len(out) + len(body)))
        out += body
        out += b",\n" if i < len(items) - 1 else b"\n"
    out += b"]\n"
    starts = [0] + [b[0] for b in bodies[1:]]
    ends = starts[1:] + [len(out)]
    recs = [Rec(s, e, it[text_key], body=b) for s, e, it, b in zip(starts, ends, items, bodies, strict=True)]
    return bytes(out), recs, text_key


def warc_spans_by_length(plain: bytes) -> list[tuple[int, int]]:
    """Record spans of a clean WARC by its Content-Lengths (checked: each block is followed by CRLF CRLF)."""
    spans, pos = [], 0
    while pos < len(plain):
        hend = plain.index(b"\r\n\r\n", pos) + 4
        m = re.search(rb"(?im)^content-length:[ \t]*(\d+)", plain[pos:hend])
        end = hend + int(m.group(1))
        if plain[end:end + 4] != b"\r\n\r\n":
            raise ValueError(f"WARC record at {pos}: Content-Length does not end at CRLF CRLF")
        spans.append((pos, end + 4))
        pos = end + 4
    return spans


def warc_spans_by_header(plain: bytes) -> list[tuple[int, int]]:
    """Record spans by the `WARC/1.x` line that starts each record (for files whose lengths may be wrong)."""
    starts = [0] + [m.start() + 4 for m in re.finditer(rb"\r\n\r\nWARC/1\.[01]\r\n", plain)]
    return list(zip(starts, starts[1:] + [len(plain)], strict=True))


def warc_record_rec(raw: bytes, start: int, end: int) -> Rec:
    """What the reader must make of one record (its rules: response/conversion/resource records are read;
    2xx, HTML or text, non-empty ones are documents whose text is the decoded payload)."""
    from warcio.archiveiterator import ArchiveIterator

    it = ArchiveIterator(io.BytesIO(raw), arc2warc=True)
    record = next(iter(it))
    h = record.rec_headers
    uri = h.get_header("WARC-Target-URI") or ""
    key = h.get_header("WARC-Record-ID")
    if record.rec_type not in ("response", "conversion", "resource") or uri.startswith("metadata:"):
        return Rec(start, end, None, key, doc=False)
    mime = h.get_header("WARC-Identified-Payload-Type")
    http = record.http_headers
    if http is not None:
        status = http.get_statuscode()
        if status and not str(status).startswith("2"):
            return Rec(start, end, None, key)
        mime = mime or http.get_header("Content-Type")
    mime = (mime or h.get_header("Content-Type") or "").lower()
    data = _payload(record, raw)
    is_text = record.rec_type == "conversion" or mime.startswith("text/plain")
    html = mime.startswith(("text/html", "application/xhtml+xml"))
    if not data.strip() or not (is_text or html):
        return Rec(start, end, None, key)
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return Rec(start, end, text, key)


def _payload(record: Any, raw: bytes) -> bytes:
    """The decoded HTTP payload. warcio decodes chunked / gzip / deflate / br, but its brotli path needs a
    `brotli` module API some versions lack; then the body is decoded here."""
    try:
        return record.content_stream().read()
    except AttributeError:
        import brotli
        from warcio.archiveiterator import ArchiveIterator

        rec = next(iter(ArchiveIterator(io.BytesIO(raw), arc2warc=True)))
        return brotli.decompress(rec.raw_stream.read())


def warc_recs(plain: bytes, spans: list[tuple[int, int]]) -> list[Rec]:
    return [warc_record_rec(plain[s:e], s, e) for s, e in spans]


# --- kinds of corruption per fixture -----------------------------------------------------------------------
def _kinds(structure: str, container: str, one_segment: bool) -> dict[str, float]:
    if container == "parquet":
        return {"truncate": 0.5, "flip": 2.0, "insert": 1.0, "multi_flip": 0.7, "zeros": 0.5}
    k: dict[str, float] = {"truncate": 1.0, "flip": 1.5, "insert": 1.5, "bom": 0.5, "multi_flip": 0.7, "zeros": 0.5}
    if structure in ("lines", "array"):
        k["surrogate"] = 1.0
        k["crlf"] = 0.3
    if structure == "warc":
        k["content_length"] = 1.5
    if container in ("gz", "zst"):
        raw = 0.3 if one_segment else 1.0  # in a one-member file a raw corruption touches every record
        k.update({"truncate": raw, "flip": raw, "insert": raw, "multi_flip": 0.7 * raw,
                  "truncate@plain": 0.5 if one_segment else 0.3,
                  "flip@plain": 1.0, "insert@plain": 1.0})
        k["gz_member" if container == "gz" else "zst_frame"] = 1.2 * raw
    return k


def _clean(name: str, kind: str, filename: str, structure: str, container: str, data: bytes, plain: bytes,
           recs: list[Rec], segments: list[Segment] | None = None, **kw: Any) -> Clean:
    segments = segments or []
    c = Clean(name=name, entry=name.split(":")[0], kind=kind, filename=filename, structure=structure,
              container=container, data=data, plain=plain, recs=recs, segments=segments, **kw)
    c.kinds = _kinds(structure, container, len(segments) <= 1)
    return c


# Every fixture the sweeps run, with how many corruptions the CI test gives it (the test's total is >= 2,000).
FIXTURES: dict[str, int] = {
    "web:jsonl": 120, "web:jsonl-openstax": 100, "web:jsonl.gz-1member": 90, "web:jsonl.gz-multi": 130,
    "web:jsonl.gz-bgzf": 100, "web:json.gz-real": 60, "web:jsonl.zst-1frame": 80, "web:jsonl.zst-multi": 120,
    "web:json-array": 120, "web:parquet": 120, "web:warc": 130, "web:warc.gz-per-record": 130,
    "web:warc.gz-1member": 90, "web:warc.gz-whirlwind": 50, "web:wet.gz-whirlwind": 40, "web:html": 40,
    "docs:jsonl": 100, "docs:jsonl-openstax": 80, "docs:jsonl.gz-1member": 60, "docs:jsonl.gz-multi": 110,
    "docs:jsonl.gz-bgzf": 80, "docs:json.gz-real": 40, "docs:jsonl.zst-1frame": 50, "docs:jsonl.zst-multi": 100,
    "docs:parquet": 100,
}


def _dolma_lines(shared: Path, n: int = 30) -> list[bytes]:
    """n real Common Crawl lines (Dolma) with distinct texts of 300-4,000 characters."""
    raw = gzip.decompress((shared / "web/dolma_cc/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz").read_bytes())
    out, seen = [], set()
    for line in raw.splitlines(keepends=True):
        text = json.loads(line)["text"]
        if 300 <= len(text) <= 4000 and text.strip() and text not in seen:
            seen.add(text)
            out.append(line)
            if len(out) == n:
                break
    return out


def build_corpus(shared: Path) -> dict[str, Clean]:
    """All fixtures (deterministic: same bytes on every call)."""
    web = shared / "web"
    fx: dict[str, Clean] = {}

    def both(fmt: str, **kw: Any) -> None:
        for entry in ("web", "docs"):
            if f"{entry}:{fmt}" in FIXTURES:
                fx[f"{entry}:{fmt}"] = _clean(f"{entry}:{fmt}", **kw)

    # --- jsonl, plain: real files, real bytes
    p = (web / "dolma_cc/cc_en_head/cc_en_head-0091.jsonl").read_bytes()
    both("jsonl", kind="jsonl", filename="cc_en_head.jsonl", structure="lines", container="plain", data=p,
         plain=p, recs=line_recs(p, "text"))
    lines = (shared / "textbooks/openstax_intro_python/modules_plaintext.jsonl").read_bytes().splitlines(True)[1:26]
    p = b"".join(lines)
    both("jsonl-openstax", kind="jsonl", filename="openstax.jsonl", structure="lines", container="plain",
         data=p, plain=p, recs=line_recs(p, "text"))

    # --- compressed jsonl: 30 real Common Crawl documents, as one member / frame and as several
    dl = _dolma_lines(shared)
    plain = b"".join(dl)
    recs = line_recs(plain, "text")
    sizes = [3, 4, 5, 2, 4, 3, 5, 4]
    groups, i, k = [], 0, 0
    while i < len(dl):
        groups.append(b"".join(dl[i:i + sizes[k % len(sizes)]]))
        i += sizes[k % len(sizes)]
        k += 1
    for fmt, chunks, container, ck in (
        ("jsonl.gz-1member", [plain], "gz", False),
        ("jsonl.gz-multi", groups, "gz", False),
        # bgzip-like: members cut every ~2 KB regardless of lines, so records span members
        ("jsonl.gz-bgzf", [plain[j:j + 2048] for j in range(0, len(plain), 2048)], "gz", False),
        ("jsonl.zst-1frame", [plain], "zst", False),
        ("jsonl.zst-multi", groups, "zst", True),
    ):
        data, segs = compress_segments(chunks, container, ck)
        suffix = ".jsonl.gz" if container == "gz" else ".jsonl.zst"
        both(fmt, kind="jsonl", filename="dolma_cc" + suffix, structure="lines", container=container, data=data,
             plain=plain, recs=recs, segments=segs, zst_checksum=ck)

    # --- the real .json.gz (jsonl in one gzip member)
    data = (web / "dolma_cc/provided_documents_000.json.gz").read_bytes()
    plain = gzip.decompress(data)
    segs = [Segment(raw=r, plain=(0, len(plain))) for r in gz_members(data)]
    both("json.gz-real", kind="jsonl", filename="provided_documents_000.json.gz", structure="lines",
         container="gz", data=data, plain=plain, recs=line_recs(plain, "text"), segments=segs)

    # --- JSON array: 20 real FineWeb rows
    items = json.loads((web / "fineweb_sample_300/fineweb_subset.json").read_bytes())[:20]
    data, recs, key = _array_bytes(items)
    both("json-array", kind="json", filename="fineweb_subset.json", structure="array", container="plain",
         data=data, plain=data, recs=recs, text_key=key)

    # --- parquet: the 30 Common Crawl documents, row groups of 5
    fx.update({n: c for n, c in _parquet_fixtures(dl).items() if n in FIXTURES})

    # --- WARC: real Common Crawl records (wget crawl): warcinfo, 6 request/response pairs, wget's records
    src = (web / "dolma_cc/warc/sample-0000.warc.gz").read_bytes()
    members = gz_members(src)
    dec = [zlib.decompress(src[a:b], 31) for a, b in members]
    pick = [0]
    for j in range(1, len(dec) - 1):
        if len(pick) >= 13:
            break
        if b"WARC-Type: request" in dec[j][:200] and len(dec[j + 1]) < 16_000:
            pick += [j, j + 1]
    pick += [len(dec) - 3, len(dec) - 2, len(dec) - 1]
    plain = b"".join(dec[j] for j in pick)
    spans = warc_spans_by_length(plain)
    if len(spans) != len(pick):
        raise ValueError("sample-0000.warc.gz: not one record per gzip member")
    recs = warc_recs(plain, spans)
    fx["web:warc"] = _clean("web:warc", "warc", "sample.warc", "warc", "plain", plain, plain, recs)
    data = b"".join(src[members[j][0]:members[j][1]] for j in pick)  # the real member bytes
    segs, rp = [], 0
    for j, (s, e) in zip(pick, spans, strict=True):
        n = members[j][1] - members[j][0]
        segs.append(Segment(raw=(rp, rp + n), plain=(s, e)))
        rp += n
    fx["web:warc.gz-per-record"] = _clean("web:warc.gz-per-record", "warc", "sample.warc.gz", "warc", "gz", data,
                                         plain, recs, segs)
    data, segs = compress_segments([plain], "gz")
    fx["web:warc.gz-1member"] = _clean("web:warc.gz-1member", "warc", "sample1.warc.gz", "warc", "gz", data,
                                      plain, recs, segs)
    for name, fname in (("web:warc.gz-whirlwind", "whirlwind.warc.gz"), ("web:wet.gz-whirlwind",
                                                                         "whirlwind.warc.wet.gz")):
        data = (web / "cc_whirlwind" / fname).read_bytes()
        ms = gz_members(data)
        dec = [zlib.decompress(data[a:b], 31) for a, b in ms]
        plain = b"".join(dec)
        spans = warc_spans_by_length(plain)
        segs = [Segment(raw=m, plain=s) for m, s in zip(ms, spans, strict=True)]
        fx[name] = _clean(name, "warc", fname.replace(".warc.wet.gz", ".wet.gz"), "warc", "gz", data, plain,
                          warc_recs(plain, spans), segs)

    # --- HTML: one real page of the SQLite documentation, one record
    data = (web / "sqlite_doc_html/lang_detach.html").read_bytes()
    fx["web:html"] = _clean("web:html", "html", "lang_detach.html", "file", "plain", data, data,
                            [Rec(0, len(data), data.decode("utf-8"))])
    missing = set(FIXTURES) - set(fx)
    if missing:
        raise AssertionError(f"fixtures not built: {sorted(missing)}")
    return fx


def _parquet_fixtures(lines: list[bytes]) -> dict[str, Clean]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for line in lines:
        r = json.loads(line)
        rows.append({"id": r["id"], "text": r["text"], "source": r.get("source"),
                     "url": (r.get("metadata") or {}).get("url")})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, compression="zstd", row_group_size=5)
    data = buf.getvalue()
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    segs, row = [], 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        lo, hi = len(data), 0
        for c in range(rg.num_columns):
            col = rg.column(c)
            start = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else \
                col.data_page_offset
            lo, hi = min(lo, start), max(hi, start + col.total_compressed_size)
        segs.append(Segment(raw=(lo, hi), rows=(row, row + rg.num_rows)))
        row += rg.num_rows
    recs = [Rec(i, i + 1, r["text"]) for i, r in enumerate(rows)]
    return {f"{e}:parquet": _clean(f"{e}:parquet", "parquet", "dolma_cc.parquet", "rows", "parquet", data, b"",
                                   recs, segs) for e in ("web", "docs")}


# ------------------------------------------------------------------------------------------------------------
# Corruptions
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    fixture: str
    seed: int
    index: int
    kind: str
    desc: str
    data: bytes
    touched: set[int]  # records the corruption touched: no requirement on them ...
    must_read: set[int] = field(default_factory=set)  # ... except these, which must still be counted as read
    whole: bool = False  # the file may be unreadable as a whole (an error must then name it)
    expect_text: dict[int, str] = field(default_factory=dict)  # touched records: if yielded, with this text
    flagged_or_whole: set[int] = field(default_factory=set)  # yielded whole, or an error is recorded

    @property
    def repro(self) -> str:
        return f"seed={self.seed} fixture={self.fixture} case={self.index} kind={self.kind}: {self.desc}"


def hit(spans: list[tuple[int, int]], a: int, b: int) -> set[int]:
    """Indices of spans a corruption of bytes [a, b) touches; b == a is an insertion at a, which touches the
    span it falls in and the one before it (adjacent)."""
    if b > a:
        return {i for i, (s, e) in enumerate(spans) if s < b and e > a}
    return {i for i, (s, e) in enumerate(spans) if s <= a < e or s <= a - 1 < e}


def cut(spans: list[tuple[int, int]], p: int) -> set[int]:
    """A truncation at p touches the span it cuts and removes the ones after it."""
    return {i for i, (s, e) in enumerate(spans) if e > p}


def _rec_spans(c: Clean) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in c.recs]


def _recs_in_segments(c: Clean, segs: set[int]) -> set[int]:
    out: set[int] = set()
    for k in segs:
        seg = c.segments[k]
        lo, hi = seg.rows if seg.rows is not None else seg.plain
        out |= {i for i, r in enumerate(c.recs) if r.start < hi and r.end > lo}
    return out


def edit_plain(c: Clean, a: int, b: int, new: bytes) -> bytes:
    """The file whose decompressed content is plain[:a] + new + plain[b:], with the same member / frame
    boundaries (shifted); only the members whose content changed are recompressed."""
    plain = c.plain[:a] + new + c.plain[b:]
    if c.container == "plain":
        return plain
    delta = len(new) - (b - a)

    def move(x: int) -> int:
        if x <= a:
            return x
        if x >= b:
            return x + delta
        return a + len(new)

    out = bytearray()
    for seg in c.segments:
        s, e = seg.plain
        ns = 0 if s == 0 else move(s)
        ne = len(plain) if e == len(c.plain) else move(e)
        chunk = plain[ns:ne]
        if chunk == c.plain[s:e]:
            out += c.data[seg.raw[0]:seg.raw[1]]
        elif chunk:
            out += compress_segments([chunk], c.container, c.zst_checksum)[0]
    return bytes(out)


_STRUCTURAL = [b"\n", b"\r\n", b'"', b"{", b"}", b"[", b"]", b",", b"\\", b"\x00", b"\xff\xfe", b"\xc3", b"\xed\xa0\xbd",
               b"\xf0\x9f", GZIP_MAGIC + b"\x00", ZSTD_MAGIC, b"WARC/1.0\r\n", b"\r\n\r\n", b"PAR1",
               b"Content-Length: 99999\r\n", b'"}\n{"text": "x', BOM]


def _garbage(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    r = rng.random()
    if r < 0.3:
        g = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        return g, f"{len(g)} random bytes"
    if r < 0.45:
        g = bytes(rng.randrange(32, 127) for _ in range(rng.randint(1, 32)))
        return g, f"{len(g)} printable bytes {g[:40]!r}"
    if r < 0.85:
        g = rng.choice(_STRUCTURAL)
        return g, f"{g!r}"
    n = rng.randint(8, 200)
    s = rng.randrange(max(1, len(data) - n))
    return data[s:s + n], f"a copy of bytes {s}..{s + n} of the file"


def _pos(rng: random.Random, c: Clean, n: int, level: str) -> int:
    """A byte position in [0, n): half of the time near a record / member boundary, where parsers resync."""
    if rng.random() < 0.5:
        if level == "plain" and c.recs and c.container != "parquet":
            anchors = [r.start for r in c.recs] + [r.end for r in c.recs]
        elif c.segments:
            anchors = [s.raw[0] for s in c.segments] + [s.raw[1] for s in c.segments]
        else:
            anchors = [0, n]
        return max(0, min(n - 1, rng.choice(anchors) + rng.randint(-40, 40)))
    return rng.randrange(max(1, n))


def _flip(rng: random.Random, data: bytes, p: int) -> tuple[bytes, int, str]:
    n = 1 if rng.random() < 0.6 else rng.randint(2, 8)
    n = max(1, min(n, len(data) - p))
    out = bytearray(data)
    for i in range(p, p + n):
        if rng.random() < 0.2:
            out[i] = rng.choice(b'\n"{}\\\x00\r')
        else:
            out[i] ^= rng.randint(1, 255)
    if bytes(out) == data:  # a structural byte equal to the one it replaced
        out[p] ^= 0x20
    return bytes(out), n, f"{n} byte(s) changed at {p}: {data[p:p + n]!r} -> {bytes(out[p:p + n])!r}"


_SURROGATES = [("\\ud83d", 1), ("\\uD83D", 1), ("\\ude00", 1), ("\\udc80", 1), ("\\ude00\\ud83d", 2),
               ("\\ud800\\ud800", 2)]
_MARK = "QZXSURROGATEQZX"


def _surrogate(c: Clean, rng: random.Random) -> tuple[bytes, int, str, str]:
    i = rng.randrange(len(c.recs))
    rec = c.recs[i]
    bs, be = rec.body
    obj = json.loads(c.plain[bs:be].decode("utf-8").lstrip("\ufeff"))
    text = obj[c.text_key]
    r = rng.random()
    k = len(text) if r < 0.3 else 0 if r < 0.4 else rng.randrange(len(text) + 1)
    esc, n = rng.choice(_SURROGATES)
    obj[c.text_key] = text[:k] + _MARK + text[k:]
    s = json.dumps(obj, ensure_ascii=rng.random() < 0.3)
    if c.structure == "array":
        s = json.dumps(obj, indent=2, ensure_ascii=False)
    assert s.count(_MARK) == 1
    new = s.replace(_MARK, esc).encode("utf-8")
    data = edit_plain(c, bs, be, new)
    return data, i, text[:k] + "\ufffd" * n + text[k:], f"record {i}: {esc} at char {k} of {len(text)}"


def _content_length(c: Clean, rng: random.Random) -> tuple[bytes, int, str]:
    docs = c.docs
    i = rng.choice(docs) if docs and rng.random() < 0.7 else rng.randrange(len(c.recs))
    rec = c.recs[i]
    head_end = c.plain.index(b"\r\n\r\n", rec.start) + 4
    m = re.search(rb"(?im)^content-length:[ \t]*(\d+)\r\n", c.plain[rec.start:head_end])
    a, b = rec.start + m.start(), rec.start + m.end()
    length = int(m.group(1))
    v = rng.choice(["short", "short", "long", "long", "zero", "huge", "missing", "garbage", "negative"])
    # off by a few bytes (a writer that counted LF for CRLF) as often as off by a lot
    delta = rng.randint(1, 4) if rng.random() < 0.5 else rng.randint(5, 500)
    value = {"short": str(max(0, length - min(delta, length))), "long": str(length + delta), "zero": "0",
             "huge": str(length * 1000 + 17), "garbage": "12ab", "negative": "-5"}.get(v)
    new = b"" if v == "missing" else f"Content-Length: {value}\r\n".encode()
    return edit_plain(c, a, b, new), i, f"record {i} ({rec.key}): Content-Length {length} -> {v} {value or ''}"


def _segment_break(c: Clean, rng: random.Random) -> tuple[bytes, int, str]:
    """Break one gzip member / zstd frame: its header, its body, its checksum, or cut its tail."""
    k = rng.randrange(len(c.segments))
    a, b = c.segments[k].raw
    gz = c.container == "gz"
    head = 10 if gz else 6
    tail = 8 if gz else (4 if c.zst_checksum else 0)
    v = rng.choice(["header", "body", "body", "checksum", "cut"] if tail else ["header", "body", "body", "cut"])
    if v == "cut":
        x = rng.randint(a + 1, b - 1)
        return c.data[:x] + c.data[b:], k, f"segment {k} ({a}..{b}) cut at {x}: its last {b - x} bytes removed"
    lo, hi = {"header": (a, a + head), "body": (a + head, b - tail), "checksum": (b - tail, b)}[v]
    if hi <= lo:
        lo, hi = a, b
    p = rng.randrange(lo, hi)
    out = bytearray(c.data)
    out[p] ^= rng.randint(1, 255)
    return bytes(out), k, f"segment {k} ({a}..{b}) {v}: byte {p} {c.data[p]:#04x} -> {out[p]:#04x}"


def make_case(c: Clean, seed: int, index: int) -> Case:
    """Case `index` of fixture `c` under `seed` (deterministic)."""
    rng = random.Random(f"{seed}:{c.name}:{index}")
    kinds = sorted(c.kinds)
    kind = rng.choices(kinds, weights=[c.kinds[k] for k in kinds])[0]
    spans = _rec_spans(c)
    all_recs = set(range(len(c.recs)))
    case = Case(c.name, seed, index, kind, "", b"", set())
    level = "plain" if (kind.endswith("@plain") or c.container == "plain") else "raw"
    base = c.plain if level == "plain" else c.data
    raw_segs = [s.raw for s in c.segments]

    def touched_raw(a: int, b: int, truncation: bool = False) -> set[int]:
        if c.container == "plain":
            return cut(spans, a) if truncation else hit(spans, a, b)
        segs = cut(raw_segs, a) if truncation else hit(raw_segs, a, b)
        if c.container == "parquet":
            if b == a and not truncation:  # an insertion shifts the row groups after it
                segs |= {k for k, (s, _) in enumerate(raw_segs) if s >= a}
            in_meta = not any(s <= a < e for s, e in raw_segs) or (b > a and not any(s <= b - 1 < e for s, e in raw_segs))
            if truncation or in_meta:
                case.whole = True
                return set(all_recs)
        return _recs_in_segments(c, segs)

    if kind in ("truncate", "truncate@plain"):
        p = _pos(rng, c, len(base), level)
        if rng.random() < 0.1:
            p = 0
        case.desc = f"truncated to {p} of {len(base)} bytes" + (" (decompressed, recompressed)" if level == "plain" and c.container != "plain" else "")
        if level == "plain":
            case.data = edit_plain(c, p, len(c.plain), b"")
            case.touched = cut(spans, p)
        else:
            case.data = c.data[:p]
            case.touched = touched_raw(p, p, truncation=True)
    elif kind in ("flip", "flip@plain"):
        p = _pos(rng, c, len(base), level)
        flipped, n, case.desc = _flip(rng, base, p)
        if level == "plain":
            case.data = edit_plain(c, p, p + n, flipped[p:p + n])
            case.touched = hit(spans, p, p + n)
            case.desc += " (decompressed bytes)" if c.container != "plain" else ""
        else:
            case.data = flipped
            case.touched = touched_raw(p, p + n)
    elif kind == "multi_flip":  # bit rot: a few single bytes far apart, in the file as stored
        ps = sorted(rng.sample(range(len(base)), rng.randint(2, 5)))
        out = bytearray(base)
        for p in ps:
            out[p] ^= rng.randint(1, 255)
        case.data = bytes(out)
        case.touched = set().union(*(touched_raw(p, p + 1) for p in ps))
        case.desc = f"{len(ps)} single bytes changed at {', '.join(map(str, ps))}"
    elif kind in ("insert", "insert@plain"):
        p = _pos(rng, c, len(base) + 1, level)
        g, what = _garbage(rng, base)
        case.desc = f"inserted {what} at {p}" + (" (decompressed bytes)" if level == "plain" and c.container != "plain" else "")
        if level == "plain":
            case.data = edit_plain(c, p, p, g)
            case.touched = hit(spans, p, p)
        else:
            case.data = base[:p] + g + base[p:]
            case.touched = touched_raw(p, p)
    elif kind == "zeros":  # a hole of NUL bytes, as a crashed writer or a sparse copy leaves
        n = rng.choice([64, 512, 4096])
        p = _pos(rng, c, len(base), "raw" if c.container != "plain" else "plain")
        n = min(n, len(base) - p)
        case.data = base[:p] + b"\0" * n + base[p + n:]
        case.touched = touched_raw(p, p + n)
        case.desc = f"{n} bytes zeroed at {p}"
    elif kind == "crlf":  # every line end written as CRLF (Windows tools): touches nothing
        if c.container == "plain":
            case.data = c.plain.replace(b"\n", b"\r\n")
        else:
            case.data = b"".join(compress_segments([c.plain[s.plain[0]:s.plain[1]].replace(b"\n", b"\r\n")],
                                                   c.container, c.zst_checksum)[0] for s in c.segments)
        case.desc = "every LF replaced by CRLF" + (" (decompressed, recompressed)" if c.container != "plain" else "")
    elif kind == "bom":
        case.data = edit_plain(c, 0, 0, BOM)
        case.desc = "UTF-8 BOM at the start" + (" of the decompressed content" if c.container != "plain" else "")
    elif kind == "surrogate":
        case.data, i, repaired, case.desc = _surrogate(c, rng)
        case.touched = {i}
        case.must_read = {i}
        case.expect_text = {i: repaired}
    elif kind == "content_length":
        case.data, i, case.desc = _content_length(c, rng)
        case.touched = {i}
        if c.recs[i].doc:
            case.must_read = {i}
            if c.recs[i].text is not None:
                case.flagged_or_whole = {i}
    elif kind in ("gz_member", "zst_frame"):
        case.data, k, case.desc = _segment_break(c, rng)
        case.touched = _recs_in_segments(c, {k})
    else:
        raise ValueError(kind)
    return case


# ------------------------------------------------------------------------------------------------------------
# Running a reader, bounded
# ------------------------------------------------------------------------------------------------------------
def _run_web(job: dict) -> dict:
    import inspect

    from pipeline.web.readers import WebReader
    from pipeline.web.units import Unit

    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    unit = Unit(kind=job["kind"], path=job["path"], label=job["label"], text_key=job["text_key"])
    kw: dict[str, Any] = {"out_root": str(out), "max_page_bytes": MAX_PAGE_BYTES}
    if "sample_rate" in inspect.signature(WebReader.__init__).parameters:
        kw["sample_rate"] = 0.0  # no parquet of removed documents: faster, and the counts are the same
    reader = WebReader([unit], **kw)
    docs, exc = [], None
    try:
        for d in reader.run(rank=0, world_size=1):
            docs.append((str(d.id), d.text, d.metadata.get("_file")))
    except Exception:  # noqa: BLE001 - the reader must not raise; reported as a crash
        exc = traceback.format_exc(limit=-6)
    read_p, ledger_p = out / "read" / "r00000.json", out / "ledger" / "reader-r00000.json"
    read = json.loads(read_p.read_text())["read"] if read_p.exists() else None
    ledger = json.loads(ledger_p.read_text())["counts"] if ledger_p.exists() else []
    errors = []
    for p in sorted((out / "errors").glob("*.jsonl")) if (out / "errors").is_dir() else []:
        errors += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return {"docs": docs, "read": read, "ledger": ledger, "errors": errors, "exc": exc}


def _run_docs(job: dict) -> dict:
    import inspect

    from pipeline.documents import iter_documents

    errors: list[tuple[str, str]] = []
    repairs: list[tuple[str, str]] = []
    kw: dict[str, Any] = {"on_error": lambda reason, where: errors.append((str(reason), str(where)))}
    if "on_repair" in inspect.signature(iter_documents).parameters:
        kw["on_repair"] = lambda reason, where: repairs.append((str(reason), str(where)))
    docs, exc = [], None
    try:
        for d in iter_documents([job["path"]], **kw):
            docs.append((str(d.get("id")), d.get("text"), None))
    except Exception:  # noqa: BLE001
        exc = traceback.format_exc(limit=-6)
    return {"docs": docs, "errors": errors, "repairs": repairs, "exc": exc}


def run_job(job: dict) -> dict:
    t = time.perf_counter()
    res = _run_web(job) if job["entry"] == "web" else _run_docs(job)
    res["secs"] = time.perf_counter() - t
    res["status"] = "ok"
    return res


def _serve(rfd: int, wfd: int) -> None:
    """The child's loop: a job in, a result out, until None."""
    import faulthandler
    import resource
    from multiprocessing.connection import Connection

    faulthandler.enable()  # a segfault in a C extension leaves its stack on stderr (the worker's log)
    try:  # a reader that allocates without bound dies with MemoryError here, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    except (ValueError, OSError):
        pass
    import pipeline
    import pipeline.documents  # noqa: F401 - imported once, before the first deadline
    import pipeline.web.readers  # noqa: F401

    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    outbox.send(("ready", str(Path(pipeline.__file__).parent)))
    while True:
        job = inbox.recv()
        if job is None:
            return
        try:
            res = run_job(job)
        except BaseException:  # noqa: BLE001 - whatever happens is the answer
            res = {"status": "crashed", "exc": traceback.format_exc(limit=-6)}
        outbox.send(res)


class ReaderWorker:
    """One child process that runs reader calls one at a time, each under a deadline. A call that does not
    answer in time is `hung` (the child is killed and replaced); a child that dies is `crashed`.

    The child is a plain `python -c` process talking over two pipes (not multiprocessing's spawn, which
    would re-import the caller's __main__), so whatever a reader prints cannot garble the answers."""

    def __init__(self, timeout: float = 20.0, log: str | Path | None = None, root: str | Path | None = None) -> None:
        self.timeout = timeout
        self.root = str(Path(root).resolve()) if root else None  # another checkout's `pipeline` (e.g. an old commit)
        self._own_log = log is None  # a log of our own is removed on close
        self.log = Path(log) if log else Path(tempfile.mkstemp(prefix="reader-fuzz-worker-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._start()

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        here = str(Path(__file__).resolve().parent)
        code = f"import sys; sys.path.insert(0, {here!r}); import _fuzz_corpus as f; f._serve({r1}, {w2})"
        if self.root:
            code = f"import sys; sys.path.insert(0, {self.root!r}); " + code
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(r1, w2), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, cwd=str(Path(here).parent))
        os.close(r1)
        os.close(w2)
        self.outbox, self.inbox = Connection(w1, readable=False), Connection(r2, writable=False)
        self.starts += 1
        hello = self.inbox.recv() if self.inbox.poll(180) else None
        if not (isinstance(hello, tuple) and hello[0] == "ready"):
            raise RuntimeError(f"reader fuzz worker did not start (log: {self.log})")
        self.pipeline = hello[1]  # the pipeline package the child imported

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.outbox.close()
        self.inbox.close()

    def log_tail(self, n: int = 600) -> str:
        try:
            return self.log.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def run(self, job: dict) -> dict:
        t = time.perf_counter()
        try:
            self.outbox.send(job)
            answered = self.inbox.poll(self.timeout)
        except (BrokenPipeError, EOFError, OSError):
            answered = True
        if not answered:
            self._stop()
            self._start()
            return {"status": "hung", "secs": time.perf_counter() - t}
        try:
            return self.inbox.recv()
        except (EOFError, OSError):
            code = self.proc.wait(30)
            tail = self.log_tail()
            self._stop()
            self._start()
            return {"status": "crashed", "exc": f"reader process died (exit code {code}); log: ...{tail[-300:]}",
                    "secs": time.perf_counter() - t}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.outbox.send(None)
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._stop()
        if self._own_log:
            self.log.unlink(missing_ok=True)


def job_for(c: Clean, path: Path, out: Path) -> dict:
    return {"entry": c.entry, "kind": c.kind, "path": str(path), "label": str(path), "text_key": c.text_key,
            "out": str(out)}


# ------------------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------------------
def _short(text: str | None, n: int = 70) -> str:
    return "None" if text is None else repr(text[:n] + ("..." if len(text) > n else ""))


def check(c: Clean, case: Case, res: dict, path: Path) -> list[tuple[str, str]]:
    """Problems of one run: (class, detail). No problems: the case passed."""
    status = res.get("status")
    if status == "hung":
        return [("hung", f"no answer in {res['secs']:.0f} s")]
    if status != "ok":
        return [("crashed", (res.get("exc") or "").strip().splitlines()[-1][:300])]
    problems: list[tuple[str, str]] = []
    if res.get("exc"):
        problems.append(("raised", res["exc"].strip().splitlines()[-1][:300]))
    docs = res["docs"]
    if c.entry == "web":
        read_map = res["read"]
        if read_map is None:
            problems.append(("no_read_file", "read/r00000.json was not written"))
            read = 0
        else:
            read = sum(read_map.values())
        non_kept = sum(n for _, fate, _, n in res["ledger"] if fate in ("dropped", "errored"))
        if read_map is not None and read != len(docs) + non_kept:
            problems.append(("unreconciled", f"read {read} != kept {len(docs)} + dropped/errored {non_kept} "
                                             f"(ledger {res['ledger']})"))
        for f, fate, reason, n in res["ledger"]:
            if f != str(path):
                problems.append(("error_without_file", f"ledger {fate}/{reason} x{n} names {f!r}"))
        errored = sum(n for _, fate, _, n in res["ledger"] if fate == "errored")
    else:
        read = len(docs) + len(res["errors"])
        errored = len(res["errors"])
        for reason, where in res["errors"]:
            if path.name not in where:
                problems.append(("error_without_file", f"on_error({reason!r}, {where!r})"))
    # every untouched record is read, with the same text
    by_key: dict[str | None, list[str]] = defaultdict(list)
    texts = Counter()
    for did, text, _ in docs:
        texts[(did, text) if c.structure == "warc" else text] += 1
        by_key[did].append(text)
    lost = []
    for i, r in enumerate(c.recs):
        if i in case.touched or r.text is None:
            continue
        want = (r.key, r.text) if c.structure == "warc" else r.text
        if texts[want] > 0:
            texts[want] -= 1
        elif c.structure == "warc" and r.key in by_key:
            problems.append(("changed_untouched", f"record #{i} {r.key}: text {_short(by_key[r.key][0])} "
                                                  f"instead of {_short(r.text)}"))
        else:
            lost.append(i)
    if lost:
        r = c.recs[lost[0]]
        problems.append(("lost_untouched", f"{len(lost)} untouched record(s) lost, first #{lost[0]}"
                                           f"{' ' + r.key if r.key else ''}: {_short(r.text)}"))
    need = sum(1 for i in c.docs if i not in case.touched or i in case.must_read)
    if read < need:
        problems.append(("read_too_few", f"read {read} < {need} records that must be read"))
    for did, text, _ in docs:
        if not isinstance(text, str):
            problems.append(("not_text", f"document {did} has text of type {type(text).__name__}"))
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            problems.append(("surrogate_leak", f"document {did} text is not valid Unicode ({e.reason} at {e.start})"))
    # touched records with a prescribed text: repairs (lone surrogates), Content-Length (whole or flagged)
    got = [t for _, t, _ in docs if isinstance(t, str)]
    for i, want in case.expect_text.items():
        original = c.recs[i].text
        if want in got or not original:
            continue
        near = [t for t in got if t.replace("\ufffd", "") == original]
        if near:
            problems.append(("bad_repair", f"record #{i} yielded as {_short(near[0][-70:])}, not with U+FFFD in "
                                           "place of the lone surrogate escape"))
    for i in case.flagged_or_whole:
        r = c.recs[i]
        got = by_key.get(r.key, [])
        if r.text in got:
            continue
        if got:
            problems.append(("length_not_flagged", f"record #{i} {r.key} yielded with {len(got[0])} chars, "
                                             f"not its {len(r.text)}"))
        elif errored == 0:
            problems.append(("length_not_flagged", f"record #{i} {r.key} not yielded and no error recorded"))
    if case.whole and read < len(c.docs) and errored == 0:
        problems.append(("silent_file_loss", f"read {read} of {len(c.docs)} records and no error names the file"))
    return problems


# ------------------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    problems: list[tuple[str, str]]
    secs: float
    res: dict = field(default_factory=dict, repr=False)

    @property
    def verdict(self) -> str:
        classes = {p[0] for p in self.problems}
        for v in ("hung", "crashed", "raised"):
            if v in classes:
                return "crashed" if v == "raised" else v
        if classes & {"lost_untouched", "changed_untouched", "read_too_few"}:
            return "lost"
        return "other" if classes else "passed"


def scratch_dir() -> tempfile.TemporaryDirectory:
    """Where the corrupted files and the reader's outputs go: tmpfs when there is one (the web reader fsyncs
    its ledger; on a disk that is 80 % of a run's time)."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="reader-fuzz-", dir=base)


def run_case(c: Clean, case: Case, worker: ReaderWorker, workdir: Path, keep: bool = False) -> Outcome:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / c.filename
    path.write_bytes(case.data)
    res = worker.run(job_for(c, path, workdir / "out"))
    o = Outcome(case, check(c, case, res, path), res.get("secs", 0.0), res if keep or case.index < 0 else {})
    return o


def check_clean(c: Clean, res: dict, path: Path) -> list[tuple[str, str]]:
    """The oracle on an uncorrupted file: exactly the expected documents, every record read, nothing errored."""
    problems = check(c, Case(c.name, 0, -1, "none", "clean file", c.data, set()), res, path)
    if res.get("status") != "ok":
        return problems
    got = Counter((d[0], d[1]) if c.structure == "warc" else d[1] for d in res["docs"])
    want = Counter((r.key, r.text) if c.structure == "warc" else r.text for r in c.recs if r.text is not None)
    if got != want:
        extra = list((got - want).elements())[:2]
        problems.append(("clean_mismatch", f"{sum((want - got).values())} expected document(s) missing, "
                                           f"{sum((got - want).values())} unexpected, e.g. {str(extra)[:200]}"))
    if c.entry == "web":
        read = sum((res["read"] or {}).values())
        errored = [x for x in res["ledger"] if x[1] == "errored"]
    else:
        read, errored = len(res["docs"]) + len(res["errors"]), res["errors"]
    if read != len(c.docs):
        problems.append(("clean_read", f"read {read}, the file has {len(c.docs)} records"))
    if errored:
        problems.append(("clean_errored", f"errors on a clean file: {str(errored)[:300]}"))
    return problems


# ------------------------------------------------------------------------------------------------------------
# The known cases (../shared/cases/readers): the oracle applied to real-world breakage
# ------------------------------------------------------------------------------------------------------------
def _fix_content_length(rec: bytes) -> bytes:
    hend = rec.index(b"\r\n\r\n") + 4
    body = len(rec) - hend - 4
    return re.sub(rb"(?im)^(content-length:[ \t]*)\d+", b"\\g<1>" + str(body).encode(), rec[:hend], count=1) + rec[hend:]


def known_cases(cases: Path) -> list[tuple[Clean, Case]]:
    """(clean, case) for each file of cases/readers, per reader that reads it. The case marks what the README
    calls broken (touched, but must still be read); everything else must come back."""
    d = cases / "readers"
    out: list[tuple[Clean, Case]] = []
    for fname in ("lone_surrogate.jsonl", "bom_crlf.jsonl"):
        plain = (d / fname).read_bytes()
        recs = line_recs(plain, "text")
        bad = {i for i, r in enumerate(recs) if _SURROGATE_RX.search(r.text)}
        expect = {i: _SURROGATE_RX.sub("\ufffd", recs[i].text) for i in bad}
        recs = [Rec(r.start, r.end, _SURROGATE_RX.sub("", r.text), body=r.body) for r in recs]
        for entry in ("web", "docs"):
            c = _clean(f"{entry}:case-{fname}", "jsonl", fname, "lines", "plain", plain, plain, recs)
            out.append((c, Case(c.name, 0, -1, "known", f"cases/readers/{fname}", plain, set(bad), set(bad),
                                expect_text=expect)))
    for fname in ("single_member.warc.gz", "per_record.warc.gz", "content_length_short.warc",
                  "brotli_encoded.warc"):
        data = (d / fname).read_bytes()
        gz = fname.endswith(".gz")
        plain = gzip.decompress(data) if gz else data
        spans = warc_spans_by_header(plain)
        recs, touched, must, flagged = [], set(), set(), set()
        for i, (s, e) in enumerate(spans):
            fixed = _fix_content_length(plain[s:e])
            r = warc_record_rec(fixed, s, e)
            recs.append(r)
            encoded = re.search(rb"(?im)^content-encoding:[ \t]*br\b", plain[s:e]) is not None
            if fixed != plain[s:e] or encoded:
                # a wrong Content-Length, or a brotli body: read whole, or flagged (errored) - never silently cut
                touched.add(i)
                if r.doc:
                    must.add(i)
                    flagged.add(i)
        segs = []
        if gz:
            ms = gz_members(data)
            segs = [Segment(raw=ms[0], plain=(0, len(plain)))] if len(ms) == 1 else \
                [Segment(raw=m, plain=sp) for m, sp in zip(ms, spans, strict=True)]
        c = _clean(f"web:case-{fname}", "warc", fname, "warc", "gz" if gz else "plain", data, plain, recs, segs)
        out.append((c, Case(c.name, 0, -1, "known", f"cases/readers/{fname}", data, touched, must,
                            flagged_or_whole=flagged)))
    return out


_SURROGATE_RX = re.compile("[\ud800-\udfff]")


def fuzz(c: Clean, worker: ReaderWorker, seed: int, runs: int, workdir: Path, max_hangs: int = 3,
         progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    outcomes, hangs = [], 0
    for i in range(runs):
        o = run_case(c, make_case(c, seed, i), worker, workdir)
        outcomes.append(o)
        if progress:
            progress(o)
        hangs += o.verdict == "hung"
        if hangs >= max_hangs:  # each costs the deadline: stop, the class is known
            break
    return outcomes


def failure_classes(outcomes: list[Outcome]) -> dict[tuple[str, str, str], list[Outcome]]:
    """(fixture, corruption kind, problem class) -> the outcomes with it, first seen first."""
    out: dict[tuple[str, str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        for cls in dict.fromkeys(p[0] for p in o.problems):
            out[(o.case.fixture, o.case.kind, cls)].append(o)
    return out


def summary(outcomes: list[Outcome], limit: int = 40) -> str:
    lines = []
    for (fx, kind, cls), group in sorted(failure_classes(outcomes).items()):
        o = group[0]
        detail = next(d for k, d in o.problems if k == cls)
        lines.append(f"{fx} / {kind} / {cls}: {len(group)} case(s); e.g. {o.case.repro}\n      -> {detail}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more classes"]
    failed = sum(o.verdict != "passed" for o in outcomes)
    head = f"{failed} of {len(outcomes)} corruptions failed"
    return head + ("\n  " + "\n  ".join(lines) if lines else "")
