"""Output checks on LLM answers (issue 20): refusals, preambles, meta-talk, placeholders by pattern family;
repetition (Gopher's rules); Python code that parses and tests that pass. Regression cases are real answers of
SmolLM2-135M-Instruct that passed validation before (benchmarks/results/validators.md has the measured precision)."""

from __future__ import annotations

import json

import pytest

from pipeline.config.checks import CodeCheckSettings, RepetitionSettings
from pipeline.config.generate import GenerateSection
from pipeline.generate import codecheck
from pipeline.generate.repetition import repetition
from pipeline.generate.validate import Validator

BODY = ("Photosynthesis is the process by which green plants use the energy of sunlight to turn water and carbon "
        "dioxide into sugar and oxygen. Inside each leaf, tiny structures called chloroplasts hold a green pigment, "
        "chlorophyll, that absorbs red and blue light. The sugar feeds the plant and is stored as starch in roots "
        "and seeds, and the animals that eat those plants use it for their own energy.\n\n"
        "A common misconception is that plants take their food from the soil. Jan van Helmont weighed a willow and "
        "its soil for five years: the tree gained 74 kilograms while the soil lost only 57 grams, so the mass came "
        "from water and air, not from the ground.\n")


MORE = ("Leaves are not the only green parts: young stems photosynthesise too. In deserts, cacti keep their leaves "
        "as spines and do all their photosynthesis in the stem, which stores water through the dry months. At night "
        "some of them open their pores to take in carbon dioxide and close them by day, losing less water.\n")


@pytest.fixture(scope="module")
def v() -> Validator:
    return Validator(GenerateSection(min_tokens=20, token_counter="whitespace"))


def reasons(v: Validator, text: str, fmt: str | None = None) -> list[str]:
    return [r for r, _ in v.reasons(text, "stop", fmt)]


# ------------------------------------------------------------------ pattern families, several phrasings each
@pytest.mark.parametrize("opening", [
    "As an AI language model, I cannot write a textbook. ",
    "As an AI, I don't have opinions about plants. ",
    "As I'm an AI, I can only describe what I was trained on. ",  # real 135M answer: passed as too_short only
    "As I am an artificial intelligence, this is my best summary. ",
    "I'm just a language model, so I may be wrong. ",
    "Since I am an AI assistant, here is an overview. ",
    "I’m sorry, but I can’t help with that. ",
    "I am sorry but I cannot provide a full chapter. ",
    "I apologize, but I am unable to do this. ",
    "I cannot help with writing this section. ",
    "Unfortunately, I can't write about this topic. ",
    "We cannot fulfill this request. ",
])
def test_refusals_by_family(v, opening):
    assert reasons(v, opening + BODY)[0] == "refusal"


@pytest.mark.parametrize("opening", [
    "Sure! Here's a textbook section on photosynthesis:\n\n",
    "Sure, here is the section.\n\n",
    "Certainly, below is a section for high school students.\n\n",
    "Certainly! Here is your chapter.\n\n",
    "Of course. ",
    "Absolutely! Let's dive in.\n\n",
    "Here's a textbook section on photosynthesis:\n\n",
    "Below you will find a set of exercises.\n\n",
    "I'd be happy to write this for you.\n\n",
    "# I've written a short lesson on photosynthesis\n\n",
    "I'll walk you through a sample of my textbook.\n\n",
])
def test_preambles_by_family(v, opening):
    assert "preamble" in reasons(v, opening + BODY)


@pytest.mark.parametrize("text, expect", [
    ("Here is the textbook section you asked for:\n\n" + BODY, "meta_talk"),
    ("As requested, this section explains photosynthesis.\n\n" + BODY, "meta_talk"),
    ("As you requested, " + BODY, "meta_talk"),
    (BODY + "\nNote: this section is written for high school students.", "meta_talk"),
    (BODY + "\nThis story is tailored for young children who love plants.", "meta_talk"),
    (BODY + "\nI hope this helps! Let me know if you need more examples.", "meta_talk"),
    ("Following your instructions, " + BODY, "meta_talk"),
    (BODY + "\n(312 words)", "meta_talk"),
    # real 135M answers the first patterns missed (benchmarks/results/validators.md)
    ("Here are six questions and their answers to the above request:\n\n" + BODY, "meta_talk"),
    ("I'm here to help you practice your questions. " + BODY, "meta_talk"),
    ("I'm ready to help. " + BODY, "meta_talk"),
])
def test_meta_talk_by_family(v, text, expect):
    assert expect in reasons(v, text)


