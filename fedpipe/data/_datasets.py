"""Dataset registry: every dataset becomes in-memory float tensors.

Datasets here are small enough (<= CIFAR-10) to hold as tensors, which lets local
training slice batches directly instead of paying per-sample Python transforms.
Nothing is downloaded unless the config says so: a missing dataset is one clear error
that says where fedpipe looked and how to get the files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedpipe.config import DataConfig
from fedpipe.data._userdata import load_image_folder, load_table

__all__ = ["DatasetNotFoundError", "Split", "TensorDataset", "load_dataset", "search_roots"]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where fedpipe looked."""


@dataclass(frozen=True)
class Split:
    """One split: images/features `x` (N, C, H, W) float32 normalised, labels `y` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class TensorDataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def _normalise(images: np.ndarray | torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 images -> float32 (N, C, H, W), zero mean and unit variance per channel."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
    if x.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
        x = x.unsqueeze(1)
    elif channels_last:  # (N, H, W, C) -> (N, C, H, W)
        x = x.permute(0, 3, 1, 2).contiguous()
    return x


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Statistics from the training split only, so the test set stays unseen.
    dims = [d for d in range(train.ndim) if d != 1]
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def search_roots(cfg: DataConfig) -> list[Path]:
    """Folders searched for torchvision datasets, in order."""
    if cfg.root:
        return [Path(cfg.root)]
    roots = [Path("data"), Path("../shared/data")]
    env = os.environ.get("FEDPIPE_DATA")
    return ([Path(env)] if env else []) + roots


def _writable_root(root: Path, folder: str) -> Path:
    """torchvision extracts next to the .gz files; copy them aside if `root` is read-only."""
    raw = root / folder / "raw"
    # Mode bits too: root passes os.access on a folder that is marked read-only.
    if os.access(raw, os.W_OK) and raw.stat().st_mode & 0o222:
        return root
    cache = Path(os.environ.get("FEDPIPE_CACHE", Path.home() / ".cache" / "fedpipe")) / "data"
    target = cache / folder / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for src in raw.iterdir():
        dst = target / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
    return cache


def _find_root(cfg: DataConfig, *patterns: str) -> Path | None:
    """First search root holding a file that matches one of the glob `patterns`."""
    for root in search_roots(cfg):
        if any(next(iter(root.glob(p)), None) for p in patterns):
            return root
    return None


def _load_mnist_family(cfg: DataConfig, name: str) -> TensorDataset:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    folder = cls.__name__
    root = _find_root(cfg, f"{folder}/raw/train-images-idx3-ubyte*")
    if root is None and not cfg.download:
        _missing(cfg, name, folder, "raw/train-images-idx3-ubyte.gz (and the other 3 files)")
    if root is None:
        root = search_roots(cfg)[0]
    root = _writable_root(root, folder) if (root / folder / "raw").exists() else root
    # download=True is offline when the verified .gz files are present: torchvision checks
    # their MD5 and only extracts them.
    train = cls(str(root), train=True, download=True)
    test = cls(str(root), train=False, download=True)
    x_train, x_test = _standardise(_normalise(train.data, False), _normalise(test.data, False))
    return TensorDataset(
        name,
        Split(x_train, train.targets.long()),
        Split(x_test, test.targets.long()),
        10,
    )


def _load_cifar10(cfg: DataConfig) -> TensorDataset:
    from torchvision import datasets

    root = _find_root(cfg, "cifar-10-batches-py/data_batch_1", "cifar-10-python.tar.gz")
    if root is None and not cfg.download:
        _missing(cfg, "cifar10", "", "cifar-10-python.tar.gz or cifar-10-batches-py/")
    root = root or search_roots(cfg)[0]
    # download=True with the verified tarball present only extracts it (MD5-checked).
    train = datasets.CIFAR10(str(root), train=True, download=True)
    test = datasets.CIFAR10(str(root), train=False, download=True)
    x_train, x_test = _standardise(_normalise(train.data, True), _normalise(test.data, True))
    return TensorDataset(
        "cifar10",
        Split(x_train, torch.as_tensor(train.targets).long()),
        Split(x_test, torch.as_tensor(test.targets).long()),
        10,
    )


def _load_digits(cfg: DataConfig) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits: 1797 images, ships inside the wheel, no network."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    # A fixed, stratification-free 80/20 split, independent of the run seed so every run
    # is evaluated on the same held-out images.
    order = np.random.default_rng(1234).permutation(len(labels))
    cut = int(0.8 * len(labels))
    tr, te = order[:cut], order[cut:]
    x = torch.from_numpy(images).unsqueeze(1)
    x_train, x_test = _standardise(x[tr], x[te])
    y = torch.from_numpy(labels)
    return TensorDataset("digits", Split(x_train, y[tr]), Split(x_test, y[te]), 10)


def _load_file(cfg: DataConfig) -> TensorDataset:
    """An .npz with `x`, `y`, optionally `x_test`, `y_test`, `num_classes` (a device shard)."""
    path = Path(cfg.path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"data.path={cfg.path!r}: no such file. Write one with numpy.savez(path, x=..., y=...)"
        )
    with np.load(path) as npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; found {npz.files}")
        x, y = np.asarray(npz["x"], np.float32), np.asarray(npz["y"], np.int64)
        has_test = "x_test" in npz.files and "y_test" in npz.files
        x_test = np.asarray(npz["x_test"], np.float32) if has_test else x[:0]
        y_test = np.asarray(npz["y_test"], np.int64) if has_test else y[:0]
        # A shard may lack some labels: its file says how many classes the model has.
        stored = int(npz["num_classes"]) if "num_classes" in npz.files else 0
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    num_classes = max(stored, int(max(y.max(initial=0), y_test.max(initial=0))) + 1)
    return TensorDataset(
        path.stem,
        Split(torch.from_numpy(x), torch.from_numpy(y)),
        Split(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        num_classes,
    )


def _load_user(cfg: DataConfig) -> TensorDataset:
    """An image folder or a table (fedpipe.data._userdata)."""
    load = load_image_folder if cfg.dataset == "imagefolder" else load_table
    x, y, x_test, y_test, num_classes = load(cfg)
    x_train, x_held = _standardise(torch.from_numpy(x), torch.from_numpy(x_test))
    train, test = Split(x_train, torch.from_numpy(y)), Split(x_held, torch.from_numpy(y_test))
    return TensorDataset(Path(cfg.path).stem, train, test, num_classes)


def _missing(cfg: DataConfig, name: str, folder: str, what: str) -> None:
    looked = ", ".join(str((r / folder).resolve()) for r in search_roots(cfg))
    raise DatasetNotFoundError(
        f"dataset {name!r} not found: looked for {what} in {looked}. Put the files under "
        f"<root>/{folder} and set data.root=<root> (or $FEDPIPE_DATA), or set "
        f"data.download=true on a machine with internet access."
    )


_LOADERS: dict[str, Callable[[DataConfig], TensorDataset]] = {
    "digits": _load_digits,
    "mnist": lambda cfg: _load_mnist_family(cfg, "mnist"),
    "fashion_mnist": lambda cfg: _load_mnist_family(cfg, "fashion_mnist"),
    "cifar10": _load_cifar10,
    "file": _load_file,
    "imagefolder": _load_user,
    "table": _load_user,
}


@lru_cache(maxsize=2)
def load_dataset(cfg: DataConfig) -> TensorDataset:
    """Load (once per process) the dataset named by `cfg.dataset`."""
    return _LOADERS[cfg.dataset](cfg)
