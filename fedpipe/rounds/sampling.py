"""Which clients take part in a round: reproducible, and of the configured size.

Flower's strategies sample with the global `random` module over `grid.get_node_ids()`,
and node ids are random per run (simulation) or per connection (deployment), so the same
seed picked different clients on every run, and a sampler that started while nodes were
still registering picked fewer than asked. fedpipe samples *client ids* instead: each
node says which client it is once (the identify stage, `fedpipe.rounds.engine`), and the
round's sample is drawn from the sorted client ids with a generator seeded by (run seed,
round). The same seed and the same connected clients give the same sample, in the same
order, in simulation and deployment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["NodeRegistry", "sample_nodes", "sample_size"]

# Distinguishes the sampling streams from every other use of (seed, round).
_TRAIN, _EVALUATE = 0x5452, 0x4556


def sample_size(available: int, fraction: float, min_nodes: int) -> int:
    """floor(fraction x available), at least min_nodes, at most available.

    The small epsilon keeps 0.29 x 100 (28.999999999999996 in floats) at 29.
    """
    wanted = math.floor(fraction * available + 1e-9)
    return min(available, max(wanted, min_nodes))


def sample_nodes(
    clients: Mapping[int, int], size: int, seed: int, server_round: int, purpose: str = "train"
) -> list[int]:
    """`size` nodes drawn without replacement, in draw order (the order matters: the
    first drawn set the round's bounds reference when there is no earlier one)."""
    ranked = sorted(clients, key=lambda node: (clients[node], node))
    tag = _TRAIN if purpose == "train" else _EVALUATE
    rng = np.random.default_rng([seed, server_round, tag])
    picks = rng.permutation(len(ranked))[:size]
    return [ranked[int(i)] for i in picks]


class NodeRegistry:
    """node id -> client id, learnt from the nodes' identify replies."""

    def __init__(self) -> None:
        self._clients: dict[int, int] = {}

    def unknown(self, nodes: Iterable[int]) -> list[int]:
        return [n for n in nodes if n not in self._clients]

    def learn(self, node: int, client_id: int) -> None:
        self._clients[node] = client_id

    def connected(self, nodes: Iterable[int]) -> dict[int, int]:
        """The identified subset of `nodes`; forgets nodes no longer connected (a device
        that reconnects gets a new node id and identifies again)."""
        live = set(nodes)
        self._clients = {n: c for n, c in self._clients.items() if n in live}
        return dict(self._clients)
