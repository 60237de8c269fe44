"""The shard-inspection notebook runs top to bottom against shards made here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline.shards import ShardSetWriter
from pipeline.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def make_shards(out: Path, shared_data: Path) -> dict:
    docs = []
    with open(shared_data / "textbooks/openstax_intro_python/modules_plaintext.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            if i % 2:
                docs.append({"text": rec["text"], "source": "synthetic", "topic": f"computing/python/{rec['title']}",
                             "audience": ["high school", "college"][i % 4 // 2], "format": "textbook_section"})
            else:
                docs.append({"text": rec["text"], "source": "web", "edu_score": float(i % 5) + 0.5,
                             "url": f"https://openstax.org/{rec['module']}"})
    w = ShardSetWriter(out, load_tokenizer())
    w.add("train", docs[:-10])
    w.add("validation", docs[-10:])
    return w.finalize()


def test_inspect_notebook_executes(tmp_path, shared_data, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    manifest = make_shards(tmp_path / "shards", shared_data)
    monkeypatch.setenv("TEXTBOOK_SHARDS", str(tmp_path / "shards"))
    # the kernel is started as `python`: make it this interpreter (the venv's), whatever PATH says
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    nb = nbformat.read(ROOT / "notebooks/inspect_shards.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    outputs = "".join(o.get("text", "") + json.dumps(o.get("data", {}))
                      for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "error" not in {o.get("output_type") for c in nb.cells for o in c.get("outputs", [])}
    assert f"{manifest['totals']['documents']:,}" in outputs  # the ShardSet repr shows the count
    assert "synthetic" in outputs and "most common subject: computing" in outputs
    # issue 16: the plots are shown (inline), not drawn on a backend nobody sees
    images = [c for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3, f"{len(images)} images in the executed notebook"
    heatmap = [c for c in nb.cells if c.cell_type == "code" and "topic × audience coverage" in c.source]
    assert len(heatmap) == 1 and heatmap[0] in images, "the topic × audience heatmap of the synthetic documents"
