"""Issue 12, the fuzzer: real files in every input format, thousands of seeded corruptions, and for every run
no crash, no hang, read = kept + dropped + errored, and every record the corruption did not touch still read
with the same text. What "touched" means per format is in tests/_fuzz_corpus.py.

Each reader call runs in a child process under a deadline (a hang fails the case, it never stalls CI). A failure
prints the seed, fixture, case index, corruption and the lost record; reproduce one case with
`.venv/bin/python benchmarks/bench_reader_fuzz.py --only FIXTURE --case N --seed SEED`. Another seed:
READER_FUZZ_SEED=...; more corruptions: READER_FUZZ_SCALE=2.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import _fuzz_corpus as fz
import pytest

SEED = int(os.environ.get("READER_FUZZ_SEED", "20261130"))
SCALE = float(os.environ.get("READER_FUZZ_SCALE", "1"))


@pytest.fixture(scope="module")
def corpus(shared_data: Path) -> dict[str, fz.Clean]:
    return fz.build_corpus(shared_data)


@pytest.fixture(scope="module")
def scratch():
    with fz.scratch_dir() as d:
        yield Path(d)


@pytest.fixture(scope="module")
def worker(scratch: Path):
    w = fz.ReaderWorker(timeout=float(os.environ.get("READER_FUZZ_TIMEOUT", "20")), log=scratch / "worker.log")
    yield w
    w.close()


# --- the oracle itself ------------------------------------------------------------------------------------------
def test_touch_rules():
    lines = [(0, 10), (10, 20), (20, 30)]  # three records, each with its newline
    assert fz.hit(lines, 12, 13) == {1}  # a flip inside a line
    assert fz.hit(lines, 19, 21) == {1, 2}  # across a boundary
    assert fz.hit(lines, 15, 15) == {1}  # an insertion inside a line
    assert fz.hit(lines, 20, 20) == {1, 2}  # an insertion at a boundary: both neighbours
    assert fz.hit(lines, 0, 0) == {0} and fz.hit(lines, 30, 30) == {2}
    assert fz.cut(lines, 20) == {2} and fz.cut(lines, 19) == {1, 2} and fz.cut(lines, 0) == {0, 1, 2}


def test_touch_rules_map_members_to_records(corpus):
    c = corpus["web:jsonl.gz-bgzf"]  # members cut every 2 KB: records span members
    for k, seg in enumerate(c.segments):
        recs = fz._recs_in_segments(c, {k})
        lo, hi = seg.plain
        assert recs == {i for i, r in enumerate(c.recs) if r.start < hi and r.end > lo} and recs
    one = corpus["web:jsonl.gz-1member"]
    assert fz._recs_in_segments(one, {0}) == set(range(len(one.recs)))  # one member: all of them
    pq = corpus["web:parquet"]
    assert [s.rows for s in pq.segments] == [(i, i + 5) for i in range(0, 30, 5)]


def test_edit_plain_recompresses_only_what_changed(corpus):
    import gzip

    c = corpus["web:jsonl.gz-multi"]
    seg = c.segments[3]
    a = seg.plain[0] + 5
    data = fz.edit_plain(c, a, a + 1, b"#")
    assert gzip.decompress(data) == c.plain[:a] + b"#" + c.plain[a + 1:]
    assert data[:seg.raw[0]] == c.data[:seg.raw[0]]  # members before it are the same bytes
    assert data.endswith(c.data[c.segments[4].raw[0]:])  # and the ones after it
    assert len(fz.gz_members(data)) == len(c.segments)


def test_cases_are_reproducible(corpus):
    for name in ("web:warc", "docs:jsonl.zst-multi", "web:parquet"):
        for i in range(20):
            a, b = fz.make_case(corpus[name], SEED, i), fz.make_case(corpus[name], SEED, i)
            assert (a.data, a.touched, a.desc) == (b.data, b.touched, b.desc)
            assert a.data != corpus[name].data, a.repro  # every case corrupts something


def test_clean_files_are_read_whole(corpus, worker, scratch):
    """Zero corruptions: every record read, exactly the expected documents (the oracle agrees with the reader)."""
    bad = []
    for name, c in corpus.items():
        o = fz.run_case(c, fz.Case(name, SEED, -1, "none", "clean", c.data, set()), worker, scratch / "clean")
        problems = fz.check_clean(c, o.res, scratch / "clean" / c.filename)
        bad += [f"{name}: {cls}: {detail}" for cls, detail in problems]
    assert not bad, "\n".join(bad)


def test_oracle_on_the_known_cases(shared_data, worker, scratch):
    """../shared/cases/readers: what each README line calls broken is touched (must still be read, whole or
    flagged); every other record must come back. A brotli body is decoded, or errored naming the encoding."""
    cases = shared_data.parent / "cases"
    if not (cases / "readers").is_dir():
        pytest.skip("../shared/cases/readers is absent")
    bad = []
    for c, case in fz.known_cases(cases):
        o = fz.run_case(c, case, worker, scratch / "known")
        bad += [f"{c.name}: {cls}: {detail}" for cls, detail in o.problems]
        if "brotli" in c.name and o.res.get("status") == "ok":
            yielded = {d[0] for d in o.res["docs"]}
            missing = [c.recs[i] for i in case.flagged_or_whole if c.recs[i].key not in yielded]
            named = [e for e in o.res["errors"] if re.search(r"encod|brotli|\bbr\b", f"{e['reason']} {e['detail']}", re.I)]
            if len(named) < len(missing):
                bad.append(f"{c.name}: {len(missing)} brotli pages not decoded and only {len(named)} errors name "
                           f"the content encoding ({[e['reason'] for e in o.res['errors']][:4]})")
        if "lone_surrogate" in c.name or "bom_crlf" in c.name:
            n = len(c.recs)
            if o.res.get("status") == "ok" and len(o.res["docs"]) != n:
                bad.append(f"{c.name}: {len(o.res['docs'])} documents, want all {n}")
    assert not bad, "\n".join(bad)


# --- the sweep ---------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fixture", sorted(fz.FIXTURES))
def test_fuzz(fixture, corpus, worker, scratch):
    c = corpus[fixture]
    runs = max(1, round(fz.FIXTURES[fixture] * SCALE))
    t = time.perf_counter()
    outcomes = fz.fuzz(c, worker, SEED, runs, scratch / fixture.replace(":", "_"))
    secs = time.perf_counter() - t
    kinds = sorted({o.case.kind for o in outcomes})
    assert len(kinds) >= min(4, len(c.kinds)), kinds  # the sweep exercised the corruption kinds
    failed = [o for o in outcomes if o.verdict != "passed"]
    assert not failed, (f"{fixture}: {fz.summary(outcomes)}\n({secs:.1f} s; reproduce one case: .venv/bin/python "
                        f"benchmarks/bench_reader_fuzz.py --only {fixture} --seed {SEED} --case N)")
