"""Run config: strict validation with errors that name the file and the key; --set overrides; ${ENV}."""

from __future__ import annotations

import pytest

from pipeline.config import config_hash, load_config
from pipeline.errors import ConfigError


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_valid_config_and_typed_override(tmp_path):
    p = write(tmp_path, "run:\n  name: demo\n  seed: 3\nshard:\n  validation_fraction: 0.05\n")
    cfg = load_config(p, ["run.seed=7", "shard.validation_fraction=0.1", "run.stages=[dedup, shard]"])
    assert cfg.run.name == "demo" and cfg.run.seed == 7
    assert cfg.shard.validation_fraction == pytest.approx(0.1)
    assert cfg.run.stages == ["dedup", "shard"]
    assert cfg.run.out_dir == "shards/demo"


@pytest.mark.parametrize(
    ("text", "sets", "expected"),
    [
        ("run:\n  nmae: x\n", [], r"run\.yaml: run\.nmae: unknown key"),
        ("run:\n  seed: lots\n", [], r"run\.yaml: run\.seed: Input should be a valid integer"),
        ("bogus_section: {}\n", [], r"run\.yaml: bogus_section: unknown key"),
        ("shard:\n  validation_fraction: 2\n", [], r"shard\.validation_fraction: Input should be less than 1"),
        ("run: {}\n", ["run.sed=1"], r"unknown key 'run\.sed' \(--set\)"),
        ("run: {}\n", ["nosuch.key=1"], r"unknown key 'nosuch\.key' \(--set\)"),
        ("run: {}\n", ["run.seed"], r"--set expects key=value"),
        ("run: [1, 2\n", [], r"run\.yaml: line \d+: invalid YAML"),
        ("- a\n- b\n", [], r"top level must be a mapping"),
        ("run:\n  out: ${TEXTBOOK_TEST_UNSET_VAR}\n", [], r"environment variable TEXTBOOK_TEST_UNSET_VAR is not set"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, sets, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), sets)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_env_substitution_with_default(tmp_path, monkeypatch):
    p = write(tmp_path, "run:\n  out: ${TEXTBOOK_OUT:-shards/default}\n")
    assert load_config(p).run.out_dir == "shards/default"
    monkeypatch.setenv("TEXTBOOK_OUT", "/data/x")
    assert load_config(p).run.out_dir == "/data/x"


def test_config_hash_changes_with_content(tmp_path):
    p = write(tmp_path, "run:\n  name: a\n")
    h1 = config_hash(load_config(p))
    assert h1 == config_hash(load_config(p))
    assert h1 != config_hash(load_config(p, ["run.seed=1"]))
