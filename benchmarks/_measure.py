"""Run one benchmark configuration in a fresh Python process and measure that process.

    python -m benchmarks._measure MODULE:FUNCTION '{"keyword": value, ...}' OUT.json

calls FUNCTION(**keywords) and writes {"result": ..., "peak_rss_mb": ..., "wall_seconds":
...} (or "error" and "traceback" instead of "result") to OUT.json. The peak is
getrusage(RUSAGE_SELF).ru_maxrss of that process, the simulation driver: processes it
starts (Ray's workers, raylet, GCS) are not counted, and since every configuration gets
a process of its own, one configuration's peak never hides in another's.

Loading MNIST alone lifts a driver's peak to about 1.4 GB (float copies while it
standardises; 1.1 GB stay), which would hide anything smaller that a simulation adds.
A measured function may therefore call `reset_peak_rss()` once its setup is done and
report `peak_rss_mb()` at the end: the peak of the simulation alone (Linux; elsewhere
the reset does nothing and says so).

From Python: `measure("benchmarks.plain_flower.sim_app:run_plain_flower", {...})`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["measure", "peak_rss_mb", "reset_peak_rss"]

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident set in MB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def reset_peak_rss() -> bool:
    """Lower this process's peak RSS to its current RSS (Linux >= 4.0); False if unsupported.

    Writing 5 to /proc/self/clear_refs resets the memory map's high-water mark, which is
    what ru_maxrss reads (threads that already exited may keep an older, higher value).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(target: str, kwargs: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Call `target` ("module:function") with `kwargs` in a fresh process; its report.

    Never raises for the target's own failure: the report then has "error" (and
    "traceback" when the process got as far as writing one) instead of "result".
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="fedpipe-measure-") as tmp:
        out = Path(tmp) / "report.json"
        argv = [sys.executable, "-m", "benchmarks._measure", target, json.dumps(kwargs), str(out)]
        t0 = time.perf_counter()
        # A session of its own, so a timeout can stop it with everything it started.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
        try:
            code: int | str = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            code = f"stopped after the {timeout:.0f} s timeout"
        except BaseException:  # Ctrl-C reaches only this process: stop the child too
            _stop_group(proc)
            raise
        wall = time.perf_counter() - t0
        if out.is_file():
            report: dict[str, Any] = json.loads(out.read_text())
        else:  # killed (out of memory, timeout) before it could write its report
            report = {"error": f"the measuring process ended without a report (exit {code})"}
    report.setdefault("wall_seconds", wall)
    return {"target": target, "kwargs": dict(kwargs), **report}


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(20.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _child(target: str, kwargs_json: str, out: str) -> int:
    t0 = time.perf_counter()
    report: dict[str, Any]
    try:
        module, _, name = target.partition(":")
        function = getattr(importlib.import_module(module), name)
        report = {"result": function(**json.loads(kwargs_json))}
    except Exception as exc:  # the report carries it; the caller decides
        report = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    report["peak_rss_mb"] = peak_rss_mb()
    report["wall_seconds"] = time.perf_counter() - t0
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if "result" in report else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(_child(*sys.argv[1:]))
