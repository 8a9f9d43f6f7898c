"""Error feedback (Karimireddy et al. 2019): what the codec dropped is sent next round.

The device keeps a residual e. Each round it encodes u + e instead of u and keeps
e' = (u + e) - decode(encode(u + e)). Over rounds the decoded updates then sum to the
true updates minus a single residual, so even a biased codec such as scaled sign
converges. Pure arithmetic here; the client app persists the residual in its state.
"""

from __future__ import annotations

import numpy as np

from fedpipe.codec._base import Codec, Encoded, Update

__all__ = ["encode_with_feedback"]


def encode_with_feedback(
    codec: Codec, update: Update, residual: Update | None, rng: np.random.Generator
) -> tuple[Encoded, Update]:
    """Encode update + residual; return the payload and the next residual."""
    corrected = update if residual is None else {k: update[k] + residual[k] for k in update}
    encoded = codec.encode(corrected, rng)
    # The device decodes its own payload to learn exactly what the server will see.
    decoded = codec.decode(encoded, like=corrected)
    return encoded, {k: (corrected[k] - decoded[k]).astype(np.float32) for k in corrected}
