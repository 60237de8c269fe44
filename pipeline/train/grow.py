"""Initialise a bigger model from a smaller trained one (Phi-2's "scaled knowledge transfer").

Width doubling is function-preserving (HyperCloning, Samragh et al. 2024; Net2Net, Chen et al. 2016): every
hidden vector h of the small model becomes [h, h] in the big one.
  - embedding E (V, d)              -> [E, E]                       (V, 2d)
  - RMSNorm weight g                -> [g, g]        (rms([h, h]) == rms(h))
  - a linear map W whose input doubles: each copy of the input carries half: [W/2, W/2]; if its output
    doubles too, the rows are repeated: [[W/2, W/2], [W/2, W/2]]
  - attention doubles the number of heads at the same head size (so RoPE is unchanged): the new heads are
    copies, each pair sees the same scores
  - output head: [W/2, W/2]; with tied embeddings the head is [E, E], so the final norm weight is halved
    instead ([g, g] / 2), which gives the same logits.
A SwiGLU hidden size may stay or double; n_layers may grow: new layers copy old ones cyclically ("stack",
G_stack style, not function-preserving) or copy them with zeroed output projections ("identity": each
new block adds 0 to the residual stream, so the grown model computes the same function).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import TextbookError
from pipeline.train.model import ModelArgs


def _width_factor(small: int, big: int, what: str) -> int:
    if big == small:
        return 1
    if big == 2 * small:
        return 2
    raise TextbookError(f"grow: {what} must stay {small} or double to {2 * small} (got {big})")


def _linear(w: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """Repeat output rows `out_f` times; split input columns into `in_f` equal copies that sum to the original."""
    return w.repeat(out_f, in_f) / in_f


def _grow_width_layer(sd: dict[str, torch.Tensor], prefix: str, fd: int, fh: int, fkv: int, ff: int
                      ) -> dict[str, torch.Tensor]:
    # q/k/v rows are whole heads: repeating the rows appends a copy of every head
    out = {
        f"{prefix}attention_norm.weight": sd[f"{prefix}attention_norm.weight"].repeat(fd),
        f"{prefix}ffn_norm.weight": sd[f"{prefix}ffn_norm.weight"].repeat(fd),
        f"{prefix}attention.wq.weight": _linear(sd[f"{prefix}attention.wq.weight"], fh, fd),
        f"{prefix}attention.wk.weight": _linear(sd[f"{prefix}attention.wk.weight"], fkv, fd),
        f"{prefix}attention.wv.weight": _linear(sd[f"{prefix}attention.wv.weight"], fkv, fd),
        # input: concatenated heads [o, o] (fh copies); output: the residual stream (fd copies)
        f"{prefix}attention.wo.weight": _linear(sd[f"{prefix}attention.wo.weight"], fd, fh),
        f"{prefix}feed_forward.w1.weight": _linear(sd[f"{prefix}feed_forward.w1.weight"], ff, fd),
        f"{prefix}feed_forward.w3.weight": _linear(sd[f"{prefix}feed_forward.w3.weight"], ff, fd),
        f"{prefix}feed_forward.w2.weight": _linear(sd[f"{prefix}feed_forward.w2.weight"], fd, ff),
    }
    return out


def grow_state_dict(sd: dict[str, torch.Tensor], small: ModelArgs, big: ModelArgs,
                    depth: str = "stack") -> dict[str, torch.Tensor]:
    """State dict for `big` built from the `small` model's state dict."""
    if big.vocab_size != small.vocab_size:
        raise TextbookError(f"grow: vocab sizes differ ({small.vocab_size} vs {big.vocab_size}): same tokenizer needed")
    if big.tie_embeddings != small.tie_embeddings:
        raise TextbookError("grow: model.tie_embeddings must match the smaller model's")
    if big.head_dim != small.head_dim or big.rope_theta != small.rope_theta:
        raise TextbookError(f"grow: the head size ({small.head_dim}) and rope_theta must stay: grow width by "
                            "doubling dim and n_heads together")
    if big.n_layers < small.n_layers:
        raise TextbookError(f"grow: n_layers can only grow ({small.n_layers} -> {big.n_layers})")
    if depth not in ("stack", "identity"):
        raise TextbookError(f"grow: depth method {depth!r} (stack or identity)")
    fd = _width_factor(small.dim, big.dim, "model.dim")
    fh = _width_factor(small.n_heads, big.n_heads, "model.n_heads")
    fkv = _width_factor(small.n_kv_heads, big.n_kv_heads, "model.n_kv_heads")
    ff = _width_factor(small.ffn_dim, big.ffn_dim, "model.ffn_dim")
    if fh != fd or fkv != fd:
        raise TextbookError("grow: n_heads and n_kv_heads double exactly when dim does")

    out: dict[str, torch.Tensor] = {}
    emb = sd["tok_embeddings.weight"].repeat(1, fd)
    out["tok_embeddings.weight"] = emb
    norm = sd["norm.weight"].repeat(fd)
    if small.tie_embeddings:
        out["output.weight"] = emb
        out["norm.weight"] = norm / fd
    else:
        out["output.weight"] = _linear(sd["output.weight"], 1, fd)
        out["norm.weight"] = norm
    for i in range(big.n_layers):
        src = i % small.n_layers
        layer = _grow_width_layer(sd, f"layers.{src}.", fd, fh, fkv, ff)
        if depth == "identity" and i >= small.n_layers:
            for name in ("attention.wo.weight", "feed_forward.w2.weight"):
                layer[f"layers.{src}.{name}"] = torch.zeros_like(layer[f"layers.{src}.{name}"])
        for k, v in layer.items():
            out[k.replace(f"layers.{src}.", f"layers.{i}.", 1)] = v.clone()
    return out


def grow_from_checkpoint(path: str | Path, big: ModelArgs, depth: str = "stack") -> dict[str, torch.Tensor]:
    from pipeline.train.trainer import load_checkpoint

    ckpt = load_checkpoint(path)
    small = ModelArgs(**ckpt["model_args"])
    return grow_state_dict(ckpt["model"], small, big, depth=depth)
