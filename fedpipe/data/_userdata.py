"""Data in the user's own format: an image folder, or a table (CSV or Parquet).

Both become the same in-memory tensors as the registry datasets, so partitioning
(`fedpipe partition`), simulation and deployment treat them alike:

- `data.dataset = "imagefolder"`: torchvision's ImageFolder layout, one sub-folder per
  class (`<path>/<class>/<image>`), or `<path>/train/<class>/...` beside
  `<path>/test/<class>/...`. Images are converted to `data.channels` (1 or 3) and
  resized to `data.image_size` (0: they must already share one size).
- `data.dataset = "table"`: a CSV file with a header row, or a Parquet file (needs
  `pyarrow`): the column `data.label` is the class (numbers or names), every other
  column a numeric feature.

Without a separate test set (`<path>/test`, `data.test_path`) a fixed `data.test_fraction`
of the examples is held out, drawn independently of the run seed so every run is
evaluated on the same examples. The loaders return raw float32 arrays; `fedpipe.data`
standardises them with training statistics as it does every dataset.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedpipe.config import DataConfig

__all__ = ["Arrays", "DataFormatError", "load_image_folder", "load_table"]

# x_train, y_train, x_test, y_test (float32 features, int64 labels), number of classes
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]

_HOLDOUT_SEED = 1234  # the held-out examples never depend on the run


class DataFormatError(ValueError):
    """The user's data cannot be read as the configured kind; the message says why."""


def _holdout(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(_HOLDOUT_SEED).permutation(n)
    cut = n - int(round(fraction * n))
    return order[:cut], order[cut:]


# -- image folders ----------------------------------------------------------------------


def _read_images(
    folder: Path, cfg: DataConfig, classes: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no images
        raise DataFormatError(f"data.path={str(folder)!r}: {exc}") from exc
    if classes is not None and list(ds.classes) != list(classes):
        raise DataFormatError(
            f"{folder}: classes {ds.classes} differ from the training set's {list(classes)}"
        )
    mode = "L" if cfg.channels == 1 else "RGB"
    images, labels, shapes = [], [], set()
    for path, label in ds.samples:
        img = ds.loader(path).convert(mode)
        if cfg.image_size:
            img = img.resize((cfg.image_size, cfg.image_size))
        a = np.asarray(img, np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
        shapes.add(a.shape)
        images.append(a)
        labels.append(label)
    if len(shapes) > 1:
        raise DataFormatError(
            f"{folder}: images of {len(shapes)} different sizes {sorted(shapes)[:3]}; set "
            "data.image_size to resize them to one"
        )
    return np.stack(images), np.asarray(labels, np.int64), list(ds.classes)


def load_image_folder(cfg: DataConfig) -> Arrays:
    """(x_train, y_train, x_test, y_test, number of classes) from an image folder."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataFormatError(f"data.path={cfg.path!r} is not a folder")
    if (root / "train").is_dir():
        x, y, classes = _read_images(root / "train", cfg, None)
        if (root / "test").is_dir():
            x_test, y_test, _ = _read_images(root / "test", cfg, classes)
        else:
            x_test, y_test = x[:0], y[:0]
    else:
        x_all, y_all, classes = _read_images(root, cfg, None)
        tr, te = _holdout(len(y_all), cfg.test_fraction)
        x, y, x_test, y_test = x_all[tr], y_all[tr], x_all[te], y_all[te]
    return x.astype(np.float32), y, x_test.astype(np.float32), y_test, len(classes)


# -- tables -----------------------------------------------------------------------------


def _read_columns(path: Path) -> dict[str, list[object]]:
    """Column name -> values, from a CSV (header row) or a Parquet file."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataFormatError(
                f"{path}: reading Parquet needs pyarrow (pip install 'fedpipe[parquet]')"
            ) from exc
        table = pq.read_table(path)
        return {name: table.column(name).to_pylist() for name in table.column_names}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataFormatError(f"{path}: empty file; a CSV needs a header row")
        rows = list(reader)
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise DataFormatError(
                f"{path}: row {i + 2} has {len(row)} fields, the header {len(header)}"
            )
    return {name: [row[j] for row in rows] for j, name in enumerate(header)}


def _table(
    path: Path, cfg: DataConfig, classes: list[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    columns = _read_columns(path)
    if cfg.label not in columns:
        raise DataFormatError(f"{path}: no label column {cfg.label!r}; columns: {sorted(columns)}")
    names = [c for c in columns if c != cfg.label]
    if not names:
        raise DataFormatError(f"{path}: no feature columns beside {cfg.label!r}")
    try:
        x = np.array([[float(v) for v in columns[c]] for c in names], np.float64).T  # type: ignore[arg-type]
    except ValueError as exc:
        raise DataFormatError(f"{path}: a feature is not a number ({exc})") from exc
    if not np.all(np.isfinite(x)):
        raise DataFormatError(f"{path}: features hold NaN or infinite values")
    raw = [str(v) for v in columns[cfg.label]]
    classes = classes if classes is not None else _class_names(raw)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise DataFormatError(f"{path}: labels {unknown[:5]} are not in the training set's")
    return x, np.array([index[v] for v in raw], np.int64), classes


def _class_names(raw: list[str]) -> list[str]:
    """Labels in order: numerically when they are all integers (0, 1, 2, 10), else by name."""
    unique = set(raw)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def load_table(cfg: DataConfig) -> Arrays:
    """(x_train, y_train, x_test, y_test, number of classes) from a CSV or Parquet table."""
    x, y, classes = _table(Path(cfg.path), cfg, None)
    if cfg.test_path:
        x_test, y_test, _ = _table(Path(cfg.test_path), cfg, classes)
    else:
        tr, te = _holdout(len(y), cfg.test_fraction)
        x, y, x_test, y_test = x[tr], y[tr], x[te], y[te]
    return x.astype(np.float32), y, x_test.astype(np.float32), y_test, len(classes)
