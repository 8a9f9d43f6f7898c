from __future__ import annotations

from pathlib import Path

import pytest

from fedpipe.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (
    sorted(ROOT.glob("simulations/*.toml"))
    + sorted(ROOT.glob("server/*.toml"))
    + sorted(ROOT.glob("clients/*.toml"))
)


def test_every_expected_config_ships() -> None:
    names = {p.stem for p in CONFIGS}
    assert {
        "default",
        "mnist_cnn_iid",
        "mnist_cnn_dirichlet",
        "fashion_mnist_cnn",
        "cifar10_resnet",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_default_config_matches_builtin_defaults() -> None:
    # `fedpipe-sim` with no arguments and simulations/default.toml must be the same run.
    assert load_config(ROOT / "simulations" / "default.toml").train == RunConfig().train
    assert load_config(ROOT / "simulations" / "default.toml").federation == RunConfig().federation
