"""partition.json and the partition log line stay small with 10,000 clients."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedpipe.config import load_config
from fedpipe.partition_info import summary_line, write_partition_info
from fedpipe.rundir import PARTITION_FILE

LOGGER = "fedpipe.partition_info"


def _written(tmp_path: Path, *overrides: str) -> tuple[str, dict[str, object]]:
    write_partition_info(load_config(None, list(overrides)), tmp_path)
    text = (tmp_path / PARTITION_FILE).read_text()
    return text, json.loads(text)


def test_partition_json_is_compact_and_consistent(tmp_path: Path) -> None:
    text, info = _written(tmp_path, "partition.num_clients=10", "partition.scheme='dirichlet'")
    assert text.count("\n") == 1 and text.endswith("}\n") and ", " not in text  # no indent
    assert set(info) == {"dataset", "scheme", "num_clients", "num_classes", "sizes", "labels"}
    assert (info["dataset"], info["scheme"], info["num_clients"]) == ("digits", "dirichlet", 10)
    sizes, labels = info["sizes"], info["labels"]
    assert isinstance(sizes, list) and isinstance(labels, list)
    assert [sum(row) for row in labels] == sizes and sum(sizes) == 1437  # 80 % of 1797
    assert all(len(row) == info["num_classes"] == 10 for row in labels)


def test_one_info_line_and_per_client_lines_only_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _written(tmp_path, "partition.num_clients=200")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("partition: 200 clients, iid split of digits (1437 training")
    assert "shard size min 7 / median 7 / max 8" in line and "10 classes" in line
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        _written(tmp_path, "partition.num_clients=200")
    assert len(caplog.records) == 1 + 200
    assert caplog.records[-1].getMessage().startswith("client 199: 7 examples, labels [")


def test_summary_line_counts_empty_shards_and_classes_held() -> None:
    info = {
        "dataset": "d", "scheme": "dirichlet", "num_clients": 3, "num_classes": 3,
        "sizes": [0, 4, 9], "labels": [[0, 0, 0], [4, 0, 0], [3, 3, 3]],
    }  # fmt: skip
    line = summary_line(info)
    assert "(13 training examples)" in line
    assert "shard size min 0 / median 4 / max 9, 1 empty" in line
    assert "3 classes, min 0 / median 1 / max 3 per client" in line


def test_digits_at_its_most_clients_stays_small(tmp_path: Path) -> None:
    text, info = _written(tmp_path, "partition.num_clients=1437")  # one example each
    assert info["num_clients"] == 1437
    assert len(text) < 25 * 1437  # 34.6 KB; the indented per-client objects took ~270 KB


def test_mnist_with_10000_clients_stays_small(tmp_path: Path, mnist_root: Path) -> None:
    text, info = _written(
        tmp_path, "data.dataset='mnist'", f"data.root='{mnist_root}'", "partition.num_clients=10000"
    )
    assert info["num_clients"] == 10000 and len(info["labels"]) == 10000  # type: ignore[arg-type]
    assert len(text) < 250_000  # 240 KB; the indented format wrote 1.87 MB
