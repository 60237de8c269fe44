"""Issue 12: one bad record costs one record, in every reader.

Each file of ../shared/cases/readers/ is a regression test here (its README gives the right behaviour), and each
is one example of a class: the siblings (other encodings, Content-Length too long or missing, broken gzip
members, malformed JSON array elements, corrupt parquet row groups, meta that is not an object, invalid UTF-8)
are built from the same real pages and tested beside it.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.documents import DocumentWriter, iter_documents
from pipeline.run import run_pipeline
from pipeline.web.readers import WebReader
from pipeline.web.units import Unit, kind_of


def read_web(path: Path, tmp_path: Path) -> dict:
    """Run the web stage's reader over one file: documents, read count, fates and repairs."""
    out = tmp_path / f"reader-{path.name}"
    docs = list(WebReader([Unit(kind=kind_of(path), path=str(path), label=str(path))], str(out), 5_000_000).run())
    read = json.loads((out / "read" / "r00000.json").read_text())
    ledger = out / "ledger" / "reader-r00000.json"
    counts = json.loads(ledger.read_text())["counts"] if ledger.exists() else []
    errors = [json.loads(x) for f in (out / "errors").glob("*.jsonl") for x in f.read_text().splitlines()] \
        if (out / "errors").exists() else []
    fates = {(fate, reason): n for _, fate, reason, n in counts}
    n_read = read["read"].get(str(path), 0)
    assert n_read == len(docs) + sum(fates.values()), (n_read, len(docs), fates)  # reconciled
    return {"docs": docs, "read": n_read, "fates": fates, "errors": errors,
            "repaired": read["repaired"].get(str(path), {})}


def read_docs(paths: list[Path]) -> tuple[list[dict], list[tuple[str, str]], list[tuple[str, str]]]:
    errors: list[tuple[str, str]] = []
    repairs: list[tuple[str, str]] = []
    docs = list(iter_documents(paths, on_error=lambda r, w: errors.append((r, w)),
                               on_repair=lambda r, w: repairs.append((r, w))))
    return docs, errors, repairs


def raw_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


# --- the cases, as their README says --------------------------------------------------------------------------------
def test_lone_surrogate_is_repaired_and_the_records_after_it_are_kept(shared_cases, tmp_path):
    path = shared_cases / "readers" / "lone_surrogate.jsonl"
    web = read_web(path, tmp_path)
    assert len(web["docs"]) == 5 and web["fates"] == {} and web["repaired"] == {"lone_surrogate": 1}
    texts = [d.text for d in web["docs"]]
    assert texts[1].endswith("\ufffd") and "\ud83d" not in texts[1]
    docs, errors, repairs = read_docs([path])
    assert [d["id"] for d in docs] == ["doc0", "doc1", "doc2", "doc3", "doc4"] and errors == []
    assert repairs == [("lone_surrogate", f"{path}:2")]
    assert [d["text"] for d in docs] == texts
    clean = raw_texts(path)
    assert texts[2:] == clean[2:] and texts[0] == clean[0]


def test_bom_and_crlf_give_three_documents(shared_cases, tmp_path):
    path = shared_cases / "readers" / "bom_crlf.jsonl"
    web = read_web(path, tmp_path)
    assert len(web["docs"]) == 3 and web["fates"] == {} and web["repaired"] == {}
    docs, errors, repairs = read_docs([path])
    assert [d["id"] for d in docs] == ["bom0", "bom1", "bom2"] and errors == [] and repairs == []
    assert [d["text"] for d in docs] == [d.text for d in web["docs"]] == raw_texts(path)


def test_single_member_gzip_warc_reads_every_page(shared_cases, tmp_path):
    single = read_web(shared_cases / "readers" / "single_member.warc.gz", tmp_path)
    control = read_web(shared_cases / "readers" / "per_record.warc.gz", tmp_path)
    assert len(control["docs"]) == 4 and control["fates"] == {}
    assert len(single["docs"]) == 4 and single["fates"] == {}
    assert [(d.id, d.text) for d in single["docs"]] == [(d.id, d.text) for d in control["docs"]]
    assert all(d.text.rstrip().endswith("</html>") for d in single["docs"])


