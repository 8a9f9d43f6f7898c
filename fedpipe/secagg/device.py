"""A device's side of a SecAgg round: four stages, secrets kept in `context.state`.

The aggregator is not trusted here: every request is checked, and the device refuses
(raises `SecAggRefusal`, which Flower returns as an error reply) rather than weaken its
own privacy:
- fewer neighbours than the threshold t, or a graph of the wrong degree;
- fewer live neighbours than t when masking, or fewer survivors than t when unmasking;
- a stage out of order, a second request for a stage already answered this round
  (so "unmask" is answered once: for each neighbour the device reveals the share of its
  self-mask seed (listed as a survivor) or of its mask key (listed as dropped), never
  both, however the aggregator asks), or a neighbour listed as both.
Shares from neighbours that do not open (tampered, replayed, misrouted) are not kept
and are counted in the masked-input reply. Once the device has answered the unmask stage
its round secrets (private keys, seed, neighbours' shares) are deleted from its state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedpipe.config import SecAggConfig
from fedpipe.secagg import keys, shamir
from fedpipe.secagg.graph import degree, threshold
from fedpipe.secagg.keys import RoundId
from fedpipe.secagg.masks import apply_masks
from fedpipe.secagg.quant import MAX_MODULUS_BITS, modulus_bits, pack
from fedpipe.secagg.records import float_param, id_array, ids_of, int_param, row_array, rows_of
from fedpipe.secagg.wire import BOX_BYTES, PARAMS, STAGE_SHARE, TABLE

__all__ = [
    "STATE",
    "RoundGrid",
    "SecAggRefusal",
    "advertise",
    "mask_input",
    "receive_shares",
    "round_grid",
    "share_keys",
    "unmask",
]

STATE = "fedpipe-secagg"  # ConfigRecord in context.state: this round's secrets

SHARE = shamir.SHARE_BYTES
_ADVERTISED, _SHARED, _MASKED, _UNMASKED = 1, 2, 3, 4
# What a device keeps between stages that would help unmask it or its neighbours; gone
# once it has answered the unmask stage (the round and stage stay, to refuse repeats).
_SECRETS = ("sk-s", "sk-c", "seed", "seed-sh", "key-sh", "nbr-pk-s", "nbr-pk-c")


class SecAggRefusal(RuntimeError):
    """The device will not take this step: the request would weaken its privacy."""


def _params(content: RecordDict) -> ConfigRecord:
    if PARAMS not in content.config_records:
        raise SecAggRefusal("request lacks the secagg parameters")
    return content.config_records[PARAMS]


def _expect(state: ConfigRecord, rid: RoundId, devices: int, stage: int) -> None:
    """The request continues this round's protocol at the right point."""
    if state.get("round") != rid.round or state.get("devices") != devices:
        raise SecAggRefusal(f"no secagg round {rid.round} of {devices} devices in progress")
    _expect_stage(state, stage)


def _expect_stage(state: ConfigRecord, stage: int) -> None:
    done = state.get("stage")
    if done != stage - 1:
        raise SecAggRefusal(
            f"stage {stage} requested after stage {done!r}: out of order or repeated"
        )


def _bytes(state: ConfigRecord, key: str) -> bytes:
    value = state.get(key)
    if not isinstance(value, bytes):
        raise SecAggRefusal("no secagg round in progress on this device")
    return value


def _list(state: ConfigRecord, key: str) -> list[Any]:
    value = state.get(key)
    if not isinstance(value, list):
        raise SecAggRefusal("no secagg round in progress on this device")
    return value


def _t(cfg: SecAggConfig, devices: int) -> int:
    return threshold(cfg.threshold, cfg.neighbours, devices)


def advertise(
    state: ConfigRecord,
    cfg: SecAggConfig,
    rid: RoundId,
    me: int,
    num_examples: int,
    content: RecordDict,
) -> RecordDict:
    """Stage 1: fresh keys for this round; public halves, a seed commitment and a weight out."""
    devices = int_param(_params(content), "devices", 0, 1 << 20)
    if devices < cfg.min_devices:
        raise SecAggRefusal(
            f"the round has {devices} devices; this device takes part in at least "
            f"secagg.min_devices={cfg.min_devices}"
        )
    sk_s, sk_c, seed = keys.new_private(), keys.new_private(), os.urandom(keys.KEY_BYTES)
    state.clear()
    state.update(
        {
            "round": rid.round,
            "devices": devices,
            "stage": _ADVERTISED,
            "sk-s": sk_s,
            "sk-c": sk_c,
            "seed": seed,
        }
    )
    return RecordDict(
        {
            PARAMS: ConfigRecord(
                {
                    "client-id": me,
                    "num-examples": num_examples,
                    "pk-s": keys.public_of(sk_s),
                    "pk-c": keys.public_of(sk_c),
                    "commit": keys.commit(seed, rid),
                }
            )
        }
    )


