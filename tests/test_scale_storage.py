"""Object storage (issue 18): stage inputs and the shard set on a real S3-compatible server (moto, loopback).

The server is moto's S3 in server mode on 127.0.0.1 (a separate HTTP server, reached through s3fs/botocore as
any S3 endpoint would be); the stages read s3:// inputs and publish the shard set to an s3:// prefix.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from pipeline import run as runmod
from pipeline.config import load_config
from pipeline.errors import TextbookError

BUCKET = "textbook-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 server on loopback with one bucket; the AWS_* settings point at it for this module's tests."""
    pytest.importorskip("s3fs", reason="s3fs (dev extra) is needed for the object-storage tests")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (dev extra) is needed for these tests")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from pipeline.scale.storage import filesystem

    fs, _ = filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    yield fs
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def upload(fs, paths, prefix):
    for p in paths:
        fs.put(str(p), f"{BUCKET}/{prefix}/{p.name}")
    return f"s3://{BUCKET}/{prefix}"


def run_stage(tmp_path, name, stage, inputs, *sets):
    cfg = load_config(None, [f"run.out={tmp_path / name}", f"{stage}.inputs={json.dumps([str(p) for p in inputs])}",
                             f"run.stages=[{stage}]", *sets])
    return runmod.run_pipeline(cfg, log=lambda m: None)[stage], tmp_path / name / "stages" / stage


@pytest.mark.slow
def test_dedup_reads_s3_inputs_like_local_files(shared_data, tmp_path, s3, ray_session):
    from test_scale import comparable, corpus_files, docs_of

    inputs, _ = corpus_files(shared_data, tmp_path, n_copies=30)
    url = upload(s3, inputs, "dedup-in")
    local, out_l = run_stage(tmp_path, "files", "dedup", inputs)
    remote, out_r = run_stage(tmp_path, "s3", "dedup", [url], "run.executor=ray")
    assert local["dropped"].get("near_duplicate") and comparable(remote) == comparable(local)
    assert docs_of(out_r / "kept") == docs_of(out_l / "kept")
    # errors name the object they came from
    assert json.loads((out_r / "errors.jsonl").read_text().splitlines()[0])["where"].startswith(
        f"s3://{BUCKET}/dedup-in/in-0.jsonl")


@pytest.mark.slow
def test_shard_set_published_to_s3_equals_local(shared_data, tmp_path, s3, ray_session, monkeypatch):
    from test_scale import SHARD_SETS, shard_inputs, shard_rows

    from pipeline.scale import storage

    inputs = shard_inputs(shared_data, tmp_path)
    url = upload(s3, inputs, "shard-in")
    out_url = f"s3://{BUCKET}/shards/run1"
    run_stage(tmp_path, "files", "shard", inputs, *SHARD_SETS)
    stats, _ = run_stage(tmp_path, "s3", "shard", [url], *SHARD_SETS, f"shard.out={out_url}", "run.executor=ray")
    assert stats["output_dir"] == out_url
    keys = s3.find(f"{BUCKET}/shards/run1")
    assert not [k for k in keys if "/.tmp-" in k]  # temporary keys cleaned up
    fetched = storage.fetch_shard_set(out_url, tmp_path / "fetched")
    assert shard_rows(fetched)[0] == shard_rows(tmp_path / "files")[0]

    # A publication that dies half-way leaves no manifest: readers refuse the prefix instead of reading a
    # partial set; the next run publishes a complete one.
    real_put = storage.put_atomic
    calls = []

    def dying_put(fs, local, final, tmp_prefix):
        calls.append(final)
        if len(calls) == 2:
            raise OSError("connection lost")
        real_put(fs, local, final, tmp_prefix)

    monkeypatch.setattr(storage, "put_atomic", dying_put)
    with pytest.raises(TextbookError, match="shards/run1: cannot publish the shard set: OSError: connection lost"):
        run_stage(tmp_path, "s3-again", "shard", [url], *SHARD_SETS, f"shard.out={out_url}", "shard.seed=7")
    assert not s3.exists(f"{BUCKET}/shards/run1/manifest.json")
    with pytest.raises(TextbookError, match="no manifest.json"):
        storage.fetch_shard_set(out_url, tmp_path / "refused")
    monkeypatch.setattr(storage, "put_atomic", real_put)
    run_stage(tmp_path, "s3-again", "shard", [url], *SHARD_SETS, f"shard.out={out_url}", "shard.seed=7")
    again, shards = shard_rows(storage.fetch_shard_set(out_url, tmp_path / "fetched-again"))
    assert again != shard_rows(fetched)[0]  # the new seed's set, complete (every listed file there and read)
    assert sum(map(len, again.values())) == shards.manifest["totals"]["documents"]

    # a published set of another tokenizer is never overwritten with this one's shards (checked before any work)
    other = {**shards.manifest, "tokenizer": {**shards.manifest["tokenizer"], "sha256": "0" * 64, "name": "other"}}
    s3.pipe(f"{BUCKET}/shards/run1/manifest.json", json.dumps(other).encode())
    with pytest.raises(TextbookError, match="another tokenizer"):
        run_stage(tmp_path, "s3-other", "shard", [url], *SHARD_SETS, f"shard.out={out_url}")


