"""Pruning a trained model for export: zeroed weights (smaller once compressed) and
removed channels (a smaller dense model that runs faster).

Magnitude pruning zeroes the smallest weights across all conv/linear layers at once
(global, unstructured). A dense kernel still multiplies the zeros, so it buys bytes on
disk (after compression), not speed. Channel pruning removes whole output channels of a
conv (hidden units of a linear layer) together with the matching inputs of the one layer
that reads them, and rebuilds both as smaller modules: only that physical removal makes
the CPU do less work, since a mask of zeros keeps every multiplication.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import prune

__all__ = ["channel_prune", "magnitude_prune", "sparsity"]

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Ops that act on each channel on its own: a removed channel only ever reaches itself.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardtanh, nn.Identity, nn.Dropout,
)  # fmt: skip
POOL_MODULES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d,
)  # fmt: skip
ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.leaky_relu, F.dropout,
}  # fmt: skip
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}


def _weighted(model: nn.Module) -> list[nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear]:
    return [m for m in model.modules() if isinstance(m, WEIGHTED)]


def magnitude_prune(model: nn.Module, amount: float) -> nn.Module:
    """A copy of `model` with the `amount` smallest-magnitude conv/linear weights zeroed.

    Global, so layers with many redundant weights (the CNN's fc 3136x512) give up more
    than small ones; `prune.remove` bakes the mask in, leaving a plain module to trace.
    """
    pruned = copy.deepcopy(model)
    params = [(m, "weight") for m in _weighted(pruned)]
    if params and amount > 0:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in params:
            prune.remove(module, name)  # type: ignore[no-untyped-call]
    return pruned


def sparsity(model: nn.Module) -> float:
    """The fraction of conv/linear weights that are exactly zero."""
    weights = [m.weight for m in _weighted(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int(torch.count_nonzero(w == 0)) for w in weights)
    return zeros / total if total else 0.0


# --- structured (channel) pruning --------------------------------------------------------


@dataclass
class _Chain:
    """A producer whose output channels reach exactly one consumer, through per-channel ops.

    `block`: consumer input columns per producer channel (1, or H*W after a Flatten).
    """

    producer: str
    consumer: str
    norms: list[str] = field(default_factory=list)
    block: int = 1


def channel_prune(model: nn.Module, fraction: float, example: torch.Tensor) -> nn.Module | None:
    """A copy of `model` with `fraction` of the output channels of every safe conv/linear
    layer removed (lowest L1 norm first); None when no layer can be pruned safely.

    Safe means (found with torch.fx on `example`): the layer's output passes only through
    per-channel ops (activations, pooling, batch norm, dropout, a Flatten) to exactly one
    conv or linear layer. An output with several users, one that feeds a residual add or
    a concat, or the model's own output keeps all its channels.
    """
    chains = _chains(model, example)
    if not chains:
        return None
    pruned = copy.deepcopy(model)
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}
    for chain in chains:
        keep = _strongest(pruned.get_submodule(chain.producer), fraction)
        out_keep[chain.producer] = keep
        for name in chain.norms:
            out_keep[name] = keep
        columns = keep[:, None] * chain.block + torch.arange(chain.block)
        in_keep[chain.consumer] = columns.flatten()
    for name in out_keep.keys() | in_keep.keys():
        old = pruned.get_submodule(name)
        _replace(pruned, name, _shrunk(old, out_keep.get(name), in_keep.get(name)))
    return pruned


def _strongest(layer: nn.Module, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the output channels to keep: all but the `fraction` with the
    smallest L1 norm of their weights, at least one."""
    assert isinstance(layer, nn.Conv2d | nn.Linear)  # a chain's producer
    norms = layer.weight.detach().abs().flatten(1).sum(1)
    keep = max(1, len(norms) - round(fraction * len(norms)))
    return torch.sort(torch.topk(norms, keep).indices).values


def _chains(model: nn.Module, example: torch.Tensor) -> list[_Chain]:
    """Every safe producer -> consumer chain; none when torch.fx cannot trace the model."""
    try:
        traced = fx.symbolic_trace(model)
        ShapeProp(traced).propagate(example)
    except Exception:  # data-dependent control flow, untraceable ops: leave it whole
        return []
    modules = dict(traced.named_modules())
    calls = Counter(n.target for n in traced.graph.nodes if n.op == "call_module")
    reused = {name for name, count in calls.items() if count > 1}  # one module, two calls
    chains = []
    for node in traced.graph.nodes:
        if node.op == "call_module" and node.target not in reused:
            chain = _follow(node, modules, reused)
            if chain is not None:
                chains.append(chain)
    return chains


def _follow(start: fx.Node, modules: dict[str, nn.Module], reused: set[str]) -> _Chain | None:
    """The chain from `start` to its one consumer, or None where any step is unsafe."""
    producer = modules[str(start.target)]
    shape = start.meta["tensor_meta"].shape
    conv = isinstance(producer, nn.Conv2d) and producer.groups == 1 and len(shape) == 4
    if not (conv or (isinstance(producer, nn.Linear) and len(shape) == 2)):
        return None
    chain, node, flat = _Chain(str(start.target), ""), start, False
    while True:
        users = list(node.users)
        if len(users) != 1:  # several readers (a residual, a concat), or none
            return None
        prev, (node,) = node, users
        step = _step(node, prev, modules, conv, flat)
        if step in ("consumer", "norm") and str(node.target) in reused:
            return None  # its weights also serve another call; a shared ReLU is fine
        if step == "consumer":
            chain.consumer = str(node.target)
            return chain
        if step == "norm":
            chain.norms.append(str(node.target))
        elif step == "flatten":
            chain.block, flat = math.prod(prev.meta["tensor_meta"].shape[2:]), True
        elif step != "pass":
            return None


def _step(
    node: fx.Node, prev: fx.Node, modules: dict[str, nn.Module], conv: bool, flat: bool
) -> str:
    """What `node` does to the channels of `prev`: "pass" (per channel), "norm" (a batch
    norm to shrink too), "flatten", "consumer", or "stop" (unsafe)."""
    spatial = conv and not flat  # (B, C, H, W): pooling and 2-D batch norm keep channels
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, nn.Conv2d):
            return "consumer" if spatial and m.groups == 1 else "stop"
        if isinstance(m, nn.Linear):
            return "consumer" if flat or not conv else "stop"
        if isinstance(m, _BatchNorm) and not flat:
            return "norm"
        if isinstance(m, nn.Flatten) and spatial and (m.start_dim, m.end_dim) == (1, -1):
            return "flatten"
        if isinstance(m, ELEMENTWISE_MODULES) or (spatial and isinstance(m, POOL_MODULES)):
            return "pass"
        return "stop"
    if not _only_input(node, prev):
        return "stop"
    if node.op == "call_function":
        if node.target in ELEMENTWISE_FUNCTIONS or (spatial and node.target in POOL_FUNCTIONS):
            return "pass"
        if node.target is torch.flatten and spatial and _flattens_channels(node):
            return "flatten"
    if node.op == "call_method":
        if node.target in ELEMENTWISE_METHODS:
            return "pass"
        if node.target == "flatten" and spatial and _flattens_channels(node):
            return "flatten"
    return "stop"