def share_keys(
    state: ConfigRecord, cfg: SecAggConfig, rid: RoundId, me: int, content: RecordDict
) -> RecordDict:
    """Stage 2: t-of-k shares of the seed and the mask key, one sealed box per neighbour."""
    # The graph holds the devices that advertised: no more than were sampled, and
    # never fewer than this device accepts.
    devices = int_param(_params(content), "devices", cfg.min_devices, 1 << 20)
    claimed = state.get("devices")
    if state.get("round") != rid.round or not isinstance(claimed, int) or devices > claimed:
        raise SecAggRefusal(f"no secagg round {rid.round} of {devices} devices in progress")
    _expect_stage(state, _SHARED)
    state["devices"] = devices
    arrays = content.array_records.get(TABLE, ArrayRecord())
    ids = ids_of(arrays, "ids", 1 << 20)
    pk_s, pk_c = rows_of(arrays, "pk-s", len(ids), 32), rows_of(arrays, "pk-c", len(ids), 32)
    t, k = _t(cfg, devices), degree(cfg.neighbours, devices)
    if len(ids) != k or len(ids) < t or me in ids or len(set(ids)) != len(ids):
        raise SecAggRefusal(
            f"the aggregator lists {len(ids)} neighbours; a round of {devices} devices "
            f"needs {k} distinct others (threshold {t})"
        )
    seed = int.from_bytes(_bytes(state, "seed"), "big")
    sk_s = int.from_bytes(_bytes(state, "sk-s"), "big")
    xs = [j + 1 for j in ids]
    seed_shares, key_shares = shamir.split(seed, xs, t), shamir.split(sk_s, xs, t)
    boxes = []
    for j, pc, a, b in zip(ids, pk_c, seed_shares, key_shares, strict=True):
        key = keys.agree(_bytes(state, "sk-c"), pc, rid, "share")
        boxes.append(keys.seal_box(key, a + b, rid, STAGE_SHARE, me, j))
    state.update(
        {"stage": _SHARED, "nbr": list(ids), "nbr-pk-s": list(pk_s), "nbr-pk-c": list(pk_c)}
    )
    return RecordDict(
        {TABLE: ArrayRecord({"ids": id_array(ids), "boxes": row_array(boxes, BOX_BYTES)})}
    )


def _neighbour(state: ConfigRecord, j: int) -> int:
    nbr = _list(state, "nbr")
    if j not in nbr:
        raise SecAggRefusal(f"client {j} is not one of this device's neighbours")
    return nbr.index(j)


def receive_shares(
    state: ConfigRecord, cfg: SecAggConfig, rid: RoundId, me: int, content: RecordDict
) -> int:
    """Stage 3, first half: keep the shares addressed here that open; returns how many did not.

    The senders are the neighbours alive after stage 2: this device masks with exactly
    them, so it refuses when they are fewer than t."""
    params = _params(content)
    devices = int_param(params, "devices", 0, 1 << 20)
    _expect(state, rid, devices, _MASKED)
    arrays = content.array_records.get(TABLE, ArrayRecord())
    alive = ids_of(arrays, "ids", 1 << 20)
    boxes = rows_of(arrays, "boxes", len(alive), BOX_BYTES)
    t = _t(cfg, devices)
    if len(set(alive)) != len(alive) or len(alive) < t:
        raise SecAggRefusal(f"{len(alive)} live neighbour(s) listed; the threshold is {t}")
    kept_from: list[int] = []
    seed_sh: list[bytes] = []
    key_sh: list[bytes] = []
    bad = 0
    for j, box in zip(alive, boxes, strict=True):
        pc = _list(state, "nbr-pk-c")[_neighbour(state, j)]
        key = keys.agree(_bytes(state, "sk-c"), pc, rid, "share")
        try:
            plain = keys.open_box(key, box, rid, STAGE_SHARE, j, me)
        except keys.ShareBoxError:
            bad += 1
            continue
        kept_from.append(j)
        seed_sh.append(plain[: shamir.SHARE_BYTES])
        key_sh.append(plain[shamir.SHARE_BYTES :])
    state.update({"alive": list(alive), "from": kept_from, "seed-sh": seed_sh, "key-sh": key_sh})
    return bad


