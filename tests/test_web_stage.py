"""Web stage on real Common Crawl / HTML data and on planted bad inputs: every record ends kept, dropped or errored."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.config.classifier import ClassifierSection
from pipeline.documents import iter_documents
from pipeline.errors import TextbookError
from pipeline.run import run_one

NO_FILTERS = [f"web.filters.{f}.enabled=false" for f in
              ("url", "min_length", "language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")]
# cheap filters only (no block lists, no spaCy): for tests about execution rather than filtering
LIGHT = [f"web.filters.{f}.enabled=false" for f in
         ("url", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")]


def make_cfg(tmp_path: Path, web: dict, sets: list[str] | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = {"run": {"name": "t", "out": str(tmp_path / "run"), "stages": ["web"]}, "web": web}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return load_config(str(path), sets or [])


def kept(tmp_path: Path) -> list[dict]:
    return list(iter_documents([tmp_path / "run" / "stages" / "web" / "kept"]))


def test_real_warc_jsonl_html(shared_data: Path, tmp_path: Path) -> None:
    web = shared_data / "web"
    pages = tmp_path / "pages"
    pages.mkdir()
    for name in ("adac.de.kindersitze.html", "blog.python.org.html"):  # a German shop page, an English blog
        src = web / "trafilatura_pages" / "cache" / name
        if src.exists():
            shutil.copy(src, pages / name)
    sqlite = web / "sqlite_doc_html"
    cfg = make_cfg(tmp_path, {
        "inputs": [str(web / "dolma_cc" / "warc" / "sample-0001.warc.gz"),
                   str(web / "dolma_cc" / "cc_en_head" / "cc_en_head-0091.jsonl"), str(pages)],
        "sources": [{"path": str(sqlite), "type": "html", "glob": "lang_select.html"},
                    {"path": str(sqlite), "type": "html", "glob": "releaselog/3_4_0.html"}],
        "tasks": 2, "workers": 1})
    stats = run_one(cfg, "web")
    assert stats["reconciled"] and stats["errored"] == {}
    files = stats["files"]
    assert files[str(web / "dolma_cc" / "cc_en_head" / "cc_en_head-0091.jsonl")]["read"] == 10
    warc = files[str(web / "dolma_cc" / "warc" / "sample-0001.warc.gz")]
    assert warc["read"] >= 15  # HTTP responses; request/metadata records are not documents
    assert stats["non_document_warc_records"] > 0
    for f in files.values():
        assert f["read"] == f["kept"] + sum(f["dropped"].values()) + sum(f["errored"].values())
    docs = kept(tmp_path)
    assert len(docs) == stats["kept"] > 10
    assert all(d["source"] == "web" and d["text"].strip() for d in docs)
    assert all(d["meta"]["language"] == "en" and d["meta"]["input_file"] for d in docs)
    from_warc = [d for d in docs if d["meta"]["input_file"].endswith(".warc.gz")]
    assert from_warc and all(d["url"].startswith("http") and "<html" not in d["text"].lower() for d in from_warc)
    assert any("SELECT" in d["text"] for d in docs)  # the long SQLite article survives every filter
    if (pages / "adac.de.kindersitze.html").exists():  # German: dropped by language ID, with its reason
        removed = pq.read_table(tmp_path / "run" / "stages" / "web" / "removed").to_pylist()
        adac = [r for r in removed if "adac" in (r["meta"] or "")]
        assert adac and adac[0]["reason"].startswith("language: lang_de")
        assert stats["filters"]["language"]["reasons"]["lang_de"] >= 1


def _warc_bytes(shared_data: Path) -> bytes:
    return (shared_data / "web" / "dolma_cc" / "warc" / "sample-0000.warc.gz").read_bytes()


def test_bad_inputs_are_counted_not_fatal(shared_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    whole = _warc_bytes(shared_data)
    (bad / "truncated.warc.gz").write_bytes(whole[: len(whole) // 2])
    (bad / "corrupt.warc.gz").write_bytes(whole[:40_000] + b"\x00garbage" * 500 + whole[40_000:])
    lines = [json.dumps({"id": "a", "text": "good text " * 30}).encode(),
             b'{"id": "b", "text": "no closing brace',
             b'{"id": "c", "text": "bad utf8 \xff\xfe here"}',
             json.dumps({"id": "d", "text": "   "}).encode(),
             json.dumps({"id": "e", "body": "no text field"}).encode(),
             json.dumps(["not", "an", "object"]).encode()]
    (bad / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (bad / "notgzip.jsonl.gz").write_bytes(b"this is not gzip at all")
    (bad / "broken.parquet").write_bytes(b"PAR1 nonsense")
    (bad / "empty.html").write_bytes(b"")
    with open(bad / "huge.html", "wb") as f:  # a 50 MB page
        f.write(b"<html><body>" + b"<p>spam spam spam</p>" * (50_000_000 // 21) + b"</body></html>")
    cfg = make_cfg(tmp_path, {"inputs": [str(bad)], "tasks": 2, "workers": 1}, NO_FILTERS)
    stats = run_one(cfg, "web")
    assert stats["reconciled"]
    f = {Path(k).name: v for k, v in stats["files"].items()}
    # the text with bad bytes is kept with U+FFFD and counted as repaired (the one policy of pipeline.textio)
    assert f["mixed.jsonl"] == {"read": 6, "kept": 2, "dropped": {"empty": 1},
                                "errored": {"malformed_json": 2, "missing_text": 1}, "repaired": {"invalid_utf8": 1}}
    assert f["notgzip.jsonl.gz"]["errored"] == {"corrupt_gzip_member": 1}
    assert f["broken.parquet"]["errored"] == {"unreadable_file": 1}
    assert f["empty.html"]["dropped"] == {"empty": 1}
    assert f["huge.html"]["dropped"] == {"too_large": 1}
    assert f["truncated.warc.gz"]["errored"] == {"truncated_gzip_member": 1} and f["truncated.warc.gz"]["kept"] > 0
    # garbage inside one gzip member costs that member's record: every other record of the file is still read
    clean = _records_read(_warc_bytes(shared_data), tmp_path)
    assert f["corrupt.warc.gz"]["errored"] == {"corrupt_gzip_member": 1}
    assert f["corrupt.warc.gz"]["read"] == clean
    errors = [json.loads(x) for x in (tmp_path / "run" / "stages" / "web" / "errors.jsonl").read_text().splitlines()]
    where = {(Path(e["file"]).name, e["reason"]): e for e in errors}
    assert where[("mixed.jsonl", "malformed_json")]["where"] in ("line 2", "line 6")
    assert where[("truncated.warc.gz", "truncated_gzip_member")]["where"].startswith("byte ")
    assert "compressed bytes skipped" in where[("corrupt.warc.gz", "corrupt_gzip_member")]["detail"]


def _records_read(warc: bytes, tmp_path: Path) -> int:
    from pipeline.web.readers import WebReader
    from pipeline.web.units import Unit

    path = tmp_path / "clean" / "clean.warc.gz"
    path.parent.mkdir()
    path.write_bytes(warc)
    list(WebReader([Unit(kind="warc", path=str(path), label="clean")], str(tmp_path / "clean"), 5_000_000).run())
    return json.loads((tmp_path / "clean" / "read" / "r00000.json").read_text())["read"]["clean"]


def test_missing_input_path_is_one_line_error(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"inputs": [str(tmp_path / "nope.warc.gz")]})
    with pytest.raises(TextbookError, match="does not exist"):
        run_one(cfg, "web")
    from typer.testing import CliRunner

    from pipeline.cli import app

    (tmp_path / "c.yaml").write_text(json.dumps({"run": {"out": str(tmp_path / "r")},
                                                 "web": {"sources": [{"path": str(tmp_path / "gone")}]}}))
    res = CliRunner().invoke(app, ["web", str(tmp_path / "c.yaml")])
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output


def _small_inputs(shared_data: Path) -> list[str]:
    web = shared_data / "web" / "dolma_cc"
    return [str(web / "cc_en_head"), str(web / "provided_documents_000.json.gz")]


def test_resume_skips_completed_tasks(shared_data: Path, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"inputs": _small_inputs(shared_data), "tasks": 3, "workers": 1}, LIGHT)
    first = run_one(cfg, "web")
    state = Path(first["state_dir"])
    out = state / "out" / "kept"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    # a crash during task 1: its completion marker never got written and its outputs are half there
    (state / "logs" / "completions" / "00001").unlink()
    (tmp_path / "run" / "stages" / "web" / "_SUCCESS.json").unlink()
    second = run_one(cfg, "web")
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert {k for k in before if not k.startswith("r00001")} <= after.keys()
    assert all(after[k] == v for k, v in before.items() if not k.startswith("r00001"))  # tasks 0, 2 skipped
    assert any(after[k] != v for k, v in before.items() if k.startswith("r00001"))  # task 1 re-ran
    for key in ("read", "kept", "dropped", "errored", "files"):
        assert first[key] == second[key]


def test_local_workers_and_ray_give_the_same_output(shared_data: Path, tmp_path: Path, ray_session) -> None:
    results = {}
    for name, sets in {"local1": ["web.workers=1"], "local2": ["web.workers=2"],
                       "ray": ["web.executor=ray", "web.workers=2"]}.items():
        d = tmp_path / name
        d.mkdir()
        cfg = make_cfg(d, {"inputs": _small_inputs(shared_data), "tasks": 2}, sets + LIGHT)
        stats = run_one(cfg, "web")
        results[name] = (sorted(doc["id"] for doc in kept(d)), stats["dropped"], stats["read"])
    assert results["local1"][0]
    assert results["local1"] == results["local2"] == results["ray"]


def test_edu_score_stored_and_filter(shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("pipeline.classify.datatrove_steps")
    from pipeline.paths import repo_path

    model = repo_path(ClassifierSection().model)  # the committed default classifier
    if not (model / "classifier.json").exists():
        pytest.skip("no committed edu classifier")
    inputs = [str(shared_data / "web" / "dolma_cc" / "cc_en_head")]
    cfg = make_cfg(tmp_path / "a", {"inputs": inputs, "edu": {"enabled": True, "model": str(model)}}, NO_FILTERS)
    scored = run_one(cfg, "web")
    docs = kept(tmp_path / "a")
    assert len(docs) == scored["kept"] == 20 and all(d["edu_score"] is not None for d in docs)
    cut = sorted(d["edu_score"] for d in docs)[10]
    cfg = make_cfg(tmp_path / "b", {"inputs": inputs, "edu": {"enabled": True, "model": str(model), "filter": True,
                                                              "threshold": cut}}, NO_FILTERS)
    filtered = run_one(cfg, "web")
    assert filtered["kept"] == sum(d["edu_score"] >= cut for d in docs)
    assert filtered["dropped"] == {"edu": 20 - filtered["kept"]}


def test_hf_dataset_on_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = ["A first document about databases and indexes. " * 10, "", "Second one. " * 20]
    datasets.Dataset.from_dict({"content": texts, "uid": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    cfg = make_cfg(tmp_path, {"sources": [{"path": str(tmp_path / "ds"), "type": "hf", "text_key": "content",
                                           "id_key": "uid"}], "tasks": 2}, NO_FILTERS)
    stats = run_one(cfg, "web")
    assert (stats["read"], stats["kept"], stats["dropped"]) == (3, 2, {"empty": 1})
    assert sorted(d["meta"]["source_id"] for d in kept(tmp_path)) == ["x", "z"]


def test_language_filter_offline() -> None:
    from datatrove.data import Document

    from pipeline.web.steps import LanguageFilter

    flt = LanguageFilter(["en"], 0.65)
    en = Document(text="The query planner chooses an index for each table in the join.", id="1")
    de = Document(text="Der Anfrageplaner wählt für jede Tabelle im Join einen Index aus.", id="2")
    assert flt.filter(en) is True and en.metadata["language"] == "en"
    assert flt.filter(de) == (False, "lang_de")


def test_gzip_jsonl_with_truncation(tmp_path: Path) -> None:
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 40}).encode() + b"\n" for i in range(50)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    cfg = make_cfg(tmp_path, {"inputs": [str(tmp_path / "cut.jsonl.gz")], "tasks": 1}, NO_FILTERS)
    stats = run_one(cfg, "web")
    # the lines decoded before the cut are kept (a deflate prefix decodes exactly); the cut line is the one error
    assert stats["reconciled"] and stats["errored"] == {"truncated_gzip_member": 1} and stats["kept"] >= 20
    assert stats["read"] == stats["kept"] + 1


def _default_model() -> Path:
    from pipeline.paths import repo_path

    model = repo_path(ClassifierSection().model)  # the committed default classifier
    if not (model / "classifier.json").exists():
        pytest.skip("no committed edu classifier")
    return model


def _removed(tmp_path: Path) -> list[dict]:
    d = tmp_path / "run" / "stages" / "web" / "removed"
    return list(iter_documents([d])) if d.is_dir() else []


def test_edu_keep_top_is_a_fraction_of_this_run(shared_data: Path, tmp_path: Path) -> None:
    """keep_top 0.3 keeps 30 % of the pages this run scored (the calibration sample's 30 % keeps another share);
    the cut is taken after scoring, so changing it re-scores nothing; every drop is named and counted."""
    model = _default_model()
    inputs = [str(shared_data / "web" / "dolma_cc" / "cc_en_head")]
    scored = run_one(make_cfg(tmp_path / "a", {"inputs": inputs, "edu": {"enabled": True, "model": str(model)}},
                              NO_FILTERS), "web")
    scores = {d["meta"]["source_id"]: d["edu_score"] for d in kept(tmp_path / "a")}
    assert len(scores) == scored["kept"] == scored["edu"]["scored"] == 20 and "filter" not in scored["edu"]

    edu = {"enabled": True, "model": str(model), "filter": True, "keep_top": 0.3}
    stats = run_one(make_cfg(tmp_path / "b", {"inputs": inputs, "edu": edu}, NO_FILTERS), "web")
    cut = stats["edu"]["filter"]
    assert (stats["kept"], stats["dropped"], cut["scored"], cut["kept"]) == (6, {"edu": 14}, 20, 6)
    assert cut["keep_rate"] == pytest.approx(0.3) and cut["keep_top_of"] == "run"
    assert cut["dropped"] == {"below_cutoff": 14} and stats["reconciled"]
    top = {d["meta"]["source_id"] for d in kept(tmp_path / "b")}
    assert min(scores[i] for i in top) >= max(s for i, s in scores.items() if i not in top)
    assert min(scores[i] for i in top) == pytest.approx(cut["cutoff"])
    assert sorted(r["reason"] for r in _removed(tmp_path / "b")) == ["edu: below_cutoff"] * 14
    for f in stats["files"].values():
        assert f["read"] == f["kept"] + sum(f["dropped"].values()) + sum(f["errored"].values())
    from pipeline.report import build_report

    page = build_report(tmp_path / "b" / "run", tmp_path / "report").read_text()
    assert "realised keep rate</td><td>30.0%" in page and "keep_top asked</td><td>30.0% of run" in page

    # another cut on the same run: the datatrove tasks are not run again (same state, scored files untouched)
    state = Path(stats["state_dir"])
    stamps = {p: p.stat().st_mtime_ns for p in (state / "out" / "scored").glob("*.parquet")}
    assert stamps
    again = run_one(make_cfg(tmp_path / "b", {"inputs": inputs, "edu": {**edu, "keep_top": 0.5}}, NO_FILTERS), "web")
    assert again["state_dir"] == str(state) and again["kept"] == 10 and again["dropped"] == {"edu": 10}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # the named alternative: the cut-off that keeps 30 % of the model's calibration sample
    calib = run_one(make_cfg(tmp_path / "b", {"inputs": inputs, "edu": {**edu, "keep_top_of": "calibration"}},
                             NO_FILTERS), "web")
    from pipeline.classify.model import load_classifier

    want = load_classifier(model).cutoff_for_keep_top(0.3)
    assert calib["edu"]["filter"]["cutoff"] == pytest.approx(want)
    assert calib["kept"] == sum(s >= want for s in scores.values())
    assert calib["edu"]["filter"]["keep_rate"] == pytest.approx(calib["kept"] / 20)


def test_edu_cut_ties_guards_and_task_split(tmp_path: Path) -> None:
    """Equal scores at the cut are split by provenance, the same whatever the task split; a page a guard
    stopped is never kept (even at threshold 0) and is counted under its gate."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _edu_adversarial import LESSONS, adversarial_pages

    model = _default_model()
    pages = adversarial_pages()
    rows = [{"id": f"same{i}", "text": "\n".join(LESSONS[:3])} for i in range(8)]
    rows += [{"id": f"lesson{i}", "text": "\n".join(LESSONS[i:] + LESSONS[:i])} for i in range(4)]
    rows += [{"id": "keywords", "text": pages["keyword_list_lines"]}, {"id": "salad", "text": pages["word_salad_mixed"]}]
    src = tmp_path / "pages.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = {}
    for tasks in (1, 2):
        edu = {"enabled": True, "model": str(model), "filter": True, "keep_top": 0.5}
        stats = run_one(make_cfg(tmp_path / f"t{tasks}", {"inputs": [str(src)], "tasks": tasks, "edu": edu},
                                 NO_FILTERS), "web")
        assert stats["kept"] == 7 and stats["edu"]["filter"]["keep_rate"] == pytest.approx(0.5)
        chosen[tasks] = sorted(d["meta"]["source_id"] for d in kept(tmp_path / f"t{tasks}"))
        gated = {d["meta"]["source_id"]: d["meta"]["edu_guard"] for d in _removed(tmp_path / f"t{tasks}")
                 if d["meta"].get("edu_guard")}
        if stats["edu"]["gated"]:  # checked: the model scores them at least the guards' floor
            assert set(gated) <= {"keywords", "salad"} and len(gated) == sum(stats["edu"]["gated"].values())
    assert chosen[1] == chosen[2] and not {"keywords", "salad"} & set(chosen[1])
    assert 0 < sum(i.startswith("same") for i in chosen[1]) < 8  # the cut fell among the eight equal pages

    # guards at threshold 0: every page passes the cut-off, gated ones still go, under their gate's name
    from pipeline.classify.guards import GuardConfig, GuardedScorer
    from pipeline.classify.model import load_classifier

    res = GuardedScorer(load_classifier(model), config=GuardConfig(check_above=0)).score([r["text"] for r in rows])
    assert res.gates[-2:] == ["keyword_list", "word_salad"]
    floor = GuardedScorer(load_classifier(model)).floor
    want_gated = {r["id"]: g for r, g, raw in zip(rows, res.gates, res.raw, strict=True) if g and raw >= floor}
    edu = {"enabled": True, "model": str(model), "filter": True, "threshold": 0}
    stats = run_one(make_cfg(tmp_path / "z", {"inputs": [str(src)], "edu": edu}, NO_FILTERS), "web")
    assert stats["kept"] == len(rows) - len(want_gated)
    assert stats["edu"]["filter"]["dropped"] == {f"guard_{g}": 1 for g in want_gated.values()}
    off = run_one(make_cfg(tmp_path / "off", {"inputs": [str(src)], "edu": {**edu, "guards": False}}, NO_FILTERS),
                  "web")
    assert off["kept"] == len(rows) and off["edu"]["gated"] == {}


def test_edu_threshold_and_keep_top_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(TextbookError, match="threshold or keep_top"):
        make_cfg(tmp_path, {"inputs": ["x"], "edu": {"enabled": True, "threshold": 3, "keep_top": 0.2}})
