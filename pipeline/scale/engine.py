"""The task engine behind the scaled-out stages: a function mapped over partitions, in-process or as Ray tasks.

`Engine.map(fn, items)` returns `[fn(*item) for item in items]`, in order, whichever way it runs:

- inline (`run.executor: inline`): the task code, one task after another in this process (no Ray): one
  worker, what tests and the benchmark compare N workers with;
- ray (`run.executor: ray`): one Ray task per item, `max_retries=run.task_retries`. A task whose worker or node
  dies is re-executed by Ray from its arguments; tasks write only under names derived from their partition,
  so a retry overwrites what a lost attempt may have left and never adds to it.

Joins the cluster at `run.ray_address` or `$RAY_ADDRESS`; without either, starts a local Ray with
`run.workers` CPUs (kept for the rest of the process: a start costs seconds). An already initialised Ray (a
notebook, the test session) is used as it is. The driver's storage settings (AWS_*, FSSPEC_*, GCSFS_*,
GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN, HF_ENDPOINT) are passed to the tasks in their runtime environment.

Test hook, for fault-injection tests only: with `$TEXTBOOK_TASK_EVENTS` set to a directory on the driver, every
task writes `<dir>/<label>-<index>-<node id>-<pid>.started` when it starts and then waits while
`<dir>/hold` exists, so a test can kill a node while its tasks are known to be running (an observed event,
never a sleep); when it ends it writes `<same name>.done` holding its worker's peak RSS (KB) and CPU seconds (benchmarks).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

EVENTS_ENV = "TEXTBOOK_TASK_EVENTS"


@dataclass
class Engine:
    """Where a stage's tasks run. kind: "local" | "ray"; workers: CPUs of a Ray started here (None: all)."""

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    retries: int = 3
    events: str | None = field(default_factory=lambda: os.environ.get(EVENTS_ENV) or None)

    @property
    def distributed(self) -> bool:
        """Whether the stage runs its task code (ray, or inline: the tasks one by one here)."""
        return self.kind in ("ray", "inline")

    @property
    def on_ray(self) -> bool:
        return self.kind == "ray"

    def describe(self) -> dict[str, Any]:
        """What the stage stats record of the engine (never part of the output's identity)."""
        out: dict[str, Any] = {"executor": self.kind}
        if self.on_ray:
            import ray

            self._init()
            out["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
            out["cpus"] = int(ray.cluster_resources().get("CPU", 0))
            out["task_retries"] = self.retries
        return out

    def _init(self) -> None:
        import ray

        if ray.is_initialized():
            return
        # "local": a Ray of our own, never another user's instance that happens to run on this machine
        address = self.address or os.environ.get("RAY_ADDRESS") or "local"
        check_ray_address(address)
        ray.init(address=address, num_cpus=self.workers if address == "local" else None, include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False, configure_logging=False)

    def cpus(self) -> int:
        """CPUs the tasks may use at once: the cluster's (ray), else 1 (inline and local run one at a time)."""
        if not self.on_ray:
            return 1
        import ray

        self._init()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def put(self, obj: Any) -> Any:
        """A value many tasks read (an index, a lookup table): one copy in Ray's object store, or `obj` itself."""
        if not self.on_ray:
            return obj
        import ray

        self._init()
        return ray.put(obj)

    def map(self, fn: Callable[..., Any], items: Sequence[tuple[Any, ...]], *, label: str = "task",
            num_cpus: float = 1, memory_mb: int | None = None) -> list[Any]:
        """[fn(*item) for item in items], in order; as Ray tasks when distributed (progress on stderr)."""
        if not self.on_ray:
            return [_run_task(fn, item, label, k, self.events) for k, item in enumerate(items)]
        import ray
        from tqdm import tqdm

        self._init()
        opts: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": self.retries}
        env = storage_env()
        if env:  # the driver's storage settings travel with the tasks (workers may predate them)
            opts["runtime_env"] = {"env_vars": env}
        if memory_mb:
            opts["memory"] = memory_mb << 20
        remote = ray.remote(**opts)(_run_task)
        refs = [remote.remote(fn, item, label, k, self.events) for k, item in enumerate(items)]
        pending = list(refs)
        with tqdm(total=len(refs), desc=f"{label} ({len(refs)} tasks)", unit="task", mininterval=1.0,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)


STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_APPLICATION_CREDENTIALS", "GCSFS_", "HF_TOKEN", "HF_ENDPOINT")


def storage_env() -> dict[str, str]:
    """Environment variables that configure fsspec storage (endpoint, credentials), as the driver has them."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def _run_task(fn: Callable[..., Any], item: tuple[Any, ...], label: str, index: int, events: str | None) -> Any:
    if not events:
        return fn(*item)
    name = _announce(Path(events), label, index)
    result = fn(*item)
    import resource

    # the worker's peak RSS (KB) and CPU seconds so far: what the benchmark reports per worker
    use = resource.getrusage(resource.RUSAGE_SELF)
    (Path(events) / f"{name}.done").write_text(f"{use.ru_maxrss} {use.ru_utime + use.ru_stime:.3f}")
    return result


def _announce(events: Path, label: str, index: int) -> str:
    node = "local"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()[:12]
    except ImportError:
        pass
    events.mkdir(parents=True, exist_ok=True)
    kind = re.sub(r'[^A-Za-z0-9_.]+', '_', label)
    name = f"{kind}-{index:05d}-{node}-{os.getpid()}"
    (events / f"{name}.started").touch()
    # released by the test once it has done what it waits to do: "hold" holds every task, "hold-<kind>" one kind
    while (events / "hold").exists() or (events / f"hold-{kind}").exists():
        time.sleep(0.05)
    return name


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail at once, naming the address, where no Ray head listens at `address` (`host:port` or
    `ray://host:port`): `ray.init` would otherwise retry its connection for minutes. "local", "auto" and no
    address are not checked (Ray starts or finds its own). Raises `ConfigError`."""
    if not address or address in ("local", "auto"):
        return
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} (run.ray_address / RAY_ADDRESS): expected host:port, "
                          "ray://host:port, 'auto' or 'local'")
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"no Ray cluster answers at {address} (run.ray_address / RAY_ADDRESS): {e}. Start its head "
            f"(`ray start --head --port={port}`), fix the address, or unset it to run a Ray of our own here"
        ) from None


def engine_for(cfg: Any) -> Engine:
    """The engine a run's config asks for (`run.executor`, `run.ray_address`, `run.workers`, `run.task_retries`)."""
    run = cfg.run
    return Engine(kind=run.executor, address=run.ray_address, workers=run.workers, retries=run.task_retries)
