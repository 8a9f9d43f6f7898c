"""Serving benchmark: `fedpipe serve` under HTTP load, with and without micro-batching.

    python benchmarks/serving.py --run RUN_DIR [--artifacts fp32,int8,pruned-int8]
                                 [--clients 1,8,64] [--seconds 10] [--body npy|json]

For each artifact (default: torchscript-fp32, torchscript-int8 and pruned-int8, those
the export has) and each mode (micro-batching: --max-batch and --max-wait-ms, by default
fedpipe serve's; batch-1: --max-batch 1), a `fedpipe serve` process on 127.0.0.1 takes
a closed-loop load of 1, 8 and 64 concurrent clients, each sending one example per
request and the next as soon as the answer arrives: a warm-up, then --seconds of
measurement. Reported per cell:
throughput (answered requests/s), client-side p50/p99 latency, errors and 503s, the
server's mean batch size and CPU use (its /metrics, before and after).

The load generator shares the CPUs with the server, so it is kept cheap: raw asyncio
streams (uvloop when installed), HTTP/1.1 keep-alive, request bytes encoded once. The
requests are the run's first test images (any model input works when the dataset is
not at hand: --random). The run must be exported (`fedpipe export`); it is exported
here if it is not. Prints a markdown table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from fedpipe.serve import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACTS = ("torchscript-fp32", "torchscript-int8", "pruned-int8")
MODES = {"micro-batching": None, "batch-1": 1}  # max_batch (None: --max-batch)
EXAMPLES = 256  # distinct requests, cycled
TARGET_SPEEDUP, TARGET_P99_MS = 3.0, 50.0  # micro-batching vs batch-1 at the most clients


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _service(
    run: Path, artifact: str, max_batch: int, threads: int, args: argparse.Namespace
) -> Iterator[int]:
    """A `fedpipe serve` process, healthy, on a free port; stopped on exit."""
    port = _free_port()
    argv = [
        sys.executable, "-m", "fedpipe.cli.main", "serve", str(run), "--port", str(port),
        "--artifact", artifact, "--max-batch", str(max_batch),
        "--max-wait-ms", str(args.max_wait_ms), "--threads", str(threads),
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        _wait_healthy(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fedpipe serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"fedpipe serve did not answer /healthz within {timeout:.0f} s")


def _requests(inputs: np.ndarray, body: str) -> list[bytes]:
    """Whole HTTP/1.1 requests, one example each, encoded once."""
    out = []
    for x in inputs:
        if body == "npy":
            buf = io.BytesIO()
            np.save(buf, x[None])
            payload, kind = buf.getvalue(), "application/x-npy"
        else:
            payload, kind = json.dumps({"inputs": [x.tolist()]}).encode(), "application/json"
        head = (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        out.append(head.encode() + payload)
    return out


async def _client(
    port: int, requests: list[bytes], offset: int, stop_at: float, out: dict[str, list[Any]]
) -> None:
    """One closed-loop client on a keep-alive connection (a new one if it breaks)."""
    i, clock = offset, time.perf_counter
    while clock() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            out["errors"].append("connect")
            await asyncio.sleep(0.01)
            continue
        try:
            while (t0 := clock()) < stop_at:
                writer.write(requests[i % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                status = int(head[9:12])
                if status == 200:
                    out["latencies"].append(clock() - t0)
                else:
                    out["errors"].append(status)
                i += 1
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            out["errors"].append("connection")
        finally:
            writer.close()


async def _load(
    port: int, requests: list[bytes], clients: int, seconds: float
) -> dict[str, list[Any]]:
    """`clients` closed-loop clients for `seconds`: latencies of 200s, other outcomes."""
    out: dict[str, list[Any]] = {"latencies": [], "errors": []}
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(_client(port, requests, 7 * c, stop_at, out) for c in range(clients)))
    return out


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.labels  # totals, sums and counts (not buckets or per-class counts)
    }


def _cell(
    port: int, requests: list[bytes], clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    _run(_load(port, requests, clients, args.warmup))
    before, t0, c0 = _scrape(port), time.perf_counter(), time.process_time()
    load = _run(_load(port, requests, clients, args.seconds))
    wall, client_cpu, after = time.perf_counter() - t0, time.process_time() - c0, _scrape(port)
    lat = sorted(load["latencies"])
    batches = after["fedpipe_batch_size_count"] - before["fedpipe_batch_size_count"]
    examples = after["fedpipe_batch_size_sum"] - before["fedpipe_batch_size_sum"]
    cpu = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
    return {
        "clients": clients,
        "requests": len(lat),
        "throughput": len(lat) / wall,
        "p50_ms": 1e3 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "mean_ms": 1e3 * statistics.fmean(lat) if lat else None,
        "errors": len(load["errors"]),
        "overloaded_503": load["errors"].count(503),
        "mean_batch": examples / batches if batches else None,
        "server_cpu": cpu / wall,  # cores
        "client_cpu": client_cpu / wall,  # cores: the load generator's own share
    }


def _inputs(run: Path, shape: tuple[int, ...], random: bool) -> np.ndarray:
    """The run's first test examples, as the model takes them (or seeded noise)."""
    if random:
        return np.random.default_rng(0).standard_normal((EXAMPLES, *shape)).astype(np.float32)
    from fedpipe.config import load_config
    from fedpipe.data import load_dataset

    test = load_dataset(load_config(str(run / "config.toml")).data).test
    return test.x[:EXAMPLES].numpy()


