from __future__ import annotations

import pytest
import torch

from fedpipe.config import ModelConfig
from fedpipe.models import build_model


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32)), ("resnet18", (3, 32, 32))],
)
def test_output_shape(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(name=name, hidden=16), shape, 10)
    out = model(torch.zeros(4, *shape))
    assert out.shape == (4, 10)


def test_mcmahan_cnn_has_the_papers_parameter_count() -> None:
    model = build_model(ModelConfig(name="cnn"), (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 1_663_370


def test_resnet_keeps_32x32_resolution_in_the_stem() -> None:
    model = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)
    stem = model.conv1(torch.zeros(1, 3, 32, 32))  # type: ignore[operator]
    assert stem.shape[-2:] == (32, 32)


def test_cnn_rejects_flat_inputs() -> None:
    with pytest.raises(ValueError, match="cnn"):
        build_model(ModelConfig(name="cnn"), (64,), 10)
