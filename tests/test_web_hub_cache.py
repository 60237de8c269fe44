"""A hub web sample is fetched once and cached: later runs read the cached jsonl, offline too."""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import load_config
from pipeline.errors import ResourceUnavailable
from pipeline.web.units import _hub_sample_cache, plan_units

SOURCE = {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train", "limit": 20}


def test_cached_hub_sample_is_read_offline(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("TEXTBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["web.sources=[{path: HuggingFaceFW/fineweb-edu, name: sample-10BT, limit: 20}]"])
    with pytest.raises(ResourceUnavailable, match="HF_HUB_OFFLINE"):
        plan_units(cfg.web, tasks=2)  # nothing cached yet, hub offline: a skipped stage with the reason
    cached = _hub_sample_cache(SOURCE)
    cached.parent.mkdir(parents=True)
    shutil.copy(shared_data / "web/dolma_cc/cc_en_head/cc_en_head-0091.jsonl", cached)
    units, _ = plan_units(cfg.web, tasks=2)
    assert [(u.kind, u.path) for u in units] == [("jsonl", str(cached))]
