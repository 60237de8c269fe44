"""Evaluations that measure knowledge: benchmark readers on the real files, the multiple-choice scorer
(ranking, acc_norm, answer bits per byte, batching), our checkpoint vs its Hugging Face export, eval sets
read from documents, and the trainer's periodic evaluation with its summary keys."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (
    book_shards,
    book_texts,
    one_thread,  # noqa: F401 - autouse fixture: one torch thread
    read_log,
    tiny_cfg,
)

from pipeline.config.pretrain import EVAL_TASKS, EvalSetSection
from pipeline.errors import TextbookError
from pipeline.train.benchmarks import TASKS, MCItem, read_task
from pipeline.train.evals import (
    check_eval_set,
    document_eval_data,
    encode_mc,
    mc_metrics,
    row_loglikelihoods,
    score_mc,
    tokenizer_encoder,
    transformer_hidden,
)
from pipeline.train.model import ModelArgs, Transformer


@pytest.fixture(scope="module")
def bench(shared_data) -> Path:
    return shared_data / "benchmarks"


@pytest.fixture(scope="module")
def every(bench):
    """All items of a task, read once per module (HellaSwag alone is 10,042 items in a bz2 text file)."""
    cache: dict[str, list[MCItem]] = {}

    def get(task: str) -> list[MCItem]:
        if task not in cache:
            cache[task] = read_task(task, bench)
        return cache[task]

    return get


@pytest.fixture(scope="module")
def shards(shared_data, tmp_path_factory) -> Path:
    return book_shards(shared_data, tmp_path_factory.mktemp("evals") / "book")


def _default_encoder():
    from pipeline.tokenizer import DEFAULT_TOKENIZER

    return tokenizer_encoder(DEFAULT_TOKENIZER.read_text(encoding="utf-8"))


# --- readers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,count,choices", [
    ("arc_easy", 2376, {3, 4, 5}), ("arc_challenge", 1172, {3, 4, 5}), ("hellaswag", 10042, {4}),
    ("mmlu", 14042, {4}), ("mmlu_cloze", 14042, {4}),
])
def test_readers_parse_the_real_benchmarks(every, task, count, choices):
    items = every(task)
    assert len(items) == count  # the row counts SOURCES.md records for the shipped files
    assert {len(it.choices) for it in items} == choices
    assert all(0 <= it.gold < len(it.choices) for it in items)
    golds = np.bincount([it.gold for it in items], minlength=4)
    assert golds[:4].min() > 0.2 * len(items)  # answers spread over positions, not one column misread
    assert len({it.id for it in items}) == count
    assert all(it.context == it.context.rstrip() and it.context.strip() for it in items)


def test_reader_prompts_follow_lm_eval(every, bench):
    arc = {it.id: it for it in every("arc_easy")}["ARC-Easy-Test:Mercury_417466"]  # the file's first row
    assert arc.context == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                           "food webs?\nAnswer:")
    assert arc.choices[arc.gold] == "Sunlight is the source of energy for nearly all ecosystems."
    # ARC rows labelled 1-4 instead of A-D: the answer key is found among the labels
    by_id = {it.id: it for it in every("arc_challenge")}
    with open(bench / "arc/ARC-Challenge-Test.jsonl", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    numeric = [r for r in raw if r["answerKey"].isdigit()]
    assert len(numeric) == 22
    for r in numeric:
        right = next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"])
        it = by_id[f"ARC-Challenge-Test:{r['id']}"]
        assert it.choices[it.gold] == right
    mmlu = {it.id: it for it in every("mmlu")}["abstract_algebra_test:2"]  # SOURCES.md: answer B
    assert mmlu.context == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                            "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
                            "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert mmlu.choices == ("A", "B", "C", "D") and mmlu.gold == 1
    cloze = {it.id: it for it in every("mmlu_cloze")}["abstract_algebra_test:2"]
    assert cloze.context.endswith("\n\nQuestion: Find the degree for the given field extension Q(sqrt(2), "
                                  "sqrt(3), sqrt(18)) over Q.\nAnswer:") and cloze.choices[cloze.gold] == "4"
    hs = {it.id: it for it in every("hellaswag")}["hellaswag_val_full:0"]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. he" and hs.gold == 3
    assert hs.choices[3] == "starts pulling up roofing on a roof."
    assert not any("[title]" in it.context for it in every("hellaswag"))


def test_reader_alternative_layouts(every, bench, tmp_path):
    # the original headerless MMLU csv (question, A, B, C, D, letter) gives the same items as the shipped one
    with open(bench / "mmlu/test/anatomy_test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:5]
    (tmp_path / "mmlu/test").mkdir(parents=True)
    with open(tmp_path / "mmlu/test/anatomy_test.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[r["question"], r["choice0"], r["choice1"], r["choice2"], r["choice3"],
                                  "ABCD"[int(r["answer"])]] for r in rows])
    orig = {it.id: it for it in every("mmlu") if it.id.startswith("anatomy_test:")}
    for it in read_task("mmlu", tmp_path):
        ref = orig[f"anatomy_test:{int(it.id.split(':')[1]) + 1}"]  # the header row shifts line numbers by one
        assert (it.context, it.choices, it.gold) == (ref.context, ref.choices, ref.gold)
    # the original HellaSwag jsonl: lm-eval capitalises ctx_b
    rec = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
           "ctx_b": "he", "endings": ["is using wrap [title] to wrap a pair of skis.", "b", "c", "d"], "label": "3"}
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag/hellaswag_val.jsonl").write_text(json.dumps(rec) + "\n")
    (hs,) = read_task("hellaswag", tmp_path)
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.choices[0] == "is using wrap. to wrap a pair of skis." and hs.gold == 3
    # PIQA (not shipped in ../shared/data/benchmarks): the original valid.jsonl + valid-labels.lst layout
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa/valid.jsonl").write_text(json.dumps({"goal": "g", "sol1": "x", "sol2": "y"}) + "\n")
    (tmp_path / "piqa/valid-labels.lst").write_text("1\n")
    (pq,) = read_task("piqa", tmp_path)
    assert (pq.context, pq.choices, pq.gold) == ("Question: g\nAnswer:", ("x", "y"), 1)
    with pytest.raises(TextbookError, match="no file"):
        read_task("piqa", bench)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q", "question": {"stem": "s", "choices": [{"text": "a", "label": "A"},
                                                                              {"text": "b", "label": "B"}]},
                               "answerKey": "C"}) + "\n")
    with pytest.raises(TextbookError, match=r"bad.jsonl:1: answerKey 'C'"):
        read_task("arc_easy", bad)
    assert set(TASKS) == set(EVAL_TASKS)  # the config's choices are the tasks the reader knows


def test_item_choice_is_deterministic_and_nested(every, bench):
    a = [it.id for it in read_task("arc_challenge", bench, limit=50)]
    b = [it.id for it in read_task("arc_challenge", bench, limit=200)]
    in_file = [it.id for it in sorted(every("arc_challenge"), key=lambda it: it.id)]
    assert a == b[:50] and len(set(b)) == 200
    assert a != in_file[:50]  # not the first rows of the file
    assert a == [it.id for it in read_task("arc_challenge", bench, limit=50)]
    # the two MMLU formats ask the same questions
    assert [it.id for it in read_task("mmlu", bench, 30)] == [it.id for it in read_task("mmlu_cloze", bench, 30)]


# --- the scorer ---------------------------------------------------------------------------------------------
def _unigram(logp: dict[int, float], vocab: int = 256):
    """A fake model with the same next-byte distribution at every position: `logp` plus a filler token
    holding the remaining probability, so every listed log-probability is exact."""
    rest = 1.0 - sum(math.exp(v) for v in logp.values())
    w = torch.full((vocab,), -1e9)
    for t, lp in logp.items():
        w[t] = lp
    w[1] = math.log(rest)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return w.expand(ids.shape[0], ids.shape[1], vocab).clone()

    return forward


def test_ranking_acc_norm_and_answer_bpb_on_a_known_model():
    lp = {ord(" "): -1.5, ord("a"): -3.0, ord("b"): -2.0, ord("?"): -3.0, 0xC3: -1.5, 0xA9: -1.5}  # é = C3 A9
    forward = _unigram(lp)
    encode = lambda t: list(t.encode("utf-8"))  # noqa: E731 - one token per byte
    items = [MCItem("short", "?", ("a", "bbbb"), 0),  # " a" -4.5 beats " bbbb" -9.5: acc right, acc_norm not
             MCItem("long", "?", ("a", "bbbb"), 1),  # per character -2.375 beats -4.5: acc_norm right, acc not
             MCItem("chars", "?", ("éé", "bbbb"), 1)]  # per character -3.75 < -2.375: acc_norm right; per byte
    data = encode_mc("toy", "toy", items, encode, max_length=16)  # of the answer (-1.875) it would be wrong
    ll = row_loglikelihoods(forward, data, batch_size=2)
    expect = [sum(lp[b] for b in (" " + c).encode()) for it in items for c in it.choices]
    assert ll == pytest.approx(expect, abs=1e-4)
    assert data.char_len.tolist() == [1, 4, 1, 4, 2, 4] and data.cont_bytes.tolist() == [2, 5, 2, 5, 5, 5]
    m = mc_metrics(data, ll)
    assert (m["acc"], m["acc_norm"], m["n"], m["chance"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3, 0.5)
    by_bytes = np.argmax(ll[4:6] / np.array([len("éé".encode()), len(b"bbbb")]))
    assert by_bytes != items[2].gold  # so the characters divisor is what made item 3 right
    gold_bits = -(expect[0] + expect[3] + expect[5]) / math.log(2)
    assert m["answer_bpb"] == pytest.approx(gold_bits / (2 + 5 + 5), abs=1e-5)  # bytes of " a", " bbbb", " bbbb"


def test_acc_norm_differs_from_acc_when_lengths_differ(bench):
    """On real ARC items and a fixed model the two rankings disagree on some items, exactly where the
    length division changes the argmax."""
    encode, eos = _default_encoder()
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=16384, dim=32, n_layers=1, n_heads=2, max_seq_len=256)).eval()
    data = encode_mc("arc", "arc_easy", read_task("arc_easy", bench, limit=60), encode, 256, eos)
    ll = row_loglikelihoods(transformer_hidden(model), data, 16, head=model.output)
    m = mc_metrics(data, ll)
    pred = [int(np.argmax(ll[data.item_of_row == i])) for i in range(len(data.items))]
    norm = [int(np.argmax(ll[data.item_of_row == i] / data.char_len[data.item_of_row == i]))
            for i in range(len(data.items))]
    assert pred != norm and m["acc"] != m["acc_norm"]
    assert m["acc"] == pytest.approx(np.mean([p == it.gold for p, it in zip(pred, data.items, strict=True)]),
                                     abs=1e-6)
    assert m["acc_norm"] == pytest.approx(np.mean([p == it.gold for p, it in zip(norm, data.items, strict=True)]),
                                          abs=1e-6)


def test_batching_window_sharing_and_hidden_path_agree(bench):
    """One row at a time through the full forward = batches of shared windows through hidden states + head;
    the continuation bytes are exactly the scored text."""
    from pipeline.tokenizer import DEFAULT_TOKENIZER
    from tokenizers import Tokenizer

    encode, eos = _default_encoder()
    torch.manual_seed(1)
    model = Transformer(ModelArgs(vocab_size=16384, dim=32, n_layers=2, n_heads=2, max_seq_len=64)).eval()
    items = read_task("mmlu", bench, limit=6) + read_task("hellaswag", bench, limit=6)
    data = encode_mc("mix", "mix", items, encode, 64, eos)
    assert data.truncated > 0  # MMLU prompts are longer than 64 tokens: cut on the left
    full = row_loglikelihoods(lambda ids: model(ids)[0], data, batch_size=1)
    fast = row_loglikelihoods(transformer_hidden(model), data, batch_size=5, head=model.output)
    assert np.abs(full - fast).max() < 1e-4 and (full < 0).all()
    # under DDP each rank scores every world-th answer and the ranks' arrays are summed
    ranks = [row_loglikelihoods(transformer_hidden(model), data, 4, rows=range(r, data.rows, 3), head=model.output)
             for r in range(3)]
    assert all((rk != 0).sum() == len(range(r, data.rows, 3)) for r, rk in enumerate(ranks))
    assert np.abs(sum(ranks) - fast).max() < 1e-4
    tok = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    for r in range(data.rows):
        choice = data.items[data.item_of_row[r]].choices[data.choice_of_row[r]]
        assert tok.decode(data.targets[r].tolist()) == " " + choice
        assert data.cont_bytes[r] == len((" " + choice).encode("utf-8"))
    # MMLU letters are one token: the four answers of an item share one window
    letters = [r for r in range(data.rows) if data.items[data.item_of_row[r]].choices[0] == "A"]
    assert len({data.inputs[r].tobytes() for r in letters}) == len(letters) // 4


def test_a_model_trained_on_the_answers_picks_them(bench):
    """A tiny model that memorised 8 ARC questions with their right answers scores 8/8; at init it does not."""
    items = read_task("arc_easy", bench, limit=8)
    base, _ = _default_encoder()
    texts = [it.context + " " + it.choices[it.gold] for it in items]
    used = sorted({i for it in items for t in [it.context, *(" " + c for c in it.choices)] for i in base(t)}
                  | {i for t in texts for i in base(t)})
    remap = {t: k for k, t in enumerate(used)}
    encode = lambda s: [remap[i] for i in base(s)]  # noqa: E731 - a compact vocabulary: fast on 2 cores
    data = encode_mc("arc8", "arc_easy", items, encode, 128)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=len(used), dim=64, n_layers=2, n_heads=4, max_seq_len=128))
    before, _ = score_mc(transformer_hidden(model.eval()), data, 8, head=model.output)
    seqs = [encode(t) for t in texts]
    T = max(map(len, seqs))
    x = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    y = torch.roll(x, -1, 1)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, :len(s) - 1] = True
    opt = model.configure_optimizer(1e-2, 0.0, (0.9, 0.95), fused=False)
    model.train()
    for _ in range(60):
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits[mask], y[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = score_mc(transformer_hidden(model.eval()), data, 8, head=model.output)
    assert after["acc"] == 1.0 and before["acc"] < 1.0, (before, after, float(loss))
    assert after["answer_bpb"] < 0.5 * before["answer_bpb"]


# --- our checkpoint and its Hugging Face export ---------------------------------------------------------
def test_hf_export_gives_the_same_loglikelihoods(shards, bench, tmp_path):
    from pipeline.cli.train import eval_mc, export_hf
    from pipeline.train.evals import load_scoring_model
    from pipeline.train.trainer import load_checkpoint, model_from_checkpoint, train

    train(tiny_cfg(max_steps=2, checkpoint_every=2), tmp_path / "run", shards=[str(shards)], progress=False)
    ckpt = load_checkpoint(tmp_path / "run")
    model = model_from_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that differ everywhere: a 2-step model is near its init
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.1) + ("norm" in name))
    ckpt["model"] = model.state_dict()
    torch.save({k: v for k, v in ckpt.items() if k != "path"}, tmp_path / "perturbed.pt")
    export_hf(str(tmp_path / "perturbed.pt"), str(tmp_path / "hf"), dtype="float32")

    ours, hf = load_scoring_model(tmp_path / "perturbed.pt"), load_scoring_model(tmp_path / "hf")
    assert ours.head is not None and hf.head is None  # hidden states + our head vs transformers' own logits
    items = read_task("arc_challenge", bench, limit=20) + read_task("mmlu_cloze", bench, limit=10)
    a = encode_mc("x", "x", items, ours.encode, ours.max_length, ours.eos_id)
    b = encode_mc("x", "x", items, hf.encode, hf.max_length, hf.eos_id)
    assert all(np.array_equal(u, v) for u, v in zip(a.inputs + a.targets, b.inputs + b.targets, strict=True))
    ll_ours, ll_hf = (row_loglikelihoods(m.forward, a, 8, head=m.head) for m in (ours, hf))
    assert np.abs(ll_ours - ll_hf).max() < 1e-4 and np.std(ll_ours) > 1.0

    eval_mc(str(tmp_path / "hf"), sets="arc_easy,mmlu", items=12, benchmarks=str(bench), batch_size=8,
            threads=1, device="cpu", dtype="float32", out=str(tmp_path / "mc.json"))
    res = json.loads((tmp_path / "mc.json").read_text())
    assert res["model"]["kind"] == "hf" and res["threads"] == 1
    assert set(res["tasks"]) == {"arc_easy", "mmlu"} and res["tasks"]["mmlu"]["n"] == 12
    assert {"acc", "acc_norm", "acc_stderr", "answer_bpb", "chance", "seconds"} <= set(res["tasks"]["arc_easy"])


# --- eval sets read from documents, and the trainer ---------------------------------------------------------
def test_document_eval_set_equals_the_shard_set_of_the_same_documents(shards, shared_data, tmp_path):
    from pipeline.tokenizer import load_tokenizer
    from pipeline.train.data import eval_data, open_sets

    held = book_texts(shared_data)[-10:]  # the shard fixture's validation split
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    tok = load_tokenizer(shards / "tokenizer.json")
    for budget in (1024, 4096):
        docs = document_eval_data("held", [path], tok, budget, 64)
        ref = eval_data("held", open_sets([shards]), "validation", budget, 64)
        assert docs.y.size == budget and np.array_equal(docs.x, ref.x) and np.array_equal(docs.y, ref.y)
        assert docs.tokens_per_byte == ref.tokens_per_byte
    pq_path = tmp_path / "held.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": held}), pq_path)
    assert np.array_equal(document_eval_data("p", [pq_path], tok, 1024, 64, text_field="body").x,
                          document_eval_data("j", [path], tok, 1024, 64).x)


def test_eval_set_config_and_up_front_checks(shards, tmp_path):
    assert EvalSetSection(task="hellaswag").name == "hellaswag"
    assert EvalSetSection(path="data/heldout-edu.jsonl").name == "heldout-edu"
    for bad, msg in [({"name": "x"}, "needs a path"), ({"path": "a.jsonl", "items": 5}, "task sets only"),
                     ({"task": "arc_easy", "tokens": 512}, "text sets only"), ({"task": "boolq"}, "task")]:
        with pytest.raises(ValueError, match=msg):
            EvalSetSection(**bad)
    assert check_eval_set(EvalSetSection(path=str(shards))).kind == "shards"
    with pytest.raises(TextbookError, match="does not exist"):
        check_eval_set(EvalSetSection(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(TextbookError, match="no 'test' split"):
        check_eval_set(EvalSetSection(path=str(shards), split="test"))
    with pytest.raises(TextbookError, match="another tokenizer"):
        check_eval_set(EvalSetSection(path=str(shards)), tokenizer_sha256="0" * 64)
    with pytest.raises(TextbookError, match="no file in"):
        check_eval_set(EvalSetSection(task="arc_easy", path=str(tmp_path)))


def test_trainer_reports_accuracy_and_document_bpb(shards, shared_data, bench, tmp_path):
    from pipeline.train.trainer import train

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in book_texts(shared_data)[-10:]))
    cfg = tiny_cfg(max_steps=4, checkpoint_every=4)
    cfg.eval.every = 2
    cfg.eval.sets = [EvalSetSection(name="held", path=str(held), tokens=2048),
                     EvalSetSection(path=str(held), name="held-small", tokens=512),
                     EvalSetSection(task="arc_easy", path=str(bench), items=16),
                     EvalSetSection(task="mmlu", path=str(bench), items=8)]
    summary = train(cfg, tmp_path / "run", shards=[str(shards)], progress=False)
    ev = summary["evals"]
    assert ev["eval/held/bpb"] == ev["eval/validation/bpb"]  # the same 10 documents, same budget
    assert ev["eval/held-small/bpb"] != ev["eval/held/bpb"]  # its own token budget
    for s, n in (("arc_easy", 16), ("mmlu", 8)):
        assert ev[f"eval/{s}/n"] == n and ev[f"eval/{s}/chance"] == pytest.approx(0.25, abs=0.01)
        assert 0 <= ev[f"eval/{s}/acc"] <= 1 and 0 <= ev[f"eval/{s}/acc_norm"] <= 1
        assert 1 < ev[f"eval/{s}/answer_bpb"] < 20
    evals = [r for r in read_log(tmp_path / "run") if "eval/arc_easy/acc" in r]
    assert [r["step"] for r in evals] == [2, 4]
    items = json.loads(Path(summary["eval_items"]).read_text())
    assert len(items["arc_easy"]["pred"]) == 16 and len(items["mmlu"]["id"]) == 8
    acc = np.mean(np.asarray(items["arc_easy"]["pred"]) == np.asarray(items["arc_easy"]["gold"]))
    assert acc == pytest.approx(ev["eval/arc_easy/acc"])