@pytest.mark.parametrize("text", [
    "The document:\n\n[insert LaTeX document here]\n\n" + BODY,  # real 135M answer, kept before
    "[Insert diagram of a leaf]\n\n" + BODY,
    "Written by [Your Name].\n\n" + BODY,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n\n" + BODY,
    "# A lesson on {topic}\n\n" + BODY,
    "# A lesson on {{ concept }}\n\n" + BODY,
    "# A lesson on <TOPIC>\n\n" + BODY,
    "# Chapter 3: [CHAPTER_TITLE]\n\n" + BODY,
    "(add a photo of a leaf here)\n\n" + BODY,
])
def test_placeholders_by_family(v, text):
    assert "placeholder" in reasons(v, text)


@pytest.mark.parametrize("text", [
    # textbook prose that mentions AI, instructions, notes, brackets and braces
    "As an AI system learns from examples, it adjusts its weights. " + BODY,
    "Follow these instructions to install Python on your computer. " + BODY,
    "Note: this formula only holds for ideal gases. " + BODY,
    "Here is how a cell divides. " + BODY,
    "'I can't help with the dishes now,' said Mia, 'I am planting beans.' " + BODY,
    "The concentration [CO2] rises at night; the set {1, 2, 3} has three elements. " + BODY,
    "See [the documentation](https://docs.python.org) for more. " + BODY,
    "Use an f-string:\n\n```python\nname = 'Ada'\nprint(f'Hello, {name}')\n```\n\nor `'{name}'.format(name=name)`.\n\n"
    + BODY,
    "Certainly the most important idea is energy. " + BODY,  # "Certainly" not followed by punctuation
    "The server sends a response to the request and to your request. " + BODY,
    BODY + "\nIf you have a question, ask your teacher; feel free to draw the leaf. " + MORE,  # not at the end
])
def test_textbook_text_is_not_flagged(v, text):
    assert reasons(v, text) == []


# ------------------------------------------------------------------ repetition
def test_word_loop_is_repetition_not_length(v):
    # real 135M answer: "the the the ..." was caught only by the length limit and judged English 0.96
    loop = "Photosynthesis is how plants make food from light. " + "the " * 300
    verdict = v.check(loop, "stop")
    assert verdict.reason == "repetition" and verdict.detail.startswith("top_2gram_char_frac")


@pytest.mark.parametrize("text, rule", [
    (BODY + ("Plants need light to grow.\n\n" * 12), "dup_para_frac"),
    (BODY + "Plants need light.\n" * 6 + "They also need water.\nAnd air.\n", "dup_line_frac"),
    (BODY * 3, "dup_para"),
    # a tail loop in a long answer: the whole-text fractions stay under their limits, the window does not
    (" ".join(f"word{i}" for i in range(900)) + " " + "green leaf " * 60, "window_distinct_ratio"),
    ("```python\n" + "print('hello')\n" * 30 + "```\n" + BODY, "dup_line"),
])
def test_repetition_rules(text, rule):
    found = repetition(text, RepetitionSettings())
    assert found is not None and found.startswith(rule), found


def test_repetition_spares_dialogue_speaker_lines_and_short_answers():
    # real 135M answers labelled wrong: a dialogue's "Teacher:" / "Student:" lines; one 4-gram twice in 60 words
    turns = [f"{who}:\n{line}" for who, line in zip(["Teacher", "Student"] * 5,
                                                     (BODY + MORE).replace("\n", " ").split(". "), strict=False)]
    assert repetition("\n".join(turns), RepetitionSettings()) is None
    short = ("Q: What is a simple answer to that question? A: The answer to that question is that plants make sugar "
             "from light, water and air, and animals eat the plants. This shows how food chains start with the sun "
             "and how every animal depends on green plants in the end, even the ones that eat meat.")
    assert 50 < len(short.split()) < 100 and repetition(short, RepetitionSettings()) is None
    assert repetition(short, RepetitionSettings(min_words=50)) is not None


def test_repetition_spares_code_fences_short_texts_and_the_test_server(v):
    sentences = (BODY + MORE).replace("\n", " ").split(". ")
    fenced = "\n\n".join(f"{sentence}.\n\n```python\nx = {i}\n```" for i, sentence in enumerate(sentences))
    assert repetition(fenced, RepetitionSettings()) is None  # the same ``` fence 2 x 8 times
    assert repetition("the the the the", RepetitionSettings()) is None  # under min_words: not judged
    from pipeline.llm.testserver import _answer_text

    assert all(repetition(_answer_text(f"k{i}", 200), RepetitionSettings()) is None for i in range(50))


