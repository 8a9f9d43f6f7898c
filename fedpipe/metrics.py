"""Per-round records: one JSON line each in metrics.jsonl, one progress line on stdout."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsLog", "RoundRecord", "progress_line", "read_metrics"]


@dataclass(frozen=True)
class RoundRecord:
    round: int
    accuracy: float  # centralized, on the held-out test set
    loss: float  # centralized test loss
    train_loss: float | None  # weighted mean over the clients that replied
    clients_sampled: int
    clients_replied: int  # replies that decoded and were aggregated
    clients_failed: int  # errors, undecodable payloads and timeouts
    bytes_up: int  # serialized reply payloads received this round
    bytes_down: int  # serialized messages sent to clients this round
    seconds: float  # wall time of the round, including centralized evaluation
    # Measured: 8 * serialized training-reply bytes / (replies * model parameters).
    bits_per_param_up: float | None
    encode_seconds: float  # summed over the clients aggregated this round
    decode_seconds: float  # server side, all replies
    train_seconds: float  # local training, summed over the clients aggregated
    slowest_train_seconds: float = 0.0  # the straggler's local training time
    crypto_seconds: float = 0.0  # sealing (clients, summed) + opening (server)
    clients_rejected: int = 0  # replies that arrived and were dropped (part of clients_failed)
    updates_clipped: int = 0  # accepted updates scaled down to the round's norm bound
    weights_capped: int = 0  # accepted replies whose num-examples was lowered to the cap
    # Secure aggregation (security.secagg=on): 8 * bytes of the masked inputs' arrays (the
    # bit-packed words with their .npy header) / (inputs * params); bits_per_param_up then
    # counts every stage's replies, framing and claims included.
    bits_per_param_masked: float | None = None
    # 8 * every byte sent to devices this round / (sampled clients * model parameters)
    bits_per_param_down: float | None = None
    secagg_abandoned: bool = False  # fewer than the threshold survived: model unchanged
    secagg_dropped: int = 0  # sampled devices whose input is not in the sum
    # valid replies per stage: advertise, share, masked input, unmask
    secagg_replies: list[int] | None = None
    # Compressed broadcast (downlink.scheme != float32): what each message carried, over
    # the round's stages: the whole model, one change, several (a device that missed
    # rounds; downlink_behind sums the versions they were behind), or nothing new.
    downlink_full: int = 0
    downlink_diff: int = 0
    downlink_catchup: int = 0
    downlink_current: int = 0
    downlink_behind: int = 0
    broadcast_seconds: float = 0.0  # server: coding the broadcast's change
    # Centralized, per class (fedpipe.validation): precision, recall, F1, their mean, and
    # the confusion matrix (row: true class, column: predicted) up to 100 classes.
    class_precision: list[float] | None = None
    class_recall: list[float] | None = None
    class_f1: list[float] | None = None
    macro_f1: float | None = None
    confusion: list[list[int]] | None = None
    # Federated evaluation (fraction_evaluate > 0): the global model on the sampled
    # devices' own held-out data; mean and loss weighted by their examples, the rest
    # across devices.
    fed_devices: int = 0
    fed_accuracy: float | None = None
    fed_accuracy_min: float | None = None
    fed_accuracy_p10: float | None = None
    fed_accuracy_max: float | None = None
    fed_accuracy_std: float | None = None
    fed_loss: float | None = None
    fed_rejected: int = 0  # evaluation replies dropped (boundary, names, histograms)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def progress_line(rec: RoundRecord, total_rounds: int) -> str:
    bits = f" ({rec.bits_per_param_up:.2f} bit/param)" if rec.bits_per_param_up else ""
    if rec.bits_per_param_masked:
        bits = f" ({rec.bits_per_param_up:.2f} bit/param, masked {rec.bits_per_param_masked:.2f})"
    if rec.secagg_abandoned:
        bits += " [secure round abandoned: model kept]"
    devices = (
        f" | devices {rec.fed_accuracy:.4f}, worst {rec.fed_accuracy_min:.4f}"
        if rec.fed_accuracy is not None and rec.fed_accuracy_min is not None
        else ""
    )
    return (
        f"round {rec.round:>3}/{total_rounds} | acc {rec.accuracy:.4f}{devices} | "
        f"loss {rec.loss:.4f} | "
        f"clients {rec.clients_replied}/{rec.clients_sampled} ok, {rec.clients_failed} failed | "
        f"up {_mb(rec.bytes_up)}{bits} down {_mb(rec.bytes_down)} | "
        f"codec {rec.encode_seconds + rec.decode_seconds:.2f} s | {rec.seconds:.1f} s"
    )


class MetricsLog:
    """Appends each round to `path` as it finishes, so a killed run keeps what it did."""

    def __init__(
        self,
        path: Path,
        total_rounds: int,
        stream: TextIO | None = None,
        view: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.path = path
        self.total_rounds = total_rounds
        self.stream = stream if stream is not None else sys.stdout
        self.view = view  # e.g. RoundProgress.update; default: one printed line per round
        self.records: list[RoundRecord] = []

    def write(self, rec: RoundRecord) -> None:
        self.records.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(dataclasses.asdict(rec)) + "\n")
        if self.view is not None:
            self.view(rec)
        else:
            print(progress_line(rec, self.total_rounds), file=self.stream, flush=True)

    def keep_until(self, last_round: int) -> None:
        """Resume: keep the records of rounds <= last_round (the checkpoint's), drop the rest.

        A round that was in flight when the run died may have a line but no checkpoint.
        """
        kept = (
            [r for r in read_metrics(self.path) if r["round"] <= last_round]
            if (self.path.exists())
            else []
        )
        self.records = [RoundRecord(**r) for r in kept]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        last = self.records[-1] if self.records else None
        federated = [r for r in self.records if r.fed_devices]
        return {
            "rounds": len(self.records),
            "final_accuracy": last.accuracy if last else None,
            "final_loss": last.loss if last else None,
            "wall_seconds": wall_seconds,
            "total_bytes_up": sum(r.bytes_up for r in self.records),
            "total_bytes_down": sum(r.bytes_down for r in self.records),
            "clients_failed": sum(r.clients_failed for r in self.records),
            "final_macro_f1": last.macro_f1 if last else None,
            # the last round with federated evaluation (it need not be the last round)
            "federated_round": federated[-1].round if federated else None,
            "federated_accuracy": federated[-1].fed_accuracy if federated else None,
            "worst_device_accuracy": federated[-1].fed_accuracy_min if federated else None,
        }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
