"""A two-node Ray cluster on this machine (issue 18): the whole quickstart (`textbook run`, every stage) joined to it
through $RAY_ADDRESS gives the local run's outputs, so does its dedup -> decontaminate -> shard chain on planted
copies and contamination, and a node killed mid-stage loses and duplicates nothing.

The cluster is `ray.cluster_utils.Cluster`: a head and a second node, each a raylet of its own on loopback
with one CPU. The session's shared local Ray is shut down for this module and started again after it (as
tests/conftest.py starts it), so the tests that follow find it as they expect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline import run as runmod
from pipeline.config import load_config
from pipeline.scale.engine import EVENTS_ENV

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = "configs/quickstart.yaml"
STAGES = "[dedup, decontaminate, shard]"


class TwoNodes:
    """The module's cluster: `c` (a `ray.cluster_utils.Cluster`) and its current second node, which a test may
    kill and replace (`kill_second`, `replace_second`) so that the next test finds two nodes again."""

    def __init__(self, c, second, node_args: dict) -> None:
        self.c, self.second, self.node_args = c, second, node_args

    def kill_second(self, started: Path) -> None:
        """Kill the second node without grace and wait until the worker process that announced `started` is
        gone: workers outlive their raylet for a moment, and one released before it exits would finish there."""
        self.c.remove_node(self.second, allow_graceful=False)
        pid = int(started.name.rsplit("-", 1)[1].split(".")[0])

        def gone() -> bool:  # exited, or a zombie nobody has reaped yet
            try:
                return "\tZ" in Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1][:4]
            except FileNotFoundError:
                return True

        assert _wait_for(gone), f"worker {pid} of the removed node still runs"

    def replace_second(self) -> None:
        self.second = self.c.add_node(**self.node_args)
        self.c.wait_for_nodes()

    def kill_second_during(self, run, events: Path, kind: str, hold: str = "hold"):
        """Call `run()` in a thread while the tasks held by the marker `events/hold` wait at their start; once a
        task of `kind` (its label, as the engine writes it) has started on the second node, kill that node,
        release the hold and return what `run()` returned. Asserts that the lost task ran again, on the head
        node. The second node is replaced afterwards, so the next test finds two nodes again."""
        (events / hold).touch()
        node = self.second.node_id[:12]
        failures: list[BaseException] = []
        result: list = []

        def call() -> None:
            try:
                result.append(run())
            except BaseException as e:  # reported by the test thread
                failures.append(e)

        worker = threading.Thread(target=call)
        worker.start()
        try:
            # an observed event, not a sleep: a task has started on the second node (and waits there)
            seen = _wait_for(lambda: [p for p in events.glob(f"{kind}-*.started") if f"-{node}-" in p.name])
            assert seen, f"no {kind} task started on the second node"
            self.kill_second(seen[0])  # the node dies with its running task
        finally:
            (events / hold).unlink()
            worker.join()
            self.replace_second()
        assert not failures, failures
        lost = seen[0].name.rsplit("-", 2)[0]  # "<label>-<index>": the task that was on the dead node
        again = [p.name for p in events.glob(f"{lost}-*.done")]
        assert again and all(f"-{node}-" not in name for name in again)  # it ran again, on the head node
        return result[0]


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    had_session = ray.is_initialized()
    if had_session:
        ray.shutdown()
    node_args = {"num_cpus": 1, "object_store_memory": 150 << 20, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=node_args)
    second = c.add_node(**node_args)
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield TwoNodes(c, second, node_args)
    ray.shutdown()
    c.shutdown()
    if had_session:  # as tests/conftest.py's ray_session starts it
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 configure_logging=False)


@pytest.fixture(scope="module")
def quickstart_inputs(shared_data, tmp_path_factory):
    """What the quickstart's dedup reads (web pages and synthetic textbooks, with copies) and a benchmark index."""
    from test_scale import corpus_files

    from pipeline.decontam import build_index

    d = tmp_path_factory.mktemp("quickstart")
    inputs, _ = corpus_files(shared_data, d, n_files=4, n_copies=60)
    # two GSM8K test questions planted in web pages: decontaminate must remove them on both runs
    extra = d / "in-planted.jsonl"
    qs = [json.loads(x)["question"] for x in open(shared_data / "benchmarks/gsm8k/test.jsonl")][:2]
    extra.write_text("".join(json.dumps({"id": f"planted-{i}", "text": "Homework help.\n" + q, "source": "web"}) + "\n"
                             for i, q in enumerate(qs)))
    index = d / "index"
    build_index(["gsm8k"], local_dir=str(shared_data / "benchmarks")).save(index)
    return [*inputs, extra], index