def _only_input(node: fx.Node, prev: fx.Node) -> bool:
    """`prev` is the first argument and no other tensor is involved (no add, no cat)."""
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
    return bool(node.args) and node.args[0] is prev and not others


def _flattens_channels(node: fx.Node) -> bool:
    """torch.flatten(x, 1) / x.flatten(1): (B, C, H, W) -> (B, C*H*W)."""
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return (start, end) == (1, -1)


def _shrunk(old: nn.Module, out: torch.Tensor | None, inp: torch.Tensor | None) -> nn.Module:
    """A smaller copy of a conv, linear or batch norm layer keeping channels `out` and
    input columns `inp` (None: all)."""
    new: nn.Module
    if isinstance(old, _BatchNorm):
        assert out is not None
        new = copy.deepcopy(old)
        new.num_features = len(out)
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(old, name)
            if tensor is not None:
                _set(new, name, tensor.detach()[out].clone())
        return new
    assert isinstance(old, nn.Conv2d | nn.Linear)
    weight = old.weight.detach()
    weight = weight if out is None else weight[out]
    weight = weight if inp is None else weight[:, inp]
    new = copy.deepcopy(old)
    if isinstance(new, nn.Conv2d):
        new.out_channels, new.in_channels = weight.shape[:2]
    else:
        new.out_features, new.in_features = weight.shape
    _set(new, "weight", weight.clone())
    if old.bias is not None:
        bias = old.bias.detach()
        _set(new, "bias", (bias if out is None else bias[out]).clone())
    return new


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer with a tensor of another shape, keeping its kind."""
    if isinstance(getattr(module, name), nn.Parameter):
        setattr(module, name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)