def test_repetition_thresholds_come_from_config():
    loop = BODY + "the " * 300
    assert Validator(GenerateSection(min_tokens=0, repetition={"enabled": False})).check(loop, "stop").reason is None
    loose = {"max_top_ngram_char_frac": {2: 0.9}, "max_dup_ngram_char_frac": {}, "min_window_distinct_ratio": None,
             "max_dup_line_frac": None, "max_dup_para_frac": None}
    assert Validator(GenerateSection(min_tokens=0, repetition=loose)).check(loop, "stop").reason is None
    with pytest.raises(ValueError, match="fractions in"):
        RepetitionSettings(max_top_ngram_char_frac={2: 1.5})


def test_real_human_text_passes_repetition(shared_data):
    """Real educational web pages (Llama-3.3 edu score >= 3) pass the repetition rules; Gopher's rules drop some
    boilerplate-heavy pages, so the bar is a low rate, not zero (measured: 3 of 150 pages of all scores)."""
    import csv

    csv.field_size_limit(10**8)
    with open(shared_data / "edu_labels/fineweb_edu_llama33_150/training_data.csv", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f) if float(r["score"]) >= 3]
    fired = sum(repetition(t, RepetitionSettings()) is not None for t in texts)
    assert len(texts) > 50 and fired / len(texts) <= 0.03


def test_invalid_pattern_names_the_field():
    with pytest.raises(ValueError, match="meta_talk_patterns: invalid regular expression"):
        Validator(GenerateSection(min_tokens=0, meta_talk_patterns=["(unclosed"]))


# ------------------------------------------------------------------ code: parses, tests pass
CHAPTER = """Lists keep values in order.

```python
def total(values):
    # sum by hand: the loop shows what sum() does
    result = 0
    for v in values:
        result += v
    return result
```

Tests check the examples:

```python
assert total([1, 2, 3]) == 6

def test_empty():
    assert total([]) == 0
```
""" + BODY


def _chapter(tests_block: str) -> str:
    return CHAPTER.replace("assert total([1, 2, 3]) == 6\n\ndef test_empty():\n    assert total([]) == 0\n",
                           tests_block)


def test_a_chapter_whose_tests_pass_is_kept(v):
    assert v.check(CHAPTER, "stop", "python_chapter").reason is None
    assert v.check(CHAPTER, "stop", "textbook_section").reason is None  # formats not listed: no code checks


@pytest.mark.parametrize("text, reason, detail", [
    (BODY + MORE, "code_missing", "0 python blocks"),
    # real 135M answers: code that cannot run
    (CHAPTER.replace("def total(values):", "def total(values)"), "code_syntax", "block 0 line 1"),
    (CHAPTER + "\n```python\nfor i in range(3)\n    print(i)\n```\n", "code_syntax", "block 2"),
    (_chapter("print(total([1, 2]))\n"), "tests_missing", "no block holds a test"),
    (_chapter("assert total([1, 2, 3]) == 7\n"), "tests_failed", "AssertionError (line 1: assert total"),
    (_chapter("def test_negative():\n    assert total([-1]) == 1\n"), "tests_failed", "AssertionError"),
    (_chapter("assert totl([1]) == 1\n"), "tests_failed", "NameError"),
    (_chapter("import unittest\nclass T(unittest.TestCase):\n    def test_x(self):\n        self.assertEqual("
              "total([2]), 3)\nif __name__ == '__main__':\n    unittest.main()\n"), "tests_failed", "SystemExit"),
    (_chapter("import os\nassert total([1]) == 1\nos._exit(3)\n"), "tests_failed", "died in block 1"),
])
def test_code_drop_reasons(v, text, reason, detail):
    verdict = v.check(text, "stop", "python_chapter")
    assert verdict.reason == reason and detail in verdict.detail, verdict


def test_tests_that_hang_time_out():
    blocks = codecheck.python_blocks(_chapter("assert total([1]) == 1\nwhile True:\n    pass\n"))
    assert codecheck.run_tests(blocks, CodeCheckSettings(timeout_s=2)) == "timeout after 2 s in block 1"


