"""Hugging Face export (logits match LlamaForCausalLM) and model growth (function-preserving width/depth)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import (
    book_shards,
    book_texts,
    one_thread,  # noqa: F401 - autouse fixture: one torch thread
    tiny_cfg,
    train_losses,
)

from pipeline.config.pretrain import PretrainSection
from pipeline.errors import TextbookError
from pipeline.train.grow import grow_state_dict
from pipeline.train.model import ModelArgs, Transformer
from pipeline.train.trainer import load_checkpoint, model_from_checkpoint, train


@pytest.fixture(scope="module")
def shards(shared_data, tmp_path_factory) -> Path:
    return book_shards(shared_data, tmp_path_factory.mktemp("export") / "book")


def _perturb(model: Transformer, seed: int = 0) -> Transformer:
    """Random norm weights and larger matrices, so a growth bug cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.1) + ("norm" in name))
    return model


@pytest.mark.parametrize("tied,kv", [(True, None), (False, 2)])
def test_export_hf_logits_match(shards, shared_data, tmp_path, tied, kv):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_cfg(max_steps=3, checkpoint_every=3)
    cfg.model.tie_embeddings = tied
    cfg.model.n_kv_heads = kv
    train(cfg, tmp_path / "run", shards=[str(shards)], progress=False)
    from pipeline.cli.train import export_hf as export_cmd  # the command function, as the CLI calls it

    export_cmd(str(tmp_path / "run"), str(tmp_path / "hf"), dtype="float32")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name

    ours = model_from_checkpoint(load_checkpoint(tmp_path / "run")).eval()
    assert (ours.args.tie_embeddings, ours.args.n_kv_heads) == (tied, kv or 4)
    _perturb(ours)  # a 3-step model is near its init: check the mapping on weights that differ everywhere
    ckpt = load_checkpoint(tmp_path / "run")
    ckpt["model"] = ours.state_dict()
    torch.save({k: v for k, v in ckpt.items() if k != "path"}, tmp_path / "perturbed.pt")
    export_cmd(str(tmp_path / "perturbed.pt"), str(tmp_path / "hf"), dtype="float32")

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = book_texts(shared_data)[0][:400]
    ids = torch.tensor([tok.encode(text)[:64]])
    with torch.no_grad():
        a, _ = ours(ids)
        b = hf(ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4
    assert tok.eos_token == "<|endoftext|>" and tok.decode(tok.encode(text)) == text


def test_width_doubling_preserves_logits():
    torch.manual_seed(0)
    for tied, kv in [(True, 4), (False, 2)]:
        small_args = ModelArgs(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, ffn_dim=160,
                               max_seq_len=32, tie_embeddings=tied)
        small = _perturb(Transformer(small_args)).eval()
        for ffn in (160, 320):
            big_args = ModelArgs(vocab_size=300, dim=128, n_layers=2, n_heads=8, n_kv_heads=2 * kv, ffn_dim=ffn,
                                 max_seq_len=32, tie_embeddings=tied)
            big = Transformer(big_args).eval()
            big.load_state_dict(grow_state_dict(small.state_dict(), small_args, big_args))
            x = torch.randint(0, 300, (2, 32))
            with torch.no_grad():
                assert torch.allclose(small(x)[0], big(x)[0], atol=1e-4), (tied, kv, ffn)


def test_depth_growth_identity_preserves_and_stack_copies():
    torch.manual_seed(0)
    small_args = ModelArgs(vocab_size=300, dim=64, n_layers=2, n_heads=4, max_seq_len=32)
    small = _perturb(Transformer(small_args)).eval()
    x = torch.randint(0, 300, (2, 32))
    # width and depth at once, identity: still the same function
    big_args = ModelArgs(vocab_size=300, dim=128, n_layers=5, n_heads=8, ffn_dim=2 * small_args.ffn_dim,
                         max_seq_len=32)
    big = Transformer(big_args).eval()
    big.load_state_dict(grow_state_dict(small.state_dict(), small_args, big_args, depth="identity"))
    with torch.no_grad():
        assert torch.allclose(small(x)[0], big(x)[0], atol=1e-4)
    # stack: layer i copies layer i % 2 (not the same function, but the same weights)
    deep_args = ModelArgs(vocab_size=300, dim=64, n_layers=4, n_heads=4, max_seq_len=32)
    sd = grow_state_dict(small.state_dict(), small_args, deep_args, depth="stack")
    assert torch.equal(sd["layers.3.attention.wq.weight"], small.state_dict()["layers.1.attention.wq.weight"])
    assert torch.equal(sd["layers.2.feed_forward.w2.weight"], small.state_dict()["layers.0.feed_forward.w2.weight"])
    with pytest.raises(TextbookError, match="head size"):
        grow_state_dict(small.state_dict(), small_args,
                        ModelArgs(vocab_size=300, dim=128, n_layers=2, n_heads=4, max_seq_len=32))


def test_train_init_from_smaller_checkpoint(shards, tmp_path):
    small = tiny_cfg(max_steps=10, checkpoint_every=10)
    train(small, tmp_path / "small", shards=[str(shards)], progress=False)
    small_loss = train_losses(tmp_path / "small")[10]
    big = PretrainSection.model_validate({
        **tiny_cfg(max_steps=2, checkpoint_every=2).model_dump(exclude_unset=True),
        "model": {"dim": 128, "n_heads": 8, "ffn_dim": 384, "max_seq_len": 64},
        "grow": {"init_from": str(tmp_path / "small"), "depth": "identity"},
    })
    train(big, tmp_path / "big", shards=[str(shards)], progress=False)
    fresh = PretrainSection.model_validate({**big.model_dump(exclude_unset=True), "grow": {}})
    train(fresh, tmp_path / "fresh", shards=[str(shards)], progress=False)
    grown_first, fresh_first = train_losses(tmp_path / "big")[1], train_losses(tmp_path / "fresh")[1]
    # the grown model starts where the small one ended (it computes the same function), far below a fresh init
    assert grown_first < fresh_first - 1.0
    assert abs(grown_first - small_loss) < 1.0
