"""One reading policy for every reader: resilient decompression, text repair, JSON lines.

Every reader of the project (the web stage's, and the document reader that generate, dedup, decontaminate and
shard use) goes through this module, so a bad byte is treated the same way everywhere:

Text repair (counted as *repaired*, the record is kept):
- invalid UTF-8 bytes become U+FFFD (`invalid_utf8`);
- lone surrogates (a JSON escape such as ``"\\ud83d"`` with its other half missing, or bytes a reader kept
  with ``surrogateescape``) become U+FFFD (`lone_surrogate`), in the text and in every other string field;
- a UTF-8 byte-order mark at the start of a file or line is ignored (not counted); CRLF line ends are fine;
- a `meta` field that is not a JSON object (a list, a number, a string that is not JSON) is kept as the string
  ``meta_raw`` inside meta (`meta_not_object`), never a reason to drop the document.

Compressed input (``.gz``, ``.zst``) is decoded member by member (gzip members, zstd frames). A member whose
data is corrupt, or whose CRC fails, is dropped whole (its output is held back until the member's checksum is
verified, up to `MEMBER_HOLD_BYTES`) and reading resumes at the next member's magic bytes: a broken member costs
the records in it, not the rest of the file. A member cut short by the end of the file (an interrupted
download) keeps what was decoded before the cut: a deflate/zstd prefix decodes exactly. The skipped span is reported as a `Gap` with its byte count.
"""

from __future__ import annotations

import mmap
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Output of one compressed member held back until its checksum is verified; a larger member streams unverified.
MEMBER_HOLD_BYTES = 64 << 20
_FEED = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")

OnEvent = Callable[[str, str], None]  # (reason, where)


@dataclass(frozen=True)
class Gap:
    """Compressed bytes that could not be decoded: `skipped` bytes from file offset `offset`."""

    offset: int
    skipped: int
    reason: str  # corrupt_gzip_member | truncated_gzip_member | corrupt_zstd_frame | truncated_zstd_frame
    detail: str

    @property
    def where(self) -> str:
        return f"byte {self.offset}"

    def describe(self) -> str:
        return f"{self.detail}; {self.skipped} compressed bytes skipped from byte {self.offset}"


@dataclass(frozen=True)
class Chunk:
    """Decoded bytes and the file offset of the compressed member they came from (0 for plain files)."""

    data: bytes
    member: int


# --- text repair ------------------------------------------------------------------------------------------------
def decode_utf8(data: bytes) -> tuple[str, bool]:
    """(text, repaired): UTF-8 with a leading BOM ignored; invalid bytes become U+FFFD (repaired=True)."""
    if data.startswith(BOM):
        data = data[3:]
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), True


def repair_surrogates(text: str) -> tuple[str, bool]:
    """(text, repaired): lone surrogates (and surrogate-escaped bytes) become U+FFFD."""
    if text.isascii():
        return text, False
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text), True


def repair_strings(value: Any) -> tuple[Any, bool]:
    """`repair_surrogates` on every string inside a JSON value (dict keys included)."""
    if isinstance(value, str):
        return repair_surrogates(value)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        changed = False
        for k, v in value.items():
            k2, c1 = repair_strings(k)
            v2, c2 = repair_strings(v)
            out[k2] = v2
            changed = changed or c1 or c2
        return out, changed
    if isinstance(value, list):
        items = [repair_strings(v) for v in value]
        return [v for v, _ in items], any(c for _, c in items)
    return value, False


def meta_object(raw: Any) -> tuple[dict[str, Any], bool]:
    """A `meta` value as a dict: (meta, repaired). A JSON-object string is parsed; anything else is kept as
    ``{"meta_raw": <string>}`` (repaired=True) rather than failing the document."""
    import json

    if raw is None or raw == "" or raw == {}:
        return {}, False
    if isinstance(raw, dict):
        return raw, False
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return {"meta_raw": raw}, True
        if isinstance(parsed, dict):
            return parsed, False
        return {"meta_raw": raw}, True
    return {"meta_raw": json.dumps(raw, ensure_ascii=False, default=str)}, True