def test_a_mistake_shown_on_purpose_is_excused_but_not_in_tests(v):
    mistake = CHAPTER + ("\nA common mistake is forgetting the colon, which Python rejects:\n\n"
                         "```python\ndef total(values)\n    return 0\n```\n\nand indexing past the end is wrong:\n\n"
                         "```python\n[1, 2][5]\n```\n")
    assert v.check(mistake, "stop", "python_chapter").reason is None
    assert v.check(_chapter("# a wrong test\nassert total([1]) == 2\n"), "stop", "python_chapter").reason == \
        "tests_failed"


def test_statement_skeletons_with_comment_bodies_parse():
    """A textbook idiom (OpenStax shows `if condition:` / `# Body`): not code that cannot run."""
    skeleton = "```python\n# Statements before\nif condition:\n  # Body\nelse:\n  # Body\n\nfor i in r:\n    print(i)\n```\n"
    assert codecheck.syntax_error(codecheck.python_blocks(skeleton)) is None
    broken = "```python\nif condition:\n  # Body\nprint(\n```\n"
    assert codecheck.syntax_error(codecheck.python_blocks(broken)).startswith("block 0")


def test_sessions_and_code_settings():
    session = "```pycon\n>>> total = 1 + 2\n>>> total\n3\n>>> assert total == 3\n```\n"
    (block,) = codecheck.python_blocks(session)
    assert block.source == "total = 1 + 2\ntotal\nassert total == 3" and block.tests
    assert codecheck.run_tests([block], CodeCheckSettings()) is None
    parse_only = Validator(GenerateSection(min_tokens=0, code_checks={"formats": {"python_chapter": "parse"}}))
    assert parse_only.check(_chapter("print(1)\n"), "stop", "python_chapter").reason is None
    no_run = Validator(GenerateSection(min_tokens=0, code_checks={"run_tests": False}))
    assert no_run.check(_chapter("assert 1 == 2\n"), "stop", "python_chapter").reason is None


def test_the_model_code_runs_in_a_scratch_directory(tmp_path):
    probe = tmp_path / "probe.json"
    code = (f"import json, os, sys\nopen({str(probe)!r}, 'w').write(json.dumps([os.getcwd(), sys.flags.isolated,"
            " 'pipeline' in sys.modules]))\nassert True\n")
    assert codecheck.run_tests(codecheck.python_blocks(f"```python\n{code}```\n"), CodeCheckSettings()) is None
    cwd, isolated, has_pipeline = json.loads(probe.read_text())
    assert "textbook-code-" in cwd and isolated == 1 and not has_pipeline


# ------------------------------------------------------------------ in the stages
def test_generate_judge_records_the_reason_and_what_fired(tmp_path):
    from pipeline.config import load_config
    from pipeline.documents import iter_documents, list_document_files
    from pipeline.generate.judge import Judge, JudgeSetup
    from pipeline.generate.sampler import PromptSpec
    from pipeline.generate.taxonomy import Leaf
    from pipeline.llm.types import LLMResult

    cfg = load_config(None, ["generate.min_tokens=20", "generate.token_counter=whitespace"])
    leaf = Leaf("Python Programming", "lists", "sum")
    specs = [PromptSpec(0, "college", "python_chapter", leaf=leaf), PromptSpec(1, "college", "python_chapter",
                                                                              leaf=leaf)]
    judge = Judge(JudgeSetup(cfg, tmp_path / "kept", tmp_path / "removed", specs, {"python_chapter": "pc@1"}))
    for i, text in enumerate([CHAPTER, _chapter("assert total([2]) == 3\n")]):
        judge(LLMResult(key=f"k{i}", ok=True, text=text, finish_reason="stop", prompt_tokens=10,
                        completion_tokens=200, latency_s=0.1, attempts=1, error=None, model="m",
                        tag={"spec": i, "cell": "college × python_chapter", "sample_index": 0}))
    out = judge.close()
    assert out["stats"]["kept"] == 1 and out["stats"]["dropped"] == {"tests_failed": 1}
    (removed,) = list(iter_documents(list_document_files([tmp_path / "removed"])))
    assert "AssertionError" in removed["meta"]["drop_detail"]