def run_chain(tmp_path, name, inputs, index, *sets):
    cfg = load_config(QUICKSTART, [f"run.out={tmp_path / name}", f"run.stages={STAGES}",
                                   f"dedup.inputs={json.dumps([str(p) for p in inputs])}",
                                   f"decontaminate.index={index}", *sets])
    return runmod.run_pipeline(cfg, log=lambda m: None), tmp_path / name


def outputs(out):
    from test_scale import docs_of, shard_rows

    rows, shards = shard_rows(out)
    return {"dedup": docs_of(out / "stages/dedup/kept"), "decontaminate": docs_of(out / "stages/decontaminate/kept"),
            "shards": rows, "fingerprint": shards.fingerprint}


@pytest.mark.slow
def test_quickstart_chain_on_two_nodes_equals_local(cluster, quickstart_inputs, tmp_path):
    from test_scale import comparable

    inputs, index = quickstart_inputs
    local, out_l = run_chain(tmp_path, "local", inputs, index)
    dist, out_r = run_chain(tmp_path, "cluster", inputs, index, "run.executor=ray")
    assert dist["dedup"]["engine"]["nodes"] == 2
    assert local["decontaminate"]["dropped"]["contaminated"] == 2 and local["dedup"]["dropped"]["near_duplicate"]
    for stage in ("dedup", "decontaminate", "shard"):
        drop = {"accounting"} if stage == "shard" else set()
        assert {k: v for k, v in comparable(dist[stage]).items() if k not in drop} == \
            {k: v for k, v in comparable(local[stage]).items() if k not in drop}, stage
    assert dist["shard"]["accounting"]["adds_up"] and local["shard"]["accounting"]["adds_up"]
    assert outputs(out_r) == outputs(out_l)


# The quickstart, shrunk where only time is saved: fewer web pages (the first of the dolma files), 8 textbooks,
# 4 pretraining steps. Every stage runs: web, generate, dedup, decontaminate, shard, pretrain, report.
SMALL = ["generate.n=8", "pretrain.train.max_steps=4", "pretrain.train.checkpoint_every=4", "pretrain.eval.every=4",
         "pretrain.eval.tokens=1024"]
# every stage on the cluster: dedup / decontaminate / shard as Ray tasks, web on datatrove's Ray executor,
# generate on two Ray actors
ON_RAY = ["run.executor=ray", "web.executor=ray", "llm.workers=2"]


