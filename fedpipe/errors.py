"""Turning operating-system errors into the short reasons fedpipe's one-line errors end with."""

from __future__ import annotations

__all__ = ["os_message", "os_reason"]


def os_reason(exc: OSError) -> str:
    """`Permission denied`, `No such file or directory`, ...: the part of an OSError a user
    acts on. An OSError raised with a message of fedpipe's own (no errno) is that message."""
    if exc.errno is None or not exc.strerror:
        return str(exc)
    return exc.strerror


def os_message(exc: OSError) -> str:
    """`<file>: <reason>` when the error names a file, else the reason alone."""
    reason = os_reason(exc)
    return f"{exc.filename}: {reason}" if exc.filename and exc.errno is not None else reason
