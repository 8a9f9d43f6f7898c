"""fedpipe report and fedpipe export on a tiny real run (in-process rounds, real training)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch

from fedpipe.cli.main import main as fedpipe_main
from fedpipe.config import load_config
from fedpipe.data import load_dataset
from fedpipe.export import ExportError, export_run, load_run_model
from fedpipe.metrics import RoundRecord
from fedpipe.progress import RoundProgress
from fedpipe.report import ReportError, write_report

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def runs(digits_run: Path, finished_run: Callable[[Sequence[str]], Path]) -> list[Path]:
    """Two finished runs (float32 and int4 updates) of 3 rounds on the digits data."""
    return [digits_run, finished_run(["codec.scheme='int4'"])]


def test_a_finished_run_has_its_report(runs: list[Path]) -> None:
    assert (runs[0] / "report" / "report.html").is_file()  # written at the end of the run


def test_report_overlays_runs_with_decodable_plots(runs: list[Path], tmp_path: Path) -> None:
    page = write_report(runs, out=tmp_path / "cmp")
    pngs = sorted((tmp_path / "cmp").glob("*.png"))
    assert {p.stem for p in pngs} >= {"accuracy", "bytes", "tradeoff", "clients"}
    for png in pngs:
        image = mpimg.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 500
    text = page.read_text()
    assert len(re.findall(r'src="data:image/png;base64,', text)) == len(pngs)  # self-contained
    assert runs[0].name in text and runs[1].name in text and "int4" in text
    assert "final_accuracy" in text and "codec.scheme" in text
    with pytest.raises(ReportError, match="--force"):
        write_report(runs, out=tmp_path / "cmp")
    assert fedpipe_main(["report", str(tmp_path / "nothing")]) == 1


def test_export_round_trips_and_int8_keeps_accuracy(runs: list[Path]) -> None:
    rows = {r.artifact: r for r in export_run(runs[0])}
    fp32, int8 = rows["torchscript-fp32"], rows["torchscript-int8"]
    model, cfg, _ = load_run_model(runs[0])
    test = load_dataset(cfg.data).test
    scripted = torch.jit.load(str(runs[0] / "export" / "model_fp32.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(test.x), model(test.x), rtol=1e-5, atol=1e-5)
    assert fp32.max_logit_diff < 1e-4
    assert abs(int8.accuracy - fp32.accuracy) <= 0.01
    assert int8.size_bytes < fp32.size_bytes
    assert (runs[0] / "export" / "export.json").is_file()
    assert "torchscript-int8" in (runs[0] / "export" / "export.md").read_text()
    with pytest.raises(ExportError, match="--force"):
        export_run(runs[0])


def test_export_refuses_incomplete_or_mismatched_runs(runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="missing"):
        export_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.toml").write_text((runs[1] / "config.toml").read_text())
    saved = torch.load(runs[1] / "model.pt", weights_only=True)
    saved["config"]["model"]["hidden"] = 7  # the weights no longer fit the config
    torch.save(saved, broken / "model.pt")
    with pytest.raises(ExportError, match="does not match"):
        export_run(broken)
    assert fedpipe_main(["export", str(broken)]) == 1


def _record(rnd: int) -> RoundRecord:
    return RoundRecord(
        round=rnd, accuracy=0.5 + rnd / 10, loss=1.0, train_loss=1.0, clients_sampled=3,
        clients_replied=3, clients_failed=0, bytes_up=2_000_000, bytes_down=1_000_000,
        seconds=1.0, bits_per_param_up=8.0, encode_seconds=0.0, decode_seconds=0.0,
        train_seconds=1.0,
    )  # fmt: skip


def test_live_view_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    bar, lines = io.StringIO(), io.StringIO()
    live, plain = RoundProgress(2, bar, live=True), RoundProgress(2, lines, live=False)
    for rnd in (1, 2):
        live.update(_record(rnd))
        plain.update(_record(rnd))
    live.close()
    assert "2/2" in bar.getvalue() and "acc 0.7000" in bar.getvalue()
    assert "up 4.0 MB down 2.0 MB" in bar.getvalue()  # cumulative
    assert lines.getvalue().count("\n") == 2 and "round   2/2 | acc 0.7000" in lines.getvalue()


def _synthetic_run(root: Path, num_clients: int) -> Path:
    """A run directory as a simulation of `num_clients` leaves it, without running one."""
    import dataclasses
    import json

    import numpy as np

    from fedpipe.config import config_to_toml
    from fedpipe.rundir import write_json

    cfg = load_config(
        None, [f"partition.num_clients={num_clients}", "partition.scheme='dirichlet'"]
    )
    cfg = dataclasses.replace(
        cfg,
        simulation=dataclasses.replace(cfg.simulation, fail_clients=tuple(range(num_clients // 5))),
    )
    run = root / f"clients-{num_clients}"
    run.mkdir()
    (run / "config.toml").write_text(config_to_toml(cfg))
    lines = (json.dumps(dataclasses.asdict(_record(r))) for r in range(1, 21))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_json(run / "summary.json", {"rounds": 20, "final_accuracy": 2.5})
    rng = np.random.default_rng(0)
    labels = rng.multinomial(6, rng.dirichlet(np.full(10, 0.5)), size=num_clients)
    info = {
        "dataset": "mnist", "scheme": "dirichlet", "num_clients": num_clients,
        "num_classes": 10, "sizes": labels.sum(axis=1).tolist(), "labels": labels.tolist(),
    }  # fmt: skip
    write_json(run / "partition.json", info, compact=True)
    return run


def test_report_of_10000_clients_shows_distributions_not_clients(tmp_path: Path) -> None:
    import time

    from fedpipe.report import MANY_CLIENTS, _load, _partition

    run = _synthetic_run(tmp_path, 10_000)
    t0 = time.perf_counter()
    page = write_report([run])
    assert time.perf_counter() - t0 < 15  # ~1 s; a bar per client and class took ~70 s
    assert (run / "report" / "partition-0.png").is_file()
    text = page.read_text()
    assert "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...] (2000 items)" in text  # not 2000 ids
    assert len(text) < 1_000_000
    fig = _partition(_load(run))
    assert fig is not None and len(fig.axes) == 3
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert sum(len(ax.patches) for ax in fig.axes) < 100  # bins and boxes, not clients
    assert "10000 clients" in fig.get_suptitle() and MANY_CLIENTS < 10_000


def test_report_of_few_clients_keeps_per_client_bars(tmp_path: Path) -> None:
    from fedpipe.report import _load, _partition

    fig = _partition(_load(_synthetic_run(tmp_path, 10)))
    assert fig is not None
    (ax,) = fig.axes
    assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) == 10
    assert len(ax.patches) == 10 * 10  # a bar per client and class
