"""`fedpipe report`: a run (or several, overlaid) as PNG plots and one self-contained HTML.

Reads only the run directory (metrics.jsonl, summary.json, config.toml, partition.json),
so it works the same for simulations and deployments, and for runs from other machines.
"""

from __future__ import annotations

import base64
import html
import json
import tomllib
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from fedpipe.metrics import read_metrics  # noqa: E402
from fedpipe.rundir import CONFIG_FILE, METRICS_FILE, PARTITION_FILE, SUMMARY_FILE  # noqa: E402

__all__ = ["ReportError", "write_report"]


class ReportError(RuntimeError):
    """A run directory cannot be reported on; the message says what is missing."""


def _load(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / METRICS_FILE).is_file():
        raise ReportError(f"{run_dir} has no {METRICS_FILE}: not a run directory, or no round ran")
    rounds = read_metrics(run_dir / METRICS_FILE)
    if not rounds:
        raise ReportError(f"{run_dir / METRICS_FILE} holds no rounds")
    summary = (
        json.loads((run_dir / SUMMARY_FILE).read_text())
        if (run_dir / SUMMARY_FILE).exists()
        else {}
    )
    config = (
        tomllib.loads((run_dir / CONFIG_FILE).read_text())
        if (run_dir / CONFIG_FILE).exists()
        else {}
    )
    partition = (
        json.loads((run_dir / PARTITION_FILE).read_text())
        if (run_dir / PARTITION_FILE).exists()
        else None
    )
    codec = config.get("codec", {}).get("scheme", "?")
    return {
        "dir": run_dir,
        "label": f"{run_dir.name} ({codec})",
        "rounds": rounds,
        "summary": summary,
        "config": config,
        "partition": partition,
    }


