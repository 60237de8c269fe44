"""`textbook pretrain`, `textbook export-hf` and `textbook ablate` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from train_helpers import (
    BOOK,
    WEB,
    book_shards,
    one_thread,  # noqa: F401 - autouse fixture: one torch thread
    train_losses,
    write_shards,
)
from typer.testing import CliRunner

from pipeline.cli import app

TINY = ["--set", "model.max_seq_len=64", "--set", "train.batch_size=2", "--set", "eval.tokens=1024",
        "--set", "train.log_every=1", "--set", "data.prefetch=0"]



@pytest.fixture(scope="module")
def shards(shared_data, tmp_path_factory) -> Path:
    return book_shards(shared_data, tmp_path_factory.mktemp("cli") / "book")


def _web_texts(shared_data: Path) -> list[str]:
    return [r["text"] for r in json.loads((shared_data / WEB / "fineweb_subset.json").read_text())]


def test_pretrain_cli_refuses_overwrite_then_resumes(shards, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["pretrain", "tiny", "--shards", str(shards), "--out", str(out), *TINY]
    r = runner.invoke(app, [*args, "--set", "train.max_steps=2"])
    assert r.exit_code == 0, r.output
    assert "checkpoint:" in r.output and "validation/bpb" in r.output
    r = runner.invoke(app, [*args, "--set", "train.max_steps=4"])
    assert r.exit_code == 1 and "pass --resume" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*args, "--set", "train.max_steps=4", "--resume"])
    assert r.exit_code == 0, r.output
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    r = runner.invoke(app, ["export-hf", str(tmp_path / "nothing"), str(tmp_path / "hf")])
    assert r.exit_code == 1 and "no checkpoint" in r.output
    r = runner.invoke(app, ["pretrain", "enormous", *TINY])
    assert r.exit_code == 1 and "unknown preset 'enormous'" in r.output


def test_ablation_config_overrides_and_errors(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.train.ablate import load_ablation_config

    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"tokens": 100, "arms": [{"name": "x", "shards": ["s1"]},
                                                            {"name": "y", "shards": ["s2"]}],
                                    "eval_sets": [{"name": "e", "path": "s3"}]}))
    cfg = load_ablation_config(path, ["tokens=500", "pretrain.train.lr=0.01"])
    assert (cfg.tokens, cfg.pretrain.train.lr) == (500, 0.01)
    with pytest.raises(ConfigError, match=r"a\.yaml: unknown key 'pretrain\.train\.lrr'"):
        load_ablation_config(path, ["pretrain.train.lrr=0.01"])
    with pytest.raises(ConfigError, match=r"a\.yaml: arms: names must be unique"):
        load_ablation_config(path, ["arms=[{name: x, shards: [s1]}, {name: x, shards: [s2]}]"])


def test_ablate_two_arms_two_seeds(shards, shared_data, tmp_path):
    book = [json.loads(line)["text"] for line in (shared_data / BOOK).read_text().splitlines()]
    web = _web_texts(shared_data)
    web_shards = write_shards(tmp_path / "web", [{"text": t, "source": "web"} for t in web[:200]],
                              [{"text": t, "source": "web"} for t in web[200:210]])
    heldout = write_shards(tmp_path / "heldout", [{"text": t, "source": "web"} for t in web[210:215]],
                           [{"text": t, "source": "web"} for t in web[250:256]]
                           + [{"text": t, "source": "book"} for t in book[-10:]])
    cfg = {
        "name": "book-vs-web", "out": str(tmp_path / "abl"), "tokens": 2048, "seeds": [0, 1],
        "pretrain": {"preset": "tiny", "model": {"max_seq_len": 64},
                     "train": {"batch_size": 4, "log_every": 2, "warmup_steps": 2},
                     "eval": {"every": 4, "tokens": 2048}, "data": {"prefetch": 0}},
        "arms": [{"name": "book", "shards": [str(shards)]}, {"name": "web", "shards": [str(web_shards)]}],
        "eval_sets": [{"name": "heldout", "path": str(heldout)}],
    }
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["ablate", str(path)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "abl/results.json").read_text())
    assert set(res["arms"]) == {"book", "web"}
    for arm in res["arms"].values():
        cell = arm["heldout"]
        assert len(cell["seeds"]) == 2 and cell["std"] > 0 and cell["min"] <= cell["mean"] <= cell["max"]
        assert 0.5 < cell["mean"] < 10
    for run in (tmp_path / "abl/runs").glob("*/seed*"):  # equal budgets: 2048 tokens = 8 steps of 4 x 64
        assert json.loads((run / "summary.json").read_text())["tokens"] == 2048
    assert len(list((tmp_path / "abl/runs").glob("*/seed*"))) == 4
    assert (tmp_path / "abl/ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "abl/results.md").read_text()
    assert "| book |" in md and "| web |" in md and "max seed std" in md
    # a second invocation reuses the finished runs
    r = CliRunner().invoke(app, ["ablate", str(path)])
    assert r.exit_code == 0 and r.output.count("already trained") == 4
