from __future__ import annotations

import pytest
import torch

from fedpipe.config import ModelConfig, TrainConfig
from fedpipe.data import Split
from fedpipe.models import build_model
from fedpipe.seed import round_generator
from fedpipe.training import evaluate, select_device, train


def _blobs(n: int = 200) -> Split:
    """Two well-separated Gaussian blobs: any working training loop learns them."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 2, 2, generator=gen) + (y.float() * 4 - 2).view(-1, 1, 1, 1)
    return Split(x, y.long())


def _fit(seed: int) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=8), (1, 2, 2), 2)
    res = train(
        model, _blobs(), TrainConfig(epochs=3, lr=0.1, device="cpu"), round_generator(seed, 0, 1)
    )
    return model, res.loss


def test_training_learns_and_evaluate_reports_accuracy() -> None:
    model, _ = _fit(0)
    loss, acc = evaluate(model, _blobs())
    assert acc > 0.95 and loss < 0.3


def test_training_is_deterministic_for_a_seed() -> None:
    (m1, l1), (m2, l2), (_, l3) = _fit(0), _fit(0), _fit(1)
    assert l1 == l2
    assert all(
        torch.equal(a, b)
        for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    assert l1 != l3  # another seed shuffles differently


def test_round_generator_differs_by_client_and_round() -> None:
    draws = {
        tuple(torch.randperm(10, generator=round_generator(0, c, r)).tolist())
        for c in range(3)
        for r in range(3)
    }
    assert len(draws) == 9


def test_select_device() -> None:
    assert select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    mps = getattr(torch.backends, "mps", None)
    if expected == "cpu" and mps is not None and mps.is_available():
        expected = "mps"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="train.device"):
            select_device("cuda")


def test_empty_shard_is_rejected() -> None:
    model = build_model(ModelConfig(name="mlp", hidden=4), (1, 2, 2), 2)
    with pytest.raises(ValueError, match="empty"):
        train(
            model,
            Split(torch.zeros(0, 1, 2, 2), torch.zeros(0).long()),
            TrainConfig(),
            torch.Generator(),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_path_trains() -> None:
    model = build_model(ModelConfig(name="mlp", hidden=8), (1, 2, 2), 2)
    res = train(
        model,
        _blobs(),
        TrainConfig(epochs=3, lr=0.1, device="cuda", amp=True),
        round_generator(0, 0, 1),
        torch.device("cuda"),
    )
    loss, acc = evaluate(model, _blobs(), device=torch.device("cuda"))
    assert res.loss < 1.0 and acc > 0.95
