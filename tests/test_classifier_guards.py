"""Guards in front of the edu classifier (keyword lists, word salad, repetition, pasted training text) and
the training-overlap figures: adversarial pages written for this project (tests/_edu_adversarial.py) are
stopped, real educational pages are not, and scoring or evaluating a model's own training texts says so."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _edu_adversarial import adversarial_pages, control_pages, spam_page

from pipeline.classify.guards import GuardConfig, GuardedScorer, gate, text_features
from pipeline.classify.model import load_classifier
from pipeline.classify.overlap import HASH_FILE, TrainingHashes
from pipeline.classify.train import evaluate_model, train_classifier
from pipeline.config.classifier import ClassifierSection, LabelSource, TrainSection
from pipeline.errors import TextbookError

EXPECTED_GATE = {
    "keyword_list_lines": "keyword_list", "keyword_list_commas": "keyword_list", "keyword_stuffed": "keyword_list",
    "keyword_list_with_articles": "no_sentences", "keyword_title_list": "no_sentences",
    "word_salad_shuffled": "word_salad", "word_salad_sentences": "word_salad", "word_salad_mixed": "word_salad",
    "repeated_sentence": "repetitive", "repeated_paragraph": "repetitive",
}


def _decide(text: str, english: bool = True) -> str | None:
    """The gate decision GuardedScorer makes on a page the model reads 5,000 characters of: the sample, then
    confirmed on the whole view."""
    c = GuardConfig()
    view = text[:5000]
    g = gate(view[: c.sample_chars], english, c)
    return gate(view, english, c) if g and len(view) > c.sample_chars else g


def test_gates_stop_adversarial_pages_and_pass_teaching_prose() -> None:
    pages = adversarial_pages()
    for name, want in EXPECTED_GATE.items():
        assert _decide(pages[name]) == want, (name, text_features(pages[name]))
    for name, text in control_pages().items():
        assert _decide(text) is None, (name, text_features(text))
    # spam around one lesson is fluent English: no gate stops it (the model, or the memorised rule, must)
    assert all(_decide(pages[f"pasted_spam_lesson{i}"]) is None for i in range(3))
    # English-only gates do not judge another language's function words; language-free ones still apply
    assert gate(pages["keyword_list_lines"], english=False) is None
    assert gate(pages["repeated_sentence"], english=False) == "repetitive"
    # too short to judge
    assert gate("algebra theorem vector matrix", english=True) is None


def test_determiner_rule_ignores_names_and_codes() -> None:
    text = ("The A1 road and the US border are busy. " * 3 + "Take the A14 towards the IT park. " * 3)
    f = text_features(text)
    assert f["salad_violations"] == 0 and f["determiners"] > 8


def _real_labelled(shared: Path) -> list[tuple[str, float, str]]:
    rows = []
    d = shared / "edu_labels"
    for name in ("llama3_train", "human511_train", "fwedu_classifier_train"):
        with open(d / "fineweb_edu_llama3_sample" / f"{name}.jsonl", encoding="utf-8") as f:
            rows += [(name, float(r["score"]), r["text"]) for r in map(json.loads, f)]
    with open(d / "fineweb_edu_llama33_150" / "training_data.csv", encoding="utf-8", newline="") as f:
        rows += [("llama33_150", float(r["score"]), r["text"]) for r in csv.DictReader(f)]
    return rows


def test_gates_cost_almost_nothing_on_real_educational_pages(shared_data: Path) -> None:
    """Every real English page labelled >= 3 (Llama-3, human majority, FineWeb-Edu classifier, Llama-3.3) and
    every Danish human-labelled page >= 3 (language-free gates only): at most 0.5 % may be gated (measured: 0)."""
    rows = [r for r in _real_labelled(shared_data) if r[1] >= 3]
    assert len(rows) > 600
    gated = [(src, _decide(text)) for src, _, text in rows if _decide(text)]
    assert len(gated) <= 0.005 * len(rows), gated
    with open(shared_data / "edu_labels/fineweb_c_danish_human/labels.csv", encoding="utf-8", newline="") as f:
        danish = [r["text"] for r in csv.DictReader(f) if float(r["integer_score"]) >= 3]
    assert len(danish) > 20 and not [t for t in danish if _decide(t, english=False)]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, shared_data) -> tuple[Path, TrainSection]:
    """A small English binary model trained on part of the Llama-3 labels (its hook writes the hashes)."""
    out = tmp_path_factory.mktemp("guard-models")
    src = LabelSource(path=str(shared_data / "edu_labels/fineweb_edu_llama3_sample/llama3_train.jsonl"),
                      id_column="id", name="llama3", limit=700)
    train = TrainSection(name="small-edu", mode="binary", max_chars=3000, sources=[src], cv_folds=2,
                         params={"epoch": 10, "dim": 16, "bucket": 50_000, "quantize": False})
    train_classifier(train, out_dir=out, log=lambda m: None)
    return out / "small-edu", train


def _fitted_and_fresh(model_dir: Path, shared: Path) -> tuple[list[str], list[str]]:
    """Labelled pages the model was fitted on and pages it never saw, told apart by its own hashes (whatever
    rule training used to choose what it fits on): Llama-3 sample pages it recognises, human-labelled and
    Llama-3.3 pages it does not."""
    hashes = TrainingHashes.load(model_dir)
    d = shared / "edu_labels"
    with open(d / "fineweb_edu_llama3_sample/llama3_train.jsonl", encoding="utf-8") as f:
        llama = [r["text"] for r in map(json.loads, f)]
    with open(d / "fineweb_edu_llama33_150/training_data.csv", encoding="utf-8", newline="") as f:
        other = [r["text"] for r in csv.DictReader(f)]
    fit = [t for t, m in zip(llama, hashes.contains_documents(llama), strict=True) if m]
    fresh = [t for t, m in zip(other, hashes.contains_documents(other), strict=True) if not m]
    return fit, fresh


def test_training_writes_hashes_and_overlap_is_reported(small_model, tmp_path, shared_data) -> None:
    from pipeline.classify.overlap import document_key, text_hash

    model_dir, train = small_model
    assert (model_dir / HASH_FILE).is_file()
    hashes = TrainingHashes.load(model_dir)
    fit, held = _fitted_and_fresh(model_dir, shared_data)
    # every stored document hash is one of the pages trained on, and most of the 700 chosen pages are fitted on
    assert np.array_equal(np.unique([text_hash(document_key(t)) for t in fit]), hashes.documents)
    assert 400 < len(fit) <= 700 and len(held) > 100 and len(hashes.shingles) > 10 * len(fit)
    # re-wrapped or re-cased, a training text is still recognised (normalised key)
    assert hashes.contains_documents(["\n".join(fit[0].upper().split(" "))])[0]

    # evaluate on documents the model was fitted on: the metrics say so
    jsonl = tmp_path / "mixed.jsonl"
    mixed = fit[:30] + held[:20]
    jsonl.write_text("".join(json.dumps({"text": t, "score": 1}) + "\n" for t in mixed), encoding="utf-8")
    clf = load_classifier(model_dir)
    m = evaluate_model(clf, [LabelSource(path=str(jsonl))])
    assert m["training_overlap"] == {"documents": 50, "in_training": 30, "fraction": 0.6}
    from pipeline.classify.overlap import overlap_warning

    assert "30 of 50" in overlap_warning(m["training_overlap"])

    # scoring says so too: stats, a warning line, and a flag on each such document
    from pipeline.classify.score import score_files
    from pipeline.documents import iter_documents

    said: list[str] = []
    stats = score_files(str(model_dir), [str(jsonl)], str(tmp_path / "scored"), log=said.append)
    assert stats["training_overlap"]["in_training"] == 30 and said and "30 of 50" in said[0]
    flagged = [d for d in iter_documents([tmp_path / "scored"]) if d["meta"].get("edu_in_training")]
    assert len(flagged) == 30

    # a model without hashes (trained before they existed) reports no overlap figures rather than zero
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(model_dir, bare)
    (bare / HASH_FILE).unlink()
    assert evaluate_model(load_classifier(bare), [LabelSource(path=str(jsonl))])["training_overlap"] is None
    (bare / HASH_FILE).write_bytes(b"not a zip")
    with pytest.raises(TextbookError, match="corrupt training hashes"):
        TrainingHashes.load(bare)


def test_hashes_from_config_match_the_hook(small_model, tmp_path) -> None:
    from pipeline.classify.overlap import hashes_from_config

    model_dir, train = small_model
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / HASH_FILE).unlink()
    hashes_from_config(train, copy)
    a, b = TrainingHashes.load(model_dir), TrainingHashes.load(copy)
    assert np.array_equal(a.documents, b.documents) and np.array_equal(a.shingles, b.shingles)
    other = train.model_copy(update={"sources": [train.sources[0].model_copy(update={"limit": 300})]})
    with pytest.raises(TextbookError, match="not the config this model was trained with"):
        hashes_from_config(other, copy)  # another number of fitted documents than its metrics.json records


def test_scorer_gates_and_pasted_training_paragraph(small_model, shared_data) -> None:
    model_dir, train = small_model
    clf = load_classifier(model_dir)
    scorer = GuardedScorer(clf, config=GuardConfig(check_above=0))  # every page checked, whatever its score
    fit, _ = _fitted_and_fresh(model_dir, shared_data)
    # the training paragraph the model scores highest when pasted into spam: the strongest such attack
    paragraphs = [p for t in fit for p in t.split("\n") if 300 <= len(p) <= 1200]
    pages = [spam_page(p, 0.6, i) for i, p in enumerate(paragraphs)]
    raw = clf.score(pages)
    top = int(np.argmax(raw))
    page, para = pages[top], paragraphs[top]
    spam_only = page.replace(para, "")
    adversarial = adversarial_pages()
    res = scorer.score([page, spam_only, para.replace(". ", ".\n"), *adversarial.values()])
    exact = len(para.split()) / len(page.split())
    assert res.rescored[0] and abs(res.memorised_share[0] - exact) < 0.15 and not res.rescored[1]
    # judged on its own text: the remainder is spam only (no 8-word run of the paragraph left in it)
    share, remainder = scorer.hashes.memorised(page)
    assert res.scores[0] == pytest.approx(clf.score([remainder])[0], abs=1e-6)
    left, words = remainder.lower().split(), para.lower().split()
    assert not {tuple(left[i:i + 8]) for i in range(len(left))} & {tuple(words[i:i + 8]) for i in range(len(words))}
    # the passage re-wrapped (a line per sentence) is the same words: recognised as such, and as mostly
    # training text it is not rescored
    assert res.memorised_share[2] == pytest.approx(scorer.hashes.memorised(para)[0])
    assert res.memorised_share[2] > 0.6
    assert not res.rescored[2]
    assert res.raw[0] == pytest.approx(raw[top], abs=1e-6)
    # each adversarial page is stopped by its gate: the rubric minimum, its own score kept beside it
    for i, (name, text) in enumerate(adversarial.items(), start=3):
        assert res.gates[i] == EXPECTED_GATE.get(name), name
        if res.gates[i]:
            assert res.scores[i] == clf.score_min and res.raw[i] == pytest.approx(clf.score([text])[0])
    # the default floor: pages the model already rates below it are not checked (cost), the rest are
    default = GuardedScorer(clf)
    assert default.floor == pytest.approx(min(1.0, 0.5 * clf.selection_cutoff()[0]))
    low = default.score(list(adversarial.values()))
    assert all((g is None) == (r < default.floor or n not in EXPECTED_GATE)
               for n, g, r in zip(adversarial, low.gates, low.raw, strict=True))
    # guards off: exactly the model's scores; a training text itself is never "rescored"
    off = GuardedScorer(clf, enabled=False).score([page, fit[0]])
    assert np.array_equal(off.scores, clf.score([page, fit[0]])) and not off.rescored.any()
    own = scorer.score([fit[0]])
    assert own.in_training[0] and not own.rescored[0]


def test_default_model_adversarial_pages_score_below_its_cutoff(shared_data) -> None:
    """The committed default classifier, through the guards, at the cut-off `web.edu` and `evaluate` use by
    default: keyword lists, word salad, repetition and spam pages (with a lesson, or with the paragraph of the
    model's own training text it rates highest) all score below it; teaching prose is not gated."""
    from pipeline.paths import repo_path

    clf = load_classifier(repo_path(ClassifierSection().model))
    scorer = GuardedScorer(clf)
    assert scorer.hashes is not None, "the default model must carry training_hashes.npz"
    cutoff = float(clf.selection_cutoff()[0])
    pages = adversarial_pages()
    res = scorer.score(list(pages.values()))
    above = {n: (float(r), float(s)) for n, r, s in zip(pages, res.raw, res.scores, strict=True) if s >= cutoff}
    assert not above, (cutoff, above)
    # spam pasting a paragraph of the model's own training text (found through its hashes in the shared data)
    candidates = []  # paragraphs of the labelled pages that teach (>= 3): what a spammer would paste
    for _, label, text in _real_labelled(shared_data):
        candidates += [p for p in text.split("\n") if 200 <= len(p) <= 1500 and label >= 3]
    with open(shared_data / "textbooks/openstax_intro_python/modules_plaintext.jsonl", encoding="utf-8") as f:
        for rec in map(json.loads, f):
            candidates += [p.strip() for p in rec["text"].split("\n\n") if 200 <= len(p.strip()) <= 1500]
    # the strongest attacks: the 300 passages the model rates highest on their own, that it was trained on
    best = np.argsort(-clf.score(candidates))[:300]
    memorised = [candidates[i] for i in best if scorer.hashes.memorised(candidates[i])[0] > 0.9]
    assert len(memorised) >= 20
    spam_pages = [spam_page(p, 0.6, i) for i, p in enumerate(memorised)]
    res = scorer.score(spam_pages)
    worst = np.argsort(-res.raw)[:10]  # the ten pasted pages the model alone rates highest
    assert [round(float(res.scores[i]), 3) for i in worst if res.scores[i] >= cutoff] == []
    res = scorer.score(list(control_pages().values()))
    assert not any(res.gates)
