"""The decision step of the lobe grouping (qcloop.lobes.fusion)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import DisjointSet

from qcloop.lobes.fusion import _UnionFind


@pytest.mark.parametrize("seed", range(5))
def test_union_find_makes_the_same_sets_as_scipy_disjointset(seed):
    rng = np.random.default_rng(seed)
    n = 60
    ours, theirs = _UnionFind(n), DisjointSet(range(n))
    for _ in range(45):
        a, b = (int(v) for v in rng.integers(0, n, 2))
        ours.union(ours.find(a), ours.find(b))  # as _fuse_lobes calls it: on roots
        theirs.merge(a, b)
        roots = ours.roots()
        assert sorted(map(sorted, theirs.subsets())) == sorted(
            sorted(np.flatnonzero(roots == r).tolist()) for r in np.unique(roots))
        assert all(ours.size[ours.find(k)] == theirs.subset_size(k) for k in range(n))


def test_union_find_root_is_the_larger_set_then_the_first_argument():
    uf = _UnionFind(5)
    uf.union(3, 4)  # tie: 3
    uf.union(1, 2)  # tie: 1
    uf.union(uf.find(4), uf.find(2))  # tie of two pairs: the first argument's root, 3
    assert uf.roots().tolist() == [0, 3, 3, 3, 3]
    uf.union(0, 3)  # the larger set's root wins
    assert uf.roots().tolist() == [3, 3, 3, 3, 3]
