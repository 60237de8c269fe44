"""Export a checkpoint as a Hugging Face `LlamaForCausalLM` directory (config.json, model.safetensors,
tokenizer files), so lm-eval-harness, vLLM, `transformers serve` or the generation stage can use it.

Our tensors already have Llama's shapes and RoPE layout ("rotate half"): export is a renaming.

Chat template: the export carries `PLAIN_CHAT_TEMPLATE`, which joins the messages' contents as plain text (no
role markers) after the end-of-text token that starts every pretraining document: a pretrained model, not
instruction-tuned, continues that text. Without a template `transformers serve` answers HTTP 500 on every chat
request ("tokenizer.chat_template is not set"). The README.md written beside the weights names it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import TextbookError

# Messages' contents joined by blank lines, as one plain-text document; the bos token (our end-of-text token,
# which precedes every document in the packed pretraining stream) first; a blank line opens the answer. The
# newlines are Jinja string literals: transformers renders templates with trim_blocks, which eats a newline after a tag.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\\n\\n' }}{% endif %}"
)
CHAT_TEMPLATE_NAME = "plain text (the messages' contents joined by blank lines after the end-of-text token; no roles)"


def hf_state_dict(sd: dict[str, Any], n_layers: int, tied: bool) -> dict[str, Any]:
    """Our parameter names -> transformers' Llama names."""
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not tied:
        out["lm_head.weight"] = sd["output.weight"]
    names = {
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
    }
    for i in range(n_layers):
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
    return out


def llama_config(args: dict[str, Any], tokenizer: dict[str, Any] | None) -> Any:
    from transformers import LlamaConfig

    eos = tokenizer.get("eos_id") if tokenizer else None
    return LlamaConfig(
        vocab_size=args["vocab_size"],
        hidden_size=args["dim"],
        intermediate_size=args["ffn_dim"],
        num_hidden_layers=args["n_layers"],
        num_attention_heads=args["n_heads"],
        num_key_value_heads=args["n_kv_heads"],
        head_dim=args["dim"] // args["n_heads"],
        hidden_act="silu",
        max_position_embeddings=args["max_seq_len"],
        rms_norm_eps=args["norm_eps"],
        rope_theta=args["rope_theta"],
        rope_parameters={"rope_type": "default", "rope_theta": args["rope_theta"]},
        tie_word_embeddings=args["tie_embeddings"],
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=None,
        initializer_range=args["init_std"],
        architectures=["LlamaForCausalLM"],
    )


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write OUT_DIR (replaced atomically) loadable with `AutoModelForCausalLM.from_pretrained(OUT_DIR)`."""
    from transformers import LlamaForCausalLM

    from pipeline.train.trainer import DTYPES, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    args, tok = ckpt["model_args"], ckpt.get("tokenizer") or {}
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise TextbookError(f"export-hf: dtype {dtype!r} (float32, bfloat16 or float16)")
    config = llama_config(args, tok)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(hf_state_dict(ckpt["model"], args["n_layers"], args["tie_embeddings"]),
                                                strict=False)
    missing = [k for k in missing if not (args["tie_embeddings"] and k == "lm_head.weight")]
    if missing or unexpected:
        raise TextbookError(f"export-hf: weights do not map onto LlamaForCausalLM (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    if args["tie_embeddings"]:
        model.tie_weights()
    model.to(torch_dtype)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        templated = _save_tokenizer(tmp, tok, args["max_seq_len"])
        info = {"checkpoint": ckpt["path"], "step": ckpt["step"], "tokens_seen": ckpt["tokens_seen"],
                "shards": ckpt.get("shards"), "tokenizer_sha256": tok.get("sha256"), "model_args": args,
                "chat_template": CHAT_TEMPLATE_NAME if templated else None}
        (tmp / "textbook_export.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(info))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _model_card(info: dict[str, Any]) -> str:
    """README.md: what the directory holds, how to serve it, and which chat template it carries."""
    a = info["model_args"]
    template = (f"Chat template: {info['chat_template']}. The model is pretrained, not instruction-tuned: a chat "
                "request is answered by continuing the prompt's text."
                if info["chat_template"] else
                "Chat template: none (no tokenizer travelled with the checkpoint): use the completions API.")
    return (f"# textbook export\n\nA `LlamaForCausalLM` pretrained with `textbook pretrain` and written by "
            f"`textbook export-hf`: {a['n_layers']} layers, width {a['dim']}, context {a['max_seq_len']} tokens, "
            f"vocabulary {a['vocab_size']}; checkpoint `{info['checkpoint']}` (step {info['step']}, "
            f"{info['tokens_seen']:,} tokens seen).\n\n{template}\n\nServe it with `transformers serve DIR` or "
            "point `llm.model` (with `llm.provider: local`) at this directory.\n")


def _save_tokenizer(out: Path, tok: dict[str, Any], max_len: int) -> bool:
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast) from the copy held in the checkpoint, with
    `PLAIN_CHAT_TEMPLATE`. False when no tokenizer travelled with the checkpoint (weights and config only)."""
    if not tok.get("json"):
        return False
    from transformers import PreTrainedTokenizerFast

    tok_file = out / "tokenizer.json"
    tok_file.write_text(tok["json"], encoding="utf-8")
    eos = tok.get("eos_token", "<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=eos, bos_token=eos,
                                   model_max_length=max_len)
    fast.chat_template = PLAIN_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return True
