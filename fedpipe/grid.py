"""A bounded view of Flower's Grid.

Flower's node sampler polls `get_node_ids()` once a second until `min_available_nodes`
are connected, with no deadline; a missing device would hang the coordinator. This
proxy raises once too few nodes have been connected for too long. (Prompt reply polling,
which this module also did, is now the round engine's: `fedpipe.rounds.stage`.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.serverapp import Grid

__all__ = ["BoundedGrid", "NotEnoughNodes"]


class NotEnoughNodes(RuntimeError):
    """Fewer than the required devices stayed connected for longer than allowed."""


class BoundedGrid:
    """Delegates to `grid`; `get_node_ids` raises after `wait_s` below `min_nodes`."""

    def __init__(self, grid: Grid, min_nodes: int, wait_s: float) -> None:
        self._grid, self.min_nodes, self.wait_s = grid, min_nodes, wait_s
        self._short_since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        if len(ids) >= self.min_nodes:
            self._short_since = None
            return ids
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since > self.wait_s:
            raise NotEnoughNodes(
                f"only {len(ids)} of federation.min_nodes={self.min_nodes} devices connected "
                f"after waiting {self.wait_s:.0f} s (federation.wait_for_nodes); "
                "start more fedpipe-client devices or lower federation.min_nodes"
            )
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
