"""flower-supernode with a shorter idle poll: `python -m fedpipe.deploy.supernode ARGS`.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever it finds no message waiting, so a
device picks up each round's instruction 1.5 s late on average (measured in
benchmarks/deployment.py). Flower has no setting for it. This entry point runs Flower's
own `flower-supernode` CLI unchanged, except that sleeps inside its client loop are capped
at $FEDPIPE_POLL_SECONDS (default 0.25 s). Every other behaviour is Flower's; set the
variable to 3 to get stock Flower. Checked against flwr 1.42 only (pinned in pyproject).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

POLL_ENV = "FEDPIPE_POLL_SECONDS"
DEFAULT_POLL = 0.25


class _CappedSleep:
    """The `time` module as seen by Flower's client loop, with sleeps capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def main() -> int:
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    cap = float(os.environ.get(POLL_ENV, DEFAULT_POLL))
    setattr(loop, "time", _CappedSleep(cap))  # noqa: B010 - the module global Flower reads
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
