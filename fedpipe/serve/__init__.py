"""An HTTP inference service for an exported model: micro-batching, metrics, bounds.

The config and the request decoding import quickly; the web stack (FastAPI, uvicorn)
is imported on first use of `make_app` or `serve`, so that `fedpipe --help` and the
other subcommands, which read ServeConfig's defaults, don't pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedpipe.serve.config import ServeConfig
from fedpipe.serve.decode import BadRequest

if TYPE_CHECKING:
    from fedpipe.serve.app import make_app
    from fedpipe.serve.batcher import MicroBatcher, QueueFull
    from fedpipe.serve.model import ServedModel, ServeError, load_served_model
    from fedpipe.serve.server import serve

__all__ = [
    "BadRequest",
    "MicroBatcher",
    "QueueFull",
    "ServeConfig",
    "ServeError",
    "ServedModel",
    "load_served_model",
    "make_app",
    "serve",
]

_LAZY = {
    "make_app": "app",
    "MicroBatcher": "batcher",
    "QueueFull": "batcher",
    "ServedModel": "model",
    "ServeError": "model",
    "load_served_model": "model",
    "serve": "server",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
