"""Per-client costs of a simulated round, piece by piece, in one process.

    python benchmarks/per_client.py [key=value ...]

What one virtual client costs on the worker (the ClientApp call, of which local
training) and on the aggregator (decode boundary, update norm, exact fold, wire-size
accounting the way Flower measures it and the way fedpipe counts it), and what moving a
cohort's replies through pickle costs. Default: MNIST when present (else digits), 10,000
clients, fedpipe's default MLP and 3 local epochs: the 10,000-client configuration of
benchmarks/scale.py. Prints a table and writes JSON to benchmarks/results/per_client.json.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from fedpipe.boundary import DecodeBoundary
from fedpipe.client_app import make_client_app
from fedpipe.codec import build_codec
from fedpipe.config import load_config
from fedpipe.data import DatasetNotFoundError, load_dataset
from fedpipe.influence import update_norm
from fedpipe.models import build_model
from fedpipe.records import wire_bytes
from fedpipe.rounds.accumulate import ExactSum

ROOT = Path(__file__).resolve().parents[1]
CLIENTS, WARM = 300, 20


def _ms(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main(argv: list[str]) -> int:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    torch.set_num_threads(1)
    base = ["data.dataset=mnist", "partition.num_clients=10000"]
    try:
        cfg = load_config(None, [*base, *argv])
        ds = load_dataset(cfg.data)
    except DatasetNotFoundError:
        cfg = load_config(None, ["partition.num_clients=1000", *argv])
        ds = load_dataset(cfg.data)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes)
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})}
    )
    app = make_client_app(cfg)
    msgs, ctxs = [], []
    for c in range(CLIENTS):
        m = Message(content, dst_node_id=c + 1, message_type="train")
        m.metadata.__dict__["_message_id"] = str(c)
        msgs.append(m)
        ctxs.append(Context(1, c + 1, {"partition-id": c}, RecordDict(), {}))
    for i in range(WARM):
        app(msgs[i], ctxs[i])
    n = CLIENTS - WARM
    t0 = time.perf_counter()
    replies = [app(msgs[i], ctxs[i]) for i in range(WARM, CLIENTS)]
    client_ms = (time.perf_counter() - t0) / n * 1e3
    cohort = replies[:16]  # before anything deflates them (Flower caches memoryviews then)
    pickle_ms = _ms(lambda: pickle.loads(pickle.dumps(cohort)), 10) / len(cohort)
    train_ms = float(np.mean([r.content.config_records["codec"]["train-seconds"] for r in replies]))
    like = {k: a.numpy() for k, a in content.array_records["arrays"].items()}
    boundary = DecodeBoundary(build_codec(cfg.codec), like)
    it = iter(replies * 3)
    decode_ms = _ms(lambda: boundary.train(next(it), 1), n)
    decoded = [boundary.train(r, 1) for r in replies]
    it2 = iter(decoded)
    norm_ms = _ms(lambda: update_norm(next(it2).update), n)  # type: ignore[union-attr]
    exact = ExactSum(like, n, 2.0)
    it3 = iter(decoded)
    fold_ms = _ms(lambda: exact.add(next(it3).update, 0.5), n)  # type: ignore[union-attr]
    one = replies[0].content
    flower_ms = _ms(lambda: sum(len(o.deflate()) for o in get_all_nested_objects(one).values()), 50)
    counted_ms = _ms(lambda: wire_bytes(one), 50)
    rows: dict[str, Any] = {
        "client call (worker)": client_ms,
        "  of which local training": train_ms * 1e3,
        "decode boundary (aggregator)": decode_ms,
        "update norm (aggregator)": norm_ms,
        "exact fold (aggregator)": fold_ms,
        "wire size, Flower's deflate+hash": flower_ms,
        "wire size, fedpipe's count": counted_ms,
        "pickle + unpickle a reply (Ray)": pickle_ms,
    }
    params = sum(int(v.size) for v in like.values())
    print(
        f"{ds.name}, MLP hidden={cfg.model.hidden} ({params} parameters), "
        f"{cfg.train.epochs} epoch(s)\n"
    )
    print("| per client | ms |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.3f} |")
    out = ROOT / "benchmarks" / "results" / "per_client.json"
    out.write_text(json.dumps({"dataset": ds.name, "params": params, "ms": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
