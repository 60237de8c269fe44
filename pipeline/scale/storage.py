"""Paths that may be fsspec URLs (s3://, gs://, hf://, file://, memory://) next to plain local paths.

What may be a URL: the document inputs of the dedup, decontaminate and shard stages (`<stage>.inputs`, files or
prefixes) and the shard set (`shard.out`). The run directory (stage outputs, `_SUCCESS.json`, scratch) stays
a filesystem path, shared by all nodes when the stages run on a cluster.

Guarantees kept on object storage (which has no rename):

- a remote input is read from a local copy fetched whole (`local_copy`): a reader never sees half an object;
- a shard set is published by `publish_shard_set`: the old `manifest.json` is deleted first, every file is
  uploaded under a temporary key (`<out>/.tmp-<id>/...`) and copied to its final key only once the upload
  completed, stale data files are removed, and `manifest.json` (the completion marker) is written last, so a
  reader that finds a manifest finds every file it lists, complete. `open_shards_any` reads one back (the
  pretraining runner's `data.shards` may be such URLs).

The run directory itself may be a URL too: see `pipeline.scale.rundir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import TextbookError

_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "hf://", "file://", "memory://", "az://", "abfs://", "http://",
            "https://")


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL (scheme://...), False for a plain filesystem path."""
    return isinstance(path, str) and path.lower().startswith(_SCHEMES)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL. Options come from fsspec's own configuration and the
    usual environment (AWS_*, AWS_ENDPOINT_URL for an S3-compatible server, GOOGLE_*, HF_TOKEN)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **_options(url))
    return fs, path


@contextlib.contextmanager
def remote_errors(url: str, doing: str) -> Iterator[None]:
    """Turn an object store's failure (no credentials, no endpoint, access denied, a missing package) into one
    `TextbookError` line naming `url` and where credentials come from. A missing object (FileNotFoundError)
    passes unchanged: readers count it as an unreadable file."""
    try:
        yield
    except (TextbookError, FileNotFoundError):
        raise
    except Exception as e:  # botocore, gcsfs, huggingface_hub and aiohttp each raise their own kinds
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise TextbookError(
            f"{url}: cannot {doing}: {type(e).__name__}: {detail}. Endpoint and credentials come from the "
            "environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; "
            "GOOGLE_APPLICATION_CREDENTIALS; HF_TOKEN)") from e


def _options(url: str) -> dict[str, Any]:
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def _url(fs: Any, path: str) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def list_url_documents(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """Document files under a URL (a file, or every file below a prefix), sorted; missing is an error."""
    with remote_errors(url, "list input documents"):
        fs, path = filesystem(url)
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.lower().endswith(suffixes)
                           and not Path(p).name.startswith("."))
            return [_url(fs, p) for p in found]
        if fs.isfile(path):
            return [url]
    raise TextbookError(f"{url}: input path does not exist")


