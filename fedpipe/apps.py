"""The Flower app components a deployment points at (`fedpipe.apps:server_app`, ...).

`flwr run` checks these names by reading this file, so they must be module-level
assignments. Both read the whole fedpipe config from Flower's run config.
"""

from __future__ import annotations

from fedpipe.client_app import make_client_app
from fedpipe.server_app import make_server_app

__all__ = ["client_app", "server_app"]

server_app = make_server_app()
client_app = make_client_app()
