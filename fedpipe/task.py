"""The task API: your model, your data, your training loop, in fedpipe's pipeline.

A task is a Python module (config key `task = "mypkg.task"`, imported from the
environment of whoever runs it: nothing is installed at run time) with these functions,
each taking a `TaskContext`:

    def model(ctx) -> torch.nn.Module                    # required: a fresh model
    def train_data(ctx) -> Split | torch.utils.data.Dataset   # required: this client's
    def test_data(ctx) -> Split | Dataset | None          # the server's held-out data
    def eval_data(ctx) -> Split | Dataset                 # a client's own held-out data
                                                          # (default: train_data)
    def train(model, data, ctx) -> TrainResult            # default: fedpipe's loop
    def evaluate(model, data, ctx) -> tuple[float, float] # (loss, accuracy); default: fedpipe's
    def calibration_data(ctx) -> Split | Dataset          # int8 export; default: test_data

`fedpipe.builtin_task` is fedpipe's own registry models and datasets on this API (the
default), so a user task and the built-ins take one path: the ClientApp, the ServerApp,
simulation and deployment call only these functions. A Dataset given to fedpipe's
default loops is read into tensors (per-epoch augmentation needs your own `train`).

A task function that raises, or returns the wrong kind of thing (a model whose weights
do not fit the global model, data that is not data), fails with a TaskError naming it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedpipe.config import RunConfig
from fedpipe.data import Split
from fedpipe.training import TrainResult, Validation
from fedpipe.training import train as fedpipe_train
from fedpipe.training import validate as fedpipe_validate

__all__ = ["BUILTIN", "Task", "TaskContext", "TaskError", "as_split", "load_task"]

BUILTIN = "fedpipe.builtin_task"
log = logging.getLogger(__name__)


class TaskError(RuntimeError):
    """A task function failed or returned something fedpipe cannot use."""


@dataclass(frozen=True)
class TaskContext:
    """What a task function may need to know about where it runs."""

    config: RunConfig
    client_id: int | None  # None: the server (initial model, central evaluation)
    node_config: Mapping[str, Any]  # a device's own settings (e.g. its data path)
    server_round: int = 0
    device: torch.device = torch.device("cpu")
    generator: torch.Generator | None = None  # a client's per-round shuffling


Data = Split | Dataset  # type: ignore[type-arg]


def as_split(data: object, where: str) -> Split:
    """`data` as tensors for fedpipe's loops: a Split as it is, a Dataset read once."""
    if isinstance(data, Split):
        return data
    if isinstance(data, Dataset):
        try:
            items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
            x = torch.stack([torch.as_tensor(item[0], dtype=torch.float32) for item in items])
            y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        except Exception as exc:
            raise TaskError(
                f"{where} returned a Dataset whose items are not (input, label) pairs: {exc}"
            ) from exc
        return Split(x, y)
    raise TaskError(f"{where} returned {type(data).__name__}, not a Split or a torch Dataset")


