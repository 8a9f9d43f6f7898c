"""Message types and record names of the SecAgg stages (one place, both sides)."""

from __future__ import annotations

__all__ = [
    "ADVERTISE",
    "BOX_BYTES",
    "MASKED",
    "MASKED_INPUT",
    "PARAMS",
    "SHARE",
    "STAGE_SHARE",
    "TABLE",
    "UNMASK",
]

from fedpipe.secagg.keys import NONCE_BYTES
from fedpipe.secagg.shamir import SHARE_BYTES

# Message types: one Flower handler each (`@app.query(...)`, `@app.train("secagg")`).
ADVERTISE = "query.secagg_advertise"  # -> two public keys, a seed commitment, a weight
SHARE = "query.secagg_share"  # neighbours' keys -> encrypted shares, one per neighbour
MASKED = "train.secagg"  # model + shares addressed to the device -> masked input
UNMASK = "query.secagg_unmask"  # survivors/dropped -> the shares the sum needs

PARAMS = "secagg"  # ConfigRecord: the round's parameters (server -> device), or a
#                    device's advertised keys (device -> server)
TABLE = "secagg-table"  # ArrayRecord: ids and fixed-width byte rows, either way
MASKED_INPUT = "masked"  # ArrayRecord: the bit-packed masked input (one array "y")

STAGE_SHARE = 2  # the stage a share box is bound to
# A share box: nonce || AES-GCM(seed share || key share) || tag.
BOX_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16