def _export_info(run: Path) -> dict[str, Any]:
    path = run / "export" / "export.json"
    if not path.is_file():
        from fedpipe.export import export_run

        print(f"exporting {run} ...", flush=True)
        export_run(run)
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def _table(rows: list[dict[str, Any]]) -> None:
    print("\n| artifact | mode | threads | clients | req/s | p50 ms | p99 ms | errors (503) "
          "| mean batch | server CPU | client CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
        p50 = f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "-"
        print(
            f"| {r['artifact']} | {r['mode']} | {r['threads']} | {r['clients']} "
            f"| {r['throughput']:.0f} | {p50} "
            f"| {p99} | {r['errors']} ({r['overloaded_503']}) | {batch} | {r['server_cpu']:.2f} "
            f"| {r['client_cpu']:.2f} |"
        )


def _speedups(rows: list[dict[str, Any]], clients: int) -> dict[str, dict[str, Any]]:
    """Micro-batching against batch-1 at `clients` concurrent clients, per artifact: at
    each thread count, and each mode at its best thread count (the fair comparison when
    a setting helps one mode and hurts the other); whether that meets the target
    (TARGET_SPEEDUP, TARGET_P99_MS)."""
    out = {}
    for art in dict.fromkeys(r["artifact"] for r in rows):
        top = [r for r in rows if r["artifact"] == art and r["clients"] == clients]
        best = {m: max((r for r in top if r["mode"] == m), key=lambda r: r["throughput"],
                       default=None) for m in MODES}  # fmt: skip
        pairs = {f"{t} thread(s)": _pair(top, t) for t in dict.fromkeys(r["threads"] for r in top)}
        pairs["best of each"] = (best["micro-batching"], best["batch-1"])
        for name, (mb, b1) in pairs.items():
            if mb is None or b1 is None:
                continue
            speedup, p99 = mb["throughput"] / b1["throughput"], mb["p99_ms"]
            met = speedup >= TARGET_SPEEDUP and p99 is not None and p99 <= TARGET_P99_MS
            out[f"{art}, {name}"] = {
                "speedup": speedup,
                "p99_ms": p99,
                "threads": [mb["threads"], b1["threads"]],
                "target_met": met,
            }
    return out


def _pair(cells: list[dict[str, Any]], threads: int) -> tuple[Any, Any]:
    by_mode = {r["mode"]: r for r in cells if r["threads"] == threads}
    return by_mode.get("micro-batching"), by_mode.get("batch-1")


def _artifacts(info: dict[str, Any], wanted: str | None) -> list[str]:
    """Names in export.json: those asked for (all must exist), or the defaults it has."""
    names = [a["artifact"] for a in info["artifacts"]]
    aliases = {"fp32": "torchscript-fp32", "int8": "torchscript-int8"}
    if wanted is None:
        return [a for a in DEFAULT_ARTIFACTS if a in names]
    asked = [aliases.get(a, a) for a in wanted.split(",")]
    missing = [a for a in asked if a not in names]
    if missing:
        raise SystemExit(f"not in export.json: {missing}; available: {names}")
    return asked


def _measure(
    run: Path, artifacts: list[str], requests: list[bytes], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every artifact x mode x client count; one server process per artifact and mode."""
    rows: list[dict[str, Any]] = []
    for artifact in artifacts:
        for mode in args.modes.split(","):
            for threads in args.threads:
                max_batch = MODES[mode] or args.max_batch
                with _service(run, artifact, max_batch, threads, args) as port:
                    for clients in args.clients:
                        cell = _cell(port, requests, clients, args)
                        rows.append({"artifact": artifact, "mode": mode, "threads": threads,
                                     **cell})  # fmt: skip
                        print(f"{artifact} | {mode} | {threads} thread(s) | {clients} "
                              f"clients: {cell['throughput']:.0f} req/s", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (exported here if it is not)")
    p.add_argument("--artifacts", help="names in export.json (default: fp32, int8, pruned-int8)")
    p.add_argument("--clients", default="1,8,64", help="concurrent clients per cell")
    p.add_argument("--seconds", type=float, default=10.0, help="measured, per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each cell")
    p.add_argument("--modes", default=",".join(MODES), help="micro-batching and/or batch-1")
    p.add_argument("--body", choices=("npy", "json"), default="npy", help="request format")
    d = ServeConfig()
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="when micro-batching")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="when micro-batching")
    p.add_argument("--threads", default=str(d.threads), help="the server's torch threads, e.g. 1,2")
    p.add_argument("--random", action="store_true", help="noise inputs, not test images")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    run = Path(args.run)
    info = _export_info(run)
    artifacts = _artifacts(info, args.artifacts)
    requests = _requests(_inputs(run, tuple(info["input_shape"]), args.random), args.body)
    load_before = os.getloadavg()  # other work on the machine skews every figure
    gc.collect()
    gc.freeze()  # no full collections of the set-up's objects in the middle of a cell
    rows = _measure(run, artifacts, requests, args)
    _table(rows)
    top = max(args.clients)
    speedups = _speedups(rows, top)
    for art, sp in speedups.items():
        print(f"{art}: micro-batching {sp['speedup']:.2f}x batch-1 at {top} clients, p99 "
              f"{sp['p99_ms']:.1f} ms (target >= {TARGET_SPEEDUP}x, <= {TARGET_P99_MS} ms: "
              f"{'met' if sp['target_met'] else 'not met'})")  # fmt: skip
    result = {
        "run": str(run),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "torch_export": info.get("torch"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        f"speedup_at_{top}_clients": speedups,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
