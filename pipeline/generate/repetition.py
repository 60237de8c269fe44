"""Repetition of an answer: Gopher's repetition rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis
& Insights from Training Gopher", Appendix A.1, Table A1) and a windowed distinct-word ratio.

Written for LLM answers rather than web pages (datatrove's `GopherRepetitionFilter` implements the same rules for
web text): words are `\\w+` runs, lower-cased (a loop "The the the" is one word repeated); fractions are of the
words' characters, each counted once however many repeated n-grams cover it, so every fraction is in [0, 1];
fence lines (```), blank lines, lines without a letter and label lines ("Teacher:", "Solution:") are not lines,
since every code block opens and closes with the same fence and a dialogue repeats its speaker labels. The line
and paragraph rules read the whole answer (a model looping in code repeats lines; a code line counts as repeated
only within its own block, since a textbook shows a class again as it grows); the n-gram rules and the windowed
ratio read its prose (fenced code taken out: code repeats names and calls by nature; 100-word windows of the Python
standard library go down to 0.15 distinct). The windowed ratio catches a
loop at the end of a long answer, which the whole-text fractions dilute below their thresholds.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence

from pipeline.config.checks import RepetitionSettings

_WORD = re.compile(r"\w+")
_LETTER = re.compile(r"[^\W\d_]")
_FENCE = re.compile(r"^\s*(?:```|~~~)")
_LABEL = re.compile(r"[*_#]*\s*\w[\w ()'.-]{0,30}:\s*[*_]*")  # "Teacher:", "**Solution:**", "Student (Ann):"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.S)


def _units(parts: Sequence[str]) -> list[str]:
    """Lines or paragraphs that count: stripped, with a letter, not a code fence, not a label ("Teacher:")."""
    return [p for p in (x.strip() for x in parts)
            if p and _LETTER.search(p) and not _FENCE.match(p) and not _LABEL.fullmatch(p)]


def _line_units(text: str) -> tuple[list[str], list[tuple[int, str]]]:
    """The lines that count (`_units`) and their keys: a code block's lines are keyed with the block's number, so
    a line repeated inside one block counts (a model looping in code) and the same line in two blocks does not (a
    textbook shows a class again as it grows, or each example's `import` and `print`); prose lines have block 0."""
    lines: list[str] = []
    keys: list[tuple[int, str]] = []
    block, in_code = 0, False
    for raw in text.splitlines():
        if _FENCE.match(raw):
            in_code = not in_code
            block += in_code
            continue
        for u in _units([raw]):
            lines.append(u)
            keys.append((block if in_code else 0, u))
    return lines, keys


def duplicate_fractions(units: Sequence[str], keys: Sequence[object] | None = None) -> tuple[float, float]:
    """(units equal to an earlier unit / units, their characters / all units' characters); (0, 0) for none.
    `keys`: what makes two units equal (default: the units themselves)."""
    seen: set[object] = set()
    dup = dup_chars = total = 0
    for u, key in zip(units, units if keys is None else keys, strict=True):
        total += len(u)
        if key in seen:
            dup += 1
            dup_chars += len(u)
        else:
            seen.add(key)
    return (dup / len(units), dup_chars / total) if units and total else (0.0, 0.0)


def _covered_chars(words: Sequence[str], starts: list[int], n: int) -> int:
    covered = bytearray(len(words))
    for i in starts:
        covered[i:i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c)


def _ngrams(words: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(n)), strict=False)


def top_ngram_char_frac(words: Sequence[str], n: int, total_chars: int) -> float:
    """Word characters covered by the occurrences of the most frequent n-gram / all word characters (0 when no
    n-gram occurs twice)."""
    counts = Counter(_ngrams(words, n))
    if not counts or not total_chars:
        return 0.0
    top, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return _covered_chars(words, [i for i, g in enumerate(_ngrams(words, n)) if g == top], n) / total_chars


def dup_ngram_char_frac(words: Sequence[str], n: int, total_chars: int) -> float:
    """Word characters covered by repeats of n-grams seen earlier in the text / all word characters. Never larger
    for a larger n (a repeated (n+1)-gram is made of repeated n-grams)."""
    seen: set[tuple[str, ...]] = set()
    repeats = []
    for i, g in enumerate(_ngrams(words, n)):
        if g in seen:
            repeats.append(i)
        else:
            seen.add(g)
    return _covered_chars(words, repeats, n) / total_chars if total_chars and repeats else 0.0


def min_window_distinct_ratio(words: Sequence[str], window: int) -> float | None:
    """Lowest distinct words / window over windows of `window` words, half a window apart (the last one ends at the
    text's end); None when the text is shorter than one window."""
    if len(words) < window:
        return None
    starts = list(range(0, len(words) - window + 1, max(window // 2, 1)))
    if starts[-1] != len(words) - window:
        starts.append(len(words) - window)
    return min(len(set(words[i:i + window])) / window for i in starts)


def repetition(text: str, s: RepetitionSettings) -> str | None:
    """The first repetition rule `text` breaks, as 'rule value > limit' (e.g. 'top_2gram_char_frac 0.62 > 0.20'),
    or None. Texts under `s.min_words` words are not judged."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not s.enabled or len(words) < s.min_words:
        return None
    checks: list[tuple[str, float | None, float | None]] = []
    para_frac, para_chars = duplicate_fractions(_units(_PARAGRAPH_BREAK.split(text)))
    line_frac, line_chars = duplicate_fractions(*_line_units(text))
    checks += [("dup_para_frac", para_frac, s.max_dup_para_frac),
               ("dup_para_char_frac", para_chars, s.max_dup_para_char_frac),
               ("dup_line_frac", line_frac, s.max_dup_line_frac),
               ("dup_line_char_frac", line_chars, s.max_dup_line_char_frac)]
    for name, value, limit in checks:
        if limit is not None and value is not None and value > limit:
            return f"{name} {value:.2f} > {limit:.2f}"
    # the n-gram rules read the prose: code repeats names and calls by nature (`print(result)`, `self.x = x`)
    prose_words = [w.lower() for w in _WORD.findall(_CODE_BLOCK.sub(" ", text))]
    total = sum(len(w) for w in prose_words)
    for n, limit in sorted(s.max_top_ngram_char_frac.items()):
        value = top_ngram_char_frac(prose_words, n, total)
        if value > limit:
            return f"top_{n}gram_char_frac {value:.2f} > {limit:.2f}"
    dup_limits = sorted(s.max_dup_ngram_char_frac.items())
    for k, (n, limit) in enumerate(dup_limits):
        value = dup_ngram_char_frac(prose_words, n, total)
        if value > limit:
            return f"dup_{n}gram_char_frac {value:.2f} > {limit:.2f}"
        if all(value <= later for _, later in dup_limits[k + 1:]):
            break  # the fraction only shrinks as n grows: no later limit can be passed
    if s.min_window_distinct_ratio is not None:
        ratio = min_window_distinct_ratio(prose_words, s.window_words)
        if ratio is not None and ratio < s.min_window_distinct_ratio:
            return f"window_distinct_ratio {ratio:.2f} < {s.min_window_distinct_ratio:.2f}"
    return None
