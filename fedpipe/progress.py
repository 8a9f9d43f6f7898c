"""The live view of a run: a progress bar on a terminal, one line per round elsewhere.

On a terminal, a rich progress bar shows the round, the test accuracy and the bytes moved
so far; in logs, pipes and CI every round is one plain line (greppable, as before). When
the `tensorboard` package is installed, the same scalars also go to <run>/tensorboard.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from fedpipe.metrics import RoundRecord, progress_line

__all__ = ["RoundProgress"]


class RoundProgress:
    """Receives each finished round; `live=None` means: a bar if `stream` is a terminal."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        live: bool | None = None,
        tensorboard_dir: Path | None = None,
    ) -> None:
        self.total, self.stream = total, stream if stream is not None else sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.up = self.down = 0
        self._bar: Any = None
        self._task: Any = None
        self._tb = _tensorboard(tensorboard_dir) if tensorboard_dir else None

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
