"""fedpipe serve: a real uvicorn server on 127.0.0.1 and a real HTTP client."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from fedpipe.cli.main import main as fedpipe_main
from fedpipe.config import ConfigError, load_config
from fedpipe.data import load_dataset
from fedpipe.drift import DESCRIPTORS, DriftMonitor
from fedpipe.export import export_run, load_artifact
from fedpipe.serve import MicroBatcher, ServeConfig, ServeError, load_served_model, make_app
from fedpipe.serve.batcher import Answer, Model

SHAPE = (1, 8, 8)  # the digits images


@pytest.fixture(scope="module")
def run(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported copy of the shared digits run: float32 and int8 only (no pruning), with
    the drift profile export writes."""
    run = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(digits_run, run, ignore=shutil.ignore_patterns("export", "report"))
    export_run(run, overrides=["export.prune_amount=0", "export.channel_fraction=0"])
    return run


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Five test images, (5, 1, 8, 8) float32."""
    return load_dataset(load_config(None, []).data).test.x[:5]


@contextmanager
def serving(app: Any) -> Iterator[httpx.Client]:
    """`app` on a free port of 127.0.0.1 in a background thread, and a client for it."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def fp32(run: Path) -> Iterator[httpx.Client]:
    served = load_served_model(run, "fp32")
    cfg = ServeConfig(max_inputs=16, max_queue=64, max_body_bytes=64 * 1024)
    with serving(make_app(served.model, served.input_shape, cfg, served.name)) as client:
        yield client


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)  # True only so that an object array can be sent
    return buf.getvalue()


def _one_thread(model: Model, x: torch.Tensor) -> torch.Tensor:
    """model(x) with one intra-op thread, as the service runs it: the sums' order, and so
    the last bits of the logits, depend on the thread count."""
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as thread:
        return thread.submit(model, x).result()


