from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpipe.config import PartitionConfig
from fedpipe.data import dirichlet, iid, label_histograms, partition, shards

LABELS = np.repeat(np.arange(10), 100)  # 1000 examples, 100 per class


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert len(np.unique(allidx)) == n


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 2000), clients=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_iid_sizes_and_disjointness(n: int, clients: int, seed: int) -> None:
    if n < clients:
        with pytest.raises(ValueError, match="num_clients"):
            iid(n, clients, seed)
        return
    parts = iid(n, clients, seed)
    _assert_disjoint_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_min_size_disjoint_and_reproducible() -> None:
    parts = dirichlet(LABELS, 10, alpha=0.5, min_size=20, seed=1)
    _assert_disjoint_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20
    again = dirichlet(LABELS, 10, alpha=0.5, min_size=20, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet(LABELS, 10, alpha=0.5, min_size=20, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _dominant_share(parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of the client's most common label."""
    hists = np.array(label_histograms(LABELS, parts, 10), dtype=float)
    return float(np.mean(hists.max(1) / hists.sum(1)))


def test_dirichlet_skews_labels_more_as_alpha_shrinks() -> None:
    skewed = _dominant_share(dirichlet(LABELS, 10, alpha=0.1, min_size=5, seed=0))
    mild = _dominant_share(dirichlet(LABELS, 10, alpha=100.0, min_size=5, seed=0))
    uniform = _dominant_share(iid(len(LABELS), 10, seed=0))
    assert skewed > 0.5  # most of each client's data is one class
    assert mild < 0.2 and uniform < 0.2  # close to the balanced 0.1


def test_dirichlet_impossible_min_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="min_size"):
        dirichlet(LABELS, 10, alpha=0.01, min_size=99, seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_exactly_k_classes(k: int) -> None:
    parts = shards(LABELS, 10, k, seed=0)
    _assert_disjoint_cover(parts, len(LABELS))
    for p in parts:
        assert len(np.unique(LABELS[p])) == k


def test_shards_rejects_more_classes_than_exist() -> None:
    with pytest.raises(ValueError, match="classes_per_client"):
        shards(LABELS, 10, 11, seed=0)


def test_partition_dispatch() -> None:
    cfg = PartitionConfig(scheme="shards", num_clients=5, classes_per_client=2)
    assert len(partition(LABELS, cfg, seed=0)) == 5
    hist = label_histograms(LABELS, partition(LABELS, cfg, seed=0), 10)
    assert all(sum(1 for c in h if c) == 2 for h in hist)
