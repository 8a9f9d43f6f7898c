"""Local training and evaluation loops, and the choice of device.

Data arrive as in-memory tensors (see `fedpipe.data`), so batches are slices of a
permuted index instead of a DataLoader: no worker processes on a 2-core IoT board and
no per-sample Python. On CUDA the shard is pinned once and batches are copied
asynchronously, and the forward pass runs under autocast with a gradient scaler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpipe.config import TrainConfig
from fedpipe.data import Split

__all__ = ["TrainResult", "Validation", "evaluate", "select_device", "train", "validate"]


def select_device(preference: str) -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit choice must exist."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if preference in ("auto", "mps") and mps is not None and mps.is_available():
        return torch.device("mps")
    if preference in ("cuda", "mps"):
        raise RuntimeError(f"train.device={preference!r} requested but not available here")
    return torch.device("cpu")


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over all seen examples
    num_examples: int  # examples in the shard (FedAvg weight)
    steps: int


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def _to_device(data: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type != "cuda":
        return data.x, data.y
    # One pinned host copy, then one async transfer; faster than per-batch pageable copies.
    return (
        data.x.pin_memory().to(device, non_blocking=True),
        data.y.pin_memory().to(device, non_blocking=True),
    )


def train(
    model: nn.Module,
    data: Split,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> TrainResult:
    """Train `model` in place for `cfg.epochs` over `data`; shuffling draws from `generator`."""
    if len(data) == 0:
        raise ValueError("cannot train on an empty shard")
    device = device or select_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    model.to(device).train()
    x, y = _to_device(data, device)
    opt = _optimizer(model, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loss_fn = nn.CrossEntropyLoss()
    # Accumulate on the device: a float() per step would force a CUDA sync per batch.
    total = torch.zeros((), device=device)
    seen, steps = 0, 0
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        for start in range(0, len(data), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(model(x[idx]), y[idx])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.detach().float() * len(idx)
            seen += len(idx)
            steps += 1
    mean_loss = float(total) / seen
    if not math.isfinite(mean_loss):
        raise FloatingPointError("training diverged (non-finite loss); lower train.lr")
    return TrainResult(loss=mean_loss, num_examples=len(data), steps=steps)


@dataclass(frozen=True)
class Validation:
    loss: float  # mean cross-entropy
    accuracy: float
    # (classes, classes) int64: row = true class, column = predicted; None when a task's
    # own evaluate scores a model fedpipe cannot read predictions from
    confusion: np.ndarray | None


@torch.no_grad()
def validate(
    model: nn.Module, data: Split, batch_size: int = 1024, device: torch.device | None = None
) -> Validation:
    """Loss, accuracy and the confusion matrix of `model` on `data`, in one pass."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty split")
    device = device or torch.device("cpu")
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss, pairs = 0.0, []
    classes = 0
    for start in range(0, len(data), batch_size):
        xb = data.x[start : start + batch_size].to(device)
        yb = data.y[start : start + batch_size].to(device)
        logits = model(xb).float()
        loss += float(loss_fn(logits, yb))
        classes = logits.shape[1]
        pairs.append(yb * classes + logits.argmax(1))  # (B,) flat confusion cell
    cells = torch.bincount(torch.cat(pairs).cpu(), minlength=classes * classes)
    confusion = cells[: classes * classes].numpy().reshape(classes, classes).astype(np.int64)
    return Validation(loss / len(data), float(np.trace(confusion)) / len(data), confusion)


def evaluate(
    model: nn.Module, data: Split, batch_size: int = 1024, device: torch.device | None = None
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` on `data`."""
    v = validate(model, data, batch_size, device)
    return v.loss, v.accuracy