def _logits(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor(response.json()["logits"], dtype=torch.float32)


@pytest.mark.parametrize("artifact", ["torchscript-fp32", "int8"])
def test_predict_gives_the_exported_models_logits(
    run: Path, digits: torch.Tensor, artifact: str
) -> None:
    served = load_served_model(run, artifact)
    app = make_app(served.model, served.input_shape, ServeConfig(), served.name)
    with serving(app) as client:
        flat = client.post("/predict", json={"inputs": digits.flatten(1).tolist()})
        shaped = client.post("/predict", json={"inputs": digits.tolist()})
        npy = client.post(
            "/predict",
            content=_npy(digits.numpy()),
            headers={"content-type": "application/x-npy"},
        )
    expected = _one_thread(load_artifact(served.path), digits)
    for response in (flat, shaped, npy):
        assert torch.equal(_logits(response), expected)  # bit for bit
        body = response.json()
        assert body["classes"] == expected.argmax(1).tolist()
        torch.testing.assert_close(torch.tensor(body["probabilities"]), torch.softmax(expected, 1))


GOOD = [0.0] * 64
BAD_JSON: list[tuple[str, bytes, int, str]] = [
    ("malformed JSON", b'{"inputs": [', 400, "not JSON"),
    ("not an object", b"[1, 2]", 400, "inputs"),
    ("inputs not a list", b'{"inputs": 3}', 400, "inputs"),
    ("ragged", json.dumps({"inputs": [GOOD, GOOD[:10]]}).encode(), 400, "ragged"),
    ("wrong shape", json.dumps({"inputs": [GOOD[:63]]}).encode(), 400, "shape"),
    ("wrong image shape", json.dumps({"inputs": [[[GOOD[:8]] * 7]]}).encode(), 400, "shape"),
    ("empty batch", b'{"inputs": []}', 400, "empty"),
    ("NaN", b'{"inputs": [[NaN' + b", 0" * 63 + b"]]}", 400, "finite"),
    ("inf", b'{"inputs": [[Infinity' + b", 0" * 63 + b"]]}", 400, "finite"),
    ("beyond float32", json.dumps({"inputs": [[1e39] * 64]}).encode(), 400, "finite"),
    ("strings", json.dumps({"inputs": [["a"] * 64]}).encode(), 422, "integers or floats"),
    ("booleans", json.dumps({"inputs": [[True] * 64]}).encode(), 422, "integers or floats"),
    ("nulls", json.dumps({"inputs": [[None] * 64]}).encode(), 422, "integers or floats"),
    ("too many inputs", json.dumps({"inputs": [GOOD] * 17}).encode(), 413, "at most 16"),
    ("deeper than JSON", b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "not JSON"),
    ("deeper than numpy", b'{"inputs": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "nested"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "reason"), BAD_JSON, ids=[c[0] for c in BAD_JSON]
)
def test_bad_json_gets_its_status_and_a_reason(
    fp32: httpx.Client, case: str, body: bytes, status: int, reason: str
) -> None:
    response = fp32.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]


IMAGES = np.zeros((2, *SHAPE), dtype=np.float32)
BAD_NPY: list[tuple[str, bytes, int, str]] = [
    ("not npy", b"\x93NUMPY garbage", 400, "not a .npy"),
    ("truncated", _npy(IMAGES)[:-4], 400, "truncated"),
    ("padded", _npy(IMAGES) + b"\0" * 4, 400, "truncated or padded"),
    ("wrong shape", _npy(np.zeros((2, 3, 8, 8), np.float32)), 400, "shape"),
    ("no batch dimension", _npy(np.float32(1.0)), 400, "batch"),
    ("strings", _npy(np.full((2, 64), "x")), 422, "integers or floats"),
    ("complex", _npy(IMAGES.astype(np.complex64)), 422, "integers or floats"),
    ("objects", _npy(np.array([[{}] * 64] * 2, dtype=object)), 422, "integers or floats"),
    ("NaN", _npy(np.full((2, 64), np.nan, np.float32)), 400, "finite"),
    ("too many inputs", _npy(np.zeros((17, 64), np.float32)), 413, "at most 16"),
]


@pytest.mark.parametrize(("case", "body", "status", "reason"), BAD_NPY, ids=[c[0] for c in BAD_NPY])
def test_bad_npy_gets_its_status_and_a_reason(
    fp32: httpx.Client, case: str, body: bytes, status: int, reason: str
) -> None:
    headers = {"content-type": "application/octet-stream"}
    response = fp32.post("/predict", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]


def test_npy_of_integers_and_flat_images_is_accepted(fp32: httpx.Client) -> None:
    body = _npy(np.arange(2 * 64, dtype=">i2").reshape(2, 64))  # big-endian int16
    response = fp32.post("/predict", content=body, headers={"content-type": "application/x-npy"})
    assert response.status_code == 200 and len(response.json()["classes"]) == 2


def test_oversized_unknown_and_lying_bodies_are_refused(fp32: httpx.Client) -> None:
    big = b"[" * (65 * 1024)
    declared = fp32.post("/predict", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "65" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while reading
        yield from [b"0" * 16 * 1024] * 8

    chunked = fp32.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "exceeds" in chunked.json()["detail"]
    text = fp32.post("/predict", content=b"1,2,3", headers={"content-type": "text/csv"})
    assert text.status_code == 415 and "application/json" in text.json()["detail"]
    missing = fp32.post("/predict", content=b"{}", headers={"content-type": ""})
    assert missing.status_code == 415
    assert fp32.get("/healthz").status_code == 200  # still serving


def test_healthz_and_metrics(fp32: httpx.Client, run: Path) -> None:
    health = fp32.get("/healthz").json()
    assert health == {
        "status": "ok",
        "artifact": "torchscript-fp32",
        "input_shape": list(SHAPE),
        "lineage": None,
        "drift": None,
    }
    fp32.post("/predict", json={"inputs": [[0.0] * 64] * 3})
    fp32.post("/predict", json={"inputs": []})
    text = fp32.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {
        "fedpipe_requests", "fedpipe_request_errors", "fedpipe_request_latency_seconds",
        "fedpipe_examples", "fedpipe_batch_size", "fedpipe_queue_depth",
        "fedpipe_predicted_class", "process_resident_memory_bytes",
    } <= set(families)  # fmt: skip
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values()
               for s in f.samples}  # fmt: skip
    assert samples[("fedpipe_requests_total", (("code", "200"),))] >= 1
    assert samples[("fedpipe_request_errors_total", (("reason", "empty"),))] >= 1
    assert samples[("fedpipe_request_latency_seconds_count", ())] >= 1
    assert samples[("fedpipe_queue_depth", ())] == 0
    assert samples[("process_resident_memory_bytes", ())] > 1e6
    predicted = sum(s.value for s in families["fedpipe_predicted_class"].samples
                    if s.name.endswith("_total"))  # fmt: skip
    assert predicted == samples[("fedpipe_examples_total", ())] >= 3


def test_healthz_reports_the_runs_lineage(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "lineage.json").write_text(json.dumps({"parent": "abc", "rounds": 3}))
    served = load_served_model(copy, "torchscript-int8")
    assert served.lineage == {"parent": "abc", "rounds": 3}
    with serving(make_app(served.model, SHAPE, ServeConfig(), served.name, served.lineage)) as c:
        assert c.get("/healthz").json()["lineage"] == {"parent": "abc", "rounds": 3}


def _slow(seconds: float) -> Model:
    def model(x: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        return x.flatten(1)[:, :10]

    return model


def test_a_full_queue_sheds_load_with_503_and_recovers() -> None:
    cfg = ServeConfig(max_batch=1, max_wait_ms=0, max_queue=2, max_inputs=2)
    with serving(make_app(_slow(0.02), SHAPE, cfg)) as client:
        url = str(client.base_url)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=10) as aclient:
                return await asyncio.gather(
                    *(aclient.post("/predict", json={"inputs": [[0.0] * 64]}) for _ in range(30))
                )

        codes = [r.status_code for r in asyncio.run(burst())]
        assert set(codes) == {200, 503} and codes.count(503) >= 10, codes
        shed = next(r for r in asyncio.run(burst()) if r.status_code == 503)
        assert shed.headers["retry-after"] == "1" and "overloaded" in shed.json()["detail"]
        assert client.post("/predict", json={"inputs": [[0.0] * 64]}).status_code == 200
        assert 'fedpipe_request_errors_total{reason="overloaded"}' in client.get("/metrics").text


def test_a_failing_model_is_a_500_with_a_reason_and_the_service_lives_on() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of cheese")

    with serving(make_app(broken, SHAPE, ServeConfig())) as client:
        response = client.post("/predict", json={"inputs": [[0.0] * 64]})
        assert response.status_code == 500 and "out of cheese" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200
        assert 'fedpipe_request_errors_total{reason="inference"} 1.0' in client.get("/metrics").text


def test_micro_batching_groups_concurrent_requests_and_splits_large_ones() -> None:
    calls: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        time.sleep(0.005)
        return x.flatten(1)[:, :10] * 2

    async def main() -> tuple[list[Answer], Answer]:
        batcher = MicroBatcher(model, max_batch=8, max_wait_s=0.05, max_queue=100)
        batcher.start()
        xs = [np.full((1, *SHAPE), float(i), np.float32) for i in range(8)]
        singles = await asyncio.gather(*(batcher.predict(x) for x in xs))
        large = await batcher.predict(np.arange(20 * 64, dtype=np.float32).reshape(20, *SHAPE))
        await batcher.stop()
        return singles, large

    singles, large = asyncio.run(main())
    assert calls == [8, 8, 8, 4]  # eight requests in one call; 20 examples as 8 + 8 + 4
    for i, answer in enumerate(singles):
        assert answer.logits == [[2.0 * i] * 10]
    assert large.logits == (torch.arange(20 * 64.0).reshape(20, 64)[:, :10] * 2).tolist()
    assert len(large.classes) == len(large.probabilities) == 20


def test_serving_needs_an_export_and_a_known_artifact(run: Path, tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="fedpipe export"):
        load_served_model(tmp_path, "fp32")
    with pytest.raises(ServeError, match="available: torchscript-fp32, torchscript-int8"):
        load_served_model(run, "int4")
    assert fedpipe_main(["serve", str(tmp_path)]) == 1
    with pytest.raises(ConfigError, match="max_queue"):
        ServeConfig(max_inputs=100, max_queue=10)  # a request must fit in the queue


def test_drift_score_rises_on_a_shifted_stream_only(run: Path) -> None:
    # Prepare: the profile export wrote (test images), and unseen training images
    served = load_served_model(run, "fp32")
    assert served.profile is not None
    monitor = DriftMonitor(served.profile, window=200, threshold=0.25, min_examples=100)
    app = make_app(served.model, SHAPE, ServeConfig(), served.name, monitor=monitor)
    images = load_dataset(load_config(None, []).data).train.x[:360]

    def stream(client: httpx.Client, x: torch.Tensor) -> dict[str, float]:
        for start in range(0, len(x), 40):
            assert client.post("/predict", json={"inputs": x[start : start + 40].tolist()})
        families = text_string_to_metric_families(client.get("/metrics").text)
        return {
            s.labels.get("descriptor", s.name): s.value
            for f in families
            if f.name.startswith("fedpipe_drift")
            for s in f.samples
        }

    with serving(app) as client:
        # Execute: digits like the profile's, then the same digits inverted
        same = stream(client, images)
        assert client.get("/healthz").json()["drift"]["alarm"] is False
        inverted = stream(client, -images)
        health = client.get("/healthz").json()["drift"]
    # Assert
    assert same["fedpipe_drift_score"] < 0.25 and same["fedpipe_drift_alarm"] == 0
    assert inverted["fedpipe_drift_score"] > 0.25 and inverted["fedpipe_drift_alarm"] == 1
    assert set(DESCRIPTORS) <= set(inverted)
    assert inverted["input_min"] > 1 and inverted["predicted"] > 0.25
    assert health["alarm"] is True and health["seen"] >= 2 * len(images) - 64
