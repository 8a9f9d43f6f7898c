"""Protocol-level SecAgg devices for tests: the real device code, with chosen codes.

`Devices` answers the four SecAgg stages for a set of clients (node id = client id) the
way a fedpipe ClientApp does, except that each device's quantized codes are given, so a
test can compare the unmasked sum with the plain sum bit for bit. `drop[stage]` names
the clients that go silent at that stage (and stay silent).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedpipe.boundary import SHARES_REJECTED, DecodeBoundary, ReplyLimits
from fedpipe.config import SecAggConfig
from fedpipe.records import (
    CLIENT_ID,
    CODEC,
    ENCODE_SECONDS,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
)
from fedpipe.secagg import device
from fedpipe.secagg.keys import RoundId
from fedpipe.secagg.server import SecAggOutcome, SecAggRound
from fedpipe.secagg.wire import ADVERTISE, MASKED, MASKED_INPUT, SHARE, UNMASK
from tests.grids import ReplyGrid

RUN = 7


class Devices:
    def __init__(self, cfg: SecAggConfig, codes: Mapping[int, np.ndarray], server_round: int = 1):
        self.cfg, self.codes, self.rid = cfg, dict(codes), RoundId(RUN, server_round)
        self.state = {c: ConfigRecord() for c in codes}
        self.drop: dict[str, set[int]] = {}
        self.gone: set[int] = set()
        self.refused: list[tuple[int, str]] = []

    def respond(self, msg: Message) -> Message | None:
        me, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        if me in self.gone or me in self.drop.get(kind, set()):
            self.gone.add(me)
            return None
        st = self.state[me]
        try:
            if kind == ADVERTISE:
                content = device.advertise(st, self.cfg, self.rid, me, 100, msg.content)
            elif kind == SHARE:
                content = device.share_keys(st, self.cfg, self.rid, me, msg.content)
            elif kind == MASKED:
                grid = device.round_grid(st, self.cfg, msg.content)
                bad = device.receive_shares(st, self.cfg, self.rid, me, msg.content)
                packed = device.mask_input(st, self.rid, me, self.codes[me], grid)
                claims = {
                    NUM_EXAMPLES: 100,
                    TRAIN_LOSS: 0.5,
                    CLIENT_ID: me,
                    TRAIN_SECONDS: 1.0,
                    ENCODE_SECONDS: 0.0,
                    SHARES_REJECTED: bad,
                }
                content = RecordDict(
                    {MASKED_INPUT: ArrayRecord({"y": Array(packed)}), CODEC: ConfigRecord(claims)}
                )
            elif kind == UNMASK:
                content = device.unmask(st, self.cfg, self.rid, msg.content)
            else:
                raise AssertionError(kind)
        except Exception as exc:  # a refusal: an error reply, as Flower sends one
            self.refused.append((me, f"{type(exc).__name__}: {exc}"))
            from flwr.app import Error

            return Message(Error(code=1, reason=str(exc)), reply_to=msg)
        return Message(content, reply_to=msg)


def run_round(devs: Devices, count: int, clip: float = 1.0, timeout: float = 0.3) -> SecAggOutcome:
    """One SecAgg round over `devs` (count = parameters; codes have count + 1 words)."""
    import time

    nodes = sorted(devs.codes)
    grid = ReplyGrid(nodes, devs.respond)
    cfg = devs.cfg
    train = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    rnd = SecAggRound(
        cfg, devs.rid, seed=0, clip=clip, weight_ratio=0.0, max_examples=10**6, poll_s=0.01
    )
    like = {"w": np.zeros(count, np.float32)}
    boundary = DecodeBoundary(codec=None, like=like)  # type: ignore[arg-type]
    limits = ReplyLimits.for_model(like)
    return rnd.run(
        grid,
        train,
        {n: n for n in nodes},
        time.monotonic() + timeout * 20,
        count,
        limits,
        boundary.claims,
    )
