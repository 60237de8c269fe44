"""Scale out: one engine (Ray tasks) for the dedup, decontaminate and shard stages, and fsspec storage.

Engine choice. Every stage that spreads over a cluster runs on Ray: `generate` keeps Ray actors (network-bound
LLM workers), `web` keeps datatrove's `RayPipelineExecutor` (itself Ray tasks, one per datatrove rank), and
`dedup`, `decontaminate` and `shard` run as plain Ray tasks (`ray.remote(max_retries=...)`) submitted by the
stage's driver. Ray tasks, not Ray Data: each of these stages is a short chain of data-dependent phases
(hash -> band buckets -> cluster -> filter; tokenize -> hash-partition -> write) whose partitions (input files,
LSH bands, shuffle buckets) are chosen for determinism; tasks keep that control, and a task lost with its
node is re-executed by Ray from its arguments (lineage), which is all the fault tolerance the stages need
because every task writes under a name derived from its partition (a retry overwrites, never duplicates).

`run.executor: local` (the default) keeps the single-process code paths exactly as they were;
`run.executor: ray` runs the task versions, on `run.ray_address` / `$RAY_ADDRESS` when set (join a cluster),
else on a local Ray with `run.workers` CPUs. Outputs are the same either way (see each stage's docstring).

Storage: inputs of these stages (`<stage>.inputs`), `shard.out`, `run.out` and the pretraining runner's shard
sets may be fsspec URLs (s3://, gs://, hf://, file://); see `pipeline.scale.storage` and `pipeline.scale.rundir`
(stage outputs and completion markers on object storage). Stage scratch (`state/`) stays in a local mirror,
which on a multi-node cluster must be a filesystem every node sees (as for datatrove's Ray executor).
"""

from pipeline.scale.engine import Engine, engine_for

__all__ = ["Engine", "engine_for"]
