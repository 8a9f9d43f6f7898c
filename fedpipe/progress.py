"""The live view of a run: a progress bar on a terminal, one line per round elsewhere.

On a terminal, a rich progress bar shows the round, the test accuracy and the bytes moved
so far; in logs, pipes and CI every round is one plain line (greppable, as before). When
the `tensorboard` package is installed, the same scalars also go to <run>/tensorboard.

Within a round, `clients_done` counts replies as they arrive. With thousands of clients
it is called thousands of times a round, so both views throttle it: the bar redraws its
status at most every LIVE_EVERY_S, and plain output gets a line only when a round has been
silent for PLAIN_EVERY_S (a long round in a log then shows it is alive, a short one adds
nothing).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from fedpipe.metrics import RoundRecord, progress_line

__all__ = ["LIVE_EVERY_S", "PLAIN_EVERY_S", "RoundProgress"]

LIVE_EVERY_S = 0.1  # about rich's own refresh rate: redrawing more often shows nothing new
PLAIN_EVERY_S = 30.0


class RoundProgress:
    """Receives each finished round; `live=None` means: a bar if `stream` is a terminal."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        live: bool | None = None,
        tensorboard_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.stream = total, stream if stream is not None else sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.up = self.down = 0
        self._bar: Any = None
        self._task: Any = None
        self._tb = _tensorboard(tensorboard_dir) if tensorboard_dir else None
        self._clock = clock
        # The next round starts when the previous one is reported (or now, for the first).
        self._round_start = self._last_shown = clock()
        self._finished = 0  # the last round `update` reported
        self._accuracy: float | None = None

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bar = Progress(
            TextColumn("round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(file=self.stream),
        )
        self._task = self._bar.add_task("rounds", total=self.total, status="starting")
        self._bar.start()

    def update(self, rec: RoundRecord) -> None:
        self._round_start = self._last_shown = self._clock()
        self._finished, self._accuracy = max(self._finished, rec.round), rec.accuracy
        self.up += rec.bytes_up
        self.down += rec.bytes_down
        if self._tb is not None:
            for name in ("accuracy", "loss", "bytes_up", "bytes_down", "clients_failed"):
                self._tb.add_scalar(name, getattr(rec, name), rec.round)
        if not self.live:
            print(progress_line(rec, self.total), file=self.stream, flush=True)
            return
        if self._bar is None:
            self._start_bar()
        status = (
            f"acc {rec.accuracy:.4f} | up {self.up / 1e6:.1f} MB down {self.down / 1e6:.1f} MB "
            f"| {rec.clients_failed} failed"
        )
        self._bar.update(self._task, completed=rec.round, status=status)

    def clients_done(self, server_round: int, done: int, total: int) -> None:
        """`done` of the round's `total` clients have replied; cheap enough to call per reply."""
        now = self._clock()
        wait = LIVE_EVERY_S if self.live else PLAIN_EVERY_S
        if now - self._last_shown < wait or server_round <= self._finished:
            return  # throttled, or a late reply to a round already reported
        self._last_shown = now
        if not self.live:
            elapsed = now - self._round_start
            line = f"round {server_round}: {done}/{total} clients done ({elapsed:.0f} s)"
            print(line, file=self.stream, flush=True)
            return
        if self._bar is None:
            self._start_bar()
        acc = f" | acc {self._accuracy:.4f}" if self._accuracy is not None else ""
        self._bar.update(self._task, status=f"round {server_round}: {done}/{total} clients{acc}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))