def _series(run: dict[str, Any], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    xs = [r["round"] for r in run["rounds"]]
    return xs, [(r[key] or 0.0) * scale for r in run["rounds"]]


def _rounds_axis(fig: Figure) -> None:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _accuracy(runs: list[dict[str, Any]]) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        a.plot(*_series(run, "accuracy"), marker="o", label=run["label"])
        b.plot(*_series(run, "loss"), marker="o", label=run["label"])
    a.set(title="Test accuracy per round", xlabel="round", ylabel="accuracy (held-out test set)")
    b.set(title="Test loss per round", xlabel="round", ylabel="cross-entropy loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bytes(runs: list[dict[str, Any]]) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        for key, style in (("bytes_up", "-"), ("bytes_down", "--")):
            xs, ys = _series(run, key, 1e-6)
            a.plot(xs, ys, style, marker="o", label=f"{key.split('_')[1]}: {run['label']}")
            total, cumulative = 0.0, []
            for y in ys:
                total += y
                cumulative.append(total)
            b.plot(xs, cumulative, style, marker="o", label=f"{key.split('_')[1]}: {run['label']}")
    a.set(title="Bytes per round (log scale)", xlabel="round", ylabel="MB (serialized, measured)")
    a.set_yscale("log")
    b.set(title="Cumulative bytes", xlabel="round", ylabel="MB since round 1")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _tradeoff(runs: list[dict[str, Any]]) -> Figure:
    """Accuracy against the traffic spent to reach it: the fair way to compare codecs,
    since one that saves bytes a round may need more rounds."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in runs:
        _, acc = _series(run, "accuracy")
        _, up = _series(run, "bytes_up", 1e-6)
        _, down = _series(run, "bytes_down", 1e-6)
        traffic = (up, down, [u + d for u, d in zip(up, down, strict=True)])
        for ax, per_round in zip(axes, traffic, strict=True):
            ax.plot(np.cumsum(per_round), acc, marker="o", label=run["label"])
    for ax, what in zip(axes, ("up", "down", "up + down"), strict=True):
        ax.set(title=f"Accuracy against bytes {what}", xlabel=f"cumulative MB {what}")
        ax.set(ylabel="accuracy (held-out test set)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _clients(runs: list[dict[str, Any]]) -> Figure:
    fig, ax = plt.subplots(figsize=(11, 3.5))
    for run in runs:
        for key, style in (
            ("clients_sampled", ":"),
            ("clients_replied", "-"),
            ("clients_failed", "--"),
        ):
            ax.plot(
                *_series(run, key),
                style,
                marker="o",
                label=f"{key.removeprefix('clients_')}: {run['label']}",
            )
    ax.set(title="Clients per round", xlabel="round", ylabel="clients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _federated(runs: list[dict[str, Any]]) -> Figure | None:
    """Centralized accuracy beside the devices' own: the mean, the worst device and the
    band from worst to best (on non-IID data the worst device is what matters)."""
    fed = [r for r in runs if any(rec.get("fed_devices") for rec in r["rounds"])]
    if not fed:
        return None
    fig, ax = plt.subplots(figsize=(11, 4))
    for run in fed:
        rows = [rec for rec in run["rounds"] if rec.get("fed_devices")]
        xs = [rec["round"] for rec in rows]
        (line,) = ax.plot(
            *_series(run, "accuracy"), marker="o", label=f"centralized: {run['label']}"
        )
        color = line.get_color()
        ax.plot(xs, [r["fed_accuracy"] for r in rows], "--", color=color, label="devices: mean")
        ax.plot(
            xs,
            [r["fed_accuracy_min"] for r in rows],
            ":",
            marker="v",
            color=color,
            label="devices: worst",
        )
        ax.fill_between(
            xs,
            [r["fed_accuracy_min"] for r in rows],
            [r["fed_accuracy_max"] for r in rows],
            color=color,
            alpha=0.15,
            label="devices: worst to best",
        )
    ax.set(
        title="Accuracy: centralized test set and devices' own held-out data",
        xlabel="round",
        ylabel="accuracy",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _classes(run: dict[str, Any]) -> Figure | None:
    """Per-class quality: F1 of every class by round, the last round's precision, recall
    and F1 per class, and its confusion matrix (rows: true class)."""
    rows = [rec for rec in run["rounds"] if rec.get("class_f1")]
    if not rows:
        return None
    last = rows[-1]
    f1 = np.asarray([r["class_f1"] for r in rows])  # (rounds, classes)
    classes = f1.shape[1]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5), width_ratios=(1.2, 1.2, 1))
    im = a.imshow(
        f1.T,
        aspect="auto",
        origin="lower",
        vmin=0,
        vmax=1,
        cmap="viridis",
        extent=(rows[0]["round"] - 0.5, last["round"] + 0.5, -0.5, classes - 0.5),
    )
    fig.colorbar(im, ax=a, label="F1")
    a.set(title="F1 per class by round", xlabel="round", ylabel="class")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    width = 0.27
    for k, (key, name) in enumerate(
        (("class_precision", "precision"), ("class_recall", "recall"), ("class_f1", "F1"))
    ):
        b.bar(np.arange(classes) + (k - 1) * width, last[key], width, label=name)
    b.set(
        title=f"Per class, round {last['round']} (macro F1 {last.get('macro_f1', 0):.3f})",
        xlabel="class",
        ylim=(0, 1.05),
    )
    b.legend(fontsize=7, loc="lower right")
    _confusion(c, last)
    fig.suptitle(run["label"])
    fig.tight_layout()
    return fig


def _confusion(ax: Axes, rec: dict[str, Any]) -> None:
    matrix = rec.get("confusion")
    if not matrix:
        ax.set_axis_off()
        ax.set_title("no confusion matrix (over 100 classes)")
        return
    cm = np.asarray(matrix, dtype=np.float64)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # colour: share of the true class
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(cm) <= MANY_CLASSES:  # counts in the cells while they are legible
        for (i, j), v in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                f"{int(v)}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set(title=f"Confusion matrix, round {rec['round']}", xlabel="predicted", ylabel="true")


# Above this many clients, a bar per client is a smear and the plot shows distributions
# over clients instead; above this many classes, a legend entry per class is noise.
MANY_CLIENTS = 30
MANY_CLASSES = 20


def _partition(run: dict[str, Any]) -> Figure | None:
    """Who holds what: per-client bars for a few clients, distributions for many."""
    part = run["partition"]
    if not part or "labels" not in part or not part["labels"]:
        return None
    hists = np.asarray(part["labels"], dtype=np.int64)
    if len(hists) <= MANY_CLIENTS:
        return _partition_per_client(hists, run["label"])
    return _partition_summary(hists, run["label"])


def _partition_per_client(hists: np.ndarray, label: str) -> Figure:
    fig, ax = plt.subplots(figsize=(11, 4))
    bottom = np.zeros(len(hists), dtype=np.int64)
    for cls in range(hists.shape[1]):
        ax.bar(range(len(hists)), hists[:, cls], bottom=bottom, label=f"class {cls}")
        bottom += hists[:, cls]
    ax.set(title=f"Label histogram per client: {label}", xlabel="client id")
    ax.set(ylabel="training examples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if hists.shape[1] <= MANY_CLASSES:
        ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    return fig


def _partition_summary(hists: np.ndarray, label: str) -> Figure:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4), width_ratios=(1, 1, 1.4))
    sizes = hists.sum(axis=1)
    _shard_sizes(a, sizes)
    _classes_held(b, (hists > 0).sum(axis=1), hists.shape[1])
    _class_shares(c, hists[sizes > 0] / sizes[sizes > 0, None])
    fig.suptitle(f"Partition of {len(hists)} clients: {label}")
    fig.tight_layout()
    return fig


def _shard_sizes(ax: Axes, sizes: np.ndarray) -> None:
    lo, hi = int(sizes.min()), int(sizes.max())
    # One bar per size while sizes span few values (iid shards differ by one example).
    bins: Any = np.arange(lo, hi + 2) - 0.5 if hi - lo < 50 else 50
    ax.hist(sizes, bins=bins)
    ax.axvline(float(np.median(sizes)), color="k", linestyle="--", linewidth=1)
    ax.set(title="Shard sizes (dashed: median)", xlabel="training examples per client")
    ax.set(ylabel="clients")
    _integer_ticks(ax, lo, hi)


def _integer_ticks(ax: Axes, lo: int, hi: int) -> None:
    # MaxNLocator falls back to fractional ticks when the range holds only a few integers.
    if hi - lo <= 10:
        ax.set_xticks(range(lo, hi + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _classes_held(ax: Axes, held: np.ndarray, num_classes: int) -> None:
    counts = np.bincount(held, minlength=num_classes + 1)
    ax.bar(range(num_classes + 1), counts)
    ax.set(title="Classes held per client", xlabel="distinct classes in the shard")
    ax.set(ylabel="clients")
    _integer_ticks(ax, 0, num_classes)


def _class_shares(ax: Axes, shares: np.ndarray) -> None:
    """Per class, how much of a client's shard it makes up, across clients: a box plot
    (quartiles, whiskers at 5th/95th percentile, mean marked) instead of one bar per client."""
    last = shares.shape[1] - 1
    ax.boxplot(shares, positions=range(last + 1), whis=(5, 95), showfliers=False, showmeans=True)
    ax.set(title="Share of each class in a client's shard", xlabel="class")
    ax.set(ylabel="share of the client's examples", ylim=(-0.02, 1.02))
    ax.text(
        0.99, 0.98, "box: quartiles\nwhiskers: 5th-95th percentile\n▲: mean",
        transform=ax.transAxes, ha="right", va="top", fontsize=8,
    )  # fmt: skip
    ax.xaxis.set_major_formatter(ScalarFormatter())  # boxplot labels positions from 1
    _integer_ticks(ax, 0, last)


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_cell(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _cell(value: Any, shown: int = 10) -> str:
    """A list of client ids (e.g. simulation.attackers) can hold thousands: show its head."""
    if isinstance(value, list) and len(value) > shown:
        head = ", ".join(map(str, value[:shown]))
        return f"[{head}, ...] ({len(value)} items)"
    return str(value)


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def write_report(run_dirs: list[Path], out: Path | None = None, force: bool = False) -> Path:
    """PNGs and report.html for `run_dirs` (overlaid) in `out` (default: <run>/report)."""
    runs = [_load(d) for d in run_dirs]
    out = out or run_dirs[0] / "report"
    if (out / "report.html").exists() and not force:
        raise ReportError(f"{out / 'report.html'} exists; pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "accuracy": _accuracy(runs),
        "bytes": _bytes(runs),
        "tradeoff": _tradeoff(runs),
        "clients": _clients(runs),
    }
    federated = _federated(runs)
    if federated is not None:
        figures["federated"] = federated
    for i, run in enumerate(runs):
        classes = _classes(run)
        if classes is not None:
            figures[f"classes-{i}"] = classes
    shown: list[Any] = []
    for i, run in enumerate(runs):
        if run["partition"] in shown:  # runs of one config share a partition: plot it once
            continue
        shown.append(run["partition"])
        fig = _partition(run)
        if fig is not None:
            figures[f"partition-{i}"] = fig
    sections = []
    for name, fig in figures.items():
        if name in ("accuracy", "bytes", "clients", "federated"):  # x: rounds
            _rounds_axis(fig)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        data = base64.b64encode(path.read_bytes()).decode()
        sections.append(f'<h2>{name}</h2><img alt="{name}" src="data:image/png;base64,{data}">')
    for run in runs:
        sections.append(
            f"<h2>{html.escape(run['label'])}: summary</h2>" + _table(list(run["summary"].items()))
        )
        sections.append(
            f"<h2>{html.escape(run['label'])}: config</h2>" + _table(_flat(run["config"]))
        )
    style = "body{font-family:sans-serif;max-width:1200px;margin:auto}td{padding:2px 8px}"
    title = "fedpipe report: " + ", ".join(html.escape(r["dir"].name) for r in runs)
    head = f"<meta charset='utf-8'><title>{title}</title><style>{style} img{{width:100%}}</style>"
    body = f"<h1>{title}</h1>{''.join(sections)}"
    page = f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"
    (out / "report.html").write_text(page)
    return out / "report.html"
