"""Cheap guards in front of the educational-value classifier, applied wherever it scores pages (`textbook
classifier score` and `evaluate`, the web stage's `EduScoreTagger`).

A bag-of-n-grams model rewards the words of teaching, not teaching: a list of academic terms, words in random
order, or a spam page around one pasted paragraph of its own training text can score like a textbook. Two
defences, both measured in `benchmarks/results/edu_guards.md` (adversarial pages vs the real labelled pages):

**Gates** (a gated page gets the rubric minimum and its reason; the model's own score is kept beside it). They
read the text the model reads (the model's `max_chars` prefix, plus the same slack `prepare` allows):

- `keyword_list`: at least `min_words` words of which fewer than `min_function_ratio` (8 %) are English
  function words (the, of, is, ...), or fewer than `low_function_ratio` (15 %) with fewer than one sentence end
  per `low_function_max_words_per_sentence` (40) words. Of the real pages labelled >= 3, 98 % have 31-56 %;
  the lowest (a flora's species descriptions, 9.6 %) has sentences.
- `word_salad`: at least `salad_min_violations` times a determiner (the/a/an) is followed by a word that cannot
  follow one (of, is, the, which, ...), and that is at least `salad_min_ratio` of the determiners. Shuffled or
  generated word sequences keep the function-word ratio of prose but not its order (about 40 % of their
  determiners; the real pages labelled >= 3: at most 13 %, and at most 4 such pairs).
- `no_sentences`: at least `min_words` words and fewer than one sentence end (. ! ? and CJK stops) per
  `max_words_per_sentence` words (lists and tag clouds; the real pages labelled >= 3: at most 78).
- `repetitive`: the text compresses (zlib) to less than `min_compressed` of its size: the same sentence or
  paragraph over and over (stuffing by repetition). Running prose compresses to about half (the real pages
  labelled >= 3: at least 0.36 on the sample the gates read); ten copies of a sentence, to under 0.1.

`keyword_list` and `word_salad` use English word lists and apply only to models whose `language` is English;
`no_sentences` and `repetitive` apply to every language.

**Memorised text.** With the model's `training_hashes.npz` (`pipeline.classify.overlap`), runs of words of a
page that are runs of the model's training texts are recognised (8-word shingles, whatever the line breaks).
When they are between `memorised_min_share` (10 %) and `memorised_max_share` (60 %) of the words the model
reads, the page is scored without them: a page that pastes a passage of training text into other text is
judged on its own text. A page that is mostly (or exactly) training text keeps its score and counts in the
overlap figures instead (a mirror of a training page is that page); a few shared phrases change nothing. (The
share is estimated from one stored shingle in eight, a few words either way per passage: 60 %, not 50 %,
so that a page that is mostly spam is rescored even when its pasted passage is estimated a little long.)
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.classify.overlap import TrainingHashes

# English function words (closed classes: articles, pronouns, prepositions, conjunctions, auxiliaries, ...)
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither such what which whose
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs who whom
one ones myself itself themselves yourself ourselves himself herself
of in on at by for with from to into onto over under about after before between through during without within
upon against among across along around behind below beneath beside besides beyond down inside near off out
outside since than toward towards until up via per
and or but nor so yet if because although though while whereas unless whether as once when where why how
whenever wherever then there here also not only just very too more most less least much many few
is are was were be been being am do does did doing done has have had having will would shall should can could
may might must ought
""".split())
DETERMINERS = frozenset(("the", "a", "an"))
# words that cannot directly follow the/a/an in English prose (closed-class words that head no noun phrase)
# (lower-case only: "the US", "a B-movie", "the IT desk" are names, not salad)
NOT_AFTER_DETERMINER = frozenset("""
the a an this these those of in on at by for with from to into onto and or but nor if because although while
is are was were be been am do does did has have had will would shall should can could may might must
its you he she we they me him them my your his our their which who whom whose what when where why how
not than there
""".split())

_PUNCT = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum()) + "“”‘’«»„…–—·•|"
_SENTENCE_END = re.compile(r"[.!?。！？](?=[\s\"'”’)\]]|$)")

