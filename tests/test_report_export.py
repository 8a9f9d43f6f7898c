"""fedpipe report and fedpipe export on a tiny real run (in-process rounds, real training)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from fedpipe.cli.main import main as fedpipe_main
from fedpipe.config import ConfigError, load_config
from fedpipe.data import load_dataset
from fedpipe.export import ExportError, export_run, load_run_model
from fedpipe.metrics import RoundRecord
from fedpipe.progress import RoundProgress
from fedpipe.report import ReportError, write_report

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def runs(digits_run: Path, finished_run: Callable[[Sequence[str]], Path]) -> list[Path]:
    """Two finished runs (float32 and int4 updates) of 3 rounds on the digits data; the
    float32 one with federated evaluation."""
    return [digits_run, finished_run(["codec.scheme='int4'", "partition.holdout=0.2"])]


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


def test_report_draws_per_class_metrics_and_the_confusion_matrix(
    runs: list[Path], tmp_path: Path
) -> None:
    from fedpipe.metrics import read_metrics
    from fedpipe.report import _classes, _federated, _load
    from fedpipe.training import validate

    rounds = read_metrics(runs[0] / "metrics.jsonl")
    model, cfg, _ = load_run_model(runs[0])
    test = load_dataset(cfg.data).test
    last = rounds[-1]
    expected = validate(model, test).confusion
    assert expected is not None and last["confusion"] == expected.tolist()
    assert all(len(r["class_f1"]) == 10 and r["macro_f1"] is not None for r in rounds)
    fig = _classes(_load(runs[0]))
    assert fig is not None
    heat, bars, confusion, _colorbar = fig.axes
    assert heat.images[0].get_array().shape == (10, 3)  # classes x rounds
    assert len(bars.patches) == 3 * 10  # precision, recall, F1 per class
    shown = confusion.images[0].get_array()
    np.testing.assert_allclose(shown, expected / expected.sum(1, keepdims=True))
    assert len(confusion.texts) == 100  # the counts, legible at 10 classes
    fed = _federated([_load(r) for r in runs])
    assert fed is not None  # the int4 run has no federated evaluation: only float32's lines
    (ax,) = fed.axes
    assert len(ax.lines) == 3 and [t.get_text() for t in ax.get_legend().get_texts()][1:] == [
        "devices: mean",
        "devices: worst",
        "devices: worst to best",
    ]
    write_report(runs, out=tmp_path / "r")
    assert {"classes-0", "classes-1", "federated"} <= {p.stem for p in (tmp_path / "r").glob("*")}
    assert all(r["fed_devices"] == 3 and r["fed_accuracy_min"] <= r["fed_accuracy"] for r in rounds)


def test_release_gate_refuses_and_accepts_as_configured(
    runs: list[Path], private_copy: Callable[[Path], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from fedpipe.export import ReleaseRefused
    from fedpipe.metrics import read_metrics

    run = private_copy(runs[0])
    # One device 0.2 below the centralized accuracy in the last round (on these IID
    # digits every device scores about the average).
    rounds = read_metrics(run / "metrics.jsonl")
    last = rounds[-1]
    last["fed_accuracy_min"] = last["accuracy"] - 0.2
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    with pytest.raises(ReleaseRefused, match=r"release.min_accuracy: test accuracy .* below"):
        export_run(run, overrides=[f"release.min_accuracy={last['accuracy'] + 0.01}"])
    assert not (run / "export").exists()  # nothing written
    assert fedpipe_main(["export", str(run), "release.max_worst_client_drop=0.1"]) == 3
    err = capsys.readouterr().err
    assert "worst of 3 devices scored" in err and "over the bar 0.1" in err
    assert not (run / "export").exists()
    # The int4 run never evaluated on devices: the drop bar cannot be checked, so it fails.
    other = private_copy(runs[1])
    with pytest.raises(ReleaseRefused, match="no federated evaluation"):
        export_run(other, overrides=["release.max_worst_client_drop=0.5"])
    with pytest.raises(ConfigError, match="task and model"):
        export_run(run, overrides=["model.hidden=3"])
    # Bars the model clears: exported, with the verdict beside the artifacts.
    bars = [f"release.min_accuracy={last['accuracy'] - 0.01}", "release.max_worst_client_drop=0.25"]
    export_run(run, overrides=bars)
    verdict = json.loads((run / "export" / "release.json").read_text())
    assert verdict["passed"] and not verdict["forced"] and len(verdict["criteria"]) == 2
    # Forced past a bar it fails: exported, and release.json says so.
    assert fedpipe_main(["export", str(other), "release.min_accuracy=1.0", "--ignore-gate"]) == 0
    verdict = json.loads((other / "export" / "release.json").read_text())
    assert verdict["forced"] and not verdict["passed"]


def test_export_profile_joins_the_devices_histograms(
    runs: list[Path], private_copy: Callable[[Path], Path]
) -> None:
    from fedpipe.drift import Profile

    with_devices, without = private_copy(runs[0]), private_copy(runs[1])
    for run in (with_devices, without):
        export_run(run)
    profile = Profile.load(with_devices / "export" / "profile.json")
    assert profile.sources["devices"] == 3 and profile.sources["coordinator_examples"] > 0
    assert "devices" not in Profile.load(without / "export" / "profile.json").sources
