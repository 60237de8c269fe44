"""The tokenizer layer: load any `tokenizer.json` (or a Hugging Face name when online), encode in batches
with EOS appended to every document, decode, and train our own byte-level BPE.

The default is the committed `tokenizers/textbook-bpe-16k/tokenizer.json`, so everything works offline.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.errors import TextbookError
from pipeline.paths import repo_path

DEFAULT_TOKENIZER = repo_path("tokenizers", "textbook-bpe-16k", "tokenizer.json")
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|pad|>"]


def _set_threads(workers: int | None) -> None:
    # The Rust thread pool is sized once, at first use: set it before the first encode_batch.
    if workers:
        os.environ.setdefault("RAYON_NUM_THREADS", str(workers))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the shards record about it."""

    name: str
    path: Path
    _tok: object  # tokenizers.Tokenizer
    eos_token: str = EOS_TOKEN

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @cached_property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @cached_property
    def eos_id(self) -> int:
        eid = self._tok.token_to_id(self.eos_token)
        if eid is None:
            raise TextbookError(f"{self.path}: tokenizer has no EOS token {self.eos_token!r}")
        return int(eid)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids (uint32) per text, EOS appended. Uses the Rust thread pool (all configured cores)."""
        encs = self._tok.encode_batch_fast(texts, add_special_tokens=False) if hasattr(
            self._tok, "encode_batch_fast") else self._tok.encode_batch(texts, add_special_tokens=False)
        eos = self.eos_id
        out = []
        for e in encs:
            ids = np.empty(len(e.ids) + 1, dtype=np.uint32)
            ids[:-1] = e.ids
            ids[-1] = eos
            out.append(ids)
        return out

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the EOS appended at encode time is dropped."""
        ids = [int(i) for i in ids]
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self._tok.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token}


def load_tokenizer(spec: str | os.PathLike[str] | None = None, workers: int | None = None) -> Tokenizer:
    """`spec`: a tokenizer.json path, a directory holding one, or a Hugging Face name (online); None: the default."""
    _set_threads(workers)
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(spec) if spec is not None else DEFAULT_TOKENIZER
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TextbookError(f"{path}: not a valid tokenizer.json ({e})") from None
        name = path.parent.name if path.name == "tokenizer.json" else path.stem
        t = Tokenizer(name=name, path=path, _tok=tok)
        if tok.token_to_id(EOS_TOKEN) is None:
            t.eos_token = _guess_eos(tok, path)
        return t
    if spec is None:
        raise TextbookError(f"{path}: default tokenizer missing (run `textbook tokenizer train`)")
    text = str(spec)
    # "name" and "org/name" are hub names; a .json file, an absolute or ./ path, or deeper nesting is a missing file
    if text.endswith(".json") or text.startswith((".", os.sep)) or text.count("/") > 1:
        raise TextbookError(f"{spec}: tokenizer file not found")
    return _from_hub(text)


_PROCESS_TOKENIZERS: dict[tuple[str, int, int, int | None], Tokenizer] = {}


def process_tokenizer(spec: str | os.PathLike[str] | None = None, workers: int | None = None) -> Tokenizer:
    """`load_tokenizer`, loaded once per process and file version (path, size, mtime) and then reused.

    For task code that a long-lived worker process runs many times (Ray workers are reused across tasks): a
    `tokenizers.Tokenizer` that has encoded text and is then dropped does not give all its memory back
    (tokenizers 0.23: ~3-5 MB of RSS per instance that encoded a few hundred documents, measured in a loop of
    shard tokenize tasks), so a fresh tokenizer per task makes a worker's memory grow with the number of tasks,
    i.e. with the input. One instance per process keeps it flat. A hub name is not cached (resolved to a file).
    """
    path = Path(spec) if spec is not None else DEFAULT_TOKENIZER
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        return load_tokenizer(spec, workers=workers)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, workers)
    tok = _PROCESS_TOKENIZERS.get(key)
    if tok is None:
        if len(_PROCESS_TOKENIZERS) >= 4:  # a process that sees many tokenizer files keeps the latest few
            _PROCESS_TOKENIZERS.pop(next(iter(_PROCESS_TOKENIZERS)))
        tok = _PROCESS_TOKENIZERS[key] = load_tokenizer(path, workers=workers)
    return tok


def _guess_eos(tok: object, path: Path) -> str:
    for cand in ("</s>", "<|end_of_text|>", "<|im_end|>", "<eos>", "[SEP]"):
        if tok.token_to_id(cand) is not None:
            return cand
    raise TextbookError(f"{path}: tokenizer has no EOS token ({EOS_TOKEN} or a common alternative)")


def _from_hub(name: str) -> Tokenizer:
    """A Hugging Face tokenizer by name (needs the hub or a local HF cache); stored under our cache."""
    try:
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(name, "tokenizer.json"))
    except Exception as e:
        raise TextbookError(f"tokenizer '{name}': not a local file and not downloadable ({type(e).__name__}); "
                            "offline, pass a tokenizer.json path") from None
    return load_tokenizer(local)


def iter_training_texts(paths: Iterable[Path], max_chars: int = 20_000) -> Iterator[str]:
    """Text for BPE training from document files (jsonl/parquet) and plain text files (.txt/.rst/.md)."""
    from pipeline.documents import DOC_SUFFIXES, iter_documents

    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.name.endswith(DOC_SUFFIXES):
                for doc in iter_documents([f]):
                    yield doc["text"][:max_chars]
            elif f.suffix in (".txt", ".rst", ".md"):
                yield f.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(paths: list[Path], out_dir: Path, vocab_size: int = 16384, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) with `<|endoftext|>` as EOS."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(iter_training_texts(paths), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    from pipeline.io import atomic_path

    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    return load_tokenizer(out_dir / "tokenizer.json")
