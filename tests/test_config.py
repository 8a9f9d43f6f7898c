from __future__ import annotations

from pathlib import Path

import pytest

from fedpipe.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_from_toml,
    config_to_toml,
    load_config,
)


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.data.dataset == "digits"


def test_partial_nested_override_keeps_siblings(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlr = 0.2\nbatch_size = 8\n[federation]\nrounds = 4\n")
    # Execute
    cfg = load_config(path, ["train.lr=0.01", "seed=7"])
    # Assert: the overridden key changed, its siblings from the file survived
    assert cfg.train.lr == 0.01
    assert cfg.train.batch_size == 8
    assert cfg.federation.rounds == 4
    assert cfg.seed == 7


def test_override_parses_toml_literals() -> None:
    cfg = load_config(
        None,
        ["simulation.fail_clients=[1, 2]", "data.download=true", "model.name=cnn", "train.lr=1"],
    )
    assert cfg.simulation.fail_clients == (1, 2)
    assert cfg.data.download is True
    assert cfg.model.name == "cnn"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_apply_overrides_does_not_mutate_input() -> None:
    data = {"train": {"lr": 0.1}}
    apply_overrides(data, ["train.lr=0.5"])
    assert data == {"train": {"lr": 0.1}}


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["train.lrr=0.1"], ["train.lrr", "'lr'"]),
        (["nosuch=1"], ["'nosuch'", "allowed keys"]),
        (["model.name=vgg"], ["model.name", "'mlp'", "'cnn'", "'resnet18'"]),
        (["partition.scheme=random"], ["partition.scheme", "'dirichlet'"]),
        (["train.lr=0"], ["train.lr", "(0.0, 10.0]"]),
        (["federation.fraction_train=1.5"], ["federation.fraction_train", "1.0"]),
        (["partition.num_clients=0"], ["partition.num_clients", "[1"]),
        (["train.epochs=1.5"], ["train.epochs", "integer"]),
        (["data.download=yes"], ["data.download", "true or false"]),
        (["train=3"], ["train", "table"]),
        (["simulation.fail_clients=[10]"], ["simulation.fail_clients[]", "9"]),
        (["codec.scheme=int3"], ["codec.scheme", "'int4'", "'topk'"]),
        (["codec.topk=0"], ["codec.topk", "(0.0, 1.0]"]),
        (["codec.topk_bits=3"], ["codec.topk_bits", "(2, 4, 8)"]),
        (["downlink.scheme=int3"], ["downlink.scheme", "'hadamard1'"]),
        (
            ["downlink.scheme=hadamard2", "downlink.chunk_size=1000"],
            ["downlink.chunk_size=1000", "power of two"],
        ),
        (["codec.downlink=int8"], ["codec.downlink", "'max_staleness'"]),
        (["train.lr"], ["key=value"]),
    ],
)
def test_invalid_config_names_key_and_allowed_values(
    overrides: list[str], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_toml_round_trip() -> None:
    cfg = config_from_dict(
        {"seed": 3, "simulation": {"fail_clients": [0]}, "partition": {"scheme": "shards"}}
    )
    assert config_from_toml(config_to_toml(cfg)) == cfg


def test_file_dataset_needs_path() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.dataset=file"])


def test_config_travels_in_flower_run_config() -> None:
    from fedpipe.records import RUN_CONFIG_KEY, config_from_run_config

    cfg = load_config(None, ["seed=5", "partition.scheme=dirichlet"])
    assert config_from_run_config({RUN_CONFIG_KEY: config_to_toml(cfg)}) == cfg
    with pytest.raises(KeyError, match=RUN_CONFIG_KEY):
        config_from_run_config({})
