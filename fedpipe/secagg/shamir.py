"""Shamir secret sharing over the prime field GF(2^521 - 1): the one primitive fedpipe writes.

Secrets here are 32-byte values (an AES-CTR seed, an X25519 private key), so the field
must hold any 256-bit integer: the Mersenne prime 2^521 - 1 does, with a fixed 66-byte
share encoding. Structure is constant: a polynomial of degree t - 1 with t - 1 random
coefficients from the OS's CSPRNG (`secrets`), evaluated by Horner's rule at x = 1..,
and Lagrange interpolation at 0 from exactly t points; nothing branches on a secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

__all__ = ["PRIME", "SHARE_BYTES", "ShareError", "combine", "share_from_bytes", "split"]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8): one field element, big-endian


class ShareError(ValueError):
    """Shares that cannot define a secret (too few, repeated or invalid points)."""


def split(secret: int, xs: Sequence[int], threshold: int) -> list[bytes]:
    """Shares of `secret` at the points `xs` (distinct, in [1, PRIME)); any `threshold`
    of them recover it, fewer reveal nothing."""
    if not 0 <= secret < PRIME:
        raise ShareError("the secret must lie in [0, PRIME)")
    if not 1 <= threshold <= len(xs):
        raise ShareError(f"threshold {threshold} needs 1..{len(xs)} shares")
    _check_points(xs)
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner: ((c_{t-1} x + c_{t-2}) x + ...) x + c_0
            y = (y * x + c) % PRIME
        out.append(y.to_bytes(SHARE_BYTES, "big"))
    return out


def share_from_bytes(raw: bytes) -> int:
    """A share's field element; a value outside the field is not a share."""
    if len(raw) != SHARE_BYTES:
        raise ShareError(f"a share is {SHARE_BYTES} bytes, not {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ShareError("share value outside the field")
    return y


def combine(points: Sequence[tuple[int, bytes]], threshold: int) -> int:
    """The secret from the first `threshold` of (x, share) points (Lagrange at 0)."""
    if len(points) < threshold or threshold < 1:
        raise ShareError(f"{len(points)} share(s), {threshold} needed")
    use = points[:threshold]
    xs = [x for x, _ in use]
    _check_points(xs)
    secret = 0
    for i, (xi, raw) in enumerate(use):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + share_from_bytes(raw) * num * pow(den, -1, PRIME)) % PRIME
    return secret


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ShareError("share points repeat")
    if any(not 0 < x < PRIME for x in xs):
        raise ShareError("share points must lie in [1, PRIME)")
