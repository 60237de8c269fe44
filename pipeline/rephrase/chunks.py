"""Long pages are split into chunks that fit the model's context; the answers are re-joined in chunk order.

Token counts here are estimates (characters / `chars_per_token`): the model's tokenizer is not ours, and an
estimate that errs long only makes chunks smaller. Chunks are cut at line breaks, then at sentence ends, then at
spaces (never inside a word), and balanced: a page needing n chunks gets n of about equal size rather than n-1
full ones and a stub (a stub's rewrite would be judged on a few words).
"""

from __future__ import annotations

import math
import re

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
JOIN = "\n\n"  # between the answers of consecutive chunks


def estimate_tokens(text: str, chars_per_token: float) -> int:
    """Tokens of `text` estimated from its length (>= 1 for a non-empty text)."""
    return math.ceil(len(text) / chars_per_token) if text else 0


def chunk_budget(context_tokens: int, max_tokens: int, prompt_overhead_tokens: int, answer_room: float) -> int:
    """Source tokens per chunk: what fits the context beside the template (`prompt_overhead_tokens`) and the answer
    (`max_tokens`), and at most `answer_room` x max_tokens, so that a rewrite about as long as its chunk is not cut
    off at max_tokens. At least 32."""
    fits = context_tokens - max_tokens - prompt_overhead_tokens
    return max(32, min(fits, int(answer_room * max_tokens)))


def _by_words(sentence: str, max_chars: int) -> list[str]:
    """A sentence longer than a chunk, cut between words (a single word longer than a chunk is cut itself)."""
    out: list[str] = []
    piece = ""
    for w in sentence.split():
        while len(w) > max_chars:
            if piece:
                out.append(piece)
                piece = ""
            out.append(w[:max_chars])
            w = w[max_chars:]
        if piece and len(piece) + 1 + len(w) > max_chars:
            out.append(piece)
            piece = w
        else:
            piece = f"{piece} {w}" if piece else w
    if piece:
        out.append(piece)
    return out


def _units(text: str, max_chars: int) -> list[str]:
    """Lines of `text` (blank ones dropped), each split further at sentence ends, then spaces, to <= max_chars."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if len(line) <= max_chars:
            if line:
                out.append(line)
            continue
        piece = ""
        for sent in _SENTENCE_END.split(line):
            parts = [sent] if len(sent) <= max_chars else _by_words(sent, max_chars)
            for part in parts:
                if piece and len(piece) + 1 + len(part) > max_chars:
                    out.append(piece)
                    piece = part
                else:
                    piece = f"{piece} {part}" if piece else part
        if piece:
            out.append(piece)
    return out


def _pack(units: list[str], limit: int, soft: int | None = None) -> list[str]:
    """Units joined into chunks of at most `limit` characters; with `soft`, a chunk is closed as soon as it reaches
    `soft` characters (chunks near the soft size, none above the limit)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for u in units:
        if current and size + 1 + len(u) > limit:
            chunks.append("\n".join(current))
            current, size = [], 0
        current.append(u)
        size += len(u) + (1 if size else 0)
        if soft is not None and size >= soft:
            chunks.append("\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n".join(current))
    return chunks


def split_chunks(text: str, max_tokens: int, chars_per_token: float) -> list[str]:
    """`text` as chunks of at most `max_tokens` estimated tokens each, in order, lines kept (joined by "\\n").

    Every word of `text` is in exactly one chunk, in order (a line longer than a chunk is cut at sentence ends,
    then between words; only whitespace may change). An empty text gives no chunk."""
    max_chars = max(1, int(max_tokens * chars_per_token))
    units = _units(text, max_chars)
    if not units:
        return []
    greedy = _pack(units, max_chars)
    if len(greedy) <= 1:
        return greedy
    total = sum(len(u) + 1 for u in units)
    target = min(max_chars, math.ceil(total / len(greedy) * 1.05))
    balanced = _pack(_units(text, target), max_chars, soft=target)
    return balanced if len(balanced) <= len(greedy) else greedy
