"""Drift: PSI, the reference profile, devices' histograms and the sliding-window monitor."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from fedpipe.config import DataConfig
from fedpipe.data import load_dataset
from fedpipe.drift import (
    DESCRIPTORS,
    DeviceProfiles,
    DriftError,
    DriftMonitor,
    Profile,
    describe,
    histograms,
    psi,
)


def test_psi_by_hand() -> None:
    # Prepare: reference 50/50, observed 80/20
    ref, obs = np.array([5.0, 5.0]), np.array([8.0, 2.0])
    # Execute / Assert: (0.8-0.5) ln(0.8/0.5) + (0.2-0.5) ln(0.2/0.5)
    assert psi(ref, obs) == pytest.approx(0.3 * math.log(1.6) - 0.3 * math.log(0.4))
    assert psi(ref, ref * 7) == pytest.approx(0.0)
    assert math.isfinite(psi(np.array([1.0, 0.0]), np.array([0.0, 1.0])))  # empty bins


def test_histograms_bins_left_closed() -> None:
    edges = {n: np.array([0.0, 1.0]) for n in DESCRIPTORS}
    values = {n: np.array([-1.0, 0.0, 0.5, 1.0, 2.0]) for n in DESCRIPTORS}
    values["predicted"] = np.array([0.0, 1.0, 2.0, 2.0, 9.0])  # 9: clipped to the last class
    counts = histograms(edges, 3, values)
    assert counts["input_mean"].tolist() == [1, 2, 2]
    assert counts["predicted"].tolist() == [1, 1, 3]


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Digits and a softmax regression fitted for a moment (any model gives probabilities;
    a fitted one gives the confident, skewed ones a real model does)."""
    ds = load_dataset(DataConfig())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ds.train.x), ds.train.y).backward()
        opt.step()
    return ds.train.x, ds.test.x, model.eval()


@torch.no_grad()
def _probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x), 1)


def test_shifted_stream_alarms_and_in_distribution_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    train, test, model = _digits()
    profile = Profile.reference(train, _probs(model, train))
    shifts = {
        "inverted": test.max() + test.min() - test,
        "noised": test + torch.randn(test.shape, generator=torch.Generator().manual_seed(1)),
    }
    same = DriftMonitor(profile, window=300, threshold=0.25, min_examples=200)
    for start in range(0, len(test), 32):  # served in batches, as a service would
        same.observe(test[start : start + 32], _probs(model, test[start : start + 32]))
    assert same.score() < 0.25 and not same.alarm
    for name, x in shifts.items():
        monitor = DriftMonitor(profile, window=300, threshold=0.25, min_examples=200)
        with caplog.at_level(logging.WARNING, logger="fedpipe.drift"):
            for start in range(0, len(x), 32):
                monitor.observe(x[start : start + 32], _probs(model, x[start : start + 32]))
        assert monitor.score() > 0.25, name
        assert monitor.alarm, name
    assert sum("input drift: PSI" in r.message for r in caplog.records) == 2  # once each


def test_monitor_counts_only_the_window() -> None:
    train, test, model = _digits()
    profile = Profile.reference(train, _probs(model, train))
    monitor = DriftMonitor(profile, window=100, threshold=0.25, min_examples=1)
    for start in range(0, 250, 7):  # batches that straddle the ring's end
        monitor.observe(test[start : start + 7], _probs(model, test[start : start + 7]))
    last = test[152:252]  # the 100 most recent examples (36 batches of 7 end at 252)
    expected = histograms(profile.edges, 10, describe(last, _probs(model, last)))
    for n in DESCRIPTORS:
        assert monitor._counts[n].tolist() == expected[n].tolist(), n
    assert monitor.scores()["input_mean"] == pytest.approx(
        psi(profile.fractions["input_mean"], expected["input_mean"])
    )


def test_monitor_scores_zero_until_min_examples() -> None:
    train, test, model = _digits()
    profile = Profile.reference(train, _probs(model, train))
    monitor = DriftMonitor(profile, window=300, min_examples=200)
    x = -test[:150]
    monitor.observe(x, _probs(model, x))
    assert monitor.score() == 0.0 and not monitor.alarm


def test_profile_round_trip_and_refusals() -> None:
    train, _, model = _digits()
    profile = Profile.reference(train, _probs(model, train))
    back = Profile.from_json(profile.to_json())
    assert back.bins() == profile.bins() and back.sources == {"coordinator_examples": len(train)}
    for n in DESCRIPTORS:
        np.testing.assert_allclose(back.fractions[n], profile.fractions[n])
    bad = profile.to_json()
    bad["fractions"]["confidence"] = bad["fractions"]["confidence"][:-1]
    with pytest.raises(DriftError, match="confidence"):
        Profile.from_json(bad)
    with pytest.raises(DriftError, match="not a drift profile"):
        Profile.from_json({"classes": 10})


def test_device_histograms_checked_and_merged_per_device() -> None:
    train, test, model = _digits()
    profile = Profile.reference(train, _probs(model, train))
    devices = DeviceProfiles(profile.edges, profile.classes)
    honest = histograms(profile.edges, 10, describe(test[:50], _probs(model, test[:50])))
    assert devices.add(honest, 50) is None
    # A device claiming a million examples in one bin weighs as one device, not 20,000.
    loud = {n: np.zeros_like(c) for n, c in honest.items()}
    for c in loud.values():
        c[0] = 1_000_000
    assert devices.add(loud, 1_000_000) is None
    merged = devices.fractions()
    assert merged is not None
    assert merged["input_mean"][0] == pytest.approx(0.5 + 0.5 * honest["input_mean"][0] / 50)
    # Malformed reports are refused with a reason, and change nothing.
    wrong_sum = {**honest, "input_std": honest["input_std"] * 2}
    wrong_bins = {**honest, "predicted": honest["predicted"][:-1]}
    negative = {**honest, "confidence": honest["confidence"] - 100}
    floats = {**honest, "input_max": honest["input_max"].astype(np.float32)}
    missing = {n: c for n, c in honest.items() if n != "input_min"}
    # Counts whose int64 sum wraps around to exactly 50: 2^62 + 2^62 + (2^63 - 1) + 1 + 50
    wrapped = {**honest, "predicted": np.zeros_like(honest["predicted"])}
    wrapped["predicted"][:5] = [2**62, 2**62, 2**63 - 1, 1, 50]
    for bad in (wrong_sum, wrong_bins, negative, floats, missing, wrapped):
        assert devices.add(bad, 50) is not None
    assert devices.devices == 2
    mixed = profile.with_devices(DeviceProfiles.from_json(profile, devices.to_json()))
    assert mixed.sources["devices"] == 2
    for n in DESCRIPTORS:
        assert mixed.fractions[n].sum() == pytest.approx(1.0)
        np.testing.assert_allclose(mixed.fractions[n], 0.5 * (profile.fractions[n] + merged[n]))
