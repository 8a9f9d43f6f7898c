"""A Flower Grid for strategy tests: push/pull over a function that answers messages.

fedpipe's round engine talks to a Grid through `push_messages`/`pull_messages` only.
`ReplyGrid.exchange` answers a batch of pushed messages (None: the node stays silent);
identify messages are answered here (client id = node id unless `client_of` says
otherwise). `order_seed` shuffles the order replies are pulled in, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from uuid import uuid4

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedpipe.records import CLIENT_ID, IDENTIFY, IDENTITY


class ReplyGrid:
    def __init__(
        self,
        nodes: Iterable[int] = (),
        respond: Callable[[Message], Message | None] | None = None,
        order_seed: int | None = None,
        client_of: Callable[[int], int] = lambda node: node,
    ) -> None:
        self.nodes = list(nodes)
        self._respond = respond
        self._rng = np.random.default_rng(order_seed) if order_seed is not None else None
        self.client_of = client_of
        self._waiting: list[Message] = []
        self.pushed: list[Message] = []  # every non-identify message, in push order

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def respond(self, msg: Message) -> Message | None:
        assert self._respond is not None
        return self._respond(msg)

    def exchange(self, messages: list[Message]) -> list[Message]:
        """The replies to one stage's messages (override for whole-batch behaviour)."""
        replies = (self.respond(m) for m in messages)
        return [r for r in replies if r is not None]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid4().hex
        ident = [m for m in messages if m.metadata.message_type == IDENTIFY]
        work = [m for m in messages if m.metadata.message_type != IDENTIFY]
        self.pushed += work
        for m in ident:
            cid = self.client_of(m.metadata.dst_node_id)
            self._waiting.append(
                Message(RecordDict({IDENTITY: ConfigRecord({CLIENT_ID: cid})}), reply_to=m)
            )
        if work:
            self._waiting += self.exchange(work)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        ready = [r for r in self._waiting if r.metadata.reply_to_message_id in wanted]
        if self._rng is not None and ready:  # one at a time, in a shuffled order
            ready = [ready[int(self._rng.integers(len(ready)))]]
        for r in ready:
            self._waiting.remove(r)
        return ready
