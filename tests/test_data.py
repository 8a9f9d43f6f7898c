from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpipe.config import DataConfig, PartitionConfig
from fedpipe.data import DatasetNotFoundError, client_shard, load_dataset


def test_embedded_digits_needs_no_files() -> None:
    ds = load_dataset(DataConfig(dataset="digits"))
    assert ds.input_shape == (1, 8, 8)
    assert len(ds.train) + len(ds.test) == 1797
    assert ds.num_classes == 10
    assert abs(float(ds.train.x.mean())) < 1e-4  # standardised


def test_missing_dataset_says_where_it_looked_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path) in msg and "FashionMNIST" in msg and "data.download=true" in msg


def test_missing_cifar_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_device_shard_from_file(tmp_path: Path) -> None:
    path = tmp_path / "shard.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x=rng.normal(size=(30, 1, 4, 4)),
        y=rng.integers(0, 3, 30),
        x_test=rng.normal(size=(5, 1, 4, 4)),
        y_test=np.array([0, 1, 2, 2, 1]),
    )
    ds = load_dataset(DataConfig(dataset="file", path=str(path)))
    assert len(ds.train) == 30 and len(ds.test) == 5
    assert ds.num_classes == 3 and ds.input_shape == (1, 4, 4)


def test_bad_shard_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="missing arrays"):
        load_dataset(DataConfig(dataset="file", path=str(path)))
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        load_dataset(DataConfig(dataset="file", path=str(tmp_path / "none.npz")))


def test_client_shards_partition_the_training_set() -> None:
    data, part = DataConfig(), PartitionConfig(num_clients=4)
    sizes = [len(client_shard(data, part, 0, c)) for c in range(4)]
    assert sum(sizes) == len(load_dataset(data).train)
    with pytest.raises(ValueError, match="client id"):
        client_shard(data, part, 0, 4)


def test_real_mnist_offline(mnist_root: Path) -> None:
    ds = load_dataset(DataConfig(dataset="mnist", root=str(mnist_root)))
    assert len(ds.train) == 60_000 and len(ds.test) == 10_000
    assert ds.input_shape == (1, 28, 28)
    assert sorted(np.unique(ds.test.y.numpy()).tolist()) == list(range(10))


def test_read_only_root_is_used_through_a_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import SHARED_DATA

    raw = SHARED_DATA / "MNIST" / "raw"
    if not any(raw.glob("*.gz")) or raw.stat().st_mode & 0o222:
        pytest.skip("needs the read-only shared MNIST files")
    monkeypatch.setenv("FEDPIPE_CACHE", str(tmp_path))
    ds = load_dataset(DataConfig(dataset="mnist", root=str(SHARED_DATA)))
    assert len(ds.test) == 10_000
    assert (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
