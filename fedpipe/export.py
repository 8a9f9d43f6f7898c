"""From a run to deployable models: TorchScript float32, int8 for CPU, pruned, ONNX if
available.

Each artifact is checked against the float32 model on the test set (accuracy, largest
logit difference) and measured on this CPU (file size, batch-1 latency, batch-64
throughput). int8 uses static post-training quantization (PyTorch's FX graph mode, x86
engine): convolutions and linear layers run in int8, calibrated on training examples.
Pruned models (fedpipe.prune) come alone and in int8: magnitude-pruned ones are stored
LZMA-compressed, as their zeros only save bytes once compressed; channel-pruned ones are
smaller dense models.
"""

from __future__ import annotations

import io
import json
import lzma
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpipe.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from fedpipe.data import Split
from fedpipe.drift import (
    PROFILE_EXAMPLES,
    PROFILE_FILE,
    DeviceProfiles,
    DriftError,
    Profile,
    probabilities,
)
from fedpipe.prune import channel_prune, magnitude_prune, sparsity
from fedpipe.release import check_release
from fedpipe.rundir import CONFIG_FILE, DEVICE_PROFILE_FILE, MODEL_FILE, write_json
from fedpipe.task import TaskContext, as_split, load_task
from fedpipe.training import validate

__all__ = [
    "ExportError",
    "ExportRow",
    "ReleaseRefused",
    "export_run",
    "load_artifact",
    "load_run_model",
]

EXPORT_DIR = "export"
RELEASE_FILE = "release.json"  # the gate's verdict on each criterion
Module = Callable[[torch.Tensor], torch.Tensor]


class ExportError(RuntimeError):
    """The run directory cannot be exported; the message says what is wrong or missing."""


class ReleaseRefused(ExportError):
    """The model is below the configured release bar; the message names each criterion."""


@dataclass(frozen=True)
class ExportRow:
    artifact: str
    path: str
    size_bytes: int
    accuracy: float
    max_logit_diff: float
    latency_ms_batch1: float
    throughput_batch64: float  # examples per second
    sparsity: float = 0.0  # fraction of conv/linear weights zeroed by pruning


