"""Data in the user's format: an image folder and a CSV/Parquet table, read, checked,
partitioned into device shards (`fedpipe partition`) and trained on in simulation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedpipe.cli.main import main as fedpipe_main
from fedpipe.config import ConfigError, DataConfig, load_config
from fedpipe.data import DataFormatError, load_dataset
from fedpipe.metrics import read_metrics
from fedpipe.rundir import METRICS_FILE
from fedpipe.simulation import run_simulation

CLASSES = ("circle", "cross", "stripes")


def _image(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A noisy 12x12 picture of its class: easy to learn, never identical."""
    a = rng.uniform(0, 60, (size, size))
    c = size // 2
    if kind == "circle":
        yy, xx = np.mgrid[:size, :size]
        a[np.abs(np.hypot(yy - c, xx - c) - size / 3) < 1.2] = 255
    elif kind == "cross":
        a[c - 1 : c + 1, :] = 255
        a[:, c - 1 : c + 1] = 255
    else:
        a[::3, :] = 255
    return Image.fromarray(a.astype(np.uint8), mode="L")


def _image_folder(root: Path, per_class: int = 40, odd_size: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            size = 14 if odd_size and i == 0 else 12
            _image(kind, rng, size).save(root / kind / f"{i}.png")
    return root


def _table(path: Path, rows: int = 300) -> Path:
    """Three Gaussian blobs in four features; the label column holds names."""
    rng = np.random.default_rng(1)
    centres = {"low": (0, 0, 0, 0), "mid": (3, 0, 3, 0), "high": (0, 3, 0, 3)}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "species", "c", "d"])
        for i in range(rows):
            name = list(centres)[i % 3]
            x = rng.normal(centres[name], 0.7)
            w.writerow([f"{x[0]:.4f}", f"{x[1]:.4f}", name, f"{x[2]:.4f}", f"{x[3]:.4f}"])
    return path


def test_an_image_folder_reads_with_a_fixed_held_out_split(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "shapes")
    ds = load_dataset(DataConfig(dataset="imagefolder", path=str(root), channels=1))
    assert ds.num_classes == 3 and ds.input_shape == (1, 12, 12)
    assert (len(ds.train), len(ds.test)) == (96, 24)  # 20 % of 120 held out
    assert set(ds.test.y.tolist()) == {0, 1, 2}  # drawn across classes
    rgb = load_dataset(DataConfig(dataset="imagefolder", path=str(root), channels=3))
    assert rgb.input_shape == (3, 12, 12)


def test_an_image_folder_with_train_and_test_folders_keeps_them(tmp_path: Path) -> None:
    _image_folder(tmp_path / "split" / "train", per_class=10)
    _image_folder(tmp_path / "split" / "test", per_class=4)
    ds = load_dataset(DataConfig(dataset="imagefolder", path=str(tmp_path / "split")))
    assert (len(ds.train), len(ds.test)) == (30, 12)
    (tmp_path / "split" / "test" / "triangle").mkdir()
    Image.new("L", (12, 12)).save(tmp_path / "split" / "test" / "triangle" / "0.png")
    with pytest.raises(DataFormatError, match="differ from the training set"):
        load_dataset(DataConfig(dataset="imagefolder", path=str(tmp_path / "split"), channels=1))


def test_images_of_different_sizes_need_image_size(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "odd", per_class=5, odd_size=True)
    with pytest.raises(DataFormatError, match="data.image_size"):
        load_dataset(DataConfig(dataset="imagefolder", path=str(root)))
    ds = load_dataset(DataConfig(dataset="imagefolder", path=str(root), image_size=16))
    assert ds.input_shape == (3, 16, 16)


def test_a_csv_table_reads_names_as_classes_and_standardises_features(tmp_path: Path) -> None:
    ds = load_dataset(
        DataConfig(dataset="table", path=str(_table(tmp_path / "t.csv")), label="species")
    )
    assert ds.num_classes == 3 and ds.input_shape == (4,)
    assert (len(ds.train), len(ds.test)) == (240, 60)
    x = ds.train.x.numpy()
    assert np.allclose(x.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(x.std(axis=0, ddof=1), 1, atol=1e-3)


def test_a_parquet_table_reads_like_the_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = _table(tmp_path / "t.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    table = pa.table({k: [r[k] if k == "species" else float(r[k]) for r in rows] for k in rows[0]})
    pq.write_table(table, tmp_path / "t.parquet")
    a = load_dataset(DataConfig(dataset="table", path=str(path), label="species"))
    b = load_dataset(DataConfig(dataset="table", path=str(tmp_path / "t.parquet"), label="species"))
    assert np.allclose(a.train.x.numpy(), b.train.x.numpy(), atol=1e-6)
    assert np.array_equal(a.test.y.numpy(), b.test.y.numpy())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a,b\n1,2\n", "no label column 'label'"),
        ("a,label\n1,x\n2\n", "row 3 has 1 fields"),
        ("a,label\nseven,x\n", "not a number"),
        ("a,label\nnan,x\n", "NaN or infinite"),
        ("", "header row"),
    ],
)
def test_a_malformed_table_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message):
        load_dataset(DataConfig(dataset="table", path=str(path)))


def test_user_data_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        DataConfig(dataset="table")


@pytest.mark.parametrize("kind", ["imagefolder", "table"])
def test_user_data_partitions_into_device_shards_and_trains(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedpipe partition` writes one shard per device (Dirichlet label skew), and a
    simulation on the same data learns it: MLP, 4 clients, 5 rounds."""
    if kind == "imagefolder":
        data = [f"data.path='{_image_folder(tmp_path / 'shapes')}'", "data.channels=1"]
    else:
        data = [f"data.path='{_table(tmp_path / 't.csv')}'", "data.label='species'"]
    common = [f"data.dataset='{kind}'", *data, "partition.num_clients=4"]
    common += ["partition.scheme='dirichlet'", "partition.alpha=1.0", "partition.min_size=5"]
    assert fedpipe_main(["partition", "--out", str(tmp_path / "shards"), *common]) == 0
    shards = sorted((tmp_path / "shards").glob("client-*.npz"))
    train = load_dataset(load_config(None, common).data).train
    sizes = [len(np.load(p)["y"]) for p in shards]
    assert len(shards) == 4 and sum(sizes) == len(train) and min(sizes) >= 5
    run = [*common, "federation.rounds=5", 'simulation.backend="inprocess"']
    cfg = load_config(None, [*run, "model.hidden=32", f"output_dir='{tmp_path / 'runs'}'"])
    rounds = read_metrics(run_simulation(cfg).run_dir / METRICS_FILE)
    assert rounds[-1]["accuracy"] > 0.9
    capsys.readouterr()