def parse_json_line(raw: bytes) -> tuple[Any, list[str]]:
    """(value, repairs) of one JSON text given as bytes; raises ValueError when it is not JSON.

    orjson first (fast, strict); the standard library where orjson refuses what the repair policy accepts
    (lone surrogate escapes), then every string is repaired.
    """
    import json

    import orjson

    repairs: list[str] = []
    if raw.startswith(BOM):
        raw = raw[3:]
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text, bad_utf8 = decode_utf8(raw)
        if bad_utf8:
            repairs.append("invalid_utf8")
        try:
            value = json.loads(text)  # ValueError (JSONDecodeError) for text that is not JSON
        except RecursionError:
            raise ValueError("JSON nested too deeply to read") from None
    if _SURROGATE_ESCAPE.search(raw):
        value, changed = repair_strings(value)
        if changed:
            repairs.append("lone_surrogate")
    return value, repairs


# --- resilient decompression -------------------------------------------------------------------------------------
def codec_of(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith(".zst"):
        return "zstd"
    return "plain"


def iter_decoded(path: str | Path, codec: str | None = None) -> Iterator[Chunk | Gap]:
    """The decoded bytes of a file as Chunks, with a Gap for every span that could not be decoded."""
    codec = codec or codec_of(path)
    with open(path, "rb") as f:
        if codec == "plain":
            for block in iter(lambda: f.read(_FEED), b""):
                yield Chunk(block, 0)
            return
        size = f.seek(0, 2)
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield from _iter_members(data, codec)


def _new_decoder(codec: str) -> Any:
    if codec == "gzip":
        return zlib.decompressobj(wbits=31)
    import zstandard

    return zstandard.ZstdDecompressor(max_window_size=2**31).decompressobj()  # `zstd --long` files too


def _iter_members(data: Any, codec: str) -> Iterator[Chunk | Gap]:
    """Decode member after member; a bad one becomes a Gap and decoding resumes at the next magic.

    A member's output is held until the member ends (so a CRC failure drops it whole) unless it grows past
    MEMBER_HOLD_BYTES; then it streams, and a later failure only ends the member."""
    magic = GZIP_MAGIC if codec == "gzip" else ZSTD_MAGIC
    errors: tuple[type[BaseException], ...] = (zlib.error,) if codec == "gzip" else _zstd_errors()
    size, pos = len(data), 0
    gap_start: int | None = None
    failure = "corrupt"
    while pos < size:
        if data[pos:pos + len(magic)] != magic:  # bytes between members: part of a gap
            gap_start = pos if gap_start is None else gap_start
            nxt = data.find(magic, pos + 1)
            pos = size if nxt < 0 else nxt
            continue
        decoder = _new_decoder(codec)
        held: list[bytes] = []
        held_bytes, p, failed = 0, pos, None
        try:
            while not decoder.eof:
                if p >= size:
                    failed = "truncated"
                    break
                feed = data[p:p + _FEED]
                out = decoder.decompress(feed)
                p += len(feed) - len(decoder.unused_data) if decoder.eof else len(feed)
                if out:
                    held.append(out)
                    held_bytes += len(out)
                if held_bytes > MEMBER_HOLD_BYTES:
                    if gap_start is not None:
                        yield _gap(codec, gap_start, pos, failure)
                        gap_start = None
                    yield Chunk(b"".join(held), pos)
                    held, held_bytes = [], 0
        except errors:
            failed = "corrupt"
        if failed is None:
            if gap_start is not None:
                yield _gap(codec, gap_start, pos, failure)
                gap_start = None
            if held:
                yield Chunk(b"".join(held), pos)
            pos = p
            continue
        if failed == "truncated" and held:  # a cut file: what was decoded before the end is a valid prefix
            if gap_start is not None:
                yield _gap(codec, gap_start, pos, failure)
                gap_start = None
            yield Chunk(b"".join(held), pos)
        if gap_start is None:
            gap_start, failure = pos, failed
        nxt = data.find(magic, pos + 1)
        pos = size if nxt < 0 else nxt
    if gap_start is not None:
        yield _gap(codec, gap_start, size, failure)


def _gap(codec: str, start: int, end: int, kind: str) -> Gap:
    unit = "gzip_member" if codec == "gzip" else "zstd_frame"
    return Gap(start, end - start, f"{kind}_{unit}", f"{kind} {unit.replace('_', ' ')}")


def _zstd_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (zstandard.ZstdError,)


# --- records: lines and JSON arrays -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """One line of a decoded file (without its newline; a trailing CR is kept, JSON ignores it)."""

    lineno: int  # 1-based among the decoded lines (a Gap's lost lines are not numbered)
    raw: bytes


def iter_lines(path: str | Path, codec: str | None = None) -> Iterator[Line | Gap]:
    """Lines of a (possibly compressed) file, with a Gap wherever compressed bytes were lost.

    The partial line in progress when a Gap occurs belonged to the broken member and is dropped with it."""
    pending = b""
    lineno = 0
    for item in iter_decoded(path, codec):
        if isinstance(item, Gap):
            pending = b""
            yield item
            continue
        parts = (pending + item.data).split(b"\n")
        pending = parts.pop()
        for raw in parts:
            lineno += 1
            yield Line(lineno, raw)
    if pending:
        yield Line(lineno + 1, pending)


def iter_json_array(text: str) -> Iterator[tuple[int, Any | ValueError]]:
    """(index, value or the ValueError that stopped it) for each element of a JSON array given as text.

    A malformed element is reported once and parsing resumes at the next `{` from which a whole element
    parses (arrays of objects, the usual document dump), so one bad element costs that element. Garbage
    before the opening `[` is skipped, a lost `[` or comma is tolerated. Lone surrogates are left to
    `repair_strings`."""
    import json

    decoder = json.JSONDecoder()
    bracket, brace = text.find("["), text.find("{")
    if bracket < 0 and brace < 0:
        yield 0, ValueError("not a JSON array")
        return
    # an array whose opening bracket was lost still has its elements: start at the first object then
    i = bracket + 1 if bracket >= 0 and (brace < 0 or bracket < brace) else brace
    index, n = 0, len(text)
    while True:
        i = _skip_ws(text, i)
        if i >= n or (text[i] == "]" and _END.match(text, i + 1)):
            return
        value, nxt, err = _element_at(decoder, text, i)
        yield index, (value if err is None else err)
        index += 1
        if err is None:
            i = nxt
            continue
        i = _resync(decoder, text, i + 1)
        if i < 0:
            return


def _element_at(decoder: Any, text: str, i: int) -> tuple[Any, int, ValueError | None]:
    """(value, where the next element starts, None) or (None, i, the error) for the element at text[i]."""
    if text[i] == "]":  # a ']' with more after it: a damaged separator or an inner list's end
        return None, i, ValueError(f"unexpected ']' at char {i}")
    try:
        value, j = decoder.raw_decode(text, i)
    except ValueError as e:
        return None, i, e
    except RecursionError:
        return None, i, ValueError("JSON nested too deeply to read")
    k = _skip_ws(text, j)
    if k < len(text) and text[k] not in ",]{":  # '{': a lost comma (or JSON lines) still separates objects
        return None, i, ValueError(f"expected ',' or ']' at char {k}")
    return value, (k + 1 if k < len(text) and text[k] == "," else k), None


def _resync(decoder: Any, text: str, frm: int, attempts: int = 10_000) -> int:
    """The next `{` (>= frm) at which a whole element parses; -1 when there is none."""
    p = text.find("{", frm)
    while p >= 0 and attempts > 0:
        if _element_at(decoder, text, p)[2] is None:
            return p
        p = text.find("{", p + 1)
        attempts -= 1
    return -1


def concatenated_objects(raw: bytes) -> list[Any] | None:
    """The objects of a line that holds several whole JSON objects one after another (a file with CR-only
    line ends, or records written without newlines); None unless the whole line is such a sequence."""
    import json

    text = decode_utf8(raw)[0]
    decoder = json.JSONDecoder()
    out: list[Any] = []
    i = _skip_ws(text, 0)
    while i < len(text):
        try:
            value, j = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            return None
        out.append(repair_strings(value)[0])
        i = _skip_ws(text, j)
    return out if len(out) > 1 else None


def salvage_records(raw: bytes, max_attempts: int = 256) -> list[Any]:
    """Whole JSON objects at the end of a damaged line (a lost newline merged them into it), in order.

    A record is taken from a `{"` position only when it parses and is followed by nothing but whitespace or
    another object, so an object nested in the damaged record (always followed by its parent's `}`) is not."""
    import json

    text = decode_utf8(raw)[0]
    decoder = json.JSONDecoder()
    found: list[Any] = []
    p = text.find('{"', 1)
    while p >= 0 and max_attempts > 0:
        max_attempts -= 1
        try:
            value, j = decoder.raw_decode(text, p)
        except (ValueError, RecursionError):
            p = text.find('{"', p + 1)
            continue
        rest = _skip_ws(text, j)
        if rest >= len(text) or text.startswith("{", rest) or text[rest:].strip() in (",", "]", "],"):
            found.append(value)
            if not text.startswith("{", rest):
                break
            p = rest
            continue
        p = text.find('{"', p + 1)
    return [repair_strings(v)[0] for v in found]


_END = re.compile(r"\s*\Z")
_WS = re.compile(r"\s*")


def _skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()  # type: ignore[union-attr]


# --- JSON records of a file: one reader for jsonl and JSON arrays -------------------------------------------------
@dataclass(frozen=True)
class JsonRecord:
    """One record of a JSON file: its parsed value, or the error that stopped it (value None)."""

    where: str  # "line 3", "line 3 (record 2 of the line)", "item 4"
    value: Any
    error: str | None
    repairs: tuple[str, ...] = ()
    raw_size: int = 0  # bytes of the source line (0 for array elements)


def iter_json_records(path: str | Path) -> Iterator[JsonRecord | Gap]:
    """Every record of a JSON-lines or JSON-array file (plain, .gz, .zst), whatever its name says.

    Lines: a bad line is one error; a line holding several whole objects (CR-only line ends) gives each; a line
    whose newline was lost gives the error and then the whole records merged into it. Arrays (a `[` before the
    first `{`, or a first line that is not JSON) are read element by element (`iter_json_array`), in memory."""
    if _json_layout(path) == "array":
        yield from _array_records(path)
        return
    for line in iter_lines(path):
        if isinstance(line, Gap):
            yield line
        elif line.raw.strip():
            yield from _line_records(line)


def _json_layout(path: str | Path) -> str:
    """"array" when a `[` comes before the first `{`, or when the first line opens a pretty-printed object;
    else "lines" (a broken first line is then one bad line, not a reason to read the file another way)."""
    for item in iter_decoded(path):
        if isinstance(item, Chunk) and item.data.strip():
            data = item.data.removeprefix(BOM)
            bracket, brace = data.find(b"[", 0, 1 << 16), data.find(b"{", 0, 1 << 16)
            if bracket >= 0 and (brace < 0 or bracket < brace):
                return "array"
            first = next((x for x in data.split(b"\n", 64) if x.strip()), b"")
            return "array" if first.strip() == b"{" else "lines"
    return "lines"


def _line_records(line: Line) -> Iterator[JsonRecord]:
    where, size = f"line {line.lineno}", len(line.raw)
    try:
        value, repairs = parse_json_line(line.raw)
        yield JsonRecord(where, value, None, tuple(repairs), size)
        return
    except ValueError as e:
        error = str(e)[:300]
    element = line.raw.strip().lstrip(b"[").rstrip(b"],")  # one element per line of an array lost its brackets
    if element != line.raw.strip():
        try:
            value, repairs = parse_json_line(element)
            yield JsonRecord(where, value, None, tuple(repairs), size)
            return
        except ValueError:
            pass
    several = concatenated_objects(line.raw)
    if several is not None:  # records without newlines between them (e.g. CR-only line ends)
        for k, value in enumerate(several, 1):
            yield JsonRecord(f"{where} (record {k} of the line)", value, None, (), size)
        return
    yield JsonRecord(where, None, error, (), size)
    for k, value in enumerate(salvage_records(line.raw), 2):  # a lost newline merged the next records in
        yield JsonRecord(f"{where} (record {k} of a merged line)", value, None, (), size)


def _array_records(path: str | Path) -> Iterator[JsonRecord | Gap]:
    data = bytearray()
    for part in iter_decoded(path):
        if isinstance(part, Gap):
            yield part
        else:
            data += part.data
    text, bad_utf8 = decode_utf8(bytes(data))
    for index, value in iter_json_array(text):
        where = f"item {index}"
        if isinstance(value, ValueError):
            yield JsonRecord(where, None, str(value)[:300])
            continue
        value, surrogates = repair_strings(value)
        yield JsonRecord(where, value, None, ("invalid_utf8",) * bad_utf8 + ("lone_surrogate",) * surrogates)