def test_short_content_length_is_flagged_and_the_next_records_are_read(shared_cases, tmp_path):
    path = shared_cases / "readers" / "content_length_short.warc"
    web = read_web(path, tmp_path)
    responses = path.read_bytes().count(b"WARC-Type: response")
    assert web["fates"] == {("errored", "content_length_mismatch"): 1}
    assert len(web["docs"]) == responses - 1
    (err,) = web["errors"]
    assert err["reason"] == "content_length_mismatch" and re.search(r"Content-Length \d+", err["detail"])
    assert all(d.text.rstrip().endswith("</html>") for d in web["docs"])  # nothing silently cut


def test_brotli_bodies_are_decoded(shared_cases, tmp_path):
    web = read_web(shared_cases / "readers" / "brotli_encoded.warc", tmp_path)
    assert len(web["docs"]) == 8 and web["fates"] == {}
    assert all(d.text.lstrip().lower().startswith("<!doctype html") and "Lesson" in d.text for d in web["docs"])


# --- siblings: WARC ------------------------------------------------------------------------------------------------
def _pages(shared_cases: Path) -> list[tuple[str, bytes]]:
    """(uri, html) of the real pages of the per-record case file."""
    data = gzip.decompress((shared_cases / "readers" / "per_record.warc.gz").read_bytes())
    out = []
    for rec in data.split(b"WARC/1.0\r\n")[1:]:
        if b"WARC-Type: response" in rec:
            uri = re.search(rb"WARC-Target-URI: (\S+)", rec).group(1).decode()
            body = rec.split(b"\r\n\r\n", 2)[2].rstrip(b"\r\n")
            out.append((uri, body))
    return out


def warc_record(uri: str, body: bytes, encoding: str | None = None, length_delta: int = 0,
                no_length: bool = False) -> bytes:
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
    if encoding:
        http += f"Content-Encoding: {encoding}\r\n".encode()
    block = http + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:{abs(hash(uri)) % 10**12:012d}>\r\n"
            f"WARC-Date: 2024-05-01T10:00:00Z\r\nWARC-Target-URI: {uri}\r\n"
            "Content-Type: application/http; msgtype=response\r\n")
    if not no_length:
        head += f"Content-Length: {len(block) + length_delta}\r\n"
    return head.encode() + b"\r\n" + block + b"\r\n\r\n"


def _encode(body: bytes, coding: str) -> bytes:
    import brotli
    import zstandard

    return {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
            "zstd": zstandard.ZstdCompressor().compress,
            "deflate-raw": lambda b: zlib.compress(b)[2:-4]}[coding](body)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate-raw", "br", "zstd"])
def test_every_content_encoding_is_decoded(shared_cases, tmp_path, coding):
    pages = _pages(shared_cases)
    header = "deflate" if coding == "deflate-raw" else coding
    path = tmp_path / f"{coding}.warc"
    path.write_bytes(b"".join(warc_record(u, _encode(b, coding), header) for u, b in pages))
    web = read_web(path, tmp_path)
    assert web["fates"] == {}
    assert [d.text for d in web["docs"]] == [b.decode() for _, b in pages]


def test_unknown_content_encoding_is_an_error_that_names_it(shared_cases, tmp_path):
    pages = _pages(shared_cases)
    path = tmp_path / "compress.warc"
    path.write_bytes(warc_record(*pages[0]) + warc_record(pages[1][0], pages[1][1], "compress")
                     + warc_record(*pages[2]))
    web = read_web(path, tmp_path)
    assert web["fates"] == {("errored", "unknown_content_encoding"): 1} and len(web["docs"]) == 2
    assert "compress" in web["errors"][0]["detail"] and "charset" not in web["errors"][0]["detail"]


@pytest.mark.parametrize("fault", ["too_long", "missing", "short"])
def test_bad_content_length_costs_one_record(shared_cases, tmp_path, fault):
    pages = _pages(shared_cases)
    bad = {"too_long": dict(length_delta=300), "missing": dict(no_length=True), "short": dict(length_delta=-6)}
    records = [warc_record(*p, **(bad[fault] if i == 1 else {})) for i, p in enumerate(pages)]
    for name, data in (("plain.warc", b"".join(records)),
                       ("members.warc.gz", b"".join(gzip.compress(r) for r in records)),
                       ("single.warc.gz", gzip.compress(b"".join(records)))):
        path = tmp_path / f"{fault}-{name}"
        path.write_bytes(data)
        web = read_web(path, tmp_path)
        reason = "missing_content_length" if fault == "missing" else "content_length_mismatch"
        assert web["fates"] == {("errored", reason): 1}, (name, web["fates"])
        assert [d.text for d in web["docs"]] == [b.decode() for i, (_, b) in enumerate(pages) if i != 1], name


