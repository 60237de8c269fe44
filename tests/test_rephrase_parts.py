"""Rephrase mode, part by part (issue 19): chunking, fidelity, the bucket policy, the templates, reading the web
stage's scored pages, the stage registry (rephrase stands in for web), and the judge (chunk order, skipped and
failed chunks, the no-content marker, benchmark overlap after, every billed token accounted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from _rephrase_pages import scored_pages

from pipeline import run as runmod
from pipeline.config import load_config
from pipeline.config.rephrase import FidelityBounds
from pipeline.documents import DocumentWriter
from pipeline.errors import ConfigError, NoInputDocuments, TextbookError
from pipeline.llm.types import LLMResult
from pipeline.rephrase.chunks import chunk_budget, split_chunks
from pipeline.rephrase.fidelity import SourceProfile, check, entities
from pipeline.rephrase.plan import Page, bucket_of, plan, read_pages, source_files, templates_for
from pipeline.rephrase.templates import load_templates, parse_template

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ["textbook_section", "faq", "tutorial", "wikipedia", "math_word_problems", "table",
             "socratic_dialogue", "recycle"]
STRICT = FidelityBounds(min_overlap=0.5, min_length_ratio=0.25, max_length_ratio=3.0, max_copied_share=0.6,
                        max_invented_entities=2, max_invented_share=0.2)


# ----------------------------------------------------------------------------------------------- chunking
def test_chunks_keep_every_word_in_order_fit_the_budget_and_leave_no_stub(shared_data):
    page = max(scored_pages(shared_data)[:30], key=lambda p: len(p["text"]))["text"]
    for tokens in (60, 150, 400):
        chunks = split_chunks(page, tokens, 3.5)
        assert " ".join(" ".join(chunks).split()) == " ".join(page.split())  # all words, in order
        assert all(len(c) <= tokens * 3.5 for c in chunks)
        if len(chunks) > 2:  # balanced: no chunk below a third of the largest
            assert min(map(len, chunks)) > max(map(len, chunks)) / 3
    one_line = "word " * 2000 + "a" * 900  # no line break, no sentence end, one word longer than a chunk
    chunks = split_chunks(one_line, 100, 3.5)
    assert "".join(c.replace(" ", "") for c in chunks) == one_line.replace(" ", "")
    assert all(len(c) <= 350 for c in chunks)
    assert split_chunks("  \n\n ", 100, 3.5) == []
    assert chunk_budget(2048, 512, 300, 0.6) == 307  # answer room binds: 0.6 x 512
    assert chunk_budget(2048, 1500, 300, 0.6) == 248  # the context binds: 2048 - 1500 - 300


# ----------------------------------------------------------------------------------------------- fidelity
SOURCE = ("Glaciers form where more snow falls in winter than melts in summer. In 1850 the Rhone Glacier reached "
          "the village of Gletsch, according to records kept by ETH Zurich. Over many years the snow compacts "
          "into dense ice that flows slowly downhill under its own weight.")


def test_a_faithful_rewrite_passes_and_each_drift_is_named():
    src = SourceProfile.of(SOURCE)
    faithful = ("Q: How does a glacier form?\nA: Where winter snowfall exceeds summer melting, snow compacts over "
                "many years into dense ice.\nQ: What happened in 1850?\nA: The Rhone Glacier reached Gletsch, "
                "as ETH Zurich records show; the ice flows downhill under its own weight.")
    assert check(faithful, SOURCE, src, STRICT, frozenset({"q", "a"}))[0] is None
    invented = faithful + "\nA: Professor Hilda Brandt of Basel measured it again in 1921 and 1934."
    reason, figures = check(invented, SOURCE, src, STRICT, frozenset({"q", "a"}))
    assert reason == "fidelity_invented_entities"
    assert {"hilda", "brandt", "basel", "1921", "1934"} <= set(figures["invented"])
    # within tolerance: one invented name is allowed by max_invented_entities=2
    assert check(faithful + " Basel too.", SOURCE, src, STRICT, frozenset({"q", "a"}))[0] is None
    off_topic = ("Stock markets rose as investors bought technology shares while bond yields fell and the "
                 "central bank held interest rates steady for another quarter.")
    assert check(off_topic, SOURCE, src, STRICT)[0] == "fidelity_low_overlap"
    assert check("Glaciers are ice.", SOURCE, src, STRICT)[0] == "fidelity_too_short"
    assert check(" ".join([SOURCE] * 4), SOURCE, src, STRICT)[0] == "fidelity_too_long"
    # a copy is not a rewrite: the page's own sentences, barely touched
    copy = SOURCE.replace("Over many years", "Over the years")
    reason, figures = check(copy, SOURCE, src, STRICT)
    assert reason == "fidelity_copied" and figures["copied"] > 0.8
    assert check(faithful, SOURCE, src, STRICT, frozenset({"q", "a"}))[1]["copied"] < 0.2


def test_entities_are_names_not_sentence_line_cell_or_turn_openings():
    text = ("# The Life Of Glaciers\nSnow falls. Ice forms here in Gletsch and at NASA.\n"
            "| Place | Year |\n| Rhone | 1850 |\nTeacher: Why?\nStudent: Because the Sun warms it.\n- Melting ice")
    assert entities(text) == {"gletsch", "nasa", "1850", "sun"}


# ----------------------------------------------------------------------------------------------- policy
def _cfg(tmp_path: Path, *sets: str):
    return load_config(None, [f"run.out={tmp_path / 'out'}", *sets])


def test_buckets_templates_and_audiences_are_chosen_deterministically(tmp_path):
    r = _cfg(tmp_path, "rephrase.audiences=[high school, college]").rephrase
    assert [bucket_of(r, s).name for s in (5.0, 3.0, 2.99, 2.0, 1.0, 0.99, -3.0)] == \
        ["high", "high", "middle", "middle", "low", "junk", "junk"]
    high = next(b for b in r.buckets if b.name == "high")
    picks = [templates_for(high, f"page-{i}") for i in range(60)]
    assert all(len(p) == high.per_page and p == [t for t in high.templates if t in p] for p in picks)
    assert {t for p in picks for t in p} == set(high.templates)  # spread over every template
    assert picks == [templates_for(high, f"page-{i}") for i in range(60)]
    no_catch_all = _cfg(tmp_path, "rephrase.buckets=[{name: top, min_score: 3, keep: true}]").rephrase
    assert bucket_of(no_catch_all, 2.0) is None
    for bad, match in [("[{name: a, min_score: 1}, {name: a, min_score: 2}]", "distinct"),
                       ("[{name: a, min_score: null}, {name: b, min_score: null}]", "catch-all"),
                       ("[{name: a, min_score: 1, templates: [faq], per_page: 2}]", "per_page")]:
        with pytest.raises(ConfigError, match=match):
            _cfg(tmp_path, f"rephrase.buckets={bad}")
    with pytest.raises(ConfigError, match="cell_by"):
        _cfg(tmp_path, "rephrase.diversity.cell_by=[subject]")


def test_fidelity_bounds_layer_section_then_template_header_then_config(tmp_path):
    cfg = _cfg(tmp_path, "rephrase.fidelity_by_template={faq: {min_overlap: 0.7}}")
    faq = load_templates("prompts/rephrase", ["faq"])["faq"]
    b = cfg.rephrase.bounds_for("faq", faq.fidelity)
    assert (b.min_overlap, b.min_length_ratio, b.max_length_ratio) == (0.7, 0.2, 3.0)  # config, header, section


# ----------------------------------------------------------------------------------------------- templates
def test_every_template_renders_its_chunk_and_the_id_follows_the_partials(tmp_path):
    marker = "NO USABLE CONTENT"
    templates = load_templates("prompts/rephrase", TEMPLATES)
    for t in templates.values():
        for part, parts, audience in ((1, 1, ""), (2, 3, "college")):
            text = t.render(chunk="CHUNK TEXT", part=part, parts=parts, url="https://a.example/x", audience=audience,
                            audience_guidance="undergraduates" if audience else "", no_content_marker=marker)
            assert "<passage>\nCHUNK TEXT\n</passage>" in text and marker in text, t.name
            assert ("part 2 of 3" in text) == (parts == 3) and ("college" in text) == bool(audience), t.name
        assert t.prompt_id.startswith(t.name + "@")
    copy = tmp_path / "rephrase"
    shutil.copytree(REPO / "prompts/rephrase", copy)
    before = parse_template(copy / "faq.j2").prompt_id
    (copy / "_rules.j2").write_text((copy / "_rules.j2").read_text() + "Be brief.\n")
    assert parse_template(copy / "faq.j2").prompt_id != before  # a shared partial is part of every id
    (copy / "bad.j2").write_text("{#---\ndescription: x\nseeded: true\n---#}\nhi\n")
    with pytest.raises(TextbookError, match="unknown key"):
        parse_template(copy / "bad.j2")
    with pytest.raises(TextbookError, match="unknown template"):
        load_templates(copy, ["nope"])


# ----------------------------------------------------------------------------------------------- inputs
def _web_stage(tmp_path: Path, shared: Path) -> tuple[Path, list[dict]]:
    """A web stage's output as it writes it: kept/ and removed/edu-* (reason 'edu: <why>')."""
    pages = scored_pages(shared)[:12]
    web = tmp_path / "out" / "stages" / "web"
    with DocumentWriter(web / "kept", prefix="edu-r00000") as w:
        for p in pages[:4]:
            w.write({**p, "source": "web"})
    reasons = ["below_cutoff"] * 5 + ["guard_keyword_list", "guard_word_salad", "unscored"]
    with DocumentWriter(web / "removed", prefix="edu-r00000") as w:
        for p, why in zip(pages[4:], reasons, strict=True):
            w.write({**p, "source": "web", "reason": f"edu: {why}"})
    with DocumentWriter(web / "removed", prefix="min_length") as w:
        w.write({**pages[0], "id": "other", "reason": "min_length"})
    return web, pages


