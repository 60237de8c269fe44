"""Stage registry: completed stages are skipped for the same config and inputs, re-run when either changes."""

from __future__ import annotations

import json

import pytest

from pipeline import run as runmod
from pipeline.config import load_config
from pipeline.documents import DocumentWriter, iter_documents
from pipeline.errors import TextbookError
from pipeline.stats import StageStats

CALLS: list[str] = []


def drop_short_stage(ctx: runmod.StageContext) -> StageStats:
    """A small real stage: keeps documents of ≥ 3 words, removes the rest with a reason."""
    CALLS.append(ctx.name)
    stats = StageStats(ctx.name)
    with DocumentWriter(ctx.kept_dir) as kept, DocumentWriter(ctx.removed_dir, prefix="too_short") as removed:
        def unreadable(reason: str, where: str) -> None:
            stats.read()  # an unreadable record was still read: it ends in the errored column
            stats.error(reason)

        for doc in iter_documents(ctx.inputs, on_error=unreadable):
            stats.read()
            if len(doc["text"].split()) >= 3:
                kept.write(doc)
                stats.keep()
            else:
                removed.write({**doc, "reason": "too_short"})
                stats.drop("too_short")
    return stats


@pytest.fixture
def registry(monkeypatch):
    CALLS.clear()
    spec = runmod.StageSpec("dedup", f"{__name__}:drop_short_stage")
    monkeypatch.setitem(runmod.STAGES, "dedup", spec)
    return spec


