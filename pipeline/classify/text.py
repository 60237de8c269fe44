"""What a classifier sees of a document: a bounded, whitespace-collapsed prefix.

Scoring cost and memory must not depend on a 10 MB page, so every backend scores only the first
`max_chars` characters (recorded in `classifier.json` and the model card). Training uses the same function,
so train and score see text the same way.
"""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def prepare(text: str, max_chars: int, lowercase: bool = True) -> str:
    """First `max_chars` characters, whitespace (incl. newlines, which fastText rejects) collapsed to spaces."""
    if max_chars > 0:
        # a little slack so collapsing runs of whitespace still leaves ~max_chars of content
        text = text[: max_chars + max_chars // 4]
    text = " ".join(text.split())
    if max_chars > 0:
        text = text[:max_chars]
    return text.lower() if lowercase else text

