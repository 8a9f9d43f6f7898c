"""Flower's inflation of replies, made bounded and total (two small, pinned patches of flwr 1.42).

Flower's Grid turns each pulled reply back into objects (`inflate_object_from_contents`)
inside `pull_messages`, before any fedpipe code sees it. Two things a device controls
broke the aggregator there:

1. Size.
Flower sends an `Array` as a small body plus `ArrayChunk` children, and the body lists
the chunk to use at each position (`arraychunk_ids`). Nothing stops a sender from
listing one chunk many times: a 762-byte body and one 5 MiB chunk become 1,000 MiB when
the aggregator's Grid inflates the reply (`Array.inflate` concatenates every listed
chunk) -- before any fedpipe code sees the message. Raising there would abort Flower's
`pull_messages` for every reply in the batch, so the guard instead hands back an empty
Array marked with the size it would have had; fedpipe's decode boundary then drops that
reply with the reason, and the round goes on.
2. Totality. Bytes Flower's own parsers refuse (a ConfigRecord body that is not valid
protobuf, a string that is not valid UTF-8 on the wire) raise inside `pull_messages` and
ended the whole run. The deployment Grid's `inflate_object_from_contents` is wrapped so
that a reply that cannot be inflated becomes an error reply from its sender (metadata
read from the Message's own body), which the decode boundary counts as a rejection.

Each patch replaces one name (a classmethod, one module global of the deployment Grid)
and is checked by a fast test against the flwr version it was written for
(`PINNED_FLWR`): when Flower changes, the test fails.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import flwr.superlink.grid.http_grid as http_grid
from flwr.app import Array, Message, Metadata
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.common.serde_utils import metadata_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.date import now
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
_ORIGINAL_CONTENTS = http_grid.inflate_object_from_contents  # type: ignore[attr-defined]
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


def _sender(message_content: bytes | None) -> Metadata:
    """The metadata in a Message's own body; placeholders if even that cannot be read
    (the Grid then waits for that reply until the round's timeout, as for a silent one)."""
    try:
        assert message_content is not None
        body = get_object_body(message_content, Message)
        return metadata_from_proto(ProtoMessage.FromString(body).metadata)
    except Exception:  # noqa: BLE001 - any failure: nothing from this reply can be trusted
        return Metadata(
            run_id=0,
            message_id="",
            src_node_id=0,
            dst_node_id=0,
            reply_to_message_id="",
            group_id="",
            created_at=now().timestamp(),
            ttl=0,
            message_type="",
        )


def _total_inflate(object_id: str, object_contents: dict[str, bytes], **kwargs: Any) -> Any:
    """Flower's `inflate_object_from_contents`, but a reply it cannot inflate becomes an
    error reply instead of an exception that ends `pull_messages` (and the run)."""
    top = object_contents.get(object_id)
    try:
        return _ORIGINAL_CONTENTS(object_id, object_contents, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the Grid must survive any reply
        reason = f"undecodable reply ({type(exc).__name__}: {str(exc)[:200]})"
        log.warning("a reply could not be inflated: %s", reason)
        return make_message(
            metadata=_sender(top), error=Error(code=ErrorCode.UNKNOWN, reason=reason)
        )


def limit_array_inflation(max_bytes: int | None) -> None:
    """Bound every Array this process inflates to `max_bytes` (None: Flower's behaviour),
    and make the deployment Grid's inflation of replies total.

    The aggregator sets it from the model size before each round.
    """
    global _limit
    _limit = max_bytes
    Array.inflate = classmethod(_guarded_inflate)  # type: ignore[method-assign,assignment]
    http_grid.inflate_object_from_contents = _total_inflate  # type: ignore[attr-defined]