def test_rephrase_checks_each_chunk_for_patterns_and_the_rewrite_for_repetition():
    from pipeline.config import load_config
    from pipeline.rephrase.judge import validation_section

    cfg = load_config(None, ["rephrase.token_counter=whitespace"])
    chunk = Validator(validation_section(cfg, False))
    whole = Validator(validation_section(cfg, True))
    assert chunk.check("Here is the rewritten passage:\n\n" + BODY, "stop").reason == "preamble"
    assert chunk.check(BODY + "the " * 200, "stop").reason is None  # a chunk is not judged for repetition ...
    assert whole.check(BODY + "the " * 200, "stop").reason == "repetition"  # ... the joined rewrite is
    assert whole.check(CHAPTER.replace("def total(values):", "def total(values)"), "stop", "python_chapter").reason \
        is None  # no code checks for rewrites


def test_fast_paths_agree_with_the_plain_definitions():
    """PatternFamily's lower-case and word-start shortcuts find what re.search(p, text, re.I) finds, and the
    duplicate n-gram fraction never grows with n (repetition() stops early on that)."""
    import random
    import re

    from pipeline.config.checks import DEFAULT_META_TALK, DEFAULT_PREAMBLES, DEFAULT_REFUSALS
    from pipeline.generate.repetition import _WORD, dup_ngram_char_frac
    from pipeline.generate.validate import PatternFamily, normalize

    texts = [normalize(t) for t in ["Has an AI, I think.", "As an AI, I think.", "x(312 words)", "bas I'm an AI.",
                                    "Sure! Here's it.", "So sure! Here's it.", "I hope this helps.", BODY, MORE]]
    for patterns in (DEFAULT_REFUSALS, DEFAULT_PREAMBLES, DEFAULT_META_TALK):
        family = PatternFamily(patterns, "f")
        for t in texts:
            plain = next((m.group(0).strip() for p in patterns if (m := re.search(p, t, re.I))), None)
            assert (family.search(t) or "").lower() == (plain or "").lower(), (t, patterns[0])
    rng = random.Random(0)
    for _ in range(30):
        words = [w.lower() for w in _WORD.findall(BODY)]
        text = [rng.choice(words[:40]) if rng.random() < 0.5 else w for w in words * 2]
        total = sum(map(len, text))
        fracs = [dup_ngram_char_frac(text, n, total) for n in range(2, 11)]
        assert fracs == sorted(fracs, reverse=True)


