"""Simulated attackers and faults, installed into the ClientApp by simulation only.

Attacks are `ClientHooks` (what data a client trains on, what update and claim it
sends) and faults are a Flower mod: the training code has no branch for either, and a
deployed device runs none of this. What each attack does (`simulation.attack`, strength
`s = simulation.attack_scale`; u is the client's honest update, n its example count):

| attack | data | update sent | examples claimed |
|---|---|---|---|
| `label_flip` | labels y -> C-1-y | honest on flipped data | n |
| `sign_flip` | honest | -s * u | n |
| `scale` | honest | s * u | n |
| `model_replacement` | labels flipped | s * u (boosted poisoned model) | n |
| `noise` | honest | Gaussian, s x the RMS of u | n |
| `inflate` | honest | u | s^3 * n |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedpipe.client_app import client_id_of
from fedpipe.codec import Update
from fedpipe.config import RunConfig, SimulationConfig
from fedpipe.data import Split
from fedpipe.influence import update_norm

__all__ = ["Attack", "attacker_ids", "build_attack", "fault_mod"]

_FLIPS_LABELS = ("label_flip", "model_replacement")


def attacker_ids(cfg: RunConfig) -> frozenset[int]:
    """The attacking clients: the listed ids, or a seeded draw of the configured fraction."""
    sim = cfg.simulation
    if sim.attackers:
        return frozenset(sim.attackers)
    count = round(sim.attacker_fraction * cfg.partition.num_clients)
    rng = np.random.default_rng([cfg.seed, 0xA77AC])  # its own stream: sampling is unchanged
    return frozenset(int(c) for c in rng.choice(cfg.partition.num_clients, count, replace=False))


@dataclass(frozen=True)
class Attack:
    """`ClientHooks` for one attack kind; honest clients pass through untouched."""

    kind: str
    ids: frozenset[int]
    scale: float

    def on_data(self, client_id: int, data: Split, num_classes: int) -> Split:
        if client_id not in self.ids or self.kind not in _FLIPS_LABELS:
            return data
        return Split(data.x, (num_classes - 1) - data.y)

    def on_update(
        self, client_id: int, update: Update, num_examples: int, rng: np.random.Generator
    ) -> tuple[Update, int]:
        if client_id not in self.ids:
            return update, num_examples
        s = self.scale
        if self.kind == "sign_flip":
            return _scaled(update, -s), num_examples
        if self.kind in ("scale", "model_replacement"):
            return _scaled(update, s), num_examples
        if self.kind == "noise":
            return _noise(update, s, rng), num_examples
        if self.kind == "inflate":
            return update, int(min(num_examples * s**3, 2**62))
        return update, num_examples  # label_flip: the data did it


def _scaled(update: Update, factor: float) -> Update:
    return {k: (v * np.float32(factor)).astype(np.float32) for k, v in update.items()}


def _noise(update: Update, scale: float, rng: np.random.Generator) -> Update:
    count = sum(v.size for v in update.values()) or 1
    rms = update_norm(update) / float(np.sqrt(count))
    return {k: rng.normal(0.0, scale * rms, v.shape).astype(np.float32) for k, v in update.items()}


def build_attack(cfg: RunConfig) -> Attack | None:
    """The configured attack, or None for an honest run."""
    if cfg.simulation.attack == "none":
        return None
    return Attack(cfg.simulation.attack, attacker_ids(cfg), cfg.simulation.attack_scale)


def fault_mod(sim: SimulationConfig) -> Mod | None:
    """A Flower mod that makes the `simulation.fail_clients` raise on training messages
    (SecAgg's masked-input stage included: those devices drop out after sharing keys)."""
    failing = frozenset(sim.fail_clients)
    if not failing:
        return None

    def fail(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        cid = client_id_of(context)
        if msg.metadata.message_type.startswith(MessageType.TRAIN) and cid in failing:
            raise RuntimeError(f"client {cid}: injected failure (simulation.fail_clients)")
        return call_next(msg, context)

    return fail
