"""WARC/WET records that survive broken files: one bad record costs one record.

Why not warcio alone: warcio abandons a `.warc.gz` compressed as one gzip member ("non-chunked gzip"), and a
record whose Content-Length is wrong makes it lose the framing of every record after it. Here the file is
decoded by `pipeline.textio.iter_decoded` (gzip members / zstd frames, a broken member skipped to the next
one) and framed by WARC/1.x headers (ISO 28500):

- a record's block is its Content-Length bytes, which must be followed by the CRLF CRLF separator and then
  the next `WARC/1.` header (or the end of the file); otherwise the record is errored `content_length_mismatch`
  (with the declared and the found length) and reading resumes at the next header found;
- a declared block that runs into another record's header (Content-Length too long) is errored the same way
  and the swallowed record is still read;
- a record without a usable Content-Length is errored `missing_content_length`;
- bytes between records that are not a header are one errored `unparseable_bytes` span;
- the file ending inside a record: `truncated_warc_record`.

HTTP bodies are unchunked (`Transfer-Encoding: chunked`) and decoded (`Content-Encoding` gzip, deflate, br,
zstd; identity); an unknown encoding is errored `unknown_content_encoding` naming it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.textio import Chunk, Gap, iter_decoded

# A record header: its version line, then a "Name:" field line. Not anchored to a newline, so a record whose
# separator was damaged is still found.
_RECORD_START = re.compile(rb"(WARC/1\.[0-9]\r?\n)[A-Za-z][A-Za-z0-9-]*:")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_NEWLINES = re.compile(rb"[\r\n]*")
_FIELD_LINE = re.compile(rb"\n(?:WARC-Type|WARC-Record-ID|WARC-Date|WARC-Target-URI): ")
# Headers are short; a "header" that has not ended after this many bytes is not one.
MAX_HEADER_BYTES = 1 << 16


@dataclass
class WarcRecord:
    """A framed record: WARC headers (names lower-cased) and its block (None when over the size cap)."""

    offset: str
    headers: dict[str, str]
    block: bytes | None
    length: int
    adjusted: bool = False  # the block was read whole past a Content-Length that fell short by newlines

    @property
    def type(self) -> str:
        return self.headers.get("warc-type", "")


@dataclass
class WarcError:
    """Bytes that could not become a record, with a named reason."""

    offset: str
    reason: str
    detail: str


@dataclass
class _Buffer:
    """Decoded bytes not yet framed, fed from `iter_decoded`; `base` is the decoded offset of buf[0]."""

    source: Iterator[Chunk | Gap]
    buf: bytearray = field(default_factory=bytearray)
    base: int = 0
    eof: bool = False
    gap: Gap | None = None
    # (decoded offset, compressed member offset) of each chunk start, to name where a record is
    starts: list[tuple[int, int]] = field(default_factory=list)

    def fill(self, need: int) -> bool:
        """Read until `need` bytes are buffered; False at the end of the data or at a Gap (kept in .gap)."""
        while len(self.buf) < need and not self.eof and self.gap is None:
            item = next(self.source, None)
            if item is None:
                self.eof = True
            elif isinstance(item, Gap):
                self.gap = item
            else:
                self.starts.append((self.base + len(self.buf), item.member))
                self.buf += item.data
        return len(self.buf) >= need

    def consume(self, n: int) -> None:
        del self.buf[:n]
        self.base += n
        while len(self.starts) > 1 and self.starts[1][0] <= self.base:
            self.starts.pop(0)

    def where(self, compressed: bool) -> str:
        if not compressed:
            return f"byte {self.base}"
        first, member = next(((o, m) for o, m in reversed(self.starts) if o <= self.base), (self.base, 0))
        return f"byte {member}" if first == self.base else f"byte {member} (+{self.base - first} decoded)"

    def find_record_start(self, frm: int) -> int:
        """Index (>= frm) in buf of the next record header, reading on as needed; -1 when there is none."""
        scan = frm
        while True:
            m = _RECORD_START.search(self.buf, scan)
            if m is not None:
                return m.start(1)
            scan = max(len(self.buf) - 64, frm)  # a header split by the read boundary is found next time
            if not self.fill(len(self.buf) + (1 << 20)):
                m = _RECORD_START.search(self.buf, scan)
                return -1 if m is None else m.start(1)


def iter_warc(path: str | Path, max_block: int) -> Iterator[WarcRecord | WarcError]:
    """Records and errors of a WARC/WET file (plain, .gz with any member layout, .zst), in file order."""
    from pipeline.textio import codec_of

    compressed = codec_of(path) != "plain"
    b = _Buffer(iter_decoded(path))
    while True:
        skipped = _skip_blank(b)
        if skipped is None:  # end of data
            if b.gap is None:
                return
            yield _gap_error(b)
            continue
        if not b.buf.startswith(b"WARC/"):
            where = b.where(compressed)
            nxt = b.find_record_start(1)
            lost = len(b.buf) if nxt < 0 else nxt
            b.consume(lost)
            yield WarcError(where, "unparseable_bytes", f"{lost} bytes that are not a WARC record skipped")
            continue
        yield from _one_record(b, compressed, max_block)


def _skip_blank(b: _Buffer) -> int | None:
    """Drop the newlines between records; None when no data is left before the end or a Gap."""
    while True:
        if not b.buf and not b.fill(1):
            return None
        n = _NEWLINES.match(b.buf).end()  # type: ignore[union-attr]
        b.consume(n)
        if b.buf:
            b.fill(8)
            return n


def _gap_error(b: _Buffer) -> WarcError:
    gap = b.gap
    assert gap is not None
    b.gap = None
    b.consume(len(b.buf))  # the part of a record decoded before the broken member is lost with it
    return WarcError(gap.where, gap.reason, gap.describe())


def _one_record(b: _Buffer, compressed: bool, max_block: int) -> Iterator[WarcRecord | WarcError]:
    where = b.where(compressed)
    head_end = _find_head_end(b)
    if head_end is None:
        lost = len(b.buf)
        nxt = b.find_record_start(1)
        b.consume(lost if nxt < 0 else nxt)
        yield WarcError(where, "truncated_warc_record" if nxt < 0 and b.eof else "unparseable_bytes",
                        "a WARC header that never ends")
        return
    end_of_head, block_start = head_end
    headers = _parse_headers(bytes(b.buf[:end_of_head]))
    length = _content_length(headers)
    if length is None:
        nxt = b.find_record_start(block_start)
        b.consume(len(b.buf) if nxt < 0 else nxt)
        yield WarcError(where, "missing_content_length",
                        f"Content-Length {headers.get('content-length', 'absent')!r}")
        return
    yield from _block(b, where, headers, block_start, length, max_block)


def _find_head_end(b: _Buffer) -> tuple[int, int] | None:
    """(end of the header lines, start of the block) in buf, or None when there is no header end."""
    searched = 0
    while True:
        m = _HEAD_END.search(b.buf, max(searched - 4, 0), MAX_HEADER_BYTES)
        if m is not None:
            return m.start(), m.end()
        searched = len(b.buf)
        if searched >= MAX_HEADER_BYTES or not b.fill(len(b.buf) + 4096):
            m = _HEAD_END.search(b.buf, max(searched - 4, 0), MAX_HEADER_BYTES)
            return None if m is None else (m.start(), m.end())


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = None
    for line in raw.decode("utf-8", "replace").splitlines()[1:]:
        if line[:1] in (" ", "\t") and last:  # a folded continuation line
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            last = name.strip().lower()
            headers[last] = value.strip()
    return headers


def _content_length(headers: dict[str, str]) -> int | None:
    raw = headers.get("content-length", "").strip()
    return int(raw) if raw.isdigit() else None


def _block(b: _Buffer, where: str, headers: dict[str, str], start: int, length: int, max_block: int
           ) -> Iterator[WarcRecord | WarcError]:
    end = start + length
    if length > max_block:
        yield from _skip_large(b, where, headers, start, length)
        return
    b.fill(end + 4096)
    inner = _embedded_start(b.buf, start, min(end, len(b.buf)))
    if inner >= 0:  # Content-Length too long: it runs into the next record
        b.consume(inner)
        yield WarcError(where, "content_length_mismatch",
                        f"Content-Length {length} runs into the next record (block is {inner - start - 4} bytes)")
        return
    if len(b.buf) < end:
        missing = end - len(b.buf)
        b.consume(len(b.buf))
        if b.gap is None:  # else the broken member that cut it is reported as one error
            yield WarcError(where, "truncated_warc_record", f"{missing} of {length} block bytes missing")
        return
    block_end = _block_end(b.buf, start, end)
    if block_end is not None:
        block = bytes(b.buf[start:block_end])
        b.consume(end)
        yield WarcRecord(where, headers, block, length, adjusted=block_end != end)
        return
    nxt = b.find_record_start(start)  # from the block start: a damaged header can end inside the next record
    stop = len(b.buf) if nxt < 0 else nxt
    found = stop - start - (4 if b.buf[start:stop].endswith(b"\r\n\r\n") else 0)
    b.consume(stop)
    yield WarcError(where, "content_length_mismatch",
                    f"Content-Length {length}, but the block before the next record is {found} bytes")


def _block_end(buf: bytearray, start: int, end: int) -> int | None:
    """Where the block buf[start:...] really ends, judged by the separator after the declared end; None when
    the declared length cannot be right (the record is then errored).

    The separator is CRLF CRLF (LF LF in hand-made files) followed by the next header or the end of the data.
    A longer run of newlines means the Content-Length fell short by newline bytes (or the writer added blank
    lines): the extra newlines belong to the block, which is read whole. A shorter run after a block that
    itself ends in a newline byte means the Content-Length swallowed part of the separator."""
    run_end = _NEWLINES.match(buf, end).end()  # type: ignore[union-attr]
    run = bytes(buf[end:run_end])
    after = bytes(buf[run_end:run_end + 7])
    at_end = not after
    if not at_end and not b"WARC/1.".startswith(after) and not after.startswith(b"WARC/1."):
        # bytes that are neither separator nor header after the declared end: the block goes on (a Content-
        # Length short enough to land on a blank line inside the body must not cut the page silently), unless
        # what follows the CRLF CRLF is the next record's header with a damaged first line
        if run.startswith(b"\r\n\r\n") and _FIELD_LINE.search(bytes(buf[run_end:run_end + 512])):
            return end
        return None
    for sep in (b"\r\n\r\n", b"\n\n"):
        if run == sep:
            return end
        if run.endswith(sep) and len(run) > len(sep):
            return end + len(run) - len(sep)  # read whole: the block's own trailing newlines
    if at_end:
        ends_in_newline = end > start and bytes(buf[end - 1:end]) in (b"\r", b"\n")
        return end if not ends_in_newline else None  # a last record with a short or no separator
    return None


def _embedded_start(buf: bytearray, start: int, end: int) -> int:
    """Index of a WARC header that begins inside buf[start:end] after a blank line, or -1."""
    i = buf.find(b"\r\n\r\nWARC/1.", start, end)
    while i >= 0:
        head = bytes(buf[i + 4:i + 4 + 2048])
        if b"\nWARC-Type:" in head or b"\nWARC-Record-ID:" in head:
            return i + 4
        i = buf.find(b"\r\n\r\nWARC/1.", i + 1, end)
    return -1


def _skip_large(b: _Buffer, where: str, headers: dict[str, str], start: int, length: int
                ) -> Iterator[WarcRecord | WarcError]:
    """A block over the size cap: passed over in pieces (never held whole), still checked for framing."""
    b.consume(start)
    todo = length
    while todo > 0:
        more = b.fill(min(todo, 1 << 22) + 16)
        window = min(todo, len(b.buf))
        inner = _embedded_start(b.buf, 0, window)
        if inner >= 0:
            b.consume(inner)
            yield WarcError(where, "content_length_mismatch", f"Content-Length {length} runs into the next record")
            return
        if not more and window < todo:
            b.consume(len(b.buf))
            if b.gap is None:
                yield WarcError(where, "truncated_warc_record", f"the file ends inside a {length}-byte block")
            return
        step = window if window == todo else max(window - 16, 1)  # an overlap, so a split marker is found
        b.consume(step)
        todo -= step
    yield WarcRecord(where, headers, None, length)


# --- HTTP payloads -----------------------------------------------------------------------------------------------
class PayloadError(Exception):
    """A payload that cannot be decoded: reason (named) and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def split_http(block: bytes) -> tuple[int | None, dict[str, str], bytes]:
    """(status, headers lower-cased, body) of an HTTP response block; status None when there is no status line."""
    m = _HEAD_END.search(block, 0, MAX_HEADER_BYTES)
    if m is None or not block.startswith(b"HTTP/"):
        return None, {}, block
    lines = block[:m.start()].decode("latin-1").splitlines()
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return status, headers, block[m.end():]


