"""The run config: one YAML file per run, validated at load into pydantic models.

Each stage owns its section module (`llm.py`, `generate.py`, `web.py`, ...); this module assembles them
and implements loading, `--set key=value` overrides and `${ENV}` substitution.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError

from pipeline.config.classifier import ClassifierSection
from pipeline.config.core import RunSection, StageSection, StrictModel, TokenizerSection
from pipeline.config.dedup import DecontamSection, DedupSection, ShardSection
from pipeline.config.generate import GenerateSection
from pipeline.config.llm import BudgetSection, LLMSection
from pipeline.config.pretrain import PretrainSection
from pipeline.config.rephrase import RephraseSection
from pipeline.config.report import ReportSection
from pipeline.config.web import WebSection
from pipeline.errors import ConfigError
from pipeline.io import YAML_LOADER

__all__ = [
    "RunConfig",
    "StrictModel",
    "StageSection",
    "load_config",
    "config_hash",
    "ConfigError",
]


class RunConfig(StrictModel):
    run: RunSection = Field(default_factory=RunSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    llm: LLMSection = Field(default_factory=LLMSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    rephrase: RephraseSection = Field(default_factory=RephraseSection)
    web: WebSection = Field(default_factory=WebSection)
    classifier: ClassifierSection = Field(default_factory=ClassifierSection)
    dedup: DedupSection = Field(default_factory=DedupSection)
    decontaminate: DecontamSection = Field(default_factory=DecontamSection)
    shard: ShardSection = Field(default_factory=ShardSection)
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    report: ReportSection = Field(default_factory=ReportSection)

    def section(self, name: str) -> BaseModel:
        return getattr(self, name)

    def resolved(self) -> dict[str, Any]:
        """Plain JSON-able dict of the whole config (what gets written next to the outputs)."""
        return self.model_dump(mode="json")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    """`${VAR}` and `${VAR:-default}` inside string values; an unset VAR without default stays an error."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise KeyError(name)

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def _field_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The pydantic model type of `model.key` if it is itself a model (for walking dotted keys)."""
    field = model.model_fields.get(key)
    if field is None:
        return None
    ann = field.annotation
    for cand in (ann, *getattr(ann, "__args__", ())):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _apply_override(data: dict[str, Any], assignment: str, source: str, root: type[BaseModel]) -> None:
    """`key.sub=value` into `data`; keys are checked against `root` as they are walked."""
    if "=" not in assignment:
        raise ConfigError(f"{source}: --set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    model: type[BaseModel] | None = root
    node = data
    for i, key in enumerate(keys):
        if model is not None and key not in model.model_fields:
            raise ConfigError(f"{source}: unknown key '{dotted}' (--set): '{key}' is not a field of {'.'.join(keys[:i]) or 'the config'}")
        last = i == len(keys) - 1
        if last:
            try:
                node[key] = yaml.load(raw, Loader=YAML_LOADER) if raw.strip() else ""
            except yaml.YAMLError:
                node[key] = raw
        else:
            nxt = node.get(key)
            if not isinstance(nxt, dict):
                nxt = {}
                node[key] = nxt
            node = nxt
            model = _field_model(model, key) if model is not None else None


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required value is missing"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def read_yaml_mapping(path: Path, source: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is {}); errors name the file and the line."""
    if not path.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read config: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}:{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(model: type[M], path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> M:
    """Load, substitute `${ENV}`, apply `--set` overrides (keys relative to `model`), validate `model`.

    The one loader of the run config, a standalone pretrain YAML and an ablation YAML: errors name the
    file and the key the same way everywhere.
    """
    source = str(path) if path is not None else "<defaults>"
    data = read_yaml_mapping(Path(path), source) if path is not None else {}
    try:
        data = _expand_env(data)
    except KeyError as e:
        raise ConfigError(f"{source}: environment variable {e.args[0]} is not set (use ${{{e.args[0]}:-default}})") from None
    for assignment in overrides or []:
        _apply_override(data, assignment, source, model)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> RunConfig:
    """Load, substitute `${ENV}`, apply `--set` overrides, validate. Errors name the file and the key."""
    return load_yaml_model(RunConfig, path, overrides)


def config_hash(obj: Any) -> str:
    """Stable content hash of a JSON-able object (a resolved config or section)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