def test_labelled_real_answers_keep_their_verdicts():
    """The 44 real SmolLM2-135M answers of benchmarks/results/validators.md: every drop labelled right still fires,
    none labelled wrong does (the precision measured there holds for the checks as they are now)."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks/results"
    labels = json.loads((results / "validators_labels.json").read_text(encoding="utf-8"))
    v = Validator(GenerateSection(min_tokens=0, token_counter="whitespace", language=None))
    rows = [json.loads(line) for line in (results / "validators_outputs.jsonl").open(encoding="utf-8")]
    assert len(rows) >= 40
    for r in rows:
        fired = {reason for reason, _ in v.reasons(r["text"], r["finish_reason"], r["format"])}
        for reason, label in labels[r["id"]].items():
            if not reason.startswith("_"):
                assert (reason in fired) == (label == "right"), (r["id"], reason, label)


# ------------------------------------------------------------------ a newcomer's phrasings (issue 20 review)
@pytest.mark.parametrize("opening", [
    "I'm unable to help with that request. ",  # "i'm" + "unable": the family missed the contraction
    "I'm not able to write this section. ",
    "I'm afraid I can't write that chapter. ",
    "Sorry, I can't do that. ",
    "My apologies, but I cannot write about this topic. ",
    "As a language model developed by a research lab, I write what I can. ",
    "Being an AI, I do not have personal opinions about plants. ",
    "I won't be able to write this chapter. ",
    "I must decline this request. ",
    "Writing this chapter is beyond my capabilities. ",
    "This request goes against my guidelines. ",
])
def test_refusals_phrased_outside_the_first_list(v, opening):
    assert reasons(v, opening + BODY)[:1] == ["refusal"]


@pytest.mark.parametrize("text, expect", [
    ("Here you go!\n\n" + BODY, "preamble"),
    ("<insert example here>\n\n" + BODY, "placeholder"),
    ("(insert example)\n\n" + BODY, "placeholder"),
    ("[Diagram to be added]\n\n" + BODY, "placeholder"),
    ("TODO: fill in this section.\n\n" + BODY, "placeholder"),
    ("Yes! Here is a short textbook section.\n\n" + BODY, "preamble"),
    ("The user wants a textbook section about photosynthesis. " + BODY, "meta_talk"),
    ("Your prompt asks for a section on photosynthesis. " + BODY, "meta_talk"),
    ("In this section, as instructed, I avoid headings. " + BODY, "meta_talk"),
    (BODY + "\n(Note: I have not mentioned the instructions in the text.)", "meta_talk"),
    (BODY + "\nThis response follows the guidelines provided.", "meta_talk"),
])
def test_preambles_meta_talk_and_placeholders_phrased_outside_the_first_list(v, text, expect):
    assert expect in reasons(v, text)


@pytest.mark.parametrize("text", [
    # a story's dialogue: the characters refuse and offer help, not the model
    '"I cannot help you with that," said the old man, turning away from the gate. ' + BODY,
    "'I'm sorry, but I can't help you with that,' the shopkeeper said. " + BODY,
    "'Don't worry, I'm here to help,' said the nurse. " + BODY,
    '"Here is the bread you asked for," said the baker. ' + BODY,
    "\u201cOf course!\u201d said Mum, and we went out to look at the leaves. " + BODY,
    "Press <Enter> to run the cell; the program stops when the user asks for help. " + BODY,
    BODY + MORE + "'Let me know if you see the first shoot,' said Grandma, and we went to bed.",
    # textbook prose about language models, processors, servers and the immune system
    "As a large language model is trained on more text, its error falls. " + BODY,
    "The CPU executes the given instructions in order, one per clock cycle. " + BODY,
    "The web server sends the page as requested by the browser. " + BODY,
    "Once you have requested a token, the API returns it in the response. " + BODY,
    "The immune response begins within hours. In this response, white blood cells gather at the wound. " + BODY,
    "Of course, nobody expected the river to flood that spring. " + BODY,
    "Okay, so what is photosynthesis? " + BODY,
    "Take the tablets as instructed by your doctor; the recipe follows the rules of baking. " + BODY,
])
def test_dialogue_and_textbook_prose_are_not_flagged(v, text):
    assert reasons(v, text) == []


def test_code_shown_again_as_it_grows_is_not_repetition(v):
    """A textbook idiom: the same class shown three times, a method added each time (lines repeat across blocks);
    a loop inside one block still counts (test_repetition_rules)."""
    init = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n" \
           "        self.items.append(x)\n"
    pop = "\n    def pop(self):\n        return self.items.pop()\n"
    text = (f"A stack keeps the last item on top.\n\n```python\n{init}```\n\nWe add pop:\n\n```python\n{init}{pop}```"
            f"\n\nAnd size:\n\n```python\n{init}{pop}\n    def size(self):\n        return len(self.items)\n\n"
            "s = Stack()\ns.push(1)\nassert s.size() == 1\nassert s.pop() == 1\n```\n\n" + BODY + MORE)
    assert v.check(text, "stop", "python_chapter").reason is None


@pytest.mark.parametrize("lead_in, block", [
    ("To avoid typing the numbers twice, store them:", "nums = [1, 2, 3\nprint(total(nums))"),
    ("Validate the input:", "def check(x)\n    if x < 0:\n        raise ValueError('invalid input')"),
    ("The loop:", "for i in range(3):\nprint(i)"),  # no body at all is not a skeleton with comment bodies
])
def test_code_that_cannot_run_is_not_excused_by_a_stray_word(v, lead_in, block):
    verdict = v.check(CHAPTER + f"\n{lead_in}\n\n```python\n{block}\n```\n", "stop", "python_chapter")
    assert verdict.reason == "code_syntax", verdict


def test_passing_unittest_main_is_kept(v):
    """`if __name__ == '__main__': unittest.main()` reads sys.argv: the runner's own arguments are not test names."""
    text = _chapter("import unittest\nclass T(unittest.TestCase):\n    def test_x(self):\n"
                    "        self.assertEqual(total([2]), 2)\n\nif __name__ == '__main__':\n    unittest.main()\n")
    assert v.check(text, "stop", "python_chapter").reason is None


def test_a_process_the_tests_leave_behind_does_not_hold_the_check(tmp_path):
    """Model code that starts a process in a session of its own (out of reach of the process-group kill) and
    passes: the verdict comes when the test process exits, not when that process closes the inherited stderr
    (before: 'timeout', reported only after the stray process ended)."""
    import os
    import signal

    pid_file = tmp_path / "stray.pid"
    code = ("import subprocess\np = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\nassert 1 + 1 == 2\n")
    try:
        assert codecheck.run_tests(codecheck.python_blocks(f"```python\n{code}```\n"), CodeCheckSettings()) is None
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