def test_the_web_stages_kept_and_below_cutoff_pages_are_read_guarded_ones_are_not(tmp_path, shared_data):
    web, pages = _web_stage(tmp_path, shared_data)
    cfg = _cfg(tmp_path)
    files = source_files(cfg, sorted((web / "kept").glob("*.parquet")), ["web"], web)
    read, left_out = read_pages(files, lambda reason, where: None)
    assert [(p.id, p.origin) for p in read] == [(p["id"], "kept") for p in pages[:4]] + \
        [(p["id"], "below_cutoff") for p in pages[4:9]]
    assert dict(left_out) == {"edu: guard_keyword_list": 1, "edu: guard_word_salad": 1, "edu: unscored": 1}
    assert all(p.edu_score is not None and "reason" not in p.doc for p in read)
    no_recycle = _cfg(tmp_path, "rephrase.recycle_below_cutoff=false")
    assert list(source_files(no_recycle, [], ["web"], web)) == ["kept"]


def test_a_page_with_an_unusable_edu_score_is_dropped_by_name_not_crashed_on_or_bucketed(tmp_path):
    """One page whose stored score is text, NaN or infinite costs that page (invalid_edu_score), not the stage;
    a NaN must not fall into the catch-all bucket as if it were a low score."""
    text = " ".join(f"word{i}" for i in range(80))
    scores = {"text": "high", "nan": float("nan"), "inf": float("inf"), "bool": True, "string": "2.5", "none": None,
              "ok": 3.5}
    path = tmp_path / "pages.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": text, "edu_score": v}) + "\n" for k, v in scores.items()))
    cfg = _cfg(tmp_path, f"rephrase.inputs=[{path}]", "rephrase.source_language_check=false")
    pages, _ = read_pages({"inputs": [path]}, lambda reason, where: None)
    plan(cfg, pages)
    fates = {p.id: p.fate or p.bucket for p in pages}
    assert fates == {"text": "invalid_edu_score", "nan": "invalid_edu_score", "inf": "invalid_edu_score",
                     "bool": "invalid_edu_score", "string": "middle", "none": "unscored", "ok": "high"}
    # through the stage (a keep-only policy: no model): the dropped pages are written, the score as read in meta
    stage_cfg = _cfg(tmp_path, f"rephrase.inputs=[{path}]", "run.stages=[rephrase]",
                     "rephrase.buckets=[{name: high, min_score: 3, keep: true}, {name: rest, min_score: null}]")
    stats = runmod.run_one(stage_cfg, "rephrase", log=lambda m: None)
    assert stats["reconciled"] and stats["kept"] == 1
    assert stats["dropped"] == {"invalid_edu_score": 4, "unscored": 1, "policy_drop_rest": 1}
    removed = pq.read_table(next((tmp_path / "out/stages/rephrase/removed").glob("invalid_edu_score-*"))).to_pylist()
    as_read = {r["id"]: json.loads(r["meta"])["rephrase"]["edu_score_as_read"] for r in removed}
    assert as_read == {"text": "'high'", "nan": "nan", "inf": "inf", "bool": "True"}
    assert all(r["edu_score"] is None for r in removed)


