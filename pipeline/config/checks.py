"""Output checks shared by `generate:` and `rephrase:`: refusals, assistant preambles, meta-talk, placeholders,
repetition (Gopher's rules) and, for code formats, code that parses and tests that pass.

Patterns are Python regular expressions searched (case-insensitively, `re.search`) in the answer after curly
quotes are made straight and every whitespace run (newlines too) made one space; placeholders are searched in the
prose only (fenced and inline code taken out: `{name}` is an f-string there). Each default is a *family*, not one phrase: "As an
AI", "As I'm an AI", "I am just a language model" are one pattern. A pattern that must only match the opening
anchors itself (`\\A`, or `\\A[\\s\\S]{0,300}?` for "within the first 300 characters"); `(?-i:...)` makes a part
case-sensitive.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.core import StrictModel

# "I/we" + a negation: "I can't", "I won't be able to", "I'm unable to" (the contraction has no space after "i")
_NOT = (r"(?:(?:i|we) (?:can't|cannot|can not|won't(?: be able to)?|will not(?: be able to)?|(?:am|are) (?:unable|"
        r"not able) to|must decline to|do not|don't)|(?:i'm|we're) (?:unable|not able) to)")
# a softener before a refusal's first sentence: "Sorry,", "My apologies, but", "I'm afraid", "Unfortunately,"
_SOFT = (r"(?:(?:unfortunately|however|regrettably|sorry|my apologies|apologies|(?:i'm|i am) (?:so |very |really )?"
         r"(?:sorry|afraid))[,!.]? (?:but )?)?")
_MAKE = r"(?:help|assist|fulfill|comply|complete|provide|write|create|generate|produce|answer|do (?:that|this))"
_AI = (r"(?:ai|a\.i\.|artificial intelligence|(?:ai |large )?language model|llm|chatbot|"
       r"(?:ai |virtual |digital )assistant|ai model)")

DEFAULT_REFUSALS = [
    # the model speaking as an AI: "As an AI language model", "As I'm an AI", "I am just a language model"
    rf"\bas an? {_AI}(?:,| i\b| my\b| (?:developed|trained|created|built|made|designed) by\b)",
    rf"\b(?:(?:as|since|because) (?:i'm|i am)|being) (?:just |only |merely )?an? {_AI}\b",
    rf"\b(?:i'm|i am) (?:just |only |merely |simply )?an? {_AI}(?:,|\.| and\b| so\b| that\b| i\b| trained\b|$)",
    r"\b(?:my|as of my) (?:knowledge cut-?off|training data(?: only)? (?:goes|extends)|last (?:knowledge )?update)\b",
    r"\bi (?:don't|do not) have (?:personal (?:opinions|experiences|feelings|beliefs)|feelings|emotions|"
    r"the ability to|access to (?:real-time|the internet|external))\b",
    # apology + inability: "I'm sorry, but I can't", "I apologize, but I am unable to"
    rf"\b(?:i'm|i am|we're|we are) (?:so |very |really |truly )?sorry,? (?:but )?{_NOT} {_MAKE}\b",
    r"\bi apologi[sz]e,? but (?:i|as)\b",
    r"\bi apologi[sz]e for (?:the|any) (?:confusion|inconvenience|misunderstanding)\b",
    # inability to do what was asked: "I cannot help with that", "I can't fulfill this request"
    rf"\b{_NOT} (?:help|assist)(?: you)? with (?:that|this|your|such|the request)\b",
    rf"\b{_NOT} {_MAKE}(?: with)? (?:that|this|your|such|the) (?:request|task|prompt|assignment)\b",
    r"\b(?:i|we) must (?:respectfully |politely )?decline\b",
    r"\b(?:beyond|outside) (?:my|the scope of my) (?:capabilities|abilities|programming)\b",
    r"\b(?:against|violates?) my (?:guidelines|programming|policies|principles)\b",
    # ... and, as the answer's first sentences, any "I cannot write ..." (a sentence start: not a quoted line)
    rf"\A[\s\S]{{0,300}}?(?:\A|[.!?:]\s)[\s#*_>]*{_SOFT}{_NOT} {_MAKE}\b",
]

DEFAULT_PREAMBLES = [
    # an interjection to the requester: "Sure! Here's", "Certainly, below is", "Of course.", "Absolutely!"; the words a
    # story or a teacher also opens with ("Of course, nobody ...", "Okay, so ...") only with the assistant's next words
    r"\A[\s#*_>]*(?:sure(?: thing)?|certainly|absolutely|gladly|no problem|happy to help|great question)\s*[!,.:]",
    r"\A[\s#*_>]*(?:of course|okay|ok|alright|all right|great|definitely)\s*(?:[!.:]|,\s*(?:here|below|i\b|i'|"
    r"let me|the following))",
    r"\A[\s#*_>]*here you go\b",
    # "Here is/Here's/Below is ... <the thing asked for>" as the opening, after a word or two ("Yes! Here is")
    r"\A[\s#*_>]*(?:[a-z]+(?: [a-z]+)?\s*[!,.]\s*)?(?:here(?:'s| is| are)|below (?:is|are|you(?:'ll| will) find)|the following is|following is)\b"
    r"[^.!?:]{0,80}?\b(?:textbook|section|chapter|story|lesson|dialogue|explanation|exercises?|faq|guide|"
    r"tutorial|article|overview|version|rewrite|rewritten|response|draft|text|passage|introduction|summary|"
    r"requested|for you)\b",
    # the assistant announcing itself: "I'd be happy to", "I've written", "Let me write"
    r"\A[\s#*_>]*(?:i(?:'d| would) (?:be )?(?:happy|glad|delighted) to|i(?:'ve| have) (?:written|created|"
    r"prepared|put together|drafted|rewritten)|i(?:'ll| will) (?:write|create|provide|rewrite|now|walk you|guide you)|"
    r"let me (?:write|create|provide|rewrite|explain))\b",
]

DEFAULT_META_TALK = [
    # the request itself: "the section you asked for", "as requested", "per your request"
    r"\b(?:as (?:you )?requested(?! by\b)|as per your request|per your request|(?:you|that you|which you) "
    r"(?:asked|requested) (?:for|me)|you(?:'ve| have) (?:asked|requested) (?:me|for)\b)",
    r"\b(?:the (?:given|provided|above) prompt|the above instructions|the instructions (?:above|you gave))\b",
    # the requester and the prompt named: "The user wants a section", "Your prompt asks for", "as instructed, I"
    # ("the user asks for help" is a program's user in a programming textbook: only a request for a text counts)
    r"\bthe user (?:wants|wanted|asked|asks|requested|is asking|would like)(?: me)?(?: to write| for)? an? "
    r"(?:[\w-]+ ){0,3}(?:textbook|section|chapter|story|lesson|dialogue|explanation|passage|faq|exercises|rewrite)\b",
    r"\b(?:your|the) prompt (?:asks|asked|says|said|wants|requires|requests|requested|specifies)\b",
    r"\bas instructed(?! by\b)",
    r"\b(?:per|following|according to|based on|as stated in) your (?:request|instructions|prompt)\b",
    r"\b(?:the above|the given|the previous) request\b",
    # the assistant offering its services: "I'm here to help you", "I'm ready to help"
    r"\bi(?:'m| am) (?:here|ready|happy|glad|always here) to (?:help|assist)\b",
    r"\b(?:mention(?:ing|ed)?|follow(?:s|ed|ing)?) (?:the|these|any|your|all) (?:instructions|guidelines|rules) "
    r"(?:given|provided|above|you gave)\b",
    r"\b(?:without|not) (?:mention(?:ing|ed)?|referr?(?:ing|ed) to) (?:the|these|any) (?:instructions|prompt)\b",
    # notes about the text: "Note: this section is written for", "This story is tailored for young children"
    r"\bnote:? (?:that )?(?:this|the above) (?:section|chapter|text|story|lesson|dialogue|response|explanation|"
    r"answer|faq|set of exercises|exercise set|rewrite|passage|version) (?:is|was|has been|does|uses|follows|"
    r"includes|covers|aims|assumes|can be)\b",
    r"\b(?:written|designed|tailored|adapted|aimed|geared|intended|crafted) (?:specifically )?(?:for|to suit) "
    r"(?:an audience of )?(?:young children|middle school(?:ers| students)?|high school(?:ers| students)?|"
    r"college students|practitioners and researchers)\b",
    # an assistant's sign-off, in the last 300 characters: "I hope this helps", "Let me know if", "Feel free to ask"
    r"\b(?:i hope (?:this|that|the above)(?: [\w-]+){0,3} (?:helps?|meets|was helpful|is helpful|gives you|answers|"
    r"clarifies)|let me know if (?:you|there|this|that|anything)|feel free to (?:ask|let me know|reach out|modify|"
    r"adjust|customi[sz]e))\b(?=[\s\S]{0,300}\Z)",
    r"\bin this (?:response|answer|reply),? i\b",
    r"\bword count: \d|\(\s*\d{2,5} words\s*\)",
]

DEFAULT_PLACEHOLDERS = [
    # bracketed instructions: "[insert LaTeX document here]", "[Your Name]", "(add a diagram here)"
    r"\[\s*(?:insert|add|enter|include|put|paste|fill in|replace|placeholder|your|todo|tbd|to be)\b[^\]]{0,80}\]"
    r"(?!\()",
    r"\[[^\]]{0,60}\bhere\s*\](?!\()",
    r"\((?:insert|add|enter|paste) [^)]{0,60}\bhere\)|\((?:insert|paste) [^)]{1,60}\)",
    r"<\s*(?:insert|paste|your)\b[^<>]{0,80}>",  # not <Enter>: a key a programming text names
    r"\[[^\]]{0,60}\b(?:to be (?:added|inserted|written|completed|filled in|provided)|goes here)\s*\]",
    r"\blorem ipsum\b",
    r"\b(?:todo|tbd|fixme):? (?:fill|add|write|insert|complete|expand)\b",
    # unfilled template slots: {topic}, {{ concept }}, <TOPIC>, [NAME], {AUDIENCE}
    r"\{\{[^{}]{1,40}\}\}|\{%[^%]{1,60}%\}",
    r"\{\s*(?:topic|concept|subject|subtopic|audience|audience_guidance|extract|url|title|name|author|date)\s*\}",
    r"(?-i:[<\[{](?:NAME|TOPIC|CONCEPT|SUBJECT|SUBTOPIC|AUDIENCE|TITLE|DATE|AUTHOR|PLACEHOLDER|INSERT[A-Z_ ]*|"
    r"YOUR[A-Z_ ]*|[A-Z]+_[A-Z_]+)[>\]}])",
]


class RepetitionSettings(StrictModel):
    """Repetition rules of Gopher's quality filter (Rae et al. 2021, "Scaling Language Models", Appendix A, Table
    A1; as in datatrove's GopherRepetitionFilter), measured on words (`\\w+`, lower-cased) with fractions of the
    words' characters, plus the lowest distinct-word ratio in any window (a loop at the end of a long text: the
    whole-text fractions dilute it). Fence lines (```), blank lines, lines without a letter and label lines
    (speaker labels "Teacher:", "Solution:") are not lines here: a code block opens and closes with the same fence,
    a dialogue names its speakers again and again. The n-gram rules and the window read the prose (fenced
    code taken out). A null threshold turns its rule off. `pipeline/generate/repetition.py` has the details."""

    enabled: bool = Field(default=True, description="drop repetitive answers (repetition)")
    min_words: int = Field(default=100, ge=1,
                           description="answers with fewer words are not judged: one 4-gram said twice in 60 words "
                                       "passes the 4-gram limit (a short answer is judged by min_tokens instead)")
    max_dup_line_frac: float | None = Field(default=0.3, ge=0, le=1,
                                            description="lines that repeat an earlier line / lines")
    max_dup_para_frac: float | None = Field(default=0.3, ge=0, le=1,
                                            description="paragraphs that repeat an earlier one / paragraphs")
    max_dup_line_char_frac: float | None = Field(default=0.2, ge=0, le=1,
                                                 description="characters in repeated lines / all")
    max_dup_para_char_frac: float | None = Field(default=0.2, ge=0, le=1,
                                                 description="characters in repeated paragraphs / all")
    max_top_ngram_char_frac: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n → word characters covered by the most frequent n-gram / all word characters")
    max_dup_ngram_char_frac: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n → word characters covered by n-grams that occur more than once / all word characters")
    min_window_distinct_ratio: float | None = Field(
        default=0.25, ge=0, le=1,
        description="distinct words / window_words in the worst window of the prose (real web and textbook "
                    "prose: lowest 0.24-0.43, median 0.47-0.66; a word loop: under 0.1)")
    window_words: int = Field(default=100, ge=10, description="window of the distinct-word ratio, in words")

    @field_validator("max_top_ngram_char_frac", "max_dup_ngram_char_frac")
    @classmethod
    def _ngrams(cls, v: dict[int, float]) -> dict[int, float]:
        bad = [n for n, frac in v.items() if n < 1 or not 0 <= frac <= 1]
        if bad:
            raise ValueError(f"n must be >= 1 and fractions in [0, 1] (bad: {bad})")
        return v


class CodeCheckSettings(StrictModel):
    """Code in the formats that promise it: every ```python block must parse (`ast.parse`) and, where the format
    promises tests, the blocks are run in order, in one namespace, in a separate Python process with a timeout and
    memory limit, and every block holding tests (an `assert`, a `test_*` function, a unittest.TestCase) must pass.

    This runs model-written code on the machine (in a temporary directory, with resource limits, no stdin): it is
    not a sandbox. Set `run_tests: false` for a model you do not trust to that extent."""

    formats: dict[str, Literal["parse", "tests"]] = Field(
        default_factory=lambda: {"python_chapter": "tests"},
        description="format name → what its template promises: parse (code that parses) or tests (code whose "
                    "tests pass); formats not listed are not checked")
    min_blocks: int = Field(default=1, ge=0, description="```python blocks a checked format needs (code_missing)")
    run_tests: bool = Field(default=True, description="run the tests of `tests` formats (tests_missing, "
                                                      "tests_failed); false: only parse")
    timeout_s: float = Field(default=10.0, gt=0, description="wall-clock limit of one answer's test run")
    memory_mb: int = Field(default=512, ge=64, description="address-space limit of the test process")
