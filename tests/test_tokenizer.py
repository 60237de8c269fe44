"""Tokenizer: exact round trip, EOS on every document, offline default, training, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import TextbookError
from pipeline.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, train_tokenizer


def test_default_is_committed_and_offline():
    tok = load_tokenizer()
    assert tok.path == DEFAULT_TOKENIZER and tok.vocab_size >= 16_000
    assert tok.eos_id == 0 and len(tok.sha256) == 64


def test_round_trip_and_eos_on_real_text(shared_data):
    tok = load_tokenizer()
    texts = [json.loads(x)["text"] for x in
             (shared_data / "textbooks/openstax_intro_python/modules_plaintext.jsonl").read_text().splitlines()[:30]]
    texts += ["naïve café — ∑ x² 🙂 日本語", "  leading and trailing spaces  ", "\ttabs\n\nnewlines\r\n", "", "def f(x):\n    return x"]
    encoded = tok.encode_batch(texts)
    for text, ids in zip(texts, encoded, strict=True):
        assert ids.dtype == np.uint32
        assert ids[-1] == tok.eos_id and (ids[:-1] != tok.eos_id).all()
        assert tok.decode(ids) == text
    assert len(encoded[-2]) == 1  # the empty document is just EOS


def test_load_errors(tmp_path):
    with pytest.raises(TextbookError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TextbookError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory holding tokenizer.json


def test_train_small_bpe(tmp_path, shared_data):
    tok = train_tokenizer([shared_data / "textbooks/openstax_intro_python/modules_plaintext.jsonl"],
                          tmp_path / "bpe", vocab_size=600)
    assert 300 < tok.vocab_size <= 600
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == 0
    text = "Python lists can be sliced: xs[1:3]."
    assert tok.decode(tok.encode(text)) == text
    # a trained tokenizer compresses its own domain better than bytes
    assert len(tok.encode(text)) < len(text.encode()) * 0.8
