"""The shipped ablation configs (configs/pretrain/ablations/*.yaml with `arms:`) parse, and with their shard sets
stood in by small real ones they pass `check_arms` (shard dirs, eval sets found, controls' labels) and every
arm's source weights name sources the shards hold (the rephrase check's three arms come from one shard set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from train_helpers import WEB, write_shards

from pipeline.train.ablate import check_arms, load_ablation_config
from pipeline.train.data import PackedLoader, open_sets

REPO = Path(__file__).resolve().parent.parent
ABLATIONS = sorted(p for p in (REPO / "configs" / "pretrain" / "ablations").glob("*.yaml")
                   if "arms" in (yaml.safe_load(p.read_text()) or {}))


def test_the_ablation_configs_are_found():
    assert {p.stem for p in ABLATIONS} >= {"example", "proof", "rephrase-check"}


@pytest.fixture(scope="module")
def web_and_rephrase(shared_data, tmp_path_factory) -> Path:
    """A shard set with both sources of the rephrase check: real FineWeb pages as `web`, others as `rephrase`."""
    pages = [r["text"] for r in json.loads((shared_data / WEB / "fineweb_subset.json").read_text())]
    docs = ([{"text": t, "source": "web"} for t in pages[:20]]
            + [{"text": t, "source": "rephrase"} for t in pages[20:30]])
    return write_shards(tmp_path_factory.mktemp("abl-configs") / "shards", docs,
                        [{"text": pages[30], "source": "web"}])


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_shipped_ablation_config_passes_check_arms(path, shared_data, web_and_rephrase, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the checkout
    monkeypatch.setenv("TEXTBOOK_SHARED_DATA", str(shared_data))
    raw = yaml.safe_load(path.read_text())
    cfg = load_ablation_config(path)
    assert [a.name for a in cfg.arms] == [a["name"] for a in raw["arms"]]
    # the real shards are built by the commands in each file's header; stand them in and run the real checks
    stand_in = tmp_path / "cfg.yaml"
    raw["arms"] = [{**a, "shards": [str(web_and_rephrase)]} for a in raw["arms"]]
    raw["eval_sets"] = [e for e in raw.get("eval_sets", []) if "task" in e]  # document sets: made by the user
    raw["out"] = str(tmp_path / "out")
    stand_in.write_text(yaml.safe_dump(raw))
    cfg = load_ablation_config(stand_in)
    check_arms(cfg)
    for arm in cfg.arms:  # an unknown source name in source_weights is refused by the loader
        loader = PackedLoader(open_sets([Path(s) for s in arm.shards]), "train", 2, 32,
                              source_weights=arm.source_weights)
        x, _ = loader.next_batch()
        assert x.shape == (2, 32)


def test_unigram_counts_follow_an_arms_source_weights(web_and_rephrase):
    """The unigram baseline of an arm that trains on one source of a shard set counts only that source's tokens
    (the rephrase check's arms share one shard set); weights in between scale a source's tokens."""
    import numpy as np

    from pipeline.shards import open_shards
    from pipeline.train.ablate_data import token_counts

    tokens = open_shards(web_and_rephrase).manifest["splits"]["train"]["sources"]
    everything = token_counts([web_and_rephrase], "train", 16384)
    web_only = token_counts([web_and_rephrase], "train", 16384, {"rephrase": 0.0})
    rephrase_only = token_counts([web_and_rephrase], "train", 16384, {"web": 0.0})
    assert web_only.sum() == tokens["web"]["tokens"] and rephrase_only.sum() == tokens["rephrase"]["tokens"]
    assert np.array_equal(web_only + rephrase_only, everything)
    half = token_counts([web_and_rephrase], "train", 16384, {"web": 0.5})
    assert np.allclose(half, 0.5 * web_only + rephrase_only)