def test_broken_gzip_member_costs_its_record(shared_cases, tmp_path):
    data = (shared_cases / "readers" / "per_record.warc.gz").read_bytes()
    members = [m.start() for m in re.finditer(re.escape(b"\x1f\x8b\x08"), data)]
    broken = bytearray(data)
    third = members[2]  # warcinfo, page 0, page 1 (broken), page 2, page 3
    broken[third + 40] ^= 0xFF
    path = tmp_path / "broken.warc.gz"
    path.write_bytes(bytes(broken))
    web = read_web(path, tmp_path)
    assert web["fates"] == {("errored", "corrupt_gzip_member"): 1}
    assert [d.metadata["url"] for d in web["docs"]] == [u for i, (u, _) in enumerate(_pages(shared_cases)) if i != 1]
    truncated = tmp_path / "truncated.warc.gz"
    truncated.write_bytes(data[: members[3] + 50])
    web = read_web(truncated, tmp_path)
    assert web["fates"] == {("errored", "truncated_gzip_member"): 1} and len(web["docs"]) == 2


@pytest.mark.parametrize("repeats", [20, 100])
def test_garbage_between_records_is_never_a_silent_cut(shared_cases, tmp_path, repeats):
    """Bytes after a record's CRLF CRLF that are not the next header: a damaged header when header lines follow
    closely (the record before is read, the garbage is one error); otherwise the record's Content-Length may
    have cut its block short at a blank line, so the record is flagged. The records after are read."""
    pages = _pages(shared_cases)
    records = [warc_record(*p) for p in pages]
    path = tmp_path / f"garbage{repeats}.warc"
    path.write_bytes(records[0] + b"\x00\xffnot a record at all\r\n" * repeats + b"".join(records[1:]))
    web = read_web(path, tmp_path)
    if repeats == 20:  # 480 bytes: the next header's field lines are within reach
        assert web["fates"] == {("errored", "unparseable_bytes"): 1} and len(web["docs"]) == len(pages)
    else:
        assert web["fates"] == {("errored", "content_length_mismatch"): 1}
        assert [d.text for d in web["docs"]] == [b.decode() for _, b in pages[1:]]


def test_short_content_length_landing_on_a_blank_line_is_flagged(shared_cases, tmp_path):
    pages = _pages(shared_cases)
    uri, body = pages[1]
    body = body.replace(b"</h1>", b"</h1>\r\n\r\n", 1)  # a blank line inside the page
    cut = len(body) - body.index(b"\r\n\r\n")  # the declared end lands right before it
    records = [warc_record(*pages[0]), warc_record(uri, body, length_delta=-cut), warc_record(*pages[2])]
    path = tmp_path / "blank-line.warc"
    path.write_bytes(b"".join(records))
    web = read_web(path, tmp_path)
    assert web["fates"] == {("errored", "content_length_mismatch"): 1}
    assert [d.text for d in web["docs"]] == [pages[0][1].decode(), pages[2][1].decode()]


# --- siblings: JSON lines, arrays, parquet, HTML ------------------------------------------------------------------
def _real_records(shared_data: Path, n: int = 12) -> list[dict]:
    lines = (shared_data / "textbooks/openstax_intro_python/modules_plaintext.jsonl").read_text().splitlines()
    return [{"id": json.loads(x)["module"], "text": json.loads(x)["text"]} for x in lines[:n]]


