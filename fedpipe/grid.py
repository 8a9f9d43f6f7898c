"""A bounded, prompt view of Flower's Grid.

Bounded: Flower's node sampler polls `get_node_ids()` once a second until
`min_available_nodes` are connected, with no deadline; a missing device would hang the
coordinator. This proxy raises once too few nodes have been connected for too long.

Prompt: Flower 1.42's deployment Grid checks for replies every 3 s (a fixed sleep), so
each round waits 1.5 s on average after the last reply has arrived. This proxy does the
same push-then-pull through Grid's public `push_messages`/`pull_messages`, polling every
`poll_s` seconds, and never past the round timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["BoundedGrid", "NotEnoughNodes"]


class NotEnoughNodes(RuntimeError):
    """Fewer than the required devices stayed connected for longer than allowed."""


class BoundedGrid:
    """Delegates to `grid`; `get_node_ids` raises after `wait_s` below `min_nodes`."""

    def __init__(self, grid: Grid, min_nodes: int, wait_s: float, poll_s: float = 0.1) -> None:
        self._grid, self.min_nodes, self.wait_s, self.poll_s = grid, min_nodes, wait_s, poll_s
        self._short_since: float | None = None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Replies that arrive before `timeout` seconds (required: no unbounded waits)."""
        pending = set(self._grid.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else self.wait_s)
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        return replies

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