PRETRAIN_SETS = ["pretrain.preset=tiny", "pretrain.train.max_steps=2", "pretrain.train.batch_size=2",
                 "pretrain.train.warmup_steps=1", "pretrain.train.log_every=1", "pretrain.train.checkpoint_every=2",
                 "pretrain.eval.every=2", "pretrain.eval.tokens=256"]


@pytest.mark.slow
def test_run_directory_on_s3(shared_data, tmp_path, s3, monkeypatch):
    """run.out = s3://...: stage outputs, completion markers and the shard set live in the bucket; a run resumed
    on another machine (another local mirror) skips what the bucket says is complete; a publication that dies
    leaves no marker, so the stage runs again; the pretraining runner trains on the published s3:// shards."""
    from test_scale import corpus_files, docs_of, shard_rows

    from pipeline.documents import iter_documents
    from pipeline.scale import rundir
    from pipeline.scale.storage import open_shards_any

    inputs, _ = corpus_files(shared_data, tmp_path, n_copies=30)
    chain = [f"dedup.inputs={json.dumps([str(p) for p in inputs])}", "decontaminate.benchmarks=[gsm8k]",
             f"decontaminate.local_dir={shared_data / 'benchmarks'}", *PRETRAIN_SETS]

    def run(out, stages, log=None):
        cfg = load_config(None, [f"run.out={out}", f"run.stages={stages}", *chain])
        return runmod.run_pipeline(cfg, log=log or (lambda m: None))

    local = run(tmp_path / "local", "[dedup, decontaminate, shard]")
    url = f"s3://{BUCKET}/runs/r1"
    monkeypatch.setenv("TEXTBOOK_CACHE", str(tmp_path / "machine-a"))
    remote = run(url, "[dedup, decontaminate, shard, pretrain]")
    for stage in ("dedup", "decontaminate", "shard", "pretrain"):
        assert s3.exists(f"{BUCKET}/runs/r1/stages/{stage}/_SUCCESS.json"), stage
    keys = s3.find(f"{BUCKET}/runs/r1")
    assert not [k for k in keys if "/state/" in k or "/.tmp-" in k]  # scratch stays local, temporaries removed
    assert [(d["id"], d["text"]) for d in iter_documents([f"{url}/stages/decontaminate/kept"])] == \
        [(i, t) for i, t, _ in docs_of(tmp_path / "local/stages/decontaminate/kept")]
    assert remote["shard"]["output_dir"] == url and remote["shard"]["kept"] == local["shard"]["kept"]
    assert shard_rows(open_shards_any(url).path)[0] == shard_rows(tmp_path / "local")[0]
    assert remote["pretrain"]["steps"] == 2 and remote["pretrain"]["final_loss"] > 0  # trained on the s3 shards

    # another machine (an empty mirror): the bucket's markers say every stage is complete
    monkeypatch.setenv("TEXTBOOK_CACHE", str(tmp_path / "machine-b"))
    said: list[str] = []
    run(url, "[dedup, decontaminate, shard]", said.append)
    assert sum("already complete" in m for m in said) == 3, said

    # a publication that dies half-way leaves the stage without a marker; the next run does it again
    real_put, calls = rundir.put_atomic, []

    def dying_put(fs, local_file, final, tmp_prefix):
        calls.append(final)
        if len(calls) == 4:  # config.resolved.yaml and two of dedup's files are up
            raise OSError("connection lost")
        real_put(fs, local_file, final, tmp_prefix)

    monkeypatch.setattr(rundir, "put_atomic", dying_put)
    url2 = f"s3://{BUCKET}/runs/r2"
    with pytest.raises(TextbookError, match="runs/r2: cannot publish a stage's outputs: OSError: connection lost"):
        run(url2, "[dedup]")
    assert s3.find(f"{BUCKET}/runs/r2/stages/dedup") and not s3.exists(f"{BUCKET}/runs/r2/stages/dedup/_SUCCESS.json")
    monkeypatch.setattr(rundir, "put_atomic", real_put)
    said.clear()
    again = run(url2, "[dedup]", said.append)
    assert not any("already complete" in m for m in said) and again["dedup"]["kept"] == local["dedup"]["kept"]
    assert s3.exists(f"{BUCKET}/runs/r2/stages/dedup/_SUCCESS.json")
