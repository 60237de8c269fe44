"""Connected components of the dedup candidate graph as tasks over edge partitions, bounded memory per task.

The graph: one node per document row that shares an LSH bucket (or an exact hash) with another; an edge from
each member of a bucket to the bucket's first row. Its components are what `pipeline.dedup_dist` clusters
independently (star clustering never looks across a component).

Algorithm: alternating Large-Star / Small-Star (Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii,
"Connected Components in MapReduce and Beyond", SoCC 2014; text-dedup's Spark MinHash uses the same). Each
step is one task per node partition: it reads the edges keyed to its nodes, works on them sorted (numpy, no
per-node Python), and writes its output edges partitioned for the next step. The loop stops when the graph is
a forest of stars (each node either has only larger neighbours, a centre, or exactly one neighbour, smaller:
a leaf), which each Large-Star task checks on its own input; the centre of a star is its component's
smallest row.

Edges travel between steps in one file per task (`<name>.bin`: int64 pairs sorted by destination partition,
`<name>.off`: int64[parts + 1] offsets), so a step writes as many files as it has tasks, not tasks x parts.
Memory per task: the edges of one partition, ~16 B each plus the sort (~3x).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import TextbookError

MAX_ROUNDS = 64  # the algorithm needs O(log n) rounds; more means something is wrong


# ---------------------------------------------------------------------------------------------- edge files


def write_parts(path: str, pairs: np.ndarray, dest: np.ndarray, parts: int) -> int:
    """Write int64 rows (m, w) grouped by destination partition `dest` (m,) to `path`.bin/.off (atomically:
    a retried task replaces its own files). Returns m."""
    order = np.argsort(dest, kind="stable")
    pairs = np.ascontiguousarray(pairs[order], dtype=np.int64)
    offsets = np.searchsorted(dest[order], np.arange(parts + 1)).astype(np.int64)
    for suffix, arr in ((".bin", pairs), (".off", offsets)):
        tmp = f"{path}{suffix}.tmp-{os.getpid()}"
        arr.tofile(tmp)
        os.replace(tmp, path + suffix)
    return len(pairs)


def read_part(paths: list[str], part: int, width: int = 2) -> np.ndarray:
    """The int64 rows (m, width) that the files `paths` (as `write_parts` wrote them) hold for `part`."""
    out = []
    for path in paths:
        off = np.fromfile(path + ".off", dtype=np.int64, count=2, offset=8 * part)
        cnt = int(off[1] - off[0])
        if cnt:
            out.append(np.fromfile(path + ".bin", dtype=np.int64, count=width * cnt,
                                   offset=8 * width * int(off[0])).reshape(cnt, width))
    return np.concatenate(out) if out else np.empty((0, width), dtype=np.int64)


def symmetric_parts(path: str, a: np.ndarray, b: np.ndarray, parts: int) -> int:
    """Write the undirected edges a-b as (a, b) to part(a) and (b, a) to part(b) (Large-Star's input)."""
    pairs = np.concatenate([np.stack([a, b], axis=1), np.stack([b, a], axis=1)])
    return write_parts(path, pairs, pairs[:, 0] % parts, parts)


def _neighbourhoods(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique edges sorted by (u, v), and per distinct u: u, first index, degree, smallest neighbour."""
    edges = np.unique(edges, axis=0)
    u, v = edges[:, 0], edges[:, 1]
    nodes, first, degree = np.unique(u, return_index=True, return_counts=True)
    return u, v, nodes, degree, v[first]


# ---------------------------------------------------------------------------------------------- steps (tasks)


def large_star(inputs: list[str], part: int, parts: int, out: str) -> dict[str, Any]:
    """Task: Large-Star on the nodes of `part` (their symmetric edges): every larger neighbour v of u is
    linked to m(u), the smallest of u and its neighbours. Output keyed by v (Small-Star's key, the larger end).
    Also reports whether its input is already a star forest on these nodes, and their count."""
    edges = read_part(inputs, part)
    if not len(edges):
        write_parts(out, edges, np.empty(0, np.int64), parts)
        return {"nodes": 0, "edges": 0, "star": True}
    u, v, nodes, degree, min_nb = _neighbourhoods(edges)
    star = not bool(np.any((min_nb < nodes) & (degree > 1)))
    m = np.repeat(np.minimum(nodes, min_nb), degree)
    up = v > u
    pairs = np.stack([v[up], m[up]], axis=1)
    write_parts(out, pairs, pairs[:, 0] % parts, parts)
    return {"nodes": int(len(nodes)), "edges": int(len(u)), "star": star}


def small_star(inputs: list[str], part: int, parts: int, out: str) -> dict[str, Any]:
    """Task: Small-Star on the nodes of `part` (edges (u, v), v < u, keyed by u): u and its smaller neighbours
    are all linked to the smallest of them. Output symmetric (Large-Star's input)."""
    edges = read_part(inputs, part)
    if not len(edges):
        write_parts(out, edges, np.empty(0, np.int64), parts)
        return {"edges": 0}
    u, v, nodes, degree, min_nb = _neighbourhoods(edges)  # min_nb < u: every neighbour here is smaller
    m = np.repeat(min_nb, degree)
    others = v != m
    a = np.concatenate([nodes, v[others]])
    b = np.concatenate([min_nb, m[others]])
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return {"edges": symmetric_parts(out, pairs[:, 0], pairs[:, 1], parts)}


def labels(inputs: list[str], part: int, clusters: int, out: str,
           payloads: tuple[tuple[list[str], int, str], ...] = ()) -> dict[str, Any]:
    """Task: on a star forest, each node of `part` and its component's smallest row (its label), written
    partitioned by label into `clusters` parts, so a component lands whole in one part. Each payload
    `(files, width, out)` holds rows keyed by a node of `part` in column 0 (as `write_parts` wrote them,
    partitioned like the nodes); they are sent to the label partition of that node, with their component."""
    edges = read_part(inputs, part)
    if len(edges):
        _, _, nodes, _, min_nb = _neighbourhoods(edges)
        label = np.minimum(nodes, min_nb)
    else:
        nodes = label = np.empty(0, np.int64)
    write_parts(out, np.stack([nodes, label], axis=1), label % clusters, clusters)
    for files, width, dest in payloads:
        rows = read_part(files, part, width)
        at = np.searchsorted(nodes, rows[:, 0])
        if len(rows) and not (np.all(at < len(nodes)) and np.array_equal(nodes[np.minimum(at, len(nodes) - 1)],
                                                                            rows[:, 0])):
            raise TextbookError("dedup: a payload row's node is not in the graph (scratch files of another run?)")
        write_parts(dest, rows, label[at] % clusters if len(rows) else at, clusters)
    return {"nodes": int(len(nodes))}


# ---------------------------------------------------------------------------------------------- driver


def components(engine: Any, edge_files: list[str], parts: int, clusters_for: Any, work: str,
               payloads: tuple[tuple[list[str], int, str], ...] = ()) -> tuple[list[str], int, dict[str, Any]]:
    """Label every node of the graph in `edge_files` (symmetric, `parts` partitions) with its component.

    `clusters_for(nodes)` gives the number of label partitions for that many nodes. Payloads (files keyed by
    node partition, their width, an output prefix) are routed to their node's label partition (see `labels`):
    output `<prefix>-<k>` per node partition k. Returns the label files ((node, label) pairs partitioned by
    label), that number, and figures (rounds, nodes, edges per round)."""
    inputs, rounds, sizes = edge_files, 0, []
    while True:
        step = f"{work}/cc-{rounds:02d}"
        large = engine.map(large_star, [(inputs, k, parts, f"{step}-large-{k:05d}") for k in range(parts)],
                           label="dedup: components")
        sizes.append(sum(r["edges"] for r in large))
        if all(r["star"] for r in large):
            break
        rounds += 1
        if rounds > MAX_ROUNDS:
            raise TextbookError(f"dedup: connected components did not converge in {MAX_ROUNDS} rounds")
        mid = [f"{step}-large-{k:05d}" for k in range(parts)]
        engine.map(small_star, [(mid, k, parts, f"{step}-small-{k:05d}") for k in range(parts)],
                   label="dedup: components")
        inputs = [f"{step}-small-{k:05d}" for k in range(parts)]
    nodes = sum(r["nodes"] for r in large)
    clusters = clusters_for(nodes)
    engine.map(labels, [(inputs, k, clusters, f"{work}/labels-{k:05d}",
                         tuple((files, width, f"{prefix}-{k:05d}") for files, width, prefix in payloads))
                        for k in range(parts)], label="dedup: components")
    return ([f"{work}/labels-{k:05d}" for k in range(parts)], clusters,
            {"rounds": rounds + 1, "nodes": nodes, "edges_per_round": sizes})