GATES = ("keyword_list", "word_salad", "no_sentences", "repetitive")


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds of the gates (see the module doc for what each measures and how they were chosen)."""

    min_words: int = 30
    min_function_ratio: float = 0.08
    low_function_ratio: float = 0.15
    low_function_max_words_per_sentence: float = 40.0
    salad_min_violations: int = 4
    salad_min_ratio: float = 0.25
    max_words_per_sentence: float = 150.0
    min_compressed: float = 0.2
    memorised_min_share: float = 0.1
    memorised_max_share: float = 0.6
    gates: tuple[str, ...] = GATES
    sample_chars: int = 1500
    check_above: float = 0.2


def text_features(text: str) -> dict[str, float]:
    """Counts and ratios the gates read, for one text: words, function_ratio, determiners, salad_violations,
    words_per_sentence, compressed (zlib size / UTF-8 size; 1.0 under 200 bytes).

    Tokens are the lower-cased whitespace-separated pieces with punctuation stripped from their ends; words
    are the tokens made of letters only ("A1", "3rd", "don't" are tokens, not words: the article "a" in "the A1
    road" is not there). Cost: a split, a sentence-end regex and a zlib pass over the text."""
    tokens = [t.strip(_PUNCT) for t in text.lower().split()]
    words = [t for t in tokens if t.isalpha()]
    n = len(words)
    counts = Counter(words)
    func = sum(c for w, c in counts.items() if w in FUNCTION_WORDS)
    dets = counts["the"] + counts["a"] + counts["an"]
    violations = sum(1 for w, nxt in zip(tokens, tokens[1:], strict=False)
                     if w in DETERMINERS and nxt in NOT_AFTER_DETERMINER) if dets else 0
    ends = len(_SENTENCE_END.findall(text))
    data = text.encode("utf-8", "surrogatepass")
    compressed = len(zlib.compress(data, 1)) / len(data) if len(data) >= 200 else 1.0
    return {"words": n, "function_ratio": func / n if n else 0.0, "determiners": dets,
            "salad_violations": violations, "words_per_sentence": n / ends if ends else float(n),
            "compressed": compressed}


def gate(text: str, english: bool = True, config: GuardConfig = GuardConfig()) -> str | None:
    """The name of the first gate `text` fails (in `config.gates` order), or None. Texts under
    `config.min_words` words pass every gate (too short to judge; the web stage's length filter handles them)."""
    f = text_features(text)
    if f["words"] < config.min_words:
        return None
    for name in config.gates:
        if name == "keyword_list" and english and (
                f["function_ratio"] < config.min_function_ratio
                or (f["function_ratio"] < config.low_function_ratio
                    and f["words_per_sentence"] > config.low_function_max_words_per_sentence)):
            return name
        if name == "word_salad" and english and f["salad_violations"] >= config.salad_min_violations \
                and f["salad_violations"] >= config.salad_min_ratio * f["determiners"]:
            return name
        if name == "no_sentences" and f["words_per_sentence"] > config.max_words_per_sentence:
            return name
        if name == "repetitive" and f["compressed"] < config.min_compressed:
            return name
    return None


@dataclass
class GuardedScores:
    """Result of `GuardedScorer.score` for n texts (arrays of length n).

    scores: float32, what to store and filter on (rubric scale); raw: float32, the model's own score; gates: the
    gate each text failed, or None; memorised_share: share of the words the model reads that are runs of
    training text (0 where not checked); rescored: scored without those words; in_training: the text is a training
    text of the model (`overlap.document_key`); has_hashes: the model has training hashes (else no overlap
    figures)."""

    scores: np.ndarray
    raw: np.ndarray
    gates: list[str | None]
    memorised_share: np.ndarray
    rescored: np.ndarray
    in_training: np.ndarray
    has_hashes: bool = True

    def gate_counts(self) -> dict[str, int]:
        """{gate: pages it stopped}, gates that stopped none left out."""
        return dict(sorted(Counter(g for g in self.gates if g).items()))

    def summary(self) -> dict[str, Any]:
        """Counts for stats files: documents, gated (per gate), pages with training text and how many
        were rescored without them, training_overlap (`overlap.overlap_summary`; None without hashes)."""
        from pipeline.classify.overlap import overlap_summary

        return {"documents": len(self.scores), "gated": self.gate_counts(),
                "with_training_text": int(np.sum(self.memorised_share > 0)),
                "rescored_without_training_text": int(self.rescored.sum()),
                "training_overlap": overlap_summary(self.in_training) if self.has_hashes else None}

    def metrics_fields(self, enabled: bool = True) -> dict[str, Any]:
        """{'guards': {enabled, gated, with_training_text, rescored_...}, 'training_overlap': ...} for a
        metrics dict (`evaluate_model`)."""
        s = self.summary()
        overlap = s.pop("training_overlap")
        s.pop("documents")
        return {"guards": {"enabled": enabled, **s}, "training_overlap": overlap}


class GuardedScorer:
    """A loaded `EduClassifier` behind the gates and the memorised-text rule.

    Args:
        clf: the classifier (`pipeline.classify.model.EduClassifier`).
        enabled: False scores exactly like `clf.score` (the training-overlap flags are still computed).
        config: thresholds (`GuardConfig`).

    Cost: only pages the model scores at least `floor` are checked: score_min + `check_above` x (score_max -
    score_min) (1.0 on a 0-5 rubric), or half way to the model's default cut-off when that is lower. A page
    below it is not scored as educational whatever it is (a cut-off set below the floor lets unchecked pages
    through: `check_above: 0` checks every page). The gates read the first `sample_chars` characters of what the
    model reads; a page a gate stops there is judged again on all of it (the decision is the whole prefix's,
    the cost mostly the sample's). The training hashes are read from the model directory once (None when the
    model has none: no memorised-text rule, no overlap figures).
    """

    def __init__(self, clf: Any, enabled: bool = True, config: GuardConfig | None = None) -> None:
        self.clf = clf
        self.enabled = enabled
        self.config = config or GuardConfig()
        self.hashes = TrainingHashes.load(clf.model_dir)
        self.english = str(clf.meta.get("language") or "en").lower().startswith("en")
        default_cut = float(clf.selection_cutoff()[0])  # the model's recorded default cut-off
        self.floor = clf.score_min + min(self.config.check_above * (clf.score_max - clf.score_min),
                                         0.5 * max(0.0, default_cut - clf.score_min))

    def _view(self, text: str, max_chars: int | None) -> str:
        """The part of the raw text the model reads (its prefix, with `prepare`'s slack for whitespace)."""
        n = self.clf.max_chars if max_chars is None else max_chars
        return text[: n + n // 4] if n > 0 else text

    def score(self, texts: list[str], max_chars: int | None = None) -> GuardedScores:
        """Scores for raw texts (non-strings count as blank, scored score_min like `EduClassifier.score`)."""
        texts = [t if isinstance(t, str) else "" for t in texts]
        raw = self.clf.score(texts, max_chars)
        scores = raw.copy()
        n = len(texts)
        gates: list[str | None] = [None] * n
        share = np.zeros(n, dtype=np.float64)
        rescored = np.zeros(n, dtype=bool)
        in_training = self.hashes.contains_documents(texts) if self.hashes else np.zeros(n, dtype=bool)
        if not self.enabled:
            return GuardedScores(scores, raw, gates, share, rescored, in_training, self.hashes is not None)
        redo: list[int] = []
        rest: list[str] = []
        for i in np.flatnonzero(raw >= self.floor):
            view = self._view(texts[i], max_chars)
            sample = view[: self.config.sample_chars]
            gates[i] = gate(sample, self.english, self.config)
            if gates[i] and len(sample) < len(view):  # confirmed on all the model reads (rare, so cheap)
                gates[i] = gate(view, self.english, self.config)
            if gates[i] or self.hashes is None or in_training[i]:
                continue
            share[i], remainder = self.hashes.memorised(view)
            if self.config.memorised_min_share <= share[i] < self.config.memorised_max_share:
                redo.append(int(i))
                rest.append(remainder)
        if redo:
            scores[redo] = self.clf.score(rest, max_chars)
            rescored[redo] = True
        for i, g in enumerate(gates):
            if g:
                scores[i] = self.clf.score_min
        return GuardedScores(scores.astype(np.float32), raw, gates, share, rescored, in_training,
                             self.hashes is not None)