def test_broken_member_of_a_multi_member_jsonl_gz_costs_that_member(shared_data, tmp_path):
    recs = _real_records(shared_data)
    members = [gzip.compress("".join(json.dumps(r) + "\n" for r in recs[i:i + 3]).encode())
               for i in range(0, len(recs), 3)]
    data = bytearray(b"".join(members))
    data[len(members[0]) + 30] ^= 0xFF  # inside the second member
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(bytes(data))
    docs, errors, _ = read_docs([path])
    assert [d["id"] for d in docs] == [r["id"] for r in recs[:3] + recs[6:]]
    assert [e[0] for e in errors] == ["corrupt_gzip_member"] and "compressed bytes skipped" in errors[0][1]
    web = read_web(path, tmp_path)
    assert [d.id for d in web["docs"]] == [r["id"] for r in recs[:3] + recs[6:]]
    assert web["fates"] == {("errored", "corrupt_gzip_member"): 1}


def test_multi_frame_zstd_is_read_in_full(shared_data, tmp_path):
    import zstandard

    recs = _real_records(shared_data)
    c = zstandard.ZstdCompressor(write_checksum=True)
    path = tmp_path / "docs.jsonl.zst"
    path.write_bytes(b"".join(c.compress("".join(json.dumps(r) + "\n" for r in recs[i:i + 4]).encode())
                             for i in range(0, len(recs), 4)))
    docs, errors, _ = read_docs([path])
    assert [d["id"] for d in docs] == [r["id"] for r in recs] and errors == []


def test_invalid_utf8_and_odd_meta_are_repaired_not_lost(shared_data, tmp_path):
    recs = _real_records(shared_data, 4)
    lines = [json.dumps(recs[0]).encode(),
             json.dumps({**recs[1], "meta": [1, 2]}).encode(),
             json.dumps({**recs[2], "meta": "not json {"}).encode(),
             json.dumps(recs[3]).encode().replace(b'", "text": "', b'", "text": "\xff\xfe', 1)]
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    docs, errors, repairs = read_docs([path])
    assert errors == [] and [d["id"] for d in docs] == [r["id"] for r in recs]
    assert sorted(r for r, _ in repairs) == ["invalid_utf8", "meta_not_object", "meta_not_object"]
    assert docs[1]["meta"] == {"meta_raw": "[1, 2]"} and docs[2]["meta"] == {"meta_raw": "not json {"}
    assert docs[3]["text"].startswith("\ufffd\ufffd") and docs[0]["text"] == recs[0]["text"]
    with DocumentWriter(tmp_path / "written") as w:  # the repaired documents can be written and read back
        w.write_many(docs)
    again, errors, _ = read_docs([tmp_path / "written"])
    assert errors == [] and [d["text"] for d in again] == [d["text"] for d in docs]
    web = read_web(path, tmp_path)
    assert len(web["docs"]) == 4 and web["repaired"] == {"invalid_utf8": 1}


def test_malformed_json_array_element_costs_that_element(shared_data, tmp_path):
    recs = _real_records(shared_data, 6)
    items = [json.dumps(r) for r in recs]
    items[2] = items[2][: len(items[2]) // 2]  # cut in the middle
    path = tmp_path / "docs.json"
    path.write_text("[\n" + ",\n".join(items) + "\n]\n")
    web = read_web(path, tmp_path)
    assert [d.id for d in web["docs"]] == [r["id"] for i, r in enumerate(recs) if i != 2]
    assert sum(n for (fate, _), n in web["fates"].items() if fate == "errored") >= 1
    gz = tmp_path / "docs.json.gz"  # a compressed array is read as an array
    gz.write_bytes(gzip.compress(("[" + ",".join(json.dumps(r) for r in recs) + "]").encode()))
    assert [d.id for d in read_web(gz, tmp_path)["docs"]] == [r["id"] for r in recs]


def test_corrupt_parquet_row_group_costs_its_rows(shared_data, tmp_path):
    recs = _real_records(shared_data, 12)
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=4, compression="zstd")
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(1)  # the text column of the second row group
    data = bytearray(path.read_bytes())
    start = col.dictionary_page_offset or col.data_page_offset  # the chunk begins with its dictionary page
    for k in range(start + 20, start + col.total_compressed_size - 4, 7):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))
    docs, errors, _ = read_docs([path])
    assert [d["id"] for d in docs] == [r["id"] for r in recs[:4] + recs[8:]]
    assert [e[0] for e in errors] == ["corrupt_row_group"] and "(4 rows)" in errors[0][1]
    web = read_web(path, tmp_path)
    assert [d.id for d in web["docs"]] == [r["id"] for r in recs[:4] + recs[8:]]


