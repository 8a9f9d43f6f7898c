"""The one place seeds are derived, so every random draw in a run is reproducible."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["client_seed", "round_generator", "set_seed"]


def set_seed(seed: int) -> int:
    """Seed Python, NumPy and torch global RNGs (for code we don't control) and return it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def client_seed(seed: int, client_id: int) -> int:
    """Client i uses seed + i."""
    return seed + client_id


def round_generator(seed: int, client_id: int, server_round: int) -> torch.Generator:
    """A torch RNG unique to (run seed, client, round): shuffling differs every round but
    replays identically for the same run seed."""
    mixed = np.random.SeedSequence([client_seed(seed, client_id), server_round])
    gen = torch.Generator()
    gen.manual_seed(int(mixed.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return gen