def textbook_run(tmp_path: Path, name: str, shared_data: Path, base_url: str, ray_address: str | None,
                 *sets: str) -> Path:
    out = tmp_path / name
    env = {**os.environ, "TEXTBOOK_OUT": str(out), "TEXTBOOK_CACHE": str(tmp_path / f"cache-{name}"),
           "TEXTBOOK_WEB": str(shared_data / "web/dolma_cc"), "TEXTBOOK_BENCHMARKS": str(shared_data / "benchmarks"),
           "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-test-cluster", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    web = f"web.sources=[{{path: {shared_data / 'web/dolma_cc'}, limit: 400}}]"
    args = [a for x in (web, *SMALL, *sets) for a in ("--set", x)]
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", QUICKSTART, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quickstart_textbook_run_on_two_nodes_equals_local(cluster, shared_data, tmp_path):
    """`textbook run configs/quickstart.yaml` with $RAY_ADDRESS set: the same documents at every stage, the same
    shards (fingerprint) and the same pretraining losses as the run in one process."""
    import ray
    from test_scale import docs_of, shard_rows

    from pipeline.llm.testserver import FaultyOpenAIServer

    c = cluster.c
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    with FaultyOpenAIServer() as srv:  # answers depend on the request only: both runs get the same text
        local = textbook_run(tmp_path, "local", shared_data, srv.base_url, None)
        dist = textbook_run(tmp_path, "cluster", shared_data, srv.base_url, c.address, *ON_RAY)
        assert srv.stats()["distinct_answered"] * 2 == srv.stats()["answered_total"]  # each run paid for its own

    def stats(out: Path, stage: str) -> dict:
        return json.loads((out / f"stages/{stage}/stats.json").read_text())

    assert stats(dist, "web")["executor"] == "ray" and stats(local, "web")["executor"] == "local"
    for stage in ("dedup", "decontaminate", "shard"):
        assert stats(dist, stage)["engine"]["nodes"] == 2, stage
    for stage in ("web", "generate", "dedup", "decontaminate"):
        for key in ("read", "kept", "dropped", "errored"):
            assert stats(dist, stage).get(key) == stats(local, stage).get(key), (stage, key)
        assert docs_of(dist / f"stages/{stage}/kept") == docs_of(local / f"stages/{stage}/kept"), stage
    assert stats(local, "web")["kept"] > 10 and stats(local, "generate")["kept"] > 0
    rows_d, set_d = shard_rows(dist)
    rows_l, set_l = shard_rows(local)
    assert rows_d == rows_l and set_d.fingerprint == set_l.fingerprint
    summary = [json.loads((out / "stages/pretrain/summary.json").read_text()) for out in (local, dist)]
    assert {k: v for k, v in summary[0].items() if "loss" in k} == {k: v for k, v in summary[1].items() if "loss" in k}
    assert (dist / "report/index.html").exists()


@pytest.mark.slow
def test_node_killed_during_shard_loses_and_duplicates_nothing(cluster, quickstart_inputs, tmp_path, monkeypatch):
    from test_scale import shard_rows

    inputs, _ = quickstart_inputs

    def shard(name, *sets):
        cfg = load_config(QUICKSTART, [f"run.out={tmp_path / name}", "run.stages=[shard]",
                                       f"shard.inputs={json.dumps([str(p) for p in inputs])}", *sets])
        return runmod.run_pipeline(cfg, log=lambda m: None)["shard"]

    events = tmp_path / "events"
    events.mkdir()
    monkeypatch.setenv(EVENTS_ENV, str(events))
    # every task waits at its start until the second node, running a shard task, is killed
    cluster.kill_second_during(lambda: shard("killed", "run.executor=ray"), events, "shard_tokenize")
    monkeypatch.delenv(EVENTS_ENV)
    shard("whole")  # uninterrupted (one process)
    rows_k, set_k = shard_rows(tmp_path / "killed")
    rows_w, set_w = shard_rows(tmp_path / "whole")
    assert rows_k == rows_w and set_k.fingerprint == set_w.fingerprint  # nothing lost, nothing twice
    ids = [r[0] for r in rows_k["train"]]
    assert len(ids) == json.loads((tmp_path / "killed/manifest.json").read_text())["splits"]["train"]["documents"]


@pytest.mark.slow
def test_node_killed_during_dedup_components_loses_and_duplicates_nothing(cluster, quickstart_inputs, tmp_path,
                                                                          monkeypatch):
    """The second node dies while a connected-components task of dedup runs there (hashing, exact groups,
    buckets and verification done): the stage's survivors, removals, pairs and stats equal a local run."""
    from test_scale import comparable, docs_of, docs_of_glob

    from pipeline import dedup_dist

    inputs, _ = quickstart_inputs
    monkeypatch.setattr(dedup_dist, "ROWS_PER_TASK", 60)  # many partitions: tasks on both nodes in every phase

    def dedup(name, *sets):
        cfg = load_config(QUICKSTART, [f"run.out={tmp_path / name}", "run.stages=[dedup]",
                                       f"dedup.inputs={json.dumps([str(p) for p in inputs])}", *sets])
        return runmod.run_pipeline(cfg, log=lambda m: None)["dedup"], tmp_path / name / "stages/dedup"

    events = tmp_path / "events"
    events.mkdir()
    monkeypatch.setenv(EVENTS_ENV, str(events))
    # only the components tasks wait at their start: hashing, exact groups, buckets and verification are done
    killed, out_k = cluster.kill_second_during(lambda: dedup("killed", "run.executor=ray"), events,
                                               "dedup_components", hold="hold-dedup_components")
    monkeypatch.delenv(EVENTS_ENV)
    whole, out_w = dedup("whole")
    assert whole["dropped"].get("near_duplicate", 0) + whole["dropped"].get("exact_duplicate", 0) > 0
    assert comparable(killed) == comparable(whole)
    assert docs_of(out_k / "kept") == docs_of(out_w / "kept")
    for reason in ("exact_duplicate", "near_duplicate"):
        assert sorted(docs_of_glob(out_k, reason)) == sorted(docs_of_glob(out_w, reason))


def _wait_for(found, timeout_s: float = 300.0):
    """Poll an observed condition (a marker file) until it holds; the timeout only bounds a broken run."""
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        hit = found()
        if hit:
            return hit
        time.sleep(0.1)
    return None