def test_html_with_a_few_bad_bytes_is_repaired_not_errored(shared_data, tmp_path):
    page = (shared_data / "web/sqlite_doc_html/about.html").read_bytes()
    folder = tmp_path / "pages"
    folder.mkdir()
    (folder / "about.html").write_bytes(b"\xef\xbb\xbf" + page.replace(b"</title>", b"\xff</title>", 1))
    web = read_web(folder / "about.html", tmp_path)
    assert len(web["docs"]) == 1 and web["repaired"] == {"invalid_utf8": 1}
    assert not web["docs"][0].text.startswith("\ufeff") and "\ufffd</title>" in web["docs"][0].text


# --- the stages that read documents: the case files end to end ----------------------------------------------------
@pytest.mark.parametrize("stage", ["dedup", "decontaminate", "shard"])
def test_stages_read_every_record_of_the_case_files(shared_cases, shared_data, tmp_path, stage):
    inputs = [str(shared_cases / "readers" / n) for n in ("lone_surrogate.jsonl", "bom_crlf.jsonl")]
    sets = [f"run.out={tmp_path / 'out'}", f"run.stages=[{stage}]", f"{stage}.inputs={json.dumps(inputs)}"]
    if stage == "decontaminate":
        sets += [f"decontaminate.local_dir={shared_data / 'benchmarks'}", "decontaminate.benchmarks=[gsm8k]"]
    stats = run_pipeline(load_config(None, sets), log=lambda m: None)[stage]
    assert stats["read"] == 8 and stats["errored"] == {} and stats["reconciled"]
    assert stats["repaired"] == {"lone_surrogate": 1}


# --- classes the fuzzer found (tests/test_reader_fuzz.py) ---------------------------------------------------------
def test_a_lost_newline_costs_only_the_damaged_record(shared_data, tmp_path):
    recs = _real_records(shared_data, 6)
    lines = [json.dumps(r).encode() for r in recs]
    lines[2] = lines[2][:-5] + b"\xc8\xbd\xce\x16{" + lines[3]  # record 2's end and newline damaged: 2+3 merged
    del lines[3]
    path = tmp_path / "merged.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs, errors, _ = read_docs([path])
    assert [d["id"] for d in docs] == [r["id"] for i, r in enumerate(recs) if i != 2]
    assert [e[0] for e in errors] == ["malformed_json"]
    web = read_web(path, tmp_path)
    assert [d.id for d in web["docs"]] == [r["id"] for i, r in enumerate(recs) if i != 2]


def test_json_array_without_its_brackets_or_commas_is_still_read(shared_data, tmp_path):
    recs = _real_records(shared_data, 5)
    body = ",\n".join(json.dumps(r) for r in recs)
    for name, text in (("lost-open.json", '"\x15' + body + "]"), ("bracket-in-gap.json", "[" + body.replace(
            ",\n", ",]", 1) + "]"), ("no-commas.json", "[" + body.replace(",\n", "\n") + "]")):
        path = tmp_path / name
        path.write_text(text)
        web = read_web(path, tmp_path)
        assert [d.id for d in web["docs"]] == [r["id"] for r in recs], name


def test_damaged_separator_costs_one_record(shared_cases, tmp_path):
    pages = _pages(shared_cases)
    records = [warc_record(*p) for p in pages]
    records[0] = records[0][:-4] + b"\r\n\xc7\xbe"  # the CRLF CRLF after record 0 damaged
    path = tmp_path / "sep.warc"
    path.write_bytes(b"".join(records))
    web = read_web(path, tmp_path)
    assert web["fates"] == {("errored", "content_length_mismatch"): 1}
    assert [d.text for d in web["docs"]] == [b.decode() for _, b in pages[1:]]


@pytest.mark.parametrize("delta", [1, 2, 3, 4])
def test_last_record_content_length_too_long_is_flagged(shared_cases, tmp_path, delta):
    pages = _pages(shared_cases)
    uri, body = pages[-1]
    path = tmp_path / f"long{delta}.warc"
    path.write_bytes(b"".join(warc_record(*p) for p in pages[:-1]) + warc_record(uri, body + b"\r\n",
                                                                               length_delta=delta))
    web = read_web(path, tmp_path)
    assert web["fates"] == {("errored", "content_length_mismatch"): 1}
    assert len(web["docs"]) == len(pages) - 1