class Task:
    """A task module's functions, each failing with a TaskError that names it."""

    def __init__(self, module: ModuleType) -> None:
        self.name = module.__name__
        missing = [f for f in ("model", "train_data") if not callable(getattr(module, f, None))]
        if missing:
            raise TaskError(f"task {self.name!r} has no function {' or '.join(missing)}")
        self._module = module
        # The last Dataset fedpipe's default evaluate read into tensors (the coordinator
        # evaluates the same test set every round: read it once).
        self._read: tuple[object, Split] | None = None

    def _fn(self, name: str) -> Callable[..., Any] | None:
        fn = getattr(self._module, name, None)
        return fn if callable(fn) else None

    def _call(self, name: str, *args: Any) -> Any:
        fn = self._fn(name)
        assert fn is not None
        try:
            return fn(*args)
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(
                f"task function {self.name}.{name} raised {type(exc).__name__}: {exc}"
            ) from exc

    def model(self, ctx: TaskContext) -> nn.Module:
        model = self._call("model", ctx)
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"{self.name}.model returned {type(model).__name__}, not a torch Module"
            )
        return model

    def load_weights(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """The global weights into a model the task built; a mismatch names `model`."""
        try:
            model.load_state_dict(dict(weights), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise TaskError(
                f"{self.name}.model builds a model that does not fit the global model: "
                f"{' '.join(line.strip() for line in first[:3])}"
            ) from exc

    def train_data(self, ctx: TaskContext) -> Data:
        data = self._call("train_data", ctx)
        if not isinstance(data, Split | Dataset):
            raise TaskError(f"{self.name}.train_data returned {type(data).__name__}, not data")
        return data

    def test_data(self, ctx: TaskContext) -> Data | None:
        if self._fn("test_data") is None:
            return None
        data = self._call("test_data", ctx)
        if data is not None and not isinstance(data, Split | Dataset):
            raise TaskError(f"{self.name}.test_data returned {type(data).__name__}, not data")
        return data

    def calibration_data(self, ctx: TaskContext) -> Split | None:
        """Inputs that set the int8 export's activation ranges (None: use the test data)."""
        if self._fn("calibration_data") is None:
            return None
        return as_split(self._call("calibration_data", ctx), f"{self.name}.calibration_data")

    def train(self, model: nn.Module, data: Data, ctx: TaskContext) -> TrainResult:
        if self._fn("train") is None:
            split = as_split(data, f"{self.name}.train_data")
            generator = ctx.generator or torch.Generator().manual_seed(ctx.config.seed)
            return fedpipe_train(model, split, ctx.config.train, generator, ctx.device)
        result = self._call("train", model, data, ctx)
        if not isinstance(result, TrainResult) or result.num_examples < 1:
            raise TaskError(
                f"{self.name}.train returned {result!r}; return a fedpipe.training.TrainResult "
                "with num_examples >= 1"
            )
        return result

    def eval_data(self, ctx: TaskContext) -> Data:
        """A client's own held-out data for federated evaluation (default: its training
        data, which flatters the model: give a task `eval_data`, or set
        partition.holdout for the built-in one)."""
        if self._fn("eval_data") is None:
            return self.train_data(ctx)
        data = self._call("eval_data", ctx)
        if not isinstance(data, Split | Dataset):
            raise TaskError(f"{self.name}.eval_data returned {type(data).__name__}, not data")
        return data

    def _split(self, data: Data) -> Split:
        read = self._read  # one read, in case a server and a client share the task
        if read is None or read[0] is not data:
            read = self._read = (data, as_split(data, f"{self.name} data"))
        return read[1]

    def evaluate(self, model: nn.Module, data: Data, ctx: TaskContext) -> tuple[float, float]:
        if self._fn("evaluate") is None:
            v = fedpipe_validate(model, self._split(data), device=ctx.device)
            return v.loss, v.accuracy
        out = self._call("evaluate", model, data, ctx)
        try:
            loss, accuracy = (float(v) for v in out)
        except (TypeError, ValueError) as exc:
            raise TaskError(f"{self.name}.evaluate returned {out!r}, not (loss, accuracy)") from exc
        return loss, accuracy

    def validate(self, model: nn.Module, data: Data, ctx: TaskContext) -> Validation:
        """The coordinator's evaluation: loss and accuracy as the task defines them, and
        the confusion matrix of the model's argmax over its outputs (one pass with
        fedpipe's loop; a task's own evaluate gets a second pass, and no matrix if its model
        is not a classifier of the data's inputs)."""
        if self._fn("evaluate") is None:
            return fedpipe_validate(model, self._split(data), device=ctx.device)
        loss, accuracy = self.evaluate(model, data, ctx)
        try:
            confusion = fedpipe_validate(model, self._split(data), device=ctx.device).confusion
        except Exception as exc:  # noqa: BLE001 - a model that is not a classifier of (x, y)
            log.warning("no per-class metrics for task %s: %s", self.name, exc)
            confusion = None
        return Validation(loss, accuracy, confusion)


@lru_cache(maxsize=8)
def load_task(spec: str) -> Task:
    """The task module `spec` names (empty: fedpipe's built-in task)."""
    name = spec or BUILTIN
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise TaskError(
            f"task {name!r} cannot be imported ({exc}); install the package that holds it "
            "in this environment (every device and the coordinator need it)"
        ) from exc
    return Task(module)
