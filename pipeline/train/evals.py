"""Evaluations beyond training loss: multiple-choice accuracy by log-likelihood, bits per byte on the right
answer, and bits-per-byte sets read straight from jsonl/parquet documents.

Multiple choice (the lm-evaluation-harness `output_type: multiple_choice` convention, zero-shot):

- every answer `a` of an item is scored as the summed log-probability of the continuation `" " + a` given
  the context; context and continuation are tokenized as lm-eval's `_encode_pair` does (trailing spaces of
  the context move to the continuation; the continuation's tokens are those of `context + continuation`
  after the context's own tokens), the window is cut on the left to the model's length, and no BOS is added
  (lm-eval's default for Hugging Face models, `add_bos_token=False`);
- `acc`: the answer with the highest log-likelihood is the gold one; `acc_norm`: the highest
  log-likelihood divided by the answer's length in characters (Python `len` of the answer string without
  the delimiter, as lm-eval's `process_results` does: `lls / completion_len`);
- `answer_bpb`: bits per UTF-8 byte of the gold continuation only (`-sum(ll_gold) / ln 2 / sum(bytes)`
  over the items; the bytes are those of the scored continuation text, delimiter included);
- `acc_stderr`: sqrt(acc (1 - acc) / (n - 1)), the sample standard error lm-eval reports; `chance`: the mean
  of 1 / (number of answers).

The same code scores our own `Transformer` (inside the trainer, or from a checkpoint) and an exported
Hugging Face directory (`textbook export-hf`), so a figure can be checked against lm-eval-harness run on
that directory (`lm_eval --model hf --model_args pretrained=DIR --tasks arc_easy`).
Sources: EleutherAI/lm-evaluation-harness, lm_eval/api/task.py (multiple_choice metrics) and
lm_eval/models/huggingface.py (`_encode_pair`, `_loglikelihood_tokens`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import TextbookError
from pipeline.train.benchmarks import MCItem, read_task, task_files
from pipeline.train.data import EvalData, pack_eval

Encode = Callable[[str], list[int]]
Forward = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) int64 -> logits (B, T, vocab)


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads as the trainer does (`trainer.cpu_threads`: `threads`, else $OMP_NUM_THREADS,
    else the CPUs this process may run on). Returns the number."""
    from pipeline.train.trainer import cpu_threads

    n = cpu_threads(threads)
    torch.set_num_threads(n)
    return n


