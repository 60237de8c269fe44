"""Planning: turn `web.inputs` and `web.sources` into read units (one file, or one shard of a HF dataset).

Units are split between datatrove tasks round-robin (task r reads units r, r+tasks, ...). A missing path is a
one-line error here, before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ResourceUnavailable, TextbookError

SUFFIX_KIND = (
    (".warc.gz", "warc"), (".warc", "warc"), (".wet.gz", "warc"), (".wet", "warc"), (".arc.gz", "warc"),
    (".jsonl.gz", "jsonl"), (".jsonl.zst", "jsonl"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
    (".json.gz", "jsonl"), (".json.zst", "jsonl"), (".json", "json"),
    (".parquet", "parquet"), (".html", "html"), (".htm", "html"), (".html.gz", "html"),
)


@dataclass(frozen=True)
class Unit:
    kind: str  # warc | jsonl | json | parquet | html | hf
    path: str
    label: str  # how the unit appears in stats (the file path, or hf:<name>#k)
    text_key: str = "text"
    id_key: str = "id"
    url_key: str = "url"
    hf_name: str | None = None
    hf_split: str = "train"
    hf_streaming: bool = True
    hf_limit: int | None = None
    shard: int = 0
    num_shards: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in SUFFIX_KIND:
        if name.endswith(suffix):
            return kind
    return None


def _looks_like_hf_name(path: str) -> bool:
    return not Path(path).exists() and path.count("/") == 1 and not path.startswith((".", "/"))


def plan_units(section: Any, tasks: int) -> tuple[list[Unit], list[str]]:
    """(units, ignored files): files found under folders with an unknown suffix are listed, not read."""
    keys = {"text_key": section.text_key, "id_key": section.id_key, "url_key": section.url_key}
    specs: list[dict[str, Any]] = [{"path": p, "type": "auto"} for p in section.inputs]
    specs += [s.model_dump() for s in section.sources]
    units: list[Unit] = []
    ignored: list[str] = []
    for spec in specs:
        k = {key: spec.get(key) or default for key, default in keys.items()}
        if spec["type"] == "hf" or (spec["type"] == "auto" and _looks_like_hf_name(spec["path"])):
            units += _hf_units(spec, k, tasks)
            continue
        path = Path(spec["path"])
        if not path.exists():
            raise TextbookError(f"web input {path}: path does not exist")
        if path.is_dir():
            pattern = spec.get("glob") or "**/*"
            found = sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith("."))
            before = len(units)
            for f in found:
                kind = spec["type"] if spec["type"] != "auto" else kind_of(f)
                if kind is None:
                    ignored.append(str(f))
                else:
                    units.append(Unit(kind=kind, path=str(f), label=str(f), **k))
            if len(units) == before:  # a path-prefix test would count a sibling folder's files (web vs web2)
                raise TextbookError(f"web input {path}: no readable input files (warc, jsonl, json, parquet, html)"
                                    + (f" matching '{spec['glob']}'" if spec.get("glob") else ""))
        else:
            kind = spec["type"] if spec["type"] != "auto" else kind_of(path)
            if kind is None:
                raise TextbookError(f"web input {path}: unknown file type (set `type:` in web.sources)")
            units.append(Unit(kind=kind, path=str(path), label=str(path), **k))
    if not units:
        raise TextbookError("web: no input: list files or folders in web.inputs or web.sources")
    return units, ignored


def _hf_units(spec: dict[str, Any], keys: dict[str, str], tasks: int) -> list[Unit]:
    path = spec["path"]
    local = Path(path).exists()
    if not local:
        cached = _hub_sample_cache(spec)
        if cached.is_file():  # fetched on an earlier run: no network needed
            return [Unit(kind="jsonl", path=str(cached), label=str(cached), **keys)]
        _check_hub_reachable(path, spec.get("name"), spec.get("split") or "train")
        if spec.get("limit"):
            _fetch_hub_sample(spec, cached)
            return [Unit(kind="jsonl", path=str(cached), label=str(cached), **keys)]
    label = f"hf:{path}" + (f"[{spec['name']}]" if spec.get("name") else "") + f"/{spec.get('split') or 'train'}"
    return [Unit(kind="hf", path=path, label=f"{label}#{k}", hf_name=spec.get("name"),
                 hf_split=spec.get("split") or "train", hf_streaming=bool(spec.get("streaming", True)),
                 hf_limit=spec.get("limit"), shard=k, num_shards=tasks, **keys) for k in range(tasks)]


def _hub_sample_cache(spec: dict[str, Any]) -> Path:
    from pipeline.paths import cache_dir

    slug = "_".join(str(x).replace("/", "__") for x in (spec["path"], spec.get("name") or "default",
                                                          spec.get("split") or "train", spec.get("limit")))
    return cache_dir() / "web" / f"{slug}.jsonl"


def _fetch_hub_sample(spec: dict[str, Any], out: Path) -> None:
    """The first `limit` records of a hub dataset, streamed once and cached as jsonl (a sample, e.g. the
    quickstart's): later runs read the cached file, offline too."""
    import datasets
    from tqdm import tqdm

    from pipeline.io import atomic_path

    ds = datasets.load_dataset(spec["path"], spec.get("name"), split=spec.get("split") or "train", streaming=True)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, rec in enumerate(tqdm(ds, total=spec["limit"], desc=f"fetching {spec['path']}", unit="doc")):
            if i >= spec["limit"]:
                break
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")


def _check_hub_reachable(name: str, config: str | None, split: str) -> None:
    """A hub dataset that cannot be reached is a skipped stage with a clear reason, not a crash in a worker."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise ResourceUnavailable(f"web input hf:{name}: the Hugging Face hub is offline (HF_HUB_OFFLINE=1); "
                                  "download the dataset and point web.sources[].path at the local copy")
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(name, timeout=10)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot read it", said in one line
        raise ResourceUnavailable(f"web input hf:{name}: cannot reach the Hugging Face hub "
                                  f"({type(e).__name__}); use a local copy in web.sources[].path") from None


def fingerprint(units: list[Unit], section: Any, extra: Any = None) -> str:
    """Key of the resume state: the config and what is read (path, size, mtime), not the file contents."""
    h = hashlib.sha256()
    h.update(json.dumps(section.model_dump(mode="json"), sort_keys=True).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for u in units:
        h.update(json.dumps(u.to_dict(), sort_keys=True).encode())
        p = Path(u.path)
        if p.is_file():
            st = p.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def input_files(section: Any) -> list[Path]:
    """Every local file the stage reads (for run.py's completion hash); hub datasets are named in the config."""
    units, _ = plan_units(section, tasks=1)
    return [Path(u.path) for u in units if u.kind != "hf"]
