"""Issue 16: a run that ends with no input documents shows the funnel that emptied it (counts per stage, drops
by reason) and names the setting to change; here, web pages whose `text` is a short snippet (the page is in
`content`) all dropped by min_length, and `web.text_key` named as the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import NoInputDocuments


def snippet_pages(shared_data: Path, out: Path, n: int = 6) -> Path:
    """Real English web pages, each stored as a 120-character snippet in `text` and the whole page in `content`."""
    rows = []
    for f in sorted((shared_data / "web/dolma_cc/cc_en_head").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if len(rec["text"]) > 2000 and len(rows) < n:
                rows.append({"id": rec["id"], "url": rec["id"], "text": rec["text"][:120], "content": rec["text"]})
    assert len(rows) == n
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_run_emptied_by_the_text_field_shows_the_funnel_and_names_the_setting(shared_data, tmp_path):
    pages = snippet_pages(shared_data, tmp_path / "pages.jsonl")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"name": "snip", "out": str(tmp_path / "out"), "stages": ["web", "dedup", "shard"]},
        "web": {"inputs": [str(pages)], "tasks": 1, "workers": 1,
                "filters": {"language": {"enabled": False}, "url": {"enabled": False}}}}))  # seconds, not a minute
    r = CliRunner().invoke(app, ["run", str(cfg)])
    said = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 1, r.output
    assert "NO INPUT" in said and "Traceback" not in r.output
    assert "web: read 6, kept 0; dropped 6 (min_length 6: too_few_chars 6)" in said
    assert "field 'content' holds the longer text" in said and "--set web.text_key=content" in said
    assert said.endswith("error: dedup: no input documents: web kept 0 of 6 (dropped: min_length 6)")
    recorded = json.loads((tmp_path / "out/stages/dedup/stats.json").read_text())
    assert recorded["funnel"][0] == {"stage": "web", "read": 6, "kept": 0, "dropped": {"min_length": 6},
                                     "errored": {}, "skipped": None, "filters": {"min_length": {"too_few_chars": 6}}}
    assert not (tmp_path / "out/stages/dedup/_SUCCESS.json").exists()

    # the setting it names is the fix: the same run with it keeps the pages and reaches the end
    r = CliRunner().invoke(app, ["run", str(cfg), "--set", "web.text_key=content"])
    assert r.exit_code == 0, r.output
    web = json.loads((tmp_path / "out/stages/web/stats.json").read_text())
    assert web["kept"] > 0 and "min_length" not in web["dropped"]
    assert json.loads((tmp_path / "out/manifest.json").read_text())["totals"]["documents"] == web["kept"]


def _completed(run_dir: Path, stage: str, stats: dict) -> None:
    d = run_dir / "stages" / stage
    d.mkdir(parents=True)
    (d / "stats.json").write_text(json.dumps({"stage": stage, "errored": {}, **stats}))
    (d / "_SUCCESS.json").write_text(json.dumps({"hash": f"{stage}-done"}))


def test_any_stage_left_without_input_names_its_upstream_funnel(tmp_path):
    """Generalised: the stage that has no input (here decontaminate, fed by generate + web) gets the funnel of every
    stage before it, a hint from the web stage and, for a stage with no hint of its own, where its removed
    documents are; standalone (`textbook decontaminate`) as in a run."""
    from pipeline.config import load_config
    from pipeline.run import run_one

    pages = tmp_path / "pages.jsonl"
    pages.write_text(json.dumps({"id": "a", "text": "tiny", "content": "a long page " * 100}) + "\n")
    run_dir = tmp_path / "out"
    _completed(run_dir, "web", {"read": 1, "kept": 0, "dropped": {"min_length": 1},
                                "filters": {"min_length": {"dropped": 1, "reasons": {"too_few_chars": 1}}}})
    _completed(run_dir, "generate", {"read": 4, "kept": 0, "dropped": {"too_short": 3, "refusal": 1}})
    cfg = load_config(None, [f"run.out={run_dir}", f"web.inputs=[{pages}]",
                             "run.stages=[web, generate, decontaminate, shard]"])
    with pytest.raises(NoInputDocuments) as info:
        run_one(cfg, "decontaminate", planned=list(cfg.run.stages), log=lambda m: None)
    e = info.value
    assert str(e) == ("decontaminate: no input documents: web kept 0 of 1 (dropped: min_length 1); "
                      "generate kept 0 of 4 (dropped: too_short 3, refusal 1)")
    assert [row["stage"] for row in e.funnel] == ["web", "generate"]
    assert any("--set web.text_key=content" in h for h in e.hints)
    assert any(h.startswith("generate: every document was dropped") and str(run_dir / "stages/generate/removed") in h
               for h in e.hints)

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"run": {"out": str(run_dir), "stages": list(cfg.run.stages)},
                                        "web": {"inputs": [str(pages)]}}))
    r = CliRunner().invoke(app, ["decontaminate", str(cfg_file)])
    said = " ".join(r.output.split())
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "generate: read 4, kept 0; dropped 4 (too_short 3; refusal 1)" in said
    assert said.endswith(f"error: {e}")
