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
from fedpipe.secagg.device import mask_input, receive_shares, round_grid
from fedpipe.secagg.keys import RoundId
from fedpipe.secagg.quant import device_estimate, quantize

__all__ = ["masked_input"]


def masked_input(  # noqa: PLR0913 - the round, the device and its update
    state: ConfigRecord,
    cfg: SecAggConfig,
    rid: RoundId,
    me: int,
    request: RecordDict,
    update: Update,
    residual: Update | None,
    num_examples: int,
    rng: np.random.Generator,
) -> tuple[ArrayRecord, Update, int]:
    """(the masked input record, the next error-feedback residual, shares that did not
    open). Shares are taken in before anything is masked: a request whose grid or
    neighbour list this device refuses gets nothing."""
    grid = round_grid(state, cfg, request)
    bad = receive_shares(state, cfg, rid, me, request)
    x = flatten(update)
    if residual is not None:
        x = x + flatten(residual)
    weight = min(num_examples, grid.max_weight) / grid.max_weight
    codes = quantize(x, weight, grid.clip, grid.bits, rng)  # (count + 1,)
    sent = device_estimate(codes, weight, grid.clip, grid.bits)
    packed = mask_input(state, rid, me, codes, grid)
    return ArrayRecord({"y": Array(packed)}), unflatten(x - sent, update), bad