@dataclass(frozen=True)
class RoundGrid:
    """The round's quantization grid, as the aggregator fixed it (checked here)."""

    devices: int
    clip: float
    bits: int
    modulus: int
    max_weight: int


def round_grid(state: ConfigRecord, cfg: SecAggConfig, content: RecordDict) -> RoundGrid:
    """The masked-input request's grid; refused unless it is the one this device's own
    config gives (bits, and the modulus for the round's device count)."""
    params = _params(content)
    devices = int_param(params, "devices", 0, 1 << 20)
    grid = RoundGrid(
        devices,
        float_param(params, "clip", 1e-12, 1e6),
        int_param(params, "bits", 1, 16),
        int_param(params, "modulus-bits", 1, MAX_MODULUS_BITS),
        int_param(params, "max-weight", 1, 1 << 62),
    )
    if grid.bits != cfg.bits or grid.modulus != modulus_bits(devices, cfg.bits):
        raise SecAggRefusal(
            f"grid of {grid.bits} bits mod 2^{grid.modulus}; this device's config gives "
            f"{cfg.bits} bits mod 2^{modulus_bits(devices, cfg.bits)} for {devices} devices"
        )
    return grid


def mask_input(
    state: ConfigRecord, rid: RoundId, me: int, codes: np.ndarray, grid: RoundGrid
) -> np.ndarray:
    """Stage 3, second half: codes + self mask + pairwise masks mod 2^m, bit-packed."""
    _expect(state, rid, grid.devices, _MASKED)
    m = grid.modulus
    sk_s, pks = _bytes(state, "sk-s"), _list(state, "nbr-pk-s")
    pairs = [
        (keys.agree(sk_s, pks[_neighbour(state, j)], rid, "mask"), me < j)
        for j in _list(state, "alive")
    ]
    masked = apply_masks(codes, _bytes(state, "seed"), pairs, m)
    state["stage"] = _MASKED
    return pack(masked, m)


def unmask(state: ConfigRecord, cfg: SecAggConfig, rid: RoundId, content: RecordDict) -> RecordDict:
    """Stage 4: per listed neighbour, the seed share (survivor) or key share (dropped)."""
    devices = int_param(_params(content), "devices", 0, 1 << 20)
    _expect(state, rid, devices, _UNMASKED)
    arrays = content.array_records.get(TABLE, ArrayRecord())
    survivors = ids_of(arrays, "survivors", 1 << 20)
    dropped = ids_of(arrays, "dropped", 1 << 20)
    alive = set(_list(state, "alive"))
    t = _t(cfg, devices)
    listed = set(survivors) | set(dropped)
    if len(listed) != len(survivors) + len(dropped):
        raise SecAggRefusal("a neighbour is listed twice, or as both survivor and dropped")
    if not listed <= alive:
        raise SecAggRefusal("the lists name devices this device did not mask with")
    if len(survivors) + 1 < t:  # this device survived too
        raise SecAggRefusal(f"{len(survivors)} surviving neighbour(s) listed; the threshold is {t}")
    state["stage"] = _UNMASKED  # answered once: no second request gets the other kind
    held = _list(state, "from")
    seed_ids = [j for j in survivors if j in held]
    key_ids = [j for j in dropped if j in held]
    seed_sh, key_sh = _list(state, "seed-sh"), _list(state, "key-sh")
    record = ArrayRecord(
        {
            "seed-ids": id_array(seed_ids),
            "seed-shares": row_array([seed_sh[held.index(j)] for j in seed_ids], SHARE),
            "key-ids": id_array(key_ids),
            "key-shares": row_array([key_sh[held.index(j)] for j in key_ids], SHARE),
        }
    )
    for secret in _SECRETS:  # nothing of this round is needed again: forget it
        state.pop(secret, None)
    return RecordDict({TABLE: record})
