"""From a run to deployable models: TorchScript float32, int8 for CPU, ONNX if available.

Each artifact is checked against the float32 model on the test set (accuracy, largest
logit difference) and measured on this CPU (file size, batch-1 latency, batch-64
throughput). int8 uses static post-training quantization (PyTorch's FX graph mode, x86
engine): convolutions and linear layers run in int8, calibrated on training examples.
"""

from __future__ import annotations

import io
import json
import lzma
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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
from fedpipe.release import check_release
from fedpipe.rundir import CONFIG_FILE, DEVICE_PROFILE_FILE, MODEL_FILE, write_json
from fedpipe.task import TaskContext, as_split, load_task

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


def _with_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """The run's config with `release.*` / `export.*` overrides from the command line
    (the model's own settings are what it was trained with: not overridable)."""
    for item in overrides:
        if not item.strip().startswith(("release.", "export.")):
            raise ExportError(f"{item!r}: export takes only release.* and export.* settings")
    try:
        return config_from_dict(apply_overrides(config_to_dict(cfg), overrides))
    except ConfigError as exc:
        raise ExportError(str(exc)) from exc


def export_run(
    run_dir: Path,
    force: bool = False,
    threads: int = 1,
    overrides: Sequence[str] = (),
    ignore_gate: bool = False,
) -> list[ExportRow]:
    """Write `<run>/export/` (artifacts, export.json, export.md, release.json and the
    drift profile); refuse to overwrite, and refuse a model below the release bar
    (fedpipe.release) unless `ignore_gate`."""
    model, cfg, shape = load_run_model(run_dir)
    cfg = _with_overrides(cfg, overrides)
    out = run_dir / EXPORT_DIR
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")
    task = load_task(cfg.task)
    raw = task.test_data(TaskContext(cfg, None, {}))
    test = as_split(raw, f"{task.name}.test_data") if raw is not None else None
    if test is None or tuple(test.x.shape[1:]) != shape or len(test) == 0:
        raise ExportError(f"the run's task {task.name!r} has no test data of the model's {shape}")
    gate = check_release(run_dir, cfg.release, _check(model, model, test)[0])
    if not gate.passed and not ignore_gate:
        raise ReleaseRefused(f"release gate failed: {gate.failures()}; nothing was exported")
    out.mkdir(exist_ok=True)
    calibration = task.calibration_data(TaskContext(cfg, None, {})) or test
    torch.set_num_threads(threads)
    example = test.x[:1]
    x64 = test.x[:64].repeat(-(-64 // max(len(test), 1)), *[1] * len(shape))[:64]
    candidates: dict[str, tuple[Path, Module]] = {
        "torchscript-fp32": (
            out / "model_fp32.pt",
            _torchscript(model, example, out / "model_fp32.pt"),
        ),
        "torchscript-int8": (
            out / "model_int8.pt",
            _torchscript(_int8(model, calibration.x[:2048]), example, out / "model_int8.pt"),
        ),
    }
    onnx_fn = _onnx(model, example, out / "model.onnx")
    if onnx_fn is not None:
        candidates["onnx-fp32"] = (out / "model.onnx", onnx_fn)
    rows = []
    for name, (path, fn) in candidates.items():
        acc, diff = _check(fn, model, test)
        latency, throughput = _speed(fn, example, x64)
        rows.append(ExportRow(name, path.name, _size(path), acc, diff, latency, throughput))
    _write_reports(out, rows, threads, shape)
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


def _size(path: Path) -> int:
    """Bytes of an artifact, with its side files (ONNX may keep weights in <name>.data)."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def markdown_table(rows: list[ExportRow]) -> str:
    base = rows[0]
    lines = [
        "| artifact | size | vs fp32 | test acc | max logit diff | batch-1 ms | speed-up "
        "| batch-64 ex/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.artifact} | {r.size_bytes / 1e6:.2f} MB | {base.size_bytes / r.size_bytes:.1f}x "
            f"smaller | {r.accuracy:.4f} | {r.max_logit_diff:.4f} | {r.latency_ms_batch1:.3f} | "
            f"{base.latency_ms_batch1 / r.latency_ms_batch1:.1f}x | {r.throughput_batch64:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _write_reports(out: Path, rows: list[ExportRow], threads: int, shape: tuple[int, ...]) -> None:
    info: dict[str, Any] = {"threads": threads, "torch": torch.__version__, "input_shape": shape}
    (out / "export.json").write_text(
        json.dumps({**info, "artifacts": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    (out / "export.md").write_text(markdown_table(rows))
