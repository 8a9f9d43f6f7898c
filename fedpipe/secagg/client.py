"""A device's masked input: its update on the round's grid, with error feedback, masked.

The ClientApp trains as always; this turns the update into the stage-3 reply. Error
feedback works as with any codec: the device keeps update - (what the aggregator's sum
takes from it), so clipping and rounding are carried to the next round, never lost.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpipe.codec import Update, flatten, unflatten
from fedpipe.config import SecAggConfig
from fedpipe.secagg.device import RoundGrid, mask_input, receive_shares, round_grid
from fedpipe.secagg.keys import RoundId
from fedpipe.secagg.quant import device_estimate, quantize

__all__ = ["accept_request", "masked_input"]


def accept_request(
    state: ConfigRecord, cfg: SecAggConfig, rid: RoundId, me: int, request: RecordDict
) -> tuple[RoundGrid, int]:
    """The masked-input request's grid, after taking in the shares addressed here (and
    how many did not open). Called before training: a request this device refuses (its
    grid, its neighbour list) costs no training and gets nothing."""
    grid = round_grid(state, cfg, request)
    return grid, receive_shares(state, cfg, rid, me, request)


def masked_input(  # noqa: PLR0913 - the round, the device and its update
    state: ConfigRecord,
    rid: RoundId,
    me: int,
    grid: RoundGrid,
    update: Update,
    residual: Update | None,
    num_examples: int,
    rng: np.random.Generator,
) -> tuple[ArrayRecord, Update]:
    """(the masked input record, the next error-feedback residual)."""
    x = flatten(update)
    if residual is not None:
        x = x + flatten(residual)
    weight = min(num_examples, grid.max_weight) / grid.max_weight
    codes = quantize(x, weight, grid.clip, grid.bits, rng)  # (count + 1,)
    sent = device_estimate(codes, weight, grid.clip, grid.bits)
    packed = mask_input(state, rid, me, codes, grid)
    return ArrayRecord({"y": Array(packed)}), unflatten(x - sent, update)