def test_a_page_in_a_script_without_spaces_is_named_by_its_language_not_as_too_short(tmp_path, shared_data):
    """Word counts split on spaces: a long Chinese or Japanese page has 'one word'. It must end source_not_en,
    not source_too_short; an empty page and a short English stub are still too short."""
    english = scored_pages(shared_data)[0]["text"]
    pages_in = {"chinese": "光合作用是植物利用光能把二氧化碳和水转化为葡萄糖并释放氧气的过程。" * 40,
                "japanese": "光合成は、植物が光のエネルギーを使って二酸化炭素と水から糖を作り、酸素を出す仕組みです。" * 30,
                "empty": "", "blank": "  \n\t ", "stub": " ".join(english.split()[:30]), "english": english}
    path = tmp_path / "pages.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": v, "edu_score": 2.5}) + "\n" for k, v in pages_in.items()))
    pages, _ = read_pages({"inputs": [path]}, lambda reason, where: None)
    plan(_cfg(tmp_path), pages)
    assert {p.id: p.fate for p in pages} == {"chinese": "source_not_en", "japanese": "source_not_en",
                                            "empty": "source_too_short", "blank": "source_too_short",
                                            "stub": "source_too_short", "english": None}


def test_rephrase_stands_in_for_web_downstream_and_web_feeds_on_when_rephrase_is_skipped(tmp_path, shared_data):
    web, _ = _web_stage(tmp_path, shared_data)
    run_dir = tmp_path / "out"
    for stage in ("web", "rephrase"):
        (run_dir / "stages" / stage).mkdir(parents=True, exist_ok=True)
        (run_dir / "stages" / stage / "_SUCCESS.json").write_text(json.dumps({"hash": stage}))
    with DocumentWriter(run_dir / "stages/rephrase/kept", prefix="page") as w:
        w.write({"id": "p", "text": "a page kept as is", "source": "web"})
    cfg = _cfg(tmp_path, "run.stages=[web, rephrase, dedup]")
    files, upstream = runmod.resolve_inputs(cfg, "dedup", run_dir, ["web", "rephrase", "dedup"])
    assert upstream == ["rephrase"] and [f.parent.name for f in files] == ["kept"]
    assert all("rephrase" in str(f) for f in files)
    files, upstream = runmod.resolve_inputs(cfg, "dedup", run_dir, ["web", "rephrase", "dedup"],
                                            skipped=frozenset({"rephrase"}))
    assert upstream == ["web"] and all("/web/" in str(f) for f in files)
    _, upstream = runmod.resolve_inputs(cfg, "rephrase", run_dir, ["web", "rephrase"])
    assert upstream == ["web"]
    with pytest.raises(TextbookError, match="run web first"):
        runmod.resolve_inputs(_cfg(tmp_path / "x", "run.stages=[rephrase]"), "rephrase", tmp_path / "x" / "out",
                              ["rephrase"])


