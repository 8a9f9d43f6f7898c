"""RoundProgress.clients_done: called per reply, shown rarely (a fake clock drives time)."""

from __future__ import annotations

import io

from test_report_export import _record

from fedpipe.progress import RoundProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_output_is_silent_mid_round_until_30_s_pass() -> None:
    out, clock = io.StringIO(), Clock()
    view = RoundProgress(3, out, live=False, clock=clock)
    for done in range(1, 1001):  # a reply every 0.1 s for 100 s
        clock.now = done / 10
        view.clients_done(1, done, 1000)
    assert out.getvalue().splitlines() == [
        "round 1: 300/1000 clients done (30 s)",
        "round 1: 600/1000 clients done (60 s)",
        "round 1: 900/1000 clients done (90 s)",
    ]
    clock.now = 105.0
    view.update(_record(1))  # the round line, as before; round 2 starts now
    out.seek(0), out.truncate()
    clock.now = 134.0
    view.clients_done(2, 5, 1000)
    view.clients_done(1, 1000, 1000)  # a late reply to a finished round
    assert out.getvalue() == ""
    clock.now = 136.0
    view.clients_done(2, 6, 1000)
    assert out.getvalue() == "round 2: 6/1000 clients done (31 s)\n"


def test_live_bar_shows_clients_of_the_running_round() -> None:
    out, clock = io.StringIO(), Clock()
    view = RoundProgress(3, out, live=True, clock=clock)
    view.update(_record(1))
    clock.now = 1.0
    view.clients_done(2, 530, 1000)
    clock.now = 1.05  # within the redraw interval: not shown
    view.clients_done(2, 531, 1000)
    view.close()
    text = out.getvalue()
    assert "round 2: 530/1000 clients | acc 0.6000" in text and "531/1000" not in text