@dataclass
class _Artifacts:
    """What export builds: name -> (stored file, loaded module, sparsity), and what it
    left out and why (kind -> reason), in export.json."""

    built: dict[str, tuple[Path, Module, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def load_run_model(run_dir: Path) -> tuple[nn.Module, RunConfig, tuple[int, ...]]:
    """The final global model of a run, rebuilt from the config stored with it."""
    missing = [n for n in (MODEL_FILE, CONFIG_FILE) if not (run_dir / n).is_file()]
    if missing:
        raise ExportError(f"{run_dir} is not a complete run directory: missing {missing}")
    saved = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    try:
        cfg = config_from_dict(saved["config"])
        shape = tuple(int(d) for d in saved["input_shape"])
        task = load_task(cfg.task)
        model = task.model(TaskContext(cfg, None, {}))
        task.load_weights(model, saved["state_dict"])
    except (KeyError, ConfigError, RuntimeError) as exc:
        raise ExportError(f"{run_dir / MODEL_FILE} does not match its config: {exc}") from exc
    return model.eval(), cfg, shape


def _int8(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():  # torch.ao announces its move to torchao
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (calibration[:1],))
        with torch.no_grad():
            for start in range(0, len(calibration), 64):
                prepared(calibration[start : start + 64])
        quantized: nn.Module = convert_fx(prepared)
    return quantized


@torch.no_grad()
def _check(fn: Module, reference: Module, test: Split) -> tuple[float, float]:
    correct, diff = 0, 0.0
    for start in range(0, len(test), 512):
        x = test.x[start : start + 512]
        logits = fn(x).float()
        diff = max(diff, float((logits - reference(x).float()).abs().max()))
        correct += int((logits.argmax(1) == test.y[start : start + 512]).sum())
    return correct / len(test), diff


@torch.no_grad()
def _speed(fn: Module, x1: torch.Tensor, x64: torch.Tensor) -> tuple[float, float]:
    def median(x: torch.Tensor, reps: int) -> float:
        for _ in range(5):
            fn(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return 1e3 * median(x1, 200), len(x64) / median(x64, 30)


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Module:
    """Trace, save, and load back what a device would load."""
    with torch.no_grad():
        traced = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
    if path.suffix == ".xz":  # zeros cost full bytes in the zip TorchScript writes
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)  # ScriptModule.save takes only a file name
        path.write_bytes(lzma.compress(buffer.getvalue()))
    else:
        traced.save(str(path))
    loaded: Module = load_artifact(path)
    return loaded


def load_artifact(path: Path) -> torch.jit.ScriptModule:
    """A TorchScript artifact as `fedpipe export` stored it: `.pt`, or `.pt.xz` (LZMA, for
    the pruned ones, whose zeros only save bytes once compressed)."""
    if path.suffix == ".xz":
        data = io.BytesIO(lzma.decompress(path.read_bytes()))
        return torch.jit.load(data, map_location="cpu")  # type: ignore[no-untyped-call,no-any-return]
    return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call,no-any-return]


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Module | None:
    """ONNX through onnxruntime when both are installed (optional dependencies)."""
    try:
        import onnx  # type: ignore[import-not-found]  # noqa: F401
        import onnxruntime as ort  # type: ignore[import-not-found]
    except ImportError:
        return None
    torch.onnx.export(model, (example,), str(path), input_names=["x"], dynamic_axes={"x": {0: "n"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def export_run(
    run_dir: Path,
    force: bool = False,
    threads: int = 1,
    overrides: Sequence[str] = (),
    ignore_gate: bool = False,
) -> list[ExportRow]:
    """Write `<run>/export/` (artifacts, export.json, export.md, release.json and the
    drift profile); refuse to overwrite, and refuse a model below the release bar
    (fedpipe.release) unless `ignore_gate`.

    `overrides` (``key=value``) change the run's stored config for this export only, e.g.
    ``export.prune_amount=0.5`` or ``release.min_accuracy=0.98``; the model's own settings
    cannot change (its weights are the run's).
    """
    model, cfg, shape = load_run_model(run_dir)
    cfg = _overridden(cfg, overrides)
    out = run_dir / EXPORT_DIR
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")
    task = load_task(cfg.task)
    raw = task.test_data(TaskContext(cfg, None, {}))
    test = as_split(raw, f"{task.name}.test_data") if raw is not None else None
    if test is None or tuple(test.x.shape[1:]) != shape or len(test) == 0:
        raise ExportError(f"the run's task {task.name!r} has no test data of the model's {shape}")
    gate = check_release(run_dir, cfg.release, validate(model, test).accuracy)
    if not gate.passed and not ignore_gate:
        raise ReleaseRefused(f"release gate failed: {gate.failures()}; nothing was exported")
    out.mkdir(exist_ok=True)
    calibration = (task.calibration_data(TaskContext(cfg, None, {})) or test).x[:2048]
    torch.set_num_threads(threads)
    example = test.x[:1]
    x64 = test.x[:64].repeat(-(-64 // max(len(test), 1)), *[1] * len(shape))[:64]
    artifacts = _Artifacts()
    _add_dense(artifacts, model, example, calibration, out)
    _add_pruned(artifacts, model, cfg.export.prune_amount, example, calibration, out)
    _add_channels(artifacts, model, cfg.export.channel_fraction, example, calibration, out)
    rows = []
    for name, (path, fn, zeros) in artifacts.built.items():
        acc, diff = _check(fn, model, test)
        latency, throughput = _speed(fn, example, x64)
        rows.append(ExportRow(name, path.name, _size(path), acc, diff, latency, throughput, zeros))
    _write_reports(out, rows, threads, shape, cfg, artifacts.skipped)
    write_json(out / RELEASE_FILE, gate.to_json(forced=not gate.passed))
    _profile(model, test, run_dir).save(out / PROFILE_FILE)
    return rows


def _profile(model: nn.Module, test: Split, run_dir: Path) -> Profile:
    """The drift reference a service compares its inputs with: the coordinator's test
    data under the final model, and the devices' histograms from the run's last
    federated evaluation when it had one."""
    x = test.x[:PROFILE_EXAMPLES]
    profile = Profile.reference(x, probabilities(model, x))
    saved = run_dir / DEVICE_PROFILE_FILE
    if not saved.is_file():
        return profile
    try:
        devices = DeviceProfiles.from_json(profile, json.loads(saved.read_text()))
    except (DriftError, KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{saved} does not fit the test data's profile: {exc}") from exc
    return profile.with_devices(devices)


def _overridden(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """The run's config with `overrides` applied and validated like any config."""
    if not overrides:
        return cfg
    new = config_from_dict(apply_overrides(config_to_dict(cfg), overrides))
    if (new.task, new.model) != (cfg.task, cfg.model):
        raise ConfigError(
            f"{list(overrides)}: task and model.* are the run's; export cannot change them"
        )
    return new


def _add_dense(
    artifacts: _Artifacts, model: nn.Module, example: torch.Tensor, calib: torch.Tensor, out: Path
) -> None:
    fp32 = _torchscript(model, example, out / "model_fp32.pt")
    int8 = _torchscript(_int8(model, calib), example, out / "model_int8.pt")
    artifacts.built["torchscript-fp32"] = (out / "model_fp32.pt", fp32, 0.0)
    artifacts.built["torchscript-int8"] = (out / "model_int8.pt", int8, 0.0)
    onnx_fn = _onnx(model, example, out / "model.onnx")
    if onnx_fn is None:
        artifacts.skipped["onnx"] = "onnx or onnxruntime is not installed"
    else:
        artifacts.built["onnx-fp32"] = (out / "model.onnx", onnx_fn, 0.0)


def _add_pruned(
    artifacts: _Artifacts,
    model: nn.Module,
    amount: float,
    example: torch.Tensor,
    calib: torch.Tensor,
    out: Path,
) -> None:
    """Magnitude-pruned float32 and int8, LZMA-compressed (`.pt.xz`, see load_artifact)."""
    if amount == 0:
        artifacts.skipped["pruned"] = "export.prune_amount=0"
        return
    sparse = magnitude_prune(model, amount)
    zeros = sparsity(sparse)
    for name, variant in (("fp32", sparse), ("int8", _int8(sparse, calib))):
        path = out / f"model_pruned_{name}.pt.xz"
        artifacts.built[f"pruned-{name}"] = (path, _torchscript(variant, example, path), zeros)


def _add_channels(
    artifacts: _Artifacts,
    model: nn.Module,
    fraction: float,
    example: torch.Tensor,
    calib: torch.Tensor,
    out: Path,
) -> None:
    """Channel-pruned float32 and int8: smaller dense models, stored as plain `.pt`."""
    if fraction == 0:
        artifacts.skipped["channels"] = "export.channel_fraction=0"
        return
    slim = channel_prune(model, fraction, example)
    if slim is None:
        artifacts.skipped["channels"] = (
            "no prunable conv/linear chain (or torch.fx cannot trace the model)"
        )
        return
    for name, variant in (("fp32", slim), ("int8", _int8(slim, calib))):
        path = out / f"model_channels_{name}.pt"
        artifacts.built[f"channels-{name}"] = (path, _torchscript(variant, example, path), 0.0)


def _size(path: Path) -> int:
    """Bytes of an artifact as stored, with its side files (ONNX may keep weights in
    <name>.data); no artifact's name starts with another's, so none is counted twice."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def markdown_table(rows: list[ExportRow]) -> str:
    base = rows[0]
    lines = [
        "| artifact | size | vs fp32 | sparsity | test acc | max logit diff | batch-1 ms "
        "| speed-up | batch-64 ex/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.artifact} | {r.size_bytes / 1e6:.2f} MB | {base.size_bytes / r.size_bytes:.1f}x "
            f"smaller | {r.sparsity:.2f} | {r.accuracy:.4f} | {r.max_logit_diff:.4f} | "
            f"{r.latency_ms_batch1:.3f} | {base.latency_ms_batch1 / r.latency_ms_batch1:.1f}x | "
            f"{r.throughput_batch64:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _write_reports(
    out: Path,
    rows: list[ExportRow],
    threads: int,
    shape: tuple[int, ...],
    cfg: RunConfig,
    skipped: dict[str, str],
) -> None:
    info: dict[str, Any] = {
        "threads": threads,
        "torch": torch.__version__,
        "input_shape": shape,
        "export": config_to_dict(cfg.export),
        "skipped": skipped,
    }
    (out / "export.json").write_text(
        json.dumps({**info, "artifacts": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    (out / "export.md").write_text(markdown_table(rows))
