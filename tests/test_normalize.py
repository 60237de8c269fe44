"""`minhash.words`: a reformatted copy must give the same words as the original (issue 13).

One normalisation serves dedup shingles, the decontamination index and the documents checked against it. The
tables say what a reformatter may do to a text (strip punctuation, change case, re-space, swap Unicode
punctuation for ASCII, remove LaTeX markup) and still land on the same words, and what stays apart.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
import string

import pytest

from pipeline.decontam import index_forms
from pipeline.minhash import NORMALIZATION_VERSION, normalize, words

# (original, reformatted copy): identical words
SAME = [
    # abbreviations: periods inside a token join it, as when a stripper deletes them
    ("The U.S. economy grew.", "The US economy grew"),
    ("e.g. a cat, i.e. a pet", "eg a cat ie a pet"),
    ("a Ph.D. student", "a PhD student"),
    ("at 9 a.m. sharp", "at 9 am sharp"),
    ("U.S.-based firms", "USbased firms"),
    ("in 240 B.C.?", "IN 240 BC"),
    # apostrophes, straight or typographic
    ("don't", "dont"),
    ("don\u2019t", "don't"),
    ("O'Brien's dog", "OBriens dog"),
    ("the students' books", "the students books"),
    ("\u2018quoted\u2019", "'quoted'"),
    # numbers: digits stay joined
    ("pi is 3.14", "pi is 314"),
    ("It costs $1.50.", "it costs 150"),
    ("3,000 people", "3000 people"),
    ("3,000,000", "3000000"),
    ("at 10:30 a.m.", "at 1030 am"),
    # hyphens (ASCII, Unicode, en dash, minus) join; line-break hyphenation is undone
    ("well-known", "wellknown"),
    ("well\u2010known", "well-known"),
    ("1990\u20132000", "1990-2000"),
    ("5\u22123", "5-3"),
    ("an exam-\nple of it", "an example of it"),
    ("well-\n    known", "well-known"),
    ("exam\u00adple", "example"),  # soft hyphen
    # Unicode quotes, dashes, ellipsis, spaces, invisible characters
    ("\u201cHello,\u201d she said\u2026", '"Hello," she said...'),
    ("wait...what", "wait\u2026 what"),
    ("cat\u2014a dog", "cat -- a dog"),
    ("a \u2013 b", "a - b"),
    ("10\u00a0kg", "10 kg"),
    ("wo\u200brd", "word"),
    # NFKC: full-width forms, ligatures, superscripts and subscripts
    ("\uff21\uff22\uff23\uff11\uff12\uff13", "ABC123"),
    ("\ufb01nal \ufb02ow", "final flow"),
    ("x\u00b2 + y\u2082", "x^2 + y_2"),
    # LaTeX markup removed
    ("$\\frac{1}{2}$", "1/2"),
    ("\u00bd", "1/2"),
    ("$3 \\times 4$", "3 \u00d7 4"),
    ("$3 \\times 4$", "3 * 4"),
    ("$a \\cdot b$", "a \u00b7 b"),
    ("$\\left( x + y \\right)$", "(x + y)"),
    ("$x^2$", "x^2"),
    ("$x^{2}$", "x\u00b2"),
    ("x^2", "x2"),
    ("$x_{1}$", "x\u2081"),
    ("\\sqrt{2}", "\u221a2"),
    ("\\sqrt{2}", "sqrt(2)"),
    ("$5\\text{ apples}$", "5 apples"),
    ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "1 2"),
    ("$90^\\circ$", "90\u00b0"),
    ("$a \\le b$", "a \u2264 b"),
    # identifiers and blanks: underscore joins, a blank line of underscores is no word
    ("foo_bar", "foobar"),
    ("__init__", "init"),
    ("The ____ is red.", "The is red"),
    ("AT&T", "ATT"),
    # case and whitespace, also around separators (code and math re-formatted)
    ("Hello,  World!", "hello world"),
    ("f(a,b)", "f( a, b )"),
    ("x=1+y", "x = 1 + y"),
    ("Line one\n\n   line two", "LINE ONE LINE TWO"),
    # necessarily the same: a lower-cased copy is a copy
    ("US", "us"),
]

# must stay apart
DIFFERENT = [
    ("3.14", "3.15"),
    ("1,2,3", "123"),  # a list of numbers, not a thousands separator
    ("10:3", "103"),  # not a clock
    ("and/or", "andor"),  # slash separates
    ("cat\u2014a", "cata"),  # em dash separates
    ("x^2", "x 2"),
    ("there", "the re"),
]

# apart in `words`, by design: a space where there was none is another word split. The decontamination
# index holds the punctuation-to-space form of every item too, so such copies of benchmark items still match.
SPLIT_BY_SPACES = [
    ("well-known", "well known"),
    ("U.S.", "U S"),
    ("3.14", "3 . 14"),
    ("don't", "don ' t"),
    ("the end.Next", "the end. Next"),
]

# the same in `words`, necessarily: once punctuation is stripped the difference is gone
COLLAPSE_BY_DESIGN = [
    ("3.14", "31.4"),  # both strip to 314: no rule can tell them apart and still match stripped copies
    ("a.m.", "am"),
    ("U.S.", "us"),
    ("well-known", "wellknown"),
]


@pytest.mark.parametrize(("original", "copy"), SAME)
def test_reformatted_copy_gives_same_words(original, copy):
    assert words(original) == words(copy), (normalize(original), normalize(copy))
    assert words(original)  # never trivially equal


@pytest.mark.parametrize(("a", "b"), DIFFERENT + SPLIT_BY_SPACES)
def test_different_texts_stay_apart(a, b):
    assert words(a) != words(b)


@pytest.mark.parametrize(("a", "b"), COLLAPSE_BY_DESIGN)
def test_known_collapses(a, b):
    assert words(a) == words(b)


def test_examples_before_after():
    """What a few texts become (the rules of `words`, spelled out)."""
    assert words("The U.S. isn't 3.14 or $1,000.50 wide, e.g. well-known.") == \
        ["the", "us", "isnt", "314", "or", "100050", "wide", "eg", "wellknown"]
    assert words("$\\frac{1}{2} \\times x^{2}$ \u2014 \u00bd \u00d7 x\u00b2") == ["1", "2", "x2", "1", "2", "x2"]
    assert words("exam-\nple\u2026 wait--what") == ["example", "wait", "what"]


def test_words_are_a_fixed_point():
    """Normalised words, joined by spaces, normalise to themselves (the index stores such sequences)."""
    for original, copy in SAME + DIFFERENT + SPLIT_BY_SPACES:
        for t in (original, copy):
            assert words(" ".join(words(t))) == words(t)


# A fixed text touching every rule: its words must not change unless NORMALIZATION_VERSION does.
_GUARD_TEXT = (
    "The U.S. isn\u2019t 3.14 or $1,000.50 wide (e.g. at 10:30 a.m.); well-known exam-\nple\u2026 wait--what "
    "\u201cquoted\u201d \u2014 and/or \uff21\ufb01 x\u00b2 $\\frac{1}{2} \\times x^{2}$ \\left( y \\right) \u221a2 "
    "__init__ ____ AT&T caf\u00e9 Stra\u00dfe \u00bd 1990\u20132000 wo\u200brd 1,2,3"
)


def test_version_guard():
    """Changing `words` changes what stored indexes hold: bump NORMALIZATION_VERSION with a new digest here."""
    digest = hashlib.sha256(" ".join(words(_GUARD_TEXT)).encode()).hexdigest()[:16]
    assert (NORMALIZATION_VERSION, digest) == (2, "575cdfbe6e803ecd"), (digest, words(_GUARD_TEXT))


def _real_items(shared_data):
    b = shared_data / "benchmarks"
    gsm = [json.loads(x)["question"] for x in open(b / "gsm8k/test.jsonl")][:150]
    with gzip.open(b / "humaneval/HumanEval.jsonl.gz", "rt") as f:
        he = [json.loads(x)["prompt"] for x in f][:40]
    arc = [json.loads(x)["question"] for x in open(b / "arc/ARC-Challenge-Test.jsonl")][:150]
    arc = [a["stem"] + " " + " ".join(c["text"] for c in a["choices"]) for a in arc]
    with open(b / "mmlu/test/high_school_mathematics_test.csv", newline="") as f:
        mmlu = [" ".join(r[:5]) for r in csv.reader(f)][:150]
    return gsm + he + arc + mmlu


_STRIP_ASCII = str.maketrans("", "", string.punctuation)
_CURLY = [("'", "\u2019"), (" - ", " \u2013 "), ("...", "\u2026")]


def test_real_items_invariant_under_reformatting(shared_data):
    """Real benchmark items: case, whitespace, Unicode punctuation, full-width digits change nothing, and both
    punctuation-free copies (lm-evaluation-harness's string.punctuation deletion, and punctuation -> space)
    give one of the forms the decontamination index holds."""
    items = _real_items(shared_data)
    assert len(items) > 400
    fullwidth = str.maketrans("0123456789", "\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19")
    for t in items:
        w = words(t)
        assert words(t.upper()) == w and words(t.lower()) == w
        assert words(re.sub(r"\s+", lambda m: "\n\n  " if len(m.group()) == 1 else " ", t)) == w
        curly = t
        for a, c in _CURLY:
            curly = curly.replace(a, c)
        assert words(curly) == w
        assert words(t.translate(fullwidth)) == w
        forms = index_forms(t)
        assert forms[0] == w
        assert words(t.translate(_STRIP_ASCII)) in forms
        assert words(re.sub(r"[^\w\s]", " ", t)) in forms
