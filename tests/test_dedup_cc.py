"""Connected components as Large-Star / Small-Star tasks (pipeline.dedup_cc) against scipy's, on graphs shaped
like dedup's (stars from buckets, long chains of near copies, one giant boilerplate bucket, isolated pairs)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.dedup_cc import components, read_part, symmetric_parts


class Inline:
    """Runs every task in this process (the stage runs them the same way under `run.executor: inline`)."""

    def __init__(self) -> None:
        self.calls = 0

    def map(self, fn, items, label="task", **_):
        self.calls += 1
        return [fn(*item) for item in items]


def labels_of(tmp_path, a, b, parts, edge_tasks=3, per_cluster=50):
    files = []
    for t in range(edge_tasks):  # edges arrive from several edge tasks, as from several bands
        path = str(tmp_path / f"edges-{t}")
        symmetric_parts(path, a[t::edge_tasks], b[t::edge_tasks], parts)
        files.append(path)
    label_files, clusters, figures = components(Inline(), files, parts, lambda n: max(1, -(-n // per_cluster)),
                                                str(tmp_path))
    got: dict[int, int] = {}
    for q in range(clusters):
        part = read_part(label_files, q)
        assert not set(part[:, 0].tolist()) & set(got), "a node in two label partitions"
        assert np.all(part[:, 1] % clusters == q)  # partitioned by label: a component lands whole in one part
        got.update(zip(part[:, 0].tolist(), part[:, 1].tolist(), strict=True))
    return got, clusters, figures


def expected(a, b):
    nodes = np.unique(np.concatenate([a, b]))
    n = int(nodes.max()) + 1
    _, comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    smallest: dict[int, int] = {}
    for v in nodes.tolist():
        smallest.setdefault(int(comp[v]), v)  # nodes ascending: the first seen is the smallest
    return {v: smallest[int(comp[v])] for v in nodes.tolist()}


def graph(kind, rng):
    if kind == "chain":  # near copies of near copies: the longest path, the most rounds
        order = rng.permutation(400)
        return order[:-1], order[1:]
    if kind == "giant_bucket":  # boilerplate shared by many pages, plus unrelated pairs
        hub = rng.choice(5000, 800, replace=False)
        a = np.concatenate([np.full(799, hub[0]), rng.integers(0, 5000, 300)])
        return a, np.concatenate([hub[1:], rng.integers(0, 5000, 300)])
    # buckets as the edge task writes them: members linked to the bucket's first row, over 22 bands
    a, b = [], []
    for _ in range(22):
        members = np.sort(rng.choice(3000, 900, replace=False)).reshape(-1, 3)
        a.append(members[:, 1:].ravel())
        b.append(np.repeat(members[:, 0], 2))
    return np.concatenate(a), np.concatenate(b)


@pytest.mark.parametrize("kind", ["chain", "giant_bucket", "buckets"])
@pytest.mark.parametrize("parts", [1, 4])
def test_components_equal_scipy(tmp_path, kind, parts):
    rng = np.random.default_rng(7)
    a, b = graph(kind, rng)
    a, b = a.astype(np.int64), b.astype(np.int64)
    keep = a != b
    got, clusters, figures = labels_of(tmp_path, a[keep], b[keep], parts)
    assert got == expected(a[keep], b[keep])
    assert figures["nodes"] == len(got) and clusters == max(1, -(-len(got) // 50))
    if kind == "chain":
        assert figures["rounds"] > 2  # it took rounds, and they converged


def test_empty_graph(tmp_path):
    e = np.empty(0, np.int64)
    got, clusters, figures = labels_of(tmp_path, e, e, 3)
    assert got == {} and clusters == 1 and figures["rounds"] == 1
