"""A tiny Llama built on the spot (random weights, a tokenizer trained here, a chat template): a real model
directory that `transformers serve` can load offline in seconds. Nothing downloaded, no third-party text."""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
_WORDS = ("energy force motion atom cell water light heat number function variable equation triangle "
          "history language story friend teacher student question answer example exercise solution python "
          "list loop class test value system model data graph area volume speed time plant animal").split()


def _corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 25))).capitalize() + "." for _ in range(n)]


def build_tiny_llama(directory: str | Path, vocab_size: int = 384, seed: int = 0, sample_by_default: bool = True,
                     chat_template: bool = True) -> Path:
    """`sample_by_default=False`: the model's generation config decodes greedily, as most exported and many hub
    models do (then only a request that asks for sampling samples). `chat_template=False`: no template, as a
    model we pretrained and exported."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "</s>"])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = sample_by_default
    model.save_pretrained(out)
    return out


def ledger_ok_rows(ledger: Path) -> int:
    """Successful rows in a request ledger (0 while it does not exist yet or is being created)."""
    import sqlite3

    if not ledger.exists():
        return 0
    try:
        db = sqlite3.connect(ledger, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM results WHERE ok = 1").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0
