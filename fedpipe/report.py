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
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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


def _partition(run: dict[str, Any]) -> Figure | None:
    part = run["partition"]
    if not part or "clients" not in part:
        return None
    clients = part["clients"]
    hists = [c["labels"] for c in clients]
    fig, ax = plt.subplots(figsize=(11, 4))
    bottom = [0] * len(hists)
    for label in range(len(hists[0]) if hists else 0):
        counts = [h[label] for h in hists]
        ax.bar(range(len(hists)), counts, bottom=bottom, label=f"class {label}")
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set(
        title=f"Label histogram per client: {run['label']}",
        xlabel="client id",
        ylabel="training examples",
    )
    ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    return fig


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


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
    figures = {"accuracy": _accuracy(runs), "bytes": _bytes(runs), "clients": _clients(runs)}
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
        if not name.startswith("partition"):
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
