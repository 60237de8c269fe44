"""Does a rewrite stay about its source? Three checks on each answer, each with a named drop reason.

- `fidelity_too_short` / `fidelity_too_long`: answer words / chunk words outside [min_length_ratio,
  max_length_ratio] (a one-line "summary" of a long chunk, or a ramble far past it);
- `fidelity_copied`: the share of the answer's word 6-grams found in its chunk exceeds `max_copied_share`: a copy,
  not a rewrite (dedup would keep one of the two anyway; a copy of a page the policy does not keep is not a
  recycling of it);
- `fidelity_low_overlap`: the share of the answer's distinct content words (lower-cased, stop words and the
  format's own words left out, crude suffix stemming) that occur in the source page is below `min_overlap`: the
  answer is about something else;
- `fidelity_invented_entities`: named entities of the answer (capitalised words not opening a sentence, line,
  table cell or dialogue turn; acronyms; numbers of two or more digits) absent from the source page exceed
  max(max_invented_entities, max_invented_share x the answer's distinct entities): names, places, dates or
  figures the model made up.

These are cheap lexical proxies (no model): they catch the failure modes rephrasing papers report for small
generators (drift off the source, hallucinated specifics; cf. WRAP, Nemotron-CC, REWIRE), not subtle errors.
Everything is measured against the whole page, not only the chunk, so a name the page gives in another part is
not counted as invented.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.config.rephrase import FidelityBounds

# English function words and words every explanatory text uses (written for this module)
STOPWORDS = frozenset("""
a about above across after again against all almost along already also although always am among an and another
any anyone anything are around as at back be became because become becomes been before being below between both
but by can cannot could did do does doing done down during each either else enough even ever every few for from
further get gets getting give given gives go goes going got had has have having he her here hers herself him
himself his how however i if in into is it its itself just keep kept know known less let like made make makes
many may me might more most much must my myself near need needs neither never next no nor not now of off often
on once one only onto or other others otherwise our ours ourselves out over own per perhaps put quite rather
really same see seen several shall she should since so some something sometimes still such than that the their
theirs them themselves then there therefore these they thing things this those though through thus to together
too toward towards under until up upon us use used uses using usually very via was way ways we well were what
whatever when where whether which while who whom whose why will with within without would yet you your yours
yourself also example examples important called means mean different first second third new including include
includes part parts kind kinds type types often simple simply based important main able
""".split())
# words a rewrite's structure brings whatever the format (headings, summaries, explanations)
STRUCTURE_WORDS = frozenset("""
summary introduction overview conclusion key point points note notes definition definitions section chapter
lesson topic topics idea ideas explanation explain explains explained understand understanding learn learning
reader readers text article let's lets consider imagine think answer question questions step steps
""".split())

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_NUMBER = re.compile(r"\d[\d,.]*\d|\d")
# a token with what precedes it on its line: sentence/turn/cell openings are not evidence of a name
_TOKEN = re.compile(r"[^\W_][\w'’.,-]*")
COPY_NGRAM = 6
_OPENER = re.compile(r"(^|[.!?:;|•*#>\-–—\"“(\[]|\d[.)])\s*$")


def stem(word: str) -> str:
    """A crude English suffix strip, enough to match 'glaciers'/'glacier', 'compacted'/'compacts'."""
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    for suffix in ("ingly", "edly", "ations", "ation", "ments", "ment", "ness", "ings", "ing", "ies", "ied", "ers",
                   "est", "ed", "es", "er", "ly", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            return w + "y" if suffix in ("ies", "ied") else w
    return w


def content_stems(text: str, exclude: frozenset[str] = frozenset()) -> set[str]:
    """Distinct stems of the content words of `text`: words of 3+ letters that are not stop words, structure words
    or in `exclude` (lower-case)."""
    out: set[str] = set()
    for m in _WORD.finditer(text):
        w = m.group(0).lower()
        if len(w) >= 3 and w not in STOPWORDS and w not in STRUCTURE_WORDS and w not in exclude:
            out.add(stem(w))
    return out


def _number_key(token: str) -> str:
    return token.replace(",", "").rstrip(".")


def entities(text: str, exclude: frozenset[str] = frozenset()) -> set[str]:
    """Named-entity candidates of `text`, lower-cased: capitalised words that do not open a sentence, line, table
    cell or dialogue turn (nor are stop, structure or `exclude` words), all-capital acronyms of 2+ letters, and
    numbers of 2+ digits (commas dropped). Markdown heading lines are skipped (title case is not a name)."""
    out: set[str] = set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        for m in _TOKEN.finditer(line):
            tok = m.group(0).rstrip(".,'’-")
            if not tok:
                continue
            if tok[0].isdigit():
                for n in _NUMBER.findall(tok):
                    if sum(c.isdigit() for c in n) >= 2:
                        out.add(_number_key(n))
                continue
            word = _WORD.match(tok)
            if word is None:
                continue
            w = word.group(0)
            low = w.lower()
            if low in STOPWORDS or low in STRUCTURE_WORDS or low in exclude or len(w) < 2:
                continue
            if len(w) >= 2 and w.isupper():
                out.add(low)
            elif w[0].isupper() and not _OPENER.search(line[: m.start()]):
                out.add(low)
    return out


@dataclass
class SourceProfile:
    """What the checks need of a source page, computed once per page."""

    words: set[str]  # every lower-cased word and stem of the page
    stems: set[str]  # content stems
    numbers: set[str]

    @classmethod
    def of(cls, text: str) -> SourceProfile:
        lows = {m.group(0).lower().replace("’", "'") for m in _WORD.finditer(text)}
        return cls(words=lows | {stem(w) for w in lows}, stems=content_stems(text),
                   numbers={_number_key(n) for n in _NUMBER.findall(text)})

    def knows(self, entity: str) -> bool:
        if entity[0].isdigit():
            return entity in self.numbers
        return entity in self.words or stem(entity) in self.words


def copied_share(answer: str, chunk: str, n: int = COPY_NGRAM) -> float:
    """Share of the answer's word n-grams (lower-cased words) that occur in the chunk (0 for an answer shorter
    than n words)."""
    a = [m.group(0).lower() for m in _WORD.finditer(answer)]
    if len(a) < n:
        return 0.0
    c = [m.group(0).lower() for m in _WORD.finditer(chunk)]
    seen = {tuple(c[i:i + n]) for i in range(len(c) - n + 1)}
    grams = [tuple(a[i:i + n]) for i in range(len(a) - n + 1)]
    return sum(g in seen for g in grams) / len(grams)


def check(answer: str, chunk: str, source: SourceProfile, bounds: FidelityBounds,
          format_words: frozenset[str] = frozenset()) -> tuple[str | None, dict[str, Any]]:
    """(drop reason or None, the measured figures) for one answer to one chunk of a page. Reasons in order:
    fidelity_too_short, fidelity_too_long, fidelity_copied, fidelity_low_overlap, fidelity_invented_entities."""
    a_words = len(answer.split())
    c_words = max(len(chunk.split()), 1)
    ratio = a_words / c_words
    copied = copied_share(answer, chunk)
    stems = content_stems(answer, format_words)
    overlap = len(stems & source.stems) / len(stems) if stems else 0.0
    ents = entities(answer, format_words)
    invented = sorted(e for e in ents if not source.knows(e))
    allowed = max(bounds.max_invented_entities or 0, int((bounds.max_invented_share or 0) * len(ents)))
    figures: dict[str, Any] = {"length_ratio": round(ratio, 3), "copied": round(copied, 3), "overlap": round(overlap, 3),
                               "content_words": len(stems), "entities": len(ents), "invented": invented[:20],
                               "invented_allowed": allowed}
    if bounds.min_length_ratio is not None and ratio < bounds.min_length_ratio:
        return "fidelity_too_short", figures
    if bounds.max_length_ratio is not None and ratio > bounds.max_length_ratio:
        return "fidelity_too_long", figures
    if bounds.max_copied_share is not None and copied > bounds.max_copied_share:
        return "fidelity_copied", figures
    if bounds.min_overlap is not None and overlap < bounds.min_overlap:
        return "fidelity_low_overlap", figures
    if len(invented) > allowed:
        return "fidelity_invented_entities", figures
    return None, figures