# --- requests ---------------------------------------------------------------------------------------------
def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int], str]:
    """(context ids, continuation ids, continuation text as scored), lm-eval's `_encode_pair` convention:
    trailing whitespace of the context moves to the continuation, and the continuation's ids are the ids of
    `context + continuation` after the first len(context ids) of them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):], continuation


@dataclass
class MCData:
    """A multiple-choice set tokenized for one model: one row per (item, answer).

    Row r scores `targets[r]` (the continuation ids, length c_r) as the last c_r predictions of the window
    `inputs[r]` (context + continuation minus its last token, at most max_length ids, cut on the left).
    """

    name: str
    task: str
    items: list[MCItem]
    inputs: list[np.ndarray]  # per row, int64 (n_r,)
    targets: list[np.ndarray]  # per row, int64 (c_r,), c_r <= n_r
    item_of_row: np.ndarray  # (rows,) item index
    choice_of_row: np.ndarray  # (rows,) answer index within the item
    char_len: np.ndarray  # (rows,) characters of the answer string (lm-eval's acc_norm divisor)
    cont_bytes: np.ndarray  # (rows,) UTF-8 bytes of the scored continuation (delimiter included)
    truncated: int = 0  # rows whose context was cut on the left to fit the model
    skipped: int = 0  # items left out: one of their answers alone is longer than the model's window

    @property
    def rows(self) -> int:
        return len(self.inputs)

    @property
    def tokens(self) -> int:
        """Input tokens one evaluation of this set runs through the model."""
        return int(sum(len(x) for x in self.inputs))


def encode_mc(name: str, task: str, items: list[MCItem], encode: Encode, max_length: int,
              prefix_id: int | None = None) -> MCData:
    """Tokenize every (item, answer) once; the windows are reused at every evaluation.

    An empty context is replaced by `prefix_id` (lm-eval uses the end-of-text token there). An item with an
    answer longer than `max_length` tokens cannot be scored and is left out (counted in `skipped`; it depends
    only on the tokenizer and max_length, so runs of one config leave out the same items).
    """
    inputs, targets, item_of_row, choice_of_row, char_len, cont_bytes = [], [], [], [], [], []
    kept: list[MCItem] = []
    truncated = skipped = 0
    for it in items:
        rows = []
        for j, choice in enumerate(it.choices):
            ctx, cont, cont_text = encode_pair(encode, it.context, it.delimiter + choice)
            if not ctx:
                if prefix_id is None:
                    raise TextbookError(f"{name}: item {it.id} has an empty context and no prefix token")
                ctx = [prefix_id]
            if not cont:
                raise TextbookError(f"{name}: item {it.id} answer {j} encodes to no tokens")
            rows.append((ctx + cont, cont, len(choice), len(cont_text.encode("utf-8"))))
        if any(len(cont) > max_length for _, cont, _, _ in rows):
            skipped += 1  # an answer longer than the model's window cannot be scored (lm-eval would stop)
            continue
        for j, (full, cont, n_chars, n_bytes) in enumerate(rows):
            window = full[-(max_length + 1):]
            truncated += len(full) > max_length + 1
            inputs.append(np.asarray(window[:-1], dtype=np.int64))
            targets.append(np.asarray(cont, dtype=np.int64))
            item_of_row.append(len(kept))
            choice_of_row.append(j)
            char_len.append(n_chars)
            cont_bytes.append(n_bytes)
        kept.append(it)
    return MCData(name, task, kept, inputs, targets, np.asarray(item_of_row, dtype=np.int64),
                  np.asarray(choice_of_row, dtype=np.int64), np.asarray(char_len, dtype=np.float64),
                  np.asarray(cont_bytes, dtype=np.int64), truncated, skipped)


# --- scoring ----------------------------------------------------------------------------------------------
@torch.no_grad()
def row_loglikelihoods(forward: Forward, data: MCData, batch_size: int, device: torch.device | str = "cpu",
                       rows: Iterable[int] | None = None, amp: Any = None, progress: bool = False,
                       head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Log-likelihood in nats of each row's continuation, shape (data.rows,); rows not asked for stay 0.

    Rows with the same input window share one forward (e.g. MMLU's one-token letters: one window per item).
    The distinct windows are sorted by length (longest first, as lm-eval) and run `batch_size` at a time:
    right-padded into one (B, T) tensor and one forward; then only the continuation positions are scored
    (log-probability of the target token = its logit - logsumexp, in float32). Right padding needs no
    attention mask in a causal model: a real position never attends to a later (padded) one. With `head`,
    `forward` returns hidden states (B, T, dim) and `head` maps the selected positions to logits (the
    vocabulary projection runs on continuation positions only); without it `forward` returns logits.
    """
    device = torch.device(device)
    groups: dict[bytes, list[int]] = {}
    for r in range(data.rows) if rows is None else rows:
        groups.setdefault(data.inputs[r].tobytes(), []).append(r)
    windows = sorted(groups.values(), key=lambda g: -len(data.inputs[g[0]]))
    ll = np.zeros(data.rows, dtype=np.float64)
    ctx = amp if amp is not None else _null()
    bar = _progress(sum(map(len, windows)), f"{data.name} ({data.rows} answers)", progress)
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            lengths = [len(data.inputs[g[0]]) for g in batch]
            x = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
            for b, g in enumerate(batch):
                x[b, :lengths[b]] = torch.from_numpy(data.inputs[g[0]])
            # one entry per scored token: (window in batch, position, target id, row within this batch)
            win, pos, tgt, seg, batch_rows = [], [], [], [], []
            for b, g in enumerate(batch):
                for r in g:
                    c = len(data.targets[r])
                    # position p predicts token p + 1: the c continuation tokens are predicted at n-c .. n-1
                    win.append(np.full(c, b))
                    pos.append(np.arange(lengths[b] - c, lengths[b]))
                    tgt.append(data.targets[r])
                    seg.append(np.full(c, len(batch_rows)))
                    batch_rows.append(r)
            w_t, p_t, t_t, s_t = (torch.from_numpy(np.concatenate(a)) for a in (win, pos, tgt, seg))
            with ctx:
                out = forward(x.to(device))
                sel = out[w_t.to(out.device), p_t.to(out.device)]  # (tokens, vocab or dim)
                logits = (head(sel) if head is not None else sel).float()
            tok = logits.gather(-1, t_t.to(logits.device)[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            sums = torch.zeros(len(batch_rows), dtype=torch.float64).index_add_(0, s_t, tok.double().cpu())
            ll[batch_rows] = sums.numpy()
            bar.update(len(batch_rows))
    finally:
        bar.close()
    return ll


def transformer_hidden(model: Any) -> Forward:
    """Our Transformer's forward without the output head: token ids (B, T) -> final-norm hidden states
    (B, T, dim); `model.output` is the head. (Checked against the full forward in tests/test_train_evals.py.)"""

    def hidden(idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > model.args.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len {model.args.max_seq_len}")
        x = model.tok_embeddings(idx)
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        for layer in model.layers:
            x = layer(x, cos, sin)
        return model.norm(x)

    return hidden


def mc_metrics(data: MCData, ll: np.ndarray) -> dict[str, float | int]:
    """acc, acc_norm, acc_stderr, answer_bpb, chance and n from the rows' log-likelihoods (shape (rows,))."""
    n = len(data.items)
    if n == 0:
        raise TextbookError(f"{data.name}: no items to score")
    per_item = _per_item(data, ll)
    acc = float(np.mean(per_item["pred"] == per_item["gold"]))
    acc_norm = float(np.mean(per_item["pred_norm"] == per_item["gold"]))
    gold_rows = per_item["gold_row"]
    bits = -float(ll[gold_rows].sum()) / math.log(2)
    n_bytes = int(data.cont_bytes[gold_rows].sum())
    return {
        "acc": round(acc, 6),
        "acc_norm": round(acc_norm, 6),
        "acc_stderr": round(math.sqrt(acc * (1 - acc) / (n - 1)), 6) if n > 1 else float("nan"),
        "answer_bpb": round(bits / max(n_bytes, 1), 6),
        "chance": round(float(np.mean([1 / len(it.choices) for it in data.items])), 6),
        "n": n,
    }


def item_outcomes(data: MCData, ll: np.ndarray) -> dict[str, list[Any]]:
    """Per item, in `data.items` order: id, gold, pred (by acc), pred_norm (by acc_norm), gold_ll (nats).
    For item-level paired comparisons of two runs on the same items."""
    per = _per_item(data, ll)
    return {"id": [it.id for it in data.items], "gold": per["gold"].tolist(), "pred": per["pred"].tolist(),
            "pred_norm": per["pred_norm"].tolist(),
            "gold_ll": [round(float(v), 6) for v in ll[per["gold_row"]]]}


def _per_item(data: MCData, ll: np.ndarray) -> dict[str, np.ndarray]:
    n = len(data.items)
    pred = np.empty(n, dtype=np.int64)
    pred_norm = np.empty(n, dtype=np.int64)
    gold = np.asarray([it.gold for it in data.items], dtype=np.int64)
    gold_row = np.empty(n, dtype=np.int64)
    bounds = np.searchsorted(data.item_of_row, np.arange(n + 1))  # rows of item i: bounds[i]:bounds[i+1]
    for i in range(n):
        a, b = bounds[i], bounds[i + 1]
        pred[i] = int(np.argmax(ll[a:b]))
        pred_norm[i] = int(np.argmax(ll[a:b] / data.char_len[a:b]))
        gold_row[i] = a + gold[i]
    return {"pred": pred, "pred_norm": pred_norm, "gold": gold, "gold_row": gold_row}


def score_mc(forward: Forward, data: MCData, batch_size: int = 16, device: torch.device | str = "cpu",
             amp: Any = None, progress: bool = False, head: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[dict[str, float | int], np.ndarray]:
    """(metrics, per-row log-likelihoods in nats, shape (data.rows,)) of one set on one process."""
    ll = row_loglikelihoods(forward, data, batch_size, device, amp=amp, progress=progress, head=head)
    return mc_metrics(data, ll), ll


# --- models -----------------------------------------------------------------------------------------------
@dataclass
class ScoringModel:
    """What the scorer needs of a model: a forward (ids (B, T) -> logits (B, T, vocab), or hidden states
    (B, T, dim) when `head` maps them to logits), the tokenizer's encode (text -> ids, no special tokens),
    the longest window, the end-of-text id, the device."""

    forward: Forward
    encode: Encode
    max_length: int
    eos_id: int | None
    device: torch.device
    label: str
    info: dict[str, Any] = field(default_factory=dict)
    head: Callable[[torch.Tensor], torch.Tensor] | None = None


def tokenizer_encoder(tokenizer_json: str) -> tuple[Encode, int | None]:
    """(encode, id of <|endoftext|>) of a `tokenizers` JSON string; encode adds no special tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    eos = tok.token_to_id("<|endoftext|>")
    return (lambda text: tok.encode(text, add_special_tokens=False).ids), eos


def model_from_checkpoint_path(path: str | Path, device: str = "cpu") -> ScoringModel:
    """Our checkpoint (a step_*.pt file or a pretrain output directory: its newest) with the tokenizer it
    carries. Raises TextbookError when the checkpoint holds no tokenizer."""
    from pipeline.train.trainer import load_checkpoint, model_from_checkpoint, pick_device

    ckpt = load_checkpoint(path)
    tok_json = (ckpt.get("tokenizer") or {}).get("json")
    if not tok_json:
        raise TextbookError(f"{ckpt['path']}: the checkpoint carries no tokenizer: cannot tokenize questions")
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev).eval()
    encode, eos = tokenizer_encoder(tok_json)
    return ScoringModel(transformer_hidden(model), encode, model.args.max_seq_len, eos, dev,
                        f"checkpoint {ckpt['path']} (step {ckpt['step']})",
                        {"kind": "checkpoint", "path": ckpt["path"], "step": ckpt["step"],
                         "tokens_seen": ckpt["tokens_seen"], "params": model.num_params()}, head=model.output)


def model_from_hf_dir(path: str | Path, device: str = "cpu", dtype: str = "float32") -> ScoringModel:
    """A Hugging Face causal LM directory (e.g. from `textbook export-hf`), loaded with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.trainer import DTYPES, pick_device

    if dtype not in DTYPES:
        raise TextbookError(f"dtype {dtype!r}: float32, bfloat16 or float16")
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 30  # we cut windows ourselves: silence the tokenizer's length warning
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or tok.model_max_length)
    return ScoringModel(lambda ids: model(input_ids=ids).logits, lambda t: tok.encode(t, add_special_tokens=False),
                        max_len, tok.eos_token_id, dev, f"hf {path}",
                        {"kind": "hf", "path": str(path), "params": sum(p.numel() for p in model.parameters())})


def load_scoring_model(source: str | Path, device: str = "cpu", dtype: str = "float32") -> ScoringModel:
    """An exported HF directory (it holds config.json) or our checkpoint / pretrain output directory."""
    p = Path(source)
    if p.is_dir() and (p / "config.json").is_file():
        return model_from_hf_dir(p, device, dtype)
    return model_from_checkpoint_path(p, device)


def evaluate_tasks(lm: ScoringModel, tasks: list[str], items: int | None = 300, path: str | Path | None = None,
                   batch_size: int = 16, progress: bool = True, log: Callable[[str], None] = print
                   ) -> dict[str, dict[str, Any]]:
    """Score `lm` on each task: {task: metrics + `answers`, `tokens`, `truncated`, `seconds`, `files`}."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        t0 = time.perf_counter()
        files = task_files(task, path)
        data = encode_mc(task, task, read_task(task, path, items), lm.encode, lm.max_length, lm.eos_id)
        metrics, _ = score_mc(lm.forward, data, batch_size, lm.device, progress=progress, head=lm.head)
        if data.truncated or data.skipped:
            log(f"note: {task}: {data.truncated} answers had their context cut to {lm.max_length} tokens, "
                f"{data.skipped} items left out (an answer longer than the window)")
        out[task] = {**metrics, "answers": data.rows, "tokens": data.tokens, "truncated": data.truncated,
                     "skipped": data.skipped,
                     "seconds": round(time.perf_counter() - t0, 2), "files": [str(f) for f in files]}
    return out


# --- evaluation sets of a pretrain config ----------------------------------------------------------------
@dataclass
class EvalSpec:
    """An evaluation set checked and located: `kind` is shards, documents or task."""

    name: str
    kind: str
    section: Any  # EvalSetSection
    sets: list[Any] = field(default_factory=list)  # shards: the opened shard sets
    files: list[Path] = field(default_factory=list)  # documents / task: the files read


def eval_set_kind(section: Any) -> str:
    """task (a `task:` set), shards (a directory with manifest.json) or documents (anything else)."""
    if section.task is not None:
        return "task"
    p = Path(section.path)
    return "shards" if p.is_dir() and (p / "manifest.json").is_file() else "documents"


def check_eval_set(section: Any, tokenizer_sha256: str | None = None) -> EvalSpec:
    """Locate and check one `EvalSetSection` before any training: the path exists and holds something to
    evaluate, a shard set has the split and (given `tokenizer_sha256`) the training shards' tokenizer, a
    task's files are found. Raises TextbookError naming the set. (For `textbook ablate`'s up-front checks too.)
    """
    from pipeline.documents import list_document_files
    from pipeline.train.data import open_sets

    kind = eval_set_kind(section)
    label = f"eval set {section.name}"
    if kind == "task":
        return EvalSpec(section.name, kind, section, files=task_files(section.task, section.path))
    p = Path(section.path)
    if not p.exists():
        raise TextbookError(f"{label}: {p} does not exist")
    if kind == "shards":
        sets = open_sets([p])
        if tokenizer_sha256 and sets[0].manifest["tokenizer"]["sha256"] != tokenizer_sha256:
            raise TextbookError(f"{label} ({p}) was made with another tokenizer than the training shards: "
                                "its loss would not be comparable")
        if section.split not in sets[0].manifest["splits"]:
            raise TextbookError(f"{label} ({p}) has no '{section.split}' split "
                                f"(splits: {', '.join(sets[0].manifest['splits'])})")
        return EvalSpec(section.name, kind, section, sets=sets)
    files = list_document_files([p])
    if not files:
        raise TextbookError(f"{label}: no document files (.jsonl, .json, .parquet) in {p}")
    return EvalSpec(section.name, kind, section, files=files)


# --- bits-per-byte sets from documents --------------------------------------------------------------------
def tokenized_documents(paths: list[str | Path], tokenizer: Any, text_field: str = "text", batch: int = 64
                        ) -> Iterator[tuple[np.ndarray, str]]:
    """(ids with EOS appended, text) of the documents of jsonl/json/parquet files or folders, in file order,
    tokenized `batch` at a time with `tokenizer.encode_batch` (pipeline.tokenizer.Tokenizer, the shards' own).
    A record that cannot be read raises TextbookError: an evaluation set is read whole or not at all."""
    from pipeline.documents import iter_documents

    def fail(reason: str, where: str) -> None:
        raise TextbookError(f"eval set: {reason} at {where}")

    texts: list[str] = []
    for doc in iter_documents(paths, text_field=text_field, on_error=fail):
        texts.append(doc["text"])
        if len(texts) == batch:
            yield from zip(tokenizer.encode_batch(texts), texts, strict=True)
            texts = []
    if texts:
        yield from zip(tokenizer.encode_batch(texts), texts, strict=True)


def document_eval_data(name: str, paths: list[str | Path], tokenizer: Any, max_tokens: int, seq_len: int,
                       text_field: str = "text") -> EvalData | None:
    """Bits-per-byte sequences from documents read directly (no sharding): the first `max_tokens` target
    tokens in file order, cut exactly as a shard set of the same documents would be (`data.pack_eval`)."""
    return pack_eval(name, tokenized_documents(paths, tokenizer, text_field), max_tokens, seq_len)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="answer", disable=not enabled, dynamic_ncols=True, leave=False)