def decode_body(body: bytes, headers: dict[str, str]) -> bytes:
    """Undo Transfer-Encoding: chunked and every Content-Encoding (in reverse order of application)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    codings = [c.strip().lower() for c in headers.get("content-encoding", "").split(",") if c.strip()]
    for coding in reversed(codings):
        body = _decode(body, coding)
    return body


def _dechunk(body: bytes) -> bytes:
    """Chunked transfer coding; a body that is not validly chunked is returned as it is (crawlers often
    store the dechunked body with the header left in)."""
    out, i = bytearray(), 0
    while True:
        j = body.find(b"\r\n", i)
        if j < 0:
            return body
        size_text = body[i:j].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return body
        if size == 0:
            return bytes(out)
        out += body[j + 2:j + 2 + size]
        i = j + 2 + size + 2
        if i > len(body) + 2:
            return bytes(out)


def _decode(body: bytes, coding: str) -> bytes:
    if coding in ("identity", "none"):
        return body
    try:
        if coding in ("gzip", "x-gzip"):
            if not body.startswith(b"\x1f\x8b"):
                return body  # stored already decoded with the header left in (common in crawls)
            return zlib.decompressobj(wbits=47).decompress(body)
        if coding == "deflate":
            try:
                return zlib.decompress(body)  # zlib-wrapped, as RFC 9110 says
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate, as many servers send
        if coding == "br":
            import brotli

            return brotli.decompress(body)
        if coding in ("zstd", "x-zstd"):
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    except Exception as e:  # noqa: BLE001 - each codec raises its own error type
        raise PayloadError("content_decoding_failed", f"Content-Encoding {coding}: {type(e).__name__}: {e}") from None
    raise PayloadError("unknown_content_encoding", f"Content-Encoding {coding!r} is not supported")