def test_a_policy_without_templates_needs_no_model(tmp_path, shared_data):
    """Keep the high pages, drop the rest: no request, so no server is started and none is needed."""
    pages = scored_pages(shared_data)[:30]
    path = tmp_path / "pages.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pages))
    cfg = _cfg(tmp_path, f"rephrase.inputs=[{path}]", "run.stages=[rephrase]", "llm.base_url=http://127.0.0.1:9/v1",
               "rephrase.buckets=[{name: high, min_score: 3, keep: true}, {name: rest, min_score: null}]")
    stats = runmod.run_one(cfg, "rephrase", log=lambda m: None)
    high = sum(1 for p in pages if p["edu_score"] >= 3)
    assert stats["kept"] == stats["pages"]["kept"] == high and stats["dropped"] == {"policy_drop_rest": 30 - high}
    assert stats["requests"] == 0 and stats["llm"]["sent"] == 0 and stats["documents_out"]["total"] == high
    # a policy that passes nothing on: the next stage stops, and the hint names the setting behind it
    empty = _cfg(tmp_path / "empty", f"rephrase.inputs=[{path}]", "run.stages=[rephrase, dedup]",
                 "rephrase.buckets=[{name: rest, min_score: null}]")
    assert runmod.run_one(empty, "rephrase", log=lambda m: None)["dropped"] == {"policy_drop_rest": 30}
    with pytest.raises(NoInputDocuments) as e:
        runmod.run_one(empty, "dedup", log=lambda m: None)
    assert "rephrase kept 0 of 30" in str(e.value)
    assert any("policy_drop_rest" in h and "rephrase.buckets" in h for h in e.value.hints)


