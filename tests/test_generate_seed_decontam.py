"""A web seed that contains a benchmark item is dropped before any prompt is built (no money spent on it)."""

from __future__ import annotations

import json

from pipeline.config import load_config
from pipeline.generate.stage import plan


def test_contaminated_seed_is_dropped_before_generation(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("TEXTBOOK_CACHE", str(tmp_path / "cache"))
    question = json.loads((shared_data / "benchmarks/gsm8k/test.jsonl").read_text().splitlines()[5])["question"]
    para = ("Glaciers form where more snow falls in winter than melts in summer, and over many years the snow "
            "compacts into dense blue ice that slowly flows downhill under its own weight. ")
    pages = tmp_path / "pages.jsonl"
    rows = [{"id": "clean", "text": para * 6, "edu_score": 4.5, "url": "https://a.org/glaciers"},
            {"id": "dirty", "text": para * 2 + question + " " + para * 2, "edu_score": 4.6,
             "url": "https://b.org/homework"}]
    pages.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"run.out={tmp_path / 'out'}", "generate.n=4", "generate.web_seed_fraction=0.5",
                             f"generate.seed_inputs=[{pages}]", "generate.decontaminate_seeds=true",
                             f"decontaminate.local_dir={shared_data / 'benchmarks'}", "decontaminate.benchmarks=[gsm8k]"])
    p = plan(cfg, [])
    assert p.seeds_info["pages_available"] == 1
    assert [d["id"] for d in p.seeds_info["pages_contaminated"]] == ["dirty"]
    assert "gsm8k" in p.seeds_info["pages_contaminated"][0]["benchmarks"]
    used = {s.seed.id for s in p.specs if s.seed is not None}
    assert used == {"clean"}
