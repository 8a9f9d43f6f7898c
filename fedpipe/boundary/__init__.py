"""The aggregator's decode boundary: the only place a device's bytes are parsed.

`DecodeBoundary` turns each reply into a validated update or a counted `Rejection`;
arrays are read with the codec package's strict `parse_npy`, never `np.load`;
`limit_array_inflation` bounds what Flower's Grid may inflate before fedpipe sees a reply.
"""

from __future__ import annotations

from fedpipe.boundary._decode import (
    Claims,
    DecodeBoundary,
    DecodedReply,
    Opener,
    Rejection,
    decode_identity,
)
from fedpipe.boundary._inflate import limit_array_inflation, oversized
from fedpipe.boundary._records import ReplyLimits, safe_text
from fedpipe.boundary._secagg import (
    SHARES_REJECTED,
    Advertised,
    MaskedInput,
    Revealed,
    decode_advertise,
    decode_masked,
    decode_shares,
    decode_unmask,
)

__all__ = [
    "SHARES_REJECTED",
    "Advertised",
    "Claims",
    "DecodeBoundary",
    "DecodedReply",
    "MaskedInput",
    "Opener",
    "Rejection",
    "ReplyLimits",
    "Revealed",
    "decode_advertise",
    "decode_identity",
    "decode_masked",
    "decode_shares",
    "decode_unmask",
    "limit_array_inflation",
    "oversized",
    "safe_text",
]
