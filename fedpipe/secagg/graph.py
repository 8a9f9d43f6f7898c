"""Who masks with whom: SecAgg+'s k-regular neighbour graph, SecAgg's full graph at small n.

Bell et al. (2020): with each device paired with k = O(log n) others instead of all n-1,
a device's key agreements, shares and masks grow with k, not n, and the sum is still
exact. The graph here is a Harary graph over a permutation of the round's sample drawn
from (seed, round): device at position p masks with positions p +- 1..k/2. With k >= n-1
it is the complete graph (SecAgg).

The threshold t is a fraction of the neighbours, ceil(fraction * degree), never below a
strict majority: an aggregator that has collected t shares of one kind from a device's
neighbours can never also collect t of the other kind (t > degree / 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["degree", "neighbour_graph", "threshold"]

_GRAPH_TAG = 0x5EC466  # separates this draw from the round's sampling streams


def degree(neighbours: int, devices: int) -> int:
    """Neighbours per device: the configured k (0 = everyone), at most devices - 1."""
    full = max(0, devices - 1)
    return full if neighbours <= 0 else min(neighbours, full)


def threshold(fraction: float, neighbours: int, devices: int) -> int:
    """Shares needed to recover a device's secret: > half its neighbours, >= 1."""
    k = degree(neighbours, devices)
    return max(k // 2 + 1, math.ceil(fraction * k - 1e-9))


def neighbour_graph(
    clients: Sequence[int], neighbours: int, seed: int, server_round: int
) -> dict[int, list[int]]:
    """client id -> its neighbours' client ids (sorted); symmetric, k-regular."""
    ids = sorted(clients)
    n = len(ids)
    k = degree(neighbours, n)
    if k >= n - 1:
        return {c: [o for o in ids if o != c] for c in ids}
    order = np.random.default_rng([seed, server_round, _GRAPH_TAG]).permutation(n)
    ring = [ids[i] for i in order]
    half = k // 2  # k is even (validated), so the graph is k-regular
    return {
        c: sorted(ring[(p + d) % n] for d in range(-half, half + 1) if d != 0)
        for p, c in enumerate(ring)
    }