def url_fingerprint(url: str) -> str:
    """What identifies a remote object's content without reading it: size + ETag/checksum/mtime (for resume)."""
    with remote_errors(url, "read the object's size and checksum"):
        fs, path = filesystem(url)
        info = fs.info(path)
    keys = ("size", "ETag", "etag", "checksum", "md5", "mtime", "LastModified", "last_modified")
    return json.dumps({k: str(info[k]) for k in keys if k in info}, sort_keys=True)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A local file with the content of `path`: itself when local, else a temporary whole copy (removed after)."""
    if not is_url(str(path)):
        yield Path(path)
        return
    with remote_errors(str(path), "fetch"):
        fs, remote = filesystem(str(path))
    name = Path(remote).name
    with tempfile.TemporaryDirectory(prefix="textbook-in-") as d:
        local = Path(d) / name  # same name: readers choose the format by suffix
        with remote_errors(str(path), "fetch"):
            fs.get(remote, str(local))
        yield local


def put_atomic(fs: Any, local: Path, final: str, tmp_prefix: str) -> None:
    """Upload `local` to `final` through a temporary key: `final` appears only when complete."""
    tmp = f"{tmp_prefix}/{Path(final).name}.{uuid.uuid4().hex[:8]}"
    fs.put(str(local), tmp)
    fs.copy(tmp, final)
    fs.rm(tmp)


def publish_shard_set(local_dir: Path, url: str) -> None:
    """Copy a finished local shard set (manifest.json, data/, tokenizer.json, README.md) to `url`.

    Order: the old manifest goes first (from then on no manifest counts anything), data files through temporary
    keys, stale data files removed, tokenizer and card, the new manifest last (the completion marker).
    """
    manifest = json.loads((local_dir / "manifest.json").read_text())
    with remote_errors(url, "publish the shard set"):
        _publish(local_dir, url, manifest)


def _publish(local_dir: Path, url: str, manifest: dict[str, Any]) -> None:
    fs, root = filesystem(url)
    root = root.rstrip("/")
    tmp_prefix = f"{root}/.tmp-{uuid.uuid4().hex[:8]}"
    if fs.exists(f"{root}/manifest.json"):
        fs.rm(f"{root}/manifest.json")
    listed = [f["path"] for s in manifest["splits"].values() for f in s["files"]]
    try:
        for rel in listed:
            put_atomic(fs, local_dir / rel, f"{root}/{rel}", tmp_prefix)
        wanted = {f"{root}/{rel}" for rel in listed}
        if fs.exists(f"{root}/data"):
            for old in fs.find(f"{root}/data"):
                if old not in wanted:
                    fs.rm(old)
        for name in ("tokenizer.json", "README.md", "manifest.json"):
            put_atomic(fs, local_dir / name, f"{root}/{name}", tmp_prefix)
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(tmp_prefix, recursive=True)


def remote_manifest(url: str) -> dict[str, Any] | None:
    """The manifest.json of a shard set at `url`, None when there is none (nothing published, or mid-publication)."""
    with remote_errors(url, "read the shard set's manifest"):
        fs, root = filesystem(url)
        path = f"{root.rstrip('/')}/manifest.json"
        if not fs.exists(path):
            return None
        text = fs.cat(path)
    try:
        return json.loads(text)
    except ValueError:
        raise TextbookError(f"{url}/manifest.json: not valid JSON; remove it or choose another shard.out") from None


def fetch_shard_set(url: str, dest: Path) -> Path:
    """Download a published shard set (manifest first: refuse a prefix without one, as `open_shards` does)."""
    with remote_errors(url, "fetch the shard set"):
        return _fetch(url, dest)


def _fetch(url: str, dest: Path) -> Path:
    fs, root = filesystem(url)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/manifest.json"):
        raise TextbookError(f"{url}: no manifest.json: not a (complete) textbook shard set")
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "data").mkdir(exist_ok=True)
    for rel in [f["path"] for s in manifest["splits"].values() for f in s["files"]] + ["tokenizer.json"]:
        fs.get(f"{root}/{rel}", str(dest / rel))
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def open_shards_any(path: str | os.PathLike[str]) -> Any:
    """`pipeline.shards.open_shards` of a directory or of a published shard set's URL.

    A URL is read from a local copy under `<cache>/shard-sets/<sha of the URL>/`, fetched whole the first time
    and again only when the published manifest's fingerprint changes (a new set was published there); the copy
    is built beside and swapped in by renames, so a reader never opens a half-fetched set."""
    import shutil

    from pipeline.paths import cache_dir
    from pipeline.shards import open_shards

    if not is_url(str(path)):
        return open_shards(path)
    url = str(path)
    manifest = remote_manifest(url)
    if manifest is None:
        raise TextbookError(f"{url}: no manifest.json: not a (complete) textbook shard set")
    dest = cache_dir() / "shard-sets" / hashlib.sha256(url.encode()).hexdigest()[:16]
    have = dest / "manifest.json"
    if not (have.is_file() and json.loads(have.read_text()).get("fingerprint") == manifest.get("fingerprint")):
        fresh = fetch_shard_set(url, dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}"))
        old = dest.with_name(f"{dest.name}.old-{uuid.uuid4().hex[:8]}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(fresh, dest)
        shutil.rmtree(old, ignore_errors=True)
    return open_shards(dest)


def staging_dir_for(url: str, base: Path) -> Path:
    """A local directory where a shard set bound for `url` is built before `publish_shard_set`."""
    return base / f"publish-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
