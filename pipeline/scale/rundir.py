"""A run directory on object storage: `run.out` as an fsspec URL (s3://, gs://, ...).

The stages keep writing plain files: each runs in a local mirror of the run directory
(`<cache>/runs/<sha of the URL>/`, `pipeline.paths.cache_dir`), and the URL holds what counts:

- `<url>/stages/<stage>/`: the stage's outputs (kept/, removed/, stats.json, errors.jsonl, its other files),
  published when the stage ends; its private scratch (`state/`) stays local;
- `<url>/stages/<stage>/_SUCCESS.json` (or `_PARTIAL.json`): the completion marker, with the same guarantee as on
  a filesystem. It is deleted when a stage starts and written last, after every output file has been uploaded
  (each through a temporary key, `put_atomic`) and stale files of an earlier attempt removed; so a marker
  present means every output of that attempt is there, complete;
- `<url>/manifest.json`, `<url>/data/...`: the shard set (published by `storage.publish_shard_set`, manifest last).

Resume reads the markers and stats from the URL (`pull_markers`), never from the mirror: a run continued on
another machine skips what is complete there. Later stages read the upstream `kept/` files from the URL
(`kept_urls`; tasks fetch one object each), so on a cluster no node needs the driver's disk for them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.scale.storage import filesystem, is_url, list_url_documents, put_atomic, remote_errors

MARKERS = ("_SUCCESS.json", "_PARTIAL.json")
PRIVATE = ("state",)  # subdirectories of a stage directory that stay in the local mirror


def _remote(doing: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A RemoteRun method whose object-store failures become one line naming the run URL (`remote_errors`)."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(self: RemoteRun, *args: Any, **kwargs: Any) -> Any:
            with remote_errors(self.url, doing):
                return fn(self, *args, **kwargs)
        return inner
    return wrap


class RemoteRun:
    """The run directory at `url` and its local mirror (where the stages write before publication)."""

    def __init__(self, url: str, mirror: Path | None = None) -> None:
        from pipeline.paths import cache_dir

        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")
        self.mirror = mirror or cache_dir() / "runs" / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def _stage(self, stage: str) -> str:
        return f"{self.root}/stages/{stage}"

    def stage_url(self, stage: str) -> str:
        return f"{self.url}/stages/{stage}"

    @_remote("read the run's stage markers")
    def pull_markers(self, stages: list[str]) -> None:
        """Make the mirror's markers and stats.json those of the URL (a file absent there is removed here)."""
        for stage in stages:
            local = self.mirror / "stages" / stage
            for name in (*MARKERS, "stats.json"):
                remote = f"{self._stage(stage)}/{name}"
                if self.fs.exists(remote):
                    local.mkdir(parents=True, exist_ok=True)
                    (local / name).write_bytes(self.fs.cat(remote))
                else:
                    (local / name).unlink(missing_ok=True)

    @_remote("clear a stage's markers")
    def begin_stage(self, stage: str) -> None:
        """A stage starts: its markers go first, so an attempt that dies leaves none (the next run re-runs it)."""
        for name in MARKERS:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(f"{self._stage(stage)}/{name}")

    @_remote("publish a stage's outputs")
    def publish_stage(self, stage: str, marker: tuple[str, str] | None) -> None:
        """Upload the mirror's stage directory (not `state/`), remove stale remote files, then the marker
        (`(file name, text)`; None for a stage that did not complete, e.g. skipped: stats only)."""
        local = self.mirror / "stages" / stage
        root = self._stage(stage)
        tmp = f"{root}/.tmp-{uuid.uuid4().hex[:8]}"
        files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.name not in MARKERS
                 and p.relative_to(local).parts[0] not in PRIVATE]
        wanted = {f"{root}/{p.relative_to(local).as_posix()}" for p in files}
        try:
            for p in files:
                put_atomic(self.fs, p, f"{root}/{p.relative_to(local).as_posix()}", tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(tmp, recursive=True)
        if self.fs.exists(root):
            for old in self.fs.find(root):
                if old not in wanted and Path(old).name not in MARKERS and "/.tmp-" not in old:
                    self.fs.rm(old)
        if marker is not None:
            name, text = marker
            self.fs.pipe(f"{root}/{name}", text.encode())  # a single PUT: the object appears whole or not at all

    @_remote("list a stage's kept documents")
    def kept_urls(self, stage: str, suffixes: tuple[str, ...]) -> list[str]:
        """The URLs of a published stage's kept/ document files, sorted (empty when it kept none)."""
        kept = f"{self._stage(stage)}/kept"
        if not self.fs.exists(kept):
            return []
        return list_url_documents(f"{self.stage_url(stage)}/kept", suffixes)

    @_remote("upload a run file")
    def put_file(self, local: Path, rel: str) -> None:
        """Upload one file of the run directory (config.resolved.yaml) to `<url>/<rel>`."""
        put_atomic(self.fs, local, f"{self.root}/{rel}", f"{self.root}/.tmp-{uuid.uuid4().hex[:8]}")


def remote_run_of(out: str) -> RemoteRun | None:
    """The RemoteRun of a `run.out` that is a URL; None for a local directory."""
    return RemoteRun(out) if is_url(out) else None


def remote_run_for(run_dir: Path, out: str) -> Any:
    """The RemoteRun whose mirror is `run_dir` (None when the run is local)."""
    rr = remote_run_of(out)
    return rr if rr is not None and rr.mirror == run_dir else None