def test_content_length_short_by_newlines_is_read_whole(shared_cases, tmp_path):
    pages = _pages(shared_cases)
    uri, body = pages[1]
    records = [warc_record(*p) for p in pages]
    records[1] = warc_record(uri, body + b"\r\n", length_delta=-2)  # the block's own CRLF left outside
    path = tmp_path / "short-newlines.warc"
    path.write_bytes(b"".join(records))
    web = read_web(path, tmp_path)
    assert web["fates"] == {} and web["repaired"] == {"content_length_adjusted": 1}
    assert web["docs"][1].text == (body + b"\r\n").decode()


def test_deeply_nested_record_costs_that_record(shared_data, tmp_path):
    recs = _real_records(shared_data, 3)
    deep = '{"id": "deep", "text": "x", "meta": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}"
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join([json.dumps(recs[0]), deep, json.dumps(recs[1]), json.dumps(recs[2])]) + "\n")
    docs, errors, _ = read_docs([path])
    assert [d["id"] for d in docs] == [r["id"] for r in recs] and [e[0] for e in errors] == ["malformed_json"]
    assert [d.id for d in read_web(path, tmp_path)["docs"]] == [r["id"] for r in recs]


def test_document_reader_reads_arrays_and_records_without_newlines(shared_data, tmp_path):
    recs = _real_records(shared_data, 5)
    array = tmp_path / "docs.json"
    array.write_text(json.dumps(recs, indent=2))
    gz = tmp_path / "docs.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(recs).encode()))
    cr = tmp_path / "cr.jsonl"
    cr.write_bytes(b"\r".join(json.dumps(r).encode() for r in recs) + b"\r")
    for path in (array, gz, cr):
        docs, errors, _ = read_docs([path])
        assert [d["id"] for d in docs] == [r["id"] for r in recs] and errors == [], path.name
    docs, errors, _ = read_docs([tmp_path])  # a folder: .json, .json.gz and .jsonl are all picked up
    assert len(docs) == 15 and errors == []
    assert [d.id for d in read_web(cr, tmp_path)["docs"]] == [r["id"] for r in recs]


def test_document_stages_write_where_each_bad_record_was(shared_cases, tmp_path):
    src = tmp_path / "in.jsonl"
    good = (shared_cases / "readers" / "bom_crlf.jsonl").read_bytes()
    src.write_bytes(good + b'{"id": "broken", "text": "no end\n{"id": "x"}\n')
    sets = [f"run.out={tmp_path / 'out'}", "run.stages=[dedup]", f"dedup.inputs={json.dumps([str(src)])}"]
    stats = run_pipeline(load_config(None, sets), log=lambda m: None)["dedup"]
    assert stats["errored"] == {"malformed_json": 1, "missing_text": 1}
    lines = [json.loads(x) for x in (tmp_path / "out/stages/dedup/errors.jsonl").read_text().splitlines()]
    assert [(e["reason"], e["where"]) for e in lines] == [("malformed_json", f"{src}:4"), ("missing_text", f"{src}:5")]


def test_case_files_through_the_whole_web_stage(shared_cases, tmp_path):
    """The README's right behaviour end to end (extraction and filters included): every page of the WARC cases
    and all three casings of the English paragraph are kept, whichever files share a task."""
    cfg = {"run": {"name": "t", "out": str(tmp_path / "run"), "stages": ["web"]},
           "web": {"sources": [{"path": str(shared_cases / "readers")}, {"path": str(shared_cases / "langid")}],
                   "tasks": 1, "workers": 1, "edu": {"enabled": False, "filter": False}}}
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    stats = run_pipeline(load_config(str(tmp_path / "cfg.yaml"), []), log=lambda m: None)["web"]
    assert stats["reconciled"]
    files = {Path(k).name: v for k, v in stats["files"].items()}
    for name, pages in (("single_member.warc.gz", 4), ("per_record.warc.gz", 4), ("brotli_encoded.warc", 8),
                        ("case_variants.jsonl", 3), ("bom_crlf.jsonl", 3)):
        assert files[name]["read"] == files[name]["kept"] == pages, (name, files[name])
    assert files["content_length_short.warc"]["errored"] == {"content_length_mismatch": 1}