# ----------------------------------------------------------------------------------------------- judge
def _result(key: str, rewrite: int, chunk: int, text: str | None = None, *, skipped: str | None = None,
            error: str | None = None, tokens: tuple[int, int] = (100, 50), cached: bool = False) -> LLMResult:
    ok = skipped is None and error is None
    usd = 0.0 if cached or not ok else (tokens[0] + 2 * tokens[1]) / 1e6
    return LLMResult(key=key, ok=ok, text=text if ok else None, finish_reason="stop" if ok else None,
                     prompt_tokens=tokens[0] if ok else 0, completion_tokens=tokens[1] if ok else 0, latency_s=0.1,
                     attempts=1, error=error, model="m", tag={"rewrite": rewrite, "chunk": chunk, "cell": "c"},
                     cached=cached, skipped=skipped, cost_usd=usd)


def test_the_judge_joins_chunks_in_order_names_every_fate_and_accounts_every_billed_token(tmp_path, monkeypatch):
    from pipeline.decontam import DecontamIndex
    from pipeline.generate.judge import billed_reconciles
    from pipeline.rephrase.judge import RephraseJudge
    from pipeline.rephrase.stage import _setup

    parts = [("Glaciers form where more snow falls in winter than melts in summer, year after year, in the high "
              "valleys of the Alps and elsewhere."),
             ("Over many years the snow compacts into dense blue ice that flows slowly downhill under its own "
              "weight, carving the valley as it goes."),
             ("Where the ice reaches warmer air it melts, and the meltwater feeds rivers that farms and towns "
              "downstream rely on in the dry months.")]
    contaminating = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                     "muffins for her friends every day with four.")
    pages = [Page(i, f"p{i}", "\n".join(parts) + (f"\n{contaminating}" if i == 5 else ""), f"https://x/{i}", 2.5,
                  "inputs", {}) for i in range(6)]
    cfg = _cfg(tmp_path, "rephrase.min_tokens=10", "rephrase.min_source_words=10", "rephrase.chunk_tokens=40",
               "rephrase.buckets=[{name: mid, min_score: 2, templates: [recycle]}]", "rephrase.language=null",
               "rephrase.decontaminate_sources=false", "budget.price_input_per_1m=1", "budget.price_output_per_1m=2",
               "rephrase.fidelity_by_template={recycle: {max_copied_share: 1.0}}")  # rewrite 5: its page verbatim
    p = plan(cfg, pages)
    assert [len(rw.chunks) for rw in p.rewrites] == [3, 3, 3, 3, 3, 4]
    setup = _setup(cfg, p, tmp_path / "kept", tmp_path / "removed")
    setup.decontaminate = True
    index = DecontamIndex.build([("bench", "test", iter([("item-0", [contaminating])]))])
    monkeypatch.setattr("pipeline.rephrase.plan.load_index", lambda cfg: index)
    judge = RephraseJudge(setup)
    faithful = [" ".join(reversed(c.split())) for c in parts]  # the same words: about its source
    results = [
        # rewrite 0: chunks arrive out of order, kept, joined in chunk order
        *[_result(f"k0{c}", 0, c, faithful[c]) for c in (2, 0, 1)],
        # rewrite 1: the second chunk never sent (budget): dropped skipped_budget, the first chunk's tokens with it
        _result("k10", 1, 0, faithful[0]), _result("k11", 1, 1, skipped="budget"), _result("k12", 1, 2, faithful[2]),
        # rewrite 2: a chunk failed after retries: errored
        _result("k20", 2, 0, faithful[0]), _result("k21", 2, 1, error="after 7 attempt(s): InternalServerError 500: x"),
        _result("k22", 2, 2, faithful[2]),
        # rewrite 3: the model said there is nothing to keep
        _result("k30", 3, 0, faithful[0]), _result("k31", 3, 1, "NO USABLE CONTENT"), _result("k32", 3, 2, faithful[2]),
        # rewrite 4: answered from the ledger (free), kept
        *[_result(f"k4{c}", 4, c, faithful[c], cached=True) for c in range(3)],
        # rewrite 5: a copy of its page, which holds a benchmark item: dropped after judging
        *[_result(f"k5{c}", 5, c, ch) for c, ch in enumerate(p.rewrites[5].chunks)],
    ]
    for r in results:
        judge(r)
    out = judge.close()
    assert out["outcomes"] == {"0": ["kept", None], "1": ["dropped", "skipped_budget"],
                               "2": ["errored", "failed_internalservererror_500"],
                               "3": ["dropped", "no_usable_content"], "4": ["kept", None],
                               "5": ["dropped", "rewrite_contaminated"]}
    kept = pq.read_table(next((tmp_path / "kept").glob("rewrite-*.parquet"))).to_pylist()
    assert [json.loads(r["meta"])["source_id"] for r in kept] == ["p0", "p4"]
    assert kept[0]["text"] == "\n\n".join(faithful)
    summary = SimpleNamespace(prompt_tokens=sum(r.prompt_tokens for r in results if not r.cached),
                              completion_tokens=sum(r.completion_tokens for r in results if not r.cached),
                              cost_usd=sum(r.cost_usd for r in results))
    assert billed_reconciles(out["billed"], summary)
    assert out["billed"]["kept"]["prompt_tokens"] == 300  # rewrite 0 only: rewrite 4 came from the ledger
    by_reason = out["billed"]["dropped_by_reason"]
    assert by_reason["skipped_budget"]["prompt_tokens"] == 200 and by_reason["rewrite_contaminated"]["prompt_tokens"] == 400
    assert out["contamination"]["contaminated"][0]["source_id"] == "p5"


