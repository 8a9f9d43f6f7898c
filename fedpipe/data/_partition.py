"""Partitioners: split a labelled training set into per-client index arrays.

All take an explicit seed (no global RNG), return sorted, disjoint index arrays, and
are reproducible: the same labels and seed give the same shards on every machine,
which is what lets each simulated client compute its own shard independently.
"""

from __future__ import annotations

import numpy as np

from fedpipe.config import PartitionConfig

__all__ = ["dirichlet", "iid", "label_histograms", "partition", "shards"]

Shards = list[np.ndarray]


def iid(num_examples: int, num_clients: int, seed: int) -> Shards:
    """Uniformly random, near-equal shards."""
    _check_enough(num_examples, num_clients)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, seed: int
) -> Shards:
    """Label skew (Hsu et al. 2019): each class is split across clients ~ Dir(alpha).

    Resamples until every client holds at least `min_size` examples, so no client ends up
    with an empty shard; gives up with a clear error if that is unreachable.
    """
    _check_enough(len(labels), num_clients * max(min_size, 1))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _attempt in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ValueError(
        f"dirichlet partition: could not give each of {num_clients} clients >= {min_size} "
        f"examples with alpha={alpha}; lower partition.min_size or raise partition.alpha"
    )


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int) -> Shards:
    """Pathological non-IID: every client holds exactly `classes_per_client` classes.

    Classes are dealt round-robin over a shuffled class order so every class is used,
    then each class's examples are split evenly among the clients holding it.
    """
    classes = np.unique(labels)
    if classes_per_client > len(classes):
        raise ValueError(
            f"partition.classes_per_client={classes_per_client} exceeds the "
            f"{len(classes)} classes in the dataset"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(classes_per_client):
            c = order[(client * classes_per_client + j) % len(order)]
            holders[int(c)].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, clients in holders.items():
        if not clients:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        _check_enough(len(idx), len(clients))
        for client, chunk in zip(clients, np.array_split(idx, len(clients)), strict=True):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def partition(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> Shards:
    """Dispatch on `cfg.scheme`."""
    if cfg.scheme == "iid":
        return iid(len(labels), cfg.num_clients, seed)
    if cfg.scheme == "dirichlet":
        return dirichlet(labels, cfg.num_clients, cfg.alpha, cfg.min_size, seed)
    return shards(labels, cfg.num_clients, cfg.classes_per_client, seed)


def label_histograms(labels: np.ndarray, parts: Shards, num_classes: int) -> list[list[int]]:
    """Per-client count of each label, for logging and reports."""
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]


def _check_enough(num_examples: int, needed: int) -> None:
    if num_examples < needed:
        raise ValueError(
            f"cannot split {num_examples} examples into {needed} non-empty parts; "
            "use fewer clients (partition.num_clients) or a larger dataset"
        )
