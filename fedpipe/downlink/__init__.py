"""Compressed broadcast: the server's public model, sent as coded changes, rebuilt
bit for bit on each device (`server`: versions and per-device plans; `device`:
rebuilding and checking; `wire`: the records and the arithmetic both share)."""

from fedpipe.downlink.device import (
    DownlinkRefusal,
    Held,
    ModelStore,
    SharedStore,
    StateStore,
    receive,
)
from fedpipe.downlink.server import Broadcaster, Decisions
from fedpipe.downlink.wire import HEADER

__all__ = [
    "HEADER",
    "Broadcaster",
    "Decisions",
    "DownlinkRefusal",
    "Held",
    "ModelStore",
    "SharedStore",
    "StateStore",
    "receive",
]