def test_a_page_whose_rewrites_all_failed_is_named_once_by_the_first_drop():
    from pipeline.rephrase.stage import fate_of_unkept_page

    assert fate_of_unkept_page([("errored", "failed_timeout"), ("dropped", "fidelity_low_overlap")]) == \
        ("dropped", "rewrite_fidelity_low_overlap")
    assert fate_of_unkept_page([("errored", "failed_timeout")]) == ("errored", "rewrite_failed_timeout")
    # the judge's own benchmark reason already names a rewrite: not rewrite_rewrite_contaminated
    assert fate_of_unkept_page([("dropped", "rewrite_contaminated")]) == ("dropped", "rewrite_contaminated")
    assert fate_of_unkept_page([]) == ("errored", "rewrite_not_planned")


# ----------------------------------------------------------------------------------------------- LLM layer
def _llm_run(tmp_path: Path, shared: Path, base_url: str, name: str, **overrides: object) -> dict:
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    pages = [p for p in scored_pages(shared)[:30] if p["edu_score"] >= 2][:5]
    inputs = tmp_path / "pages.jsonl"
    inputs.write_text("".join(json.dumps(p) + "\n" for p in pages))
    cfg = {"run": {"name": name, "out": str(tmp_path / name), "stages": ["rephrase"]},
           "llm": {"base_url": base_url, "model": "test-model", "workers": 0, "concurrency": 4, "timeout_s": 5,
                   "max_tokens": 600, "batch_poll_s": 0.02, "ledger": str(tmp_path / f"{name}.sqlite")},
           "budget": {"price_input_per_1m": 1.0, "price_output_per_1m": 4.0},
           "rephrase": {"inputs": [str(inputs)], "language": None, "source_language_check": False}}
    for key, value in overrides.items():
        section, field = key.split("__")
        cfg[section][field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["rephrase", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stage = tmp_path / name / "stages" / "rephrase"
    kept = sorted((r["id"], r["text"]) for f in sorted((stage / "kept").glob("*.parquet"))
                  for r in pq.read_table(f).to_pylist())
    return {"stats": json.loads((stage / "stats.json").read_text()), "kept": kept, "n": len(pages)}


def test_batch_mode_gives_the_same_pages_and_rewrites_at_the_batch_price(tmp_path, shared_data):
    """The LLM layer's batch mode through the rephrase stage: one batch, the same documents, half the price.
    (A budget stop reaches the judge as skipped requests: `skipped_budget` in the judge test above.)"""
    from pipeline.llm.testserver import FaultyOpenAIServer

    with FaultyOpenAIServer(mode="thread", rephrase_tag="passage") as srv:
        online = _llm_run(tmp_path, shared_data, srv.base_url, "online")
        batch = _llm_run(tmp_path, shared_data, srv.base_url, "batch", llm__mode="batch")
        served = srv.stats()
    o, b = online["stats"], batch["stats"]
    assert o["reconciled"] and o["read"] == online["n"] and o["documents_out"]["rewrites"] > 0
    assert b["llm"]["mode"] == "batch" and served["batches_created"] == 1
    assert batch["kept"] == online["kept"]  # answers are a function of the request: the same documents
    assert {k: b[k] for k in ("kept", "dropped", "pages", "rewrites")} == {k: o[k] for k in ("kept", "dropped",
                                                                                             "pages", "rewrites")}
    assert b["cost_usd"] == pytest.approx(o["cost_usd"] / 2, abs=2e-6) and b["billed"]["reconciled"]
    assert o["cost_usd"] > 0 and served["answered_total"] == 2 * o["requests"]
