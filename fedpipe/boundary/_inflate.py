"""A bound on Flower's Array inflation (a small, pinned patch of flwr 1.42).

Flower sends an `Array` as a small body plus `ArrayChunk` children, and the body lists
the chunk to use at each position (`arraychunk_ids`). Nothing stops a sender from
listing one chunk many times: a 762-byte body and one 5 MiB chunk become 1,000 MiB when
the aggregator's Grid inflates the reply (`Array.inflate` concatenates every listed
chunk) -- before any fedpipe code sees the message. Raising there would abort Flower's
`pull_messages` for every reply in the batch, so the guard instead hands back an empty
Array marked with the size it would have had; fedpipe's decode boundary then drops that
reply with the reason, and the round goes on.

The patch replaces one classmethod and is checked by a fast test against the flwr
version it was written for (`PINNED_FLWR`): when Flower changes, the test fails.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from flwr.app import Array
from flwr.supercore.inflatable.inflatable_object import (
    get_object_body,
    get_object_children_ids_from_object_content,
)

__all__ = ["OVERSIZED", "PINNED_FLWR", "inflated_size", "limit_array_inflation", "oversized"]

log = logging.getLogger(__name__)

PINNED_FLWR = "1.42."  # the Array.inflate this guards; tests/test_boundary.py checks it
# The emptied Array's stype: "fedpipe-oversized:<bytes>". Flower copies Arrays into their
# ArrayRecord field by field, so the mark travels in a field, not an attribute.
OVERSIZED = "fedpipe-oversized:"

_ORIGINAL = Array.__dict__["inflate"].__func__
_limit: int | None = None


def inflated_size(object_content: bytes, children: dict[str, Any]) -> int:
    """Bytes `Array.inflate` would allocate for this body, counted without allocating."""
    body = json.loads(get_object_body(object_content, Array).decode("utf-8"))
    ids = get_object_children_ids_from_object_content(object_content)
    uses = Counter(body["arraychunk_ids"])  # the list may name one chunk thousands of times
    return sum(len(children[ids[i]].data) * n for i, n in uses.items())


def _guarded_inflate(
    cls: type[Array], object_content: bytes, children: dict[str, Any] | None = None
) -> Array:
    limit = _limit
    if limit is not None and children:
        try:
            size = inflated_size(object_content, children)
        except (ValueError, KeyError, IndexError, TypeError):
            size = 0  # malformed: Flower's own inflate says why
        if size > limit:
            log.warning("an Array would inflate to %d bytes (bound %d): emptied", size, limit)
            return cls(dtype="", shape=(), stype=f"{OVERSIZED}{size}", data=b"")
    array: Array = _ORIGINAL(cls, object_content, children)
    return array


def oversized(array: Array) -> int | None:
    """The size an Array would have inflated to, if the guard emptied it."""
    stype = array.stype
    if isinstance(stype, str) and stype.startswith(OVERSIZED):
        return int(stype.removeprefix(OVERSIZED))
    return None


def limit_array_inflation(max_bytes: int | None) -> None:
    """Bound every Array this process inflates to `max_bytes` (None: Flower's behaviour).

    The aggregator sets it from the model size before its first round.
    """
    global _limit
    _limit = max_bytes
    Array.inflate = classmethod(_guarded_inflate)  # type: ignore[method-assign,assignment]