def make_inputs(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [{"id": "a", "text": "one two three four"}, {"id": "b", "text": "short"}, "{broken json",
             {"id": "c", "text": "five six seven"}]
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return src


def test_stage_skipped_when_complete_and_rerun_when_inputs_change(tmp_path, registry):
    src = make_inputs(tmp_path)
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", f"dedup.inputs=[{src}]", "run.stages=[dedup]"])
    stats = runmod.run_pipeline(cfg, log=lambda m: None)["dedup"]
    assert (stats["read"], stats["kept"], stats["dropped"], stats["errored"]) == (4, 2, {"too_short": 1},
                                                                                  {"malformed_json": 1})
    out = tmp_path / "out/stages/dedup"
    assert json.loads((out / "stats.json").read_text())["reconciled"] is True
    assert [d["id"] for d in iter_documents([out / "kept"])] == ["a", "c"]
    assert [d["reason"] for d in iter_documents([out / "removed"])] == ["too_short"]
    assert (tmp_path / "out/config.resolved.yaml").is_file()

    runmod.run_pipeline(cfg, log=lambda m: None)
    assert CALLS == ["dedup"], "a completed stage with the same config and inputs must be skipped"

    src.write_text(src.read_text() + json.dumps({"id": "d", "text": "eight nine ten"}) + "\n")
    stats = runmod.run_pipeline(cfg, log=lambda m: None)["dedup"]
    assert CALLS == ["dedup", "dedup"] and stats["kept"] == 3

    cfg2 = load_config(None, [f"run.out={tmp_path / 'out'}", f"dedup.inputs=[{src}]", "run.seed=5"])
    runmod.run_one(cfg2, "dedup", log=lambda m: None)
    assert len(CALLS) == 3, "a config change must re-run the stage"


def test_crashed_attempt_leaves_no_success_marker(tmp_path, registry, monkeypatch):
    src = make_inputs(tmp_path)
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", f"dedup.inputs=[{src}]"])

    def boom(ctx):
        raise RuntimeError("crash")

    monkeypatch.setattr(runmod, "load_stage_fn", lambda name: boom)
    with pytest.raises(RuntimeError):
        runmod.run_one(cfg, "dedup", log=lambda m: None)
    assert runmod.completed_hash(tmp_path / "out", "dedup") is None


def test_missing_upstream_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", "run.stages=[dedup]"])
    with pytest.raises(TextbookError, match="stage dedup: no input: run generate\\+web first"):
        runmod.run_one(cfg, "dedup", planned=["dedup"], log=lambda m: None)
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", f"dedup.inputs=[{tmp_path / 'missing.jsonl'}]"])
    with pytest.raises(TextbookError, match="missing.jsonl: input path does not exist"):
        runmod.run_one(cfg, "dedup", log=lambda m: None)


def test_unavailable_resource_skips_stage_and_the_run_goes_on(tmp_path, registry, monkeypatch):
    from pipeline.errors import ResourceUnavailable

    src = make_inputs(tmp_path)

    def offline(ctx):
        raise ResourceUnavailable("LLM endpoint unreachable: set OPENAI_BASE_URL or llm.model to a local directory")

    real = runmod.load_stage_fn
    monkeypatch.setattr(runmod, "load_stage_fn", lambda name: offline if name == "generate" else real(name))
    monkeypatch.setitem(runmod.STAGES, "generate", runmod.StageSpec("generate", "x:y"))
    spec = runmod.StageSpec("dedup", f"{__name__}:drop_short_stage", upstream=(("generate", "web"),))
    monkeypatch.setitem(runmod.STAGES, "dedup", spec)
    monkeypatch.setitem(runmod.STAGES, "web", runmod.StageSpec("web", f"{__name__}:drop_short_stage"))
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", f"web.inputs=[{src}]", "run.stages=[web, generate, dedup]"])
    results = runmod.run_pipeline(cfg, log=lambda m: None)
    assert "OPENAI_BASE_URL" in results["generate"]["skipped"]
    assert runmod.completed_hash(tmp_path / "out", "generate") is None
    assert results["dedup"]["read"] == 2  # the web stage's kept documents only
    skipped_stats = json.loads((tmp_path / "out/stages/generate/stats.json").read_text())
    assert skipped_stats["skipped"].startswith("LLM endpoint unreachable")


def test_stage_whose_inputs_were_all_skipped_is_skipped_too(tmp_path, monkeypatch):
    from pipeline.errors import ResourceUnavailable

    def offline(ctx):
        raise ResourceUnavailable("hub unreachable: set TEXTBOOK_WEB to a local folder")

    monkeypatch.setattr(runmod, "load_stage_fn", lambda name: offline)
    src = make_inputs(tmp_path)
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", "run.stages=[web, dedup]", f"web.inputs=[{src}]"])
    results = runmod.run_pipeline(cfg, log=lambda m: None)
    assert "TEXTBOOK_WEB" in results["web"]["skipped"]
    assert results["dedup"]["skipped"] == "no input, because web could not run (see above)"


GENERATED: dict[str, int] = {}  # the fake LLM stage's progress: documents answered so far, per run directory


def partial_llm_stage(ctx: runmod.StageContext) -> StageStats:
    """A fake LLM stage: each call answers 2 more of its 6 requests (as a re-run answers what a stopped run left,
    from the ledger plus new calls) and stops early, with `partial`, until all 6 are answered."""
    CALLS.append(ctx.name)
    key = str(ctx.run_dir)
    done = GENERATED[key] = min(6, GENERATED.get(key, 0) + 2)
    stats = StageStats(ctx.name)
    with DocumentWriter(ctx.kept_dir) as kept:
        for i in range(done):
            stats.read()
            kept.write({"id": f"g{i}", "text": f"generated document number {i}"})
            stats.keep()
    reason = STOP["reason"]
    for _ in range(6 - done):
        stats.read()
        stats.drop(f"skipped_{reason}")
    if done < 6:
        stats.set("partial", {"unanswered": 6 - done, "reasons": {reason: 6 - done}, "message": f"stopped by {reason}"})
    return stats


STOP = {"reason": "budget"}  # why the fake stage stops early


@pytest.fixture
def llm_pipeline(monkeypatch):
    CALLS.clear()
    GENERATED.clear()
    monkeypatch.setitem(runmod.STAGES, "generate", runmod.StageSpec("generate", f"{__name__}:partial_llm_stage"))
    monkeypatch.setitem(runmod.STAGES, "dedup", runmod.StageSpec("dedup", f"{__name__}:drop_short_stage",
                                                                 upstream=(("generate",),)))


@pytest.mark.parametrize("reason", ["server_wait", "budget"])
def test_a_partial_stage_is_not_complete_and_the_same_command_continues_it(tmp_path, llm_pipeline, monkeypatch,
                                                                            reason):
    """A stage that stopped early is marked partial (no _SUCCESS.json): the same command runs it again until it
    completes. A budget stop (the user's own cap) lets the later stages run on what was kept, and they run
    again once the stage has gone further; any other stop ends the run there."""
    monkeypatch.setitem(STOP, "reason", reason)
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", "run.stages=[generate, dedup]"])
    logs: list[str] = []
    out = tmp_path / "out/stages"

    first = runmod.run_pipeline(cfg, log=logs.append)
    assert first["generate"]["partial"]["unanswered"] == 4
    assert (out / "generate/_PARTIAL.json").is_file() and not (out / "generate/_SUCCESS.json").exists()
    assert runmod.completed_hash(tmp_path / "out", "generate") is None
    if reason == "budget":  # goes on, and says so
        assert first["dedup"]["read"] == 2 and CALLS == ["generate", "dedup"]
        assert any("PARTIAL" in m and "use the 2 documents it kept" in m for m in logs)
    else:  # stops there, and says so
        assert "dedup" not in first and CALLS == ["generate"] and not (out / "dedup").exists()
        assert any("PARTIAL" in m and "(dedup) were not run" in m for m in logs)

    logs.clear()
    second = runmod.run_pipeline(cfg, log=logs.append)  # the same command: continues, never "already complete"
    assert CALLS.count("generate") == 2 and not any("already complete" in m and "[generate]" in m for m in logs)
    assert any("an earlier attempt stopped early (4 unanswered" in m for m in logs)
    assert second["generate"]["partial"]["unanswered"] == 2
    if reason == "budget":  # the later stage re-runs on the 4 documents kept now
        assert second["dedup"]["read"] == 4 and CALLS.count("dedup") == 2

    third = runmod.run_pipeline(cfg, log=lambda m: None)
    assert "partial" not in third["generate"] and third["dedup"]["read"] == 6
    assert (out / "generate/_SUCCESS.json").is_file() and not (out / "generate/_PARTIAL.json").exists()
    runmod.run_pipeline(cfg, log=lambda m: None)  # complete now: neither stage runs again
    assert CALLS.count("generate") == 3 and CALLS[-1] == "dedup"
    assert CALLS.count("dedup") == (3 if reason == "budget" else 1)
