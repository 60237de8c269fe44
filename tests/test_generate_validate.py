"""Output validation (every drop has a named reason) and the diversity guard."""

from __future__ import annotations

import pytest

from pipeline.config.generate import DiversitySettings, GenerateSection
from pipeline.generate.diversity import DiversityGuard, opening
from pipeline.generate.validate import Validator, detect_language

ENGLISH = ("Photosynthesis is the process by which green plants use the energy of sunlight to turn water and "
           "carbon dioxide into sugar and oxygen. Inside each leaf, tiny structures called chloroplasts hold a "
           "green pigment, chlorophyll, that absorbs red and blue light. The sugar feeds the plant and is stored as "
           "starch in roots and seeds, and the animals that eat those plants use it for their own energy. A common "
           "misconception is that plants take their food from the soil. Jan van Helmont weighed a willow and its "
           "soil for five years: the tree gained 74 kilograms while the soil lost only 57 grams, so the mass came "
           "from water and air. Leaves are not the only green parts, since young stems photosynthesise too. In "
           "deserts, cacti keep their leaves as spines and do all their photosynthesis in the stem, which stores "
           "water through the dry months. At night some of them open their pores to take in carbon dioxide and "
           "close them by day, losing less water. Farmers use these ideas when they space crops so that every "
           "plant gets enough light, and gardeners see them when a plant kept in a dark corner turns pale.")
GERMAN = ("Die Photosynthese ist der Vorgang, bei dem grüne Pflanzen die Energie des Sonnenlichts nutzen, um aus "
          "Wasser und Kohlendioxid Zucker und Sauerstoff herzustellen. In jedem Blatt enthalten winzige "
          "Strukturen, die Chloroplasten, einen grünen Farbstoff. Der Zucker ernährt die Pflanze und wird als "
          "Stärke in Wurzeln und Samen gespeichert. Tiere, die Pflanzen fressen, nutzen ihn für ihre eigene "
          "Energie. Ein häufiger Irrtum ist, dass Pflanzen ihre Nahrung aus dem Boden nehmen. Ein Forscher wog "
          "eine Weide und ihre Erde fünf Jahre lang: Der Baum wurde viel schwerer, die Erde kaum leichter. Auch "
          "junge Stängel betreiben Photosynthese, und Kakteen in der Wüste tragen ihre Blätter als Stacheln.")


@pytest.fixture(scope="module")
def validator():
    return Validator(GenerateSection(min_tokens=150), None)


@pytest.mark.parametrize("text, finish, reason", [
    ("", "stop", "empty"),
    ("  \n\t ", "stop", "empty"),
    (None, "stop", "empty"),
    (ENGLISH, "length", "length"),
    ("As an AI language model, I cannot write textbooks. " + ENGLISH, "stop", "refusal"),
    ("Certainly! Here is a textbook section on photosynthesis.\n\n" + ENGLISH, "stop", "preamble"),
    ("As requested, this section explains photosynthesis.\n\n" + ENGLISH, "stop", "meta_talk"),
    ("[insert LaTeX document here]\n\n" + ENGLISH, "stop", "placeholder"),
    (ENGLISH + " the" * 200, "stop", "repetition"),
    ("I’m sorry, but I can’t help with that.", "stop", "refusal"),
    ("Photosynthesis makes sugar from light.", "stop", "too_short"),
    (GERMAN, "stop", "not_english"),
    (ENGLISH, "stop", None),
])
def test_each_drop_has_its_named_reason(validator, text, finish, reason):
    assert validator.check(text, finish).reason == reason


def test_length_finish_can_be_kept_and_whitespace_counter(validator):
    v = Validator(GenerateSection(drop_length_finish=False, token_counter="whitespace", min_tokens=20), None)
    verdict = v.check(ENGLISH, "length")
    assert verdict.reason is None and verdict.tokens == int(len(ENGLISH.split()) * 1.3)
    # the run's tokenizer counts real tokens when the word count alone cannot settle the length check
    short_words = " ".join(ENGLISH.split()[:120])
    assert validator.check(short_words, "stop").tokens > 120
    assert validator.check(short_words + " end", "stop").reason is None
    long_text = ENGLISH  # more words than min_tokens: not tokenized
    verdict = validator.check(long_text, "stop")
    assert verdict.reason is None and verdict.tokens is None and verdict.words == len(long_text.split())


def test_language_check_ignores_code_blocks_and_can_be_turned_off():
    code = "```python\n" + "def f(x):\n    return x + 1\n" * 40 + "```\n"
    lang, score = detect_language(code + ENGLISH[:400])
    assert lang == "en" and score > 0.5
    anylang = Validator(GenerateSection(language=None, min_tokens=10), None)
    assert anylang.check(GERMAN, "stop").reason is None
    german = Validator(GenerateSection(language="de", min_tokens=10), None)
    assert german.check(ENGLISH, "stop").reason == "not_german"


def test_opening_is_the_first_sentence_start():
    assert opening("# Once upon a time, there was a fox. It ran.", 5) == "once upon a time there"
    assert opening("no sentence end here", 8) == "no sentence end here"


