"""One stage of a round: push messages, then consume each reply as it arrives.

Flower's `Grid.send_and_receive` returns only when every reply is in (or the timeout
passes), so a round holds all replies at once. A stage instead pulls what has arrived,
hands each reply to `on_reply` (which decodes and folds it) and lets it go before the
next pull: the server's memory holds the replies of one pull, not of the round.

A reply is accepted only as the answer to a message of this stage, from the node that
message went to, once: Flower's SuperLink already keys replies by the message they
answer, and the check here makes that a property of fedpipe's loop, not of a relay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

__all__ = ["StageResult", "run_stage"]

log = logging.getLogger(__name__)

ReplyHandler = Callable[[Message], None]
ProgressFn = Callable[[int, int], None]


@dataclass
class StageResult:
    """What a stage got: replies handed on, and the nodes that never answered."""

    sent: int = 0
    replied: int = 0
    silent: list[int] = field(default_factory=list)  # no reply before the deadline


def _push(grid: Grid, messages: Sequence[Message]) -> dict[str, int]:
    """message id -> destination node, for the messages the grid accepted."""
    pushed = {str(i) for i in grid.push_messages(messages) if i}
    return {
        m.metadata.message_id: m.metadata.dst_node_id
        for m in messages
        if m.metadata.message_id in pushed
    }


def run_stage(
    grid: Grid,
    messages: Sequence[Message],
    on_reply: ReplyHandler,
    deadline: float,
    poll_s: float,
    on_progress: ProgressFn | None = None,
    on_lost: Callable[[int], None] | None = None,
) -> StageResult:
    """Push `messages`, feed replies to `on_reply` until all are in or `deadline`
    (time.monotonic()) passes. Never waits past the deadline. `on_lost(node)` hears of a
    node Flower reports unavailable (it will not answer this stage)."""
    pending = _push(grid, messages)
    result = StageResult(sent=len(pending))
    if len(pending) < len(messages):
        log.warning(
            "%d of %d messages could not be pushed", len(messages) - len(pending), len(messages)
        )
    while pending:
        got = list(grid.pull_messages(list(pending)))
        for reply in got:
            answered = reply.metadata.reply_to_message_id
            node = pending.pop(answered, None)
            if node is None:
                continue  # not ours, or answered already: never handed on twice
            if reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.has_error():
                # Flower's own "node unavailable" (or TTL) answer, on the node's behalf
                log.info("node %d unavailable: %s", node, reply.error.reason)
                result.silent.append(node)
                if on_lost is not None:
                    on_lost(node)
                continue
            if reply.metadata.src_node_id != node:
                log.warning(
                    "reply to a message for node %d came from node %d: dropped",
                    node,
                    reply.metadata.src_node_id,
                )
                continue
            result.replied += 1
            on_reply(reply)
        if got and on_progress is not None:
            on_progress(result.replied, result.sent)
        if not pending or time.monotonic() >= deadline:
            break
        if not got and not getattr(grid, "waits_for_replies", False):
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    result.silent = sorted([*result.silent, *pending.values()])
    return result
