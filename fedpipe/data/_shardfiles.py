"""Per-device shard files: what `fedpipe partition` writes and a deployed client reads.

In deployment each device holds only its own data. For experiments that emulate that
with a public dataset, the coordinator's partition (the same one simulation uses) is
written as one `.npz` per device, already preprocessed, with the number of classes
stored so that a shard missing some labels still builds the global model's shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedpipe.config import DataConfig, PartitionConfig

__all__ = ["shard_path", "write_shards"]


def shard_path(folder: Path, client_id: int) -> Path:
    return folder / f"client-{client_id}.npz"


def write_shards(
    data: DataConfig, part: PartitionConfig, seed: int, folder: Path, force: bool = False
) -> list[Path]:
    """One file per client: x (float32), y (int64), num_classes; never overwrites silently."""
    from fedpipe.data import client_shard, load_dataset  # the package imports this module

    ds = load_dataset(data)
    paths = [shard_path(folder, i) for i in range(part.num_clients)]
    clash = [p for p in paths if p.exists()]
    if clash and not force:
        raise FileExistsError(f"{clash[0]} exists; pass --force to overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    for cid, path in enumerate(paths):
        shard = client_shard(data, part, seed, cid)
        np.savez(
            path,
            x=shard.x.numpy().astype(np.float32),
            y=shard.y.numpy().astype(np.int64),
            num_classes=np.int64(ds.num_classes),
            client_id=np.int64(cid),
        )
    return paths