def _texts(k, start=0):
    import random

    words = ENGLISH.split() + GERMAN.split()
    out = []
    for i in range(start, start + k):
        rng = random.Random(i)
        out.append(f"Topic {i} begins here. " + " ".join(rng.choice(words) for _ in range(120)))
    return out


def test_guard_stops_a_cell_that_repeats_itself_and_leaves_a_diverse_one_alone():
    guard = DiversityGuard(DiversitySettings(min_docs=4, max_repeat_rate=0.5))
    # a cell whose outputs all start "In this chapter, we will explore" -> repeated openings
    for i, t in enumerate(_texts(6)):
        guard.observe(f"same{i}", "young children × children_story", "In this chapter, we will explore it. " + t)
    for i, t in enumerate(_texts(6, start=100)):
        guard.observe(f"div{i}", "college × exercises", t)
    stats = guard.stats()
    assert list(stats["cells_stopped"]) == ["young children × children_story"]
    assert stats["cells_stopped"]["young children × children_story"]["after_outputs"] == 4
    assert stats["most_common_openings"][0] == {"opening": "in this chapter we will explore it", "count": 6}
    assert 0 < stats["distinct_3gram_ratio"] <= 1


def test_near_duplicates_are_found_and_counted():
    guard = DiversityGuard(DiversitySettings(min_docs=3, max_repeat_rate=0.9))
    base = _texts(1)[0]
    first = guard.observe("a", "c", base)
    assert first["near_duplicate_of"] is None
    second = guard.observe("b", "c", base.replace("Topic 0 begins here.", "Here it begins.") + " extra words")
    assert second["near_duplicate_of"] == "a"
    guard.observe("c", "c", _texts(1, start=7)[0])
    assert guard.stats()["near_duplicate_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert not guard.stopped  # 1/3 repeats is under 0.9
    off = DiversityGuard(DiversitySettings(enabled=False, min_docs=1, max_repeat_rate=0.0))
    off.observe("a", "c", base)
    off.observe("b", "c", base)
    assert not off.stopped  # measured, never enforced
    assert off.stats()["near_duplicate_rate"] == 0.5


# ------------------------------------------------------------------ the judging process
def _judge_setup(tmp_path, *sets: str):
    from pipeline.config import load_config
    from pipeline.generate.judge import JudgeSetup
    from pipeline.generate.sampler import PromptSpec
    from pipeline.generate.taxonomy import Leaf

    cfg = load_config(None, list(sets))
    specs = [PromptSpec(i, "college", "textbook_section", leaf=Leaf("biology", "cells", f"concept {i}"))
             for i in range(3)]
    return JudgeSetup(cfg, tmp_path / "kept", tmp_path / "removed", specs, {"textbook_section": "ts@1"})


def _result(i, text, cell="college × textbook_section", sample_index=0):
    from pipeline.llm.types import LLMResult

    return LLMResult(key=f"k{i}", ok=True, text=text, finish_reason="stop", prompt_tokens=10,
                     completion_tokens=200, latency_s=0.1, attempts=1, error=None, model="m",
                     tag={"spec": i, "cell": cell, "sample_index": sample_index})


def test_judge_process_judges_writes_and_accounts(tmp_path):
    from pipeline.documents import iter_documents, list_document_files
    from pipeline.generate.judge import JudgeProcess

    judge = JudgeProcess()
    judge.start(_judge_setup(tmp_path, "llm.seed=7"))
    for i, text in enumerate([ENGLISH, GERMAN, "too short."]):
        judge.put(_result(i, text, sample_index=1))
    assert judge.should_send("college × textbook_section") is None
    judge.stopped["college × textbook_section"] = {}
    assert judge.should_send("college × textbook_section").startswith("diversity_guard")
    out = judge.close()
    assert out["stats"]["read"] == 3 and out["stats"]["kept"] == 1 and out["stats"]["reconciled"]
    assert out["stats"]["dropped"] == {"not_english": 1, "too_short": 1}
    kept = list(iter_documents(list_document_files([tmp_path / "kept"])))
    assert [d["meta"]["spec_index"] for d in kept] == [0] and kept[0]["prompt_id"] == "ts@1"
    assert kept[0]["meta"]["params"]["seed"] == 8  # the seed sent for sample 1
    assert out["kept_spec_indices"] == [0] and out["diversity"]["outputs_indexed"] == 3
    assert out["diversity"]["requests_not_sent_per_cell"] == {"college × textbook_section": 1}


def test_judge_process_failures_are_raised_not_lost(tmp_path):
    from pipeline.errors import TextbookError
    from pipeline.generate.judge import JudgeProcess

    # a broken setup fails at start, before any request would be sent
    broken = JudgeProcess()
    with pytest.raises(TextbookError, match="judging failed: .*no-such-tokenizer"):
        broken.start(_judge_setup(tmp_path, "generate.token_counter=tokenizer",
                                  f"tokenizer.path={tmp_path / 'no-such-tokenizer'}"))
    broken.abort()
    # the child killed mid-run: the driver is told, in one line with the exit code
    judge = JudgeProcess()
    judge.start(_judge_setup(tmp_path))
    judge.proc.kill()
    with pytest.raises(TextbookError, match="exited unexpectedly"):
        for i in range(10_000):
            judge.put(_result(i % 3, ENGLISH))
        judge.close()
    judge.abort()
