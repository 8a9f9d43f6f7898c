"""Protocol-level SecAgg devices for tests: the real device code, with chosen codes.

`Devices` answers the four SecAgg stages for a set of clients (node id = client id) the
way a fedpipe ClientApp does, except that each device's quantized codes are given, so a
test can compare the unmasked sum with the plain sum bit for bit. Faults:
- `drop[stage]`: these clients go silent at that stage and stay silent;
- `lose_replies[stage]`: these clients do the stage's work, but the reply is lost;
- `corrupt_unmask`: these clients reveal random bytes instead of their shares;
- `tamper_boxes_to`: the relay flips a bit in every share box addressed to these.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

from fedpipe.boundary import SHARES_REJECTED, DecodeBoundary, ReplyLimits
from fedpipe.codec import build_codec
from fedpipe.config import CodecConfig, SecAggConfig
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
from fedpipe.secagg.records import row_array
from fedpipe.secagg.server import SecAggOutcome, SecAggRound
from fedpipe.secagg.shamir import SHARE_BYTES
from fedpipe.secagg.wire import ADVERTISE, BOX_BYTES, MASKED, MASKED_INPUT, SHARE, TABLE, UNMASK
from tests.grids import ReplyGrid

RUN = 7


class Devices:
    def __init__(
        self, cfg: SecAggConfig, codes: Mapping[int, np.ndarray], server_round: int = 1
    ) -> None:
        self.cfg, self.codes, self.rid = cfg, dict(codes), RoundId(RUN, server_round)
        self.state = {c: ConfigRecord() for c in codes}
        self.drop: dict[str, set[int]] = {}
        self.lose_replies: dict[str, set[int]] = {}
        self.corrupt_unmask: set[int] = set()
        self.tamper_boxes_to: set[int] = set()
        self.keep_masked = False
        self.masked: dict[int, np.ndarray] = {}
        self.gone: set[int] = set()
        self.refused: list[tuple[int, str]] = []

    def respond(self, msg: Message) -> Message | None:
        me, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        if me in self.gone or me in self.drop.get(kind, set()):
            self.gone.add(me)
            return None
        try:
            content = self._answer(me, kind, msg.content)
        except Exception as exc:  # noqa: BLE001 - a refusal: an error reply, as Flower's
            self.refused.append((me, f"{type(exc).__name__}: {exc}"))
            return Message(Error(code=1, reason=str(exc)), reply_to=msg)
        if me in self.lose_replies.get(kind, set()):
            return None
        return Message(content, reply_to=msg)

    def _answer(self, me: int, kind: str, content: RecordDict) -> RecordDict:
        st = self.state[me]
        if kind == ADVERTISE:
            return device.advertise(st, self.cfg, self.rid, me, 100, content)
        if kind == SHARE:
            return device.share_keys(st, self.cfg, self.rid, me, content)
        if kind == MASKED:
            if me in self.tamper_boxes_to:
                content = _tampered(content)
            grid = device.round_grid(st, self.cfg, content)
            bad = device.receive_shares(st, self.cfg, self.rid, me, content)
            packed = device.mask_input(st, self.rid, me, self.codes[me], grid)
            if self.keep_masked:
                self.masked[me] = packed
            claims = {
                NUM_EXAMPLES: 100,
                TRAIN_LOSS: 0.5,
                CLIENT_ID: me,
                TRAIN_SECONDS: 1.0,
                ENCODE_SECONDS: 0.0,
                SHARES_REJECTED: bad,
            }
            return RecordDict(
                {
                    MASKED_INPUT: ArrayRecord({"y": Array(packed)}),
                    CODEC: ConfigRecord(claims),  # type: ignore[arg-type]
                }
            )
        if kind == UNMASK:
            out = device.unmask(st, self.cfg, self.rid, content)
            if me in self.corrupt_unmask:
                table = out.array_records[TABLE]
                for name in ("seed-shares", "key-shares"):
                    rows = len(table[name].numpy())
                    junk = np.random.default_rng(me).integers(0, 256, (rows, SHARE_BYTES))
                    table[name] = row_array([bytes(r) for r in junk.astype(np.uint8)], SHARE_BYTES)
            return out
        raise AssertionError(kind)


def _tampered(content: RecordDict) -> RecordDict:
    table = content.array_records[TABLE]
    boxes = table["boxes"].numpy().copy()
    boxes[:, -1] ^= 1
    new = RecordDict(dict(content.items()))
    new[TABLE] = ArrayRecord(
        {"ids": table["ids"], "boxes": row_array([bytes(r) for r in boxes], BOX_BYTES)}
    )
    return new


def run_round(devs: Devices, count: int, clip: float = 1.0, round_s: float = 1.0) -> SecAggOutcome:
    """One SecAgg round over `devs` (count = parameters; codes have count + 1 words);
    a silent device holds the masked-input stage for `round_s`, the others for the
    config's stage_timeout."""
    nodes = sorted(devs.codes)
    grid = ReplyGrid(nodes, devs.respond)
    train = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    rnd = SecAggRound(
        devs.cfg, devs.rid, seed=0, clip=clip, weight_ratio=0.0, max_examples=10**6, poll_s=0.01
    )
    like = {"w": np.zeros(count, np.float32)}
    boundary = DecodeBoundary(build_codec(CodecConfig()), like)
    return rnd.run(
        grid,
        train,
        {n: n for n in nodes},
        time.monotonic() + round_s,
        count,
        ReplyLimits.for_model(like),
        boundary.claims,
    )
