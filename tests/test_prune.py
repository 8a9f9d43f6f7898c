"""Pruning for export: magnitude pruning on hand-made weights, channel surgery checked
against the unpruned model, and the pruned artifacts of `fedpipe export` on real runs."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedpipe.cli.main import main as fedpipe_main
from fedpipe.export import export_run, load_artifact, load_run_model
from fedpipe.models import McMahanCNN, mlp, resnet18_cifar
from fedpipe.prune import channel_prune, magnitude_prune, sparsity

pytestmark = pytest.mark.usefixtures("task_identity")

RunFactory = Callable[[Sequence[str]], Path]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _two_layers() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -4.0], [3.0, 0.5]]))
        model[2].weight.copy_(torch.tensor([[-2.0, 6.0]]))
    return model


# --- magnitude pruning -------------------------------------------------------------------


def test_magnitude_prune_zeroes_the_smallest_weights_across_all_layers() -> None:
    model = _two_layers()
    pruned = magnitude_prune(model, 0.5)  # 3 of 6 weights: |0.5|, |1|, |-2|
    assert torch.equal(pruned[0].weight, torch.tensor([[0.0, -4.0], [3.0, 0.0]]))
    assert torch.equal(pruned[2].weight, torch.tensor([[0.0, 6.0]]))
    assert torch.equal(pruned[0].bias, model[0].bias)  # biases are not pruned
    assert sparsity(pruned) == 0.5 and sparsity(model) == 0.0  # the original is untouched
    assert pruned.state_dict().keys() == model.state_dict().keys()  # no masks left behind
    assert not any(pruned[0]._forward_pre_hooks.values())


def test_sparsity_of_a_cnn_counts_conv_and_linear_weights_only() -> None:
    model = McMahanCNN((1, 8, 8), 10)
    pruned = magnitude_prune(model, 0.7)
    assert sparsity(pruned) == pytest.approx(0.7, abs=1e-4)
    assert all(bool((p != 0).all()) for n, p in pruned.named_parameters() if "bias" in n)
    assert sparsity(magnitude_prune(model, 0.0)) == 0.0


# --- channel pruning ---------------------------------------------------------------------


def _silence(layer: nn.Conv2d | nn.Linear, channels: list[int]) -> None:
    """Zero these output channels (weights and bias): after ReLU they carry only zeros."""
    with torch.no_grad():
        layer.weight[channels] = 0
        if layer.bias is not None:
            layer.bias[channels] = 0


def _others(n: int, removed: list[int]) -> torch.Tensor:
    return torch.tensor([c for c in range(n) if c not in removed])


def test_channel_prune_with_fraction_0_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    for model, x in ((McMahanCNN((1, 8, 8), 10), torch.randn(4, 1, 8, 8)),
                     (mlp((64,), 10, 16), torch.randn(4, 64))):  # fmt: skip
        pruned = channel_prune(model.eval(), 0.0, x[:1])
        assert pruned is not None and _params(pruned) == _params(model)
        assert torch.equal(pruned(x), model(x))


def test_cnn_channels_removed_when_silent_leave_the_logits_unchanged() -> None:
    """conv 32 -> conv 64 -> flatten (64 x 2 x 2) -> fc 512 -> fc 10, a quarter removed."""
    torch.manual_seed(0)
    model = McMahanCNN((1, 8, 8), 10).eval()
    conv1, conv2 = model.features[0], model.features[3]
    fc1 = model.classifier[1]
    gone1, gone2, gone3 = list(range(0, 32, 4)), list(range(1, 64, 4)), list(range(2, 512, 4))
    _silence(conv1, gone1)
    _silence(conv2, gone2)
    _silence(fc1, gone3)
    x = torch.randn(16, 1, 8, 8)
    pruned = channel_prune(model, 0.25, x[:1])
    assert pruned is not None
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)
    p1, p2 = pruned.features[0], pruned.features[3]
    q1, q2 = pruned.classifier[1], pruned.classifier[3]
    assert (p1.out_channels, p2.in_channels, p2.out_channels) == (24, 24, 48)
    assert (q1.in_features, q1.out_features, q2.in_features) == (48 * 4, 384, 384)
    keep1, keep2, keep3 = _others(32, gone1), _others(64, gone2), _others(512, gone3)
    assert torch.equal(p2.weight, conv2.weight[keep2][:, keep1])
    columns = (keep2[:, None] * 4 + torch.arange(4)).flatten()  # channel c: columns 4c..4c+3
    assert torch.equal(q1.weight, fc1.weight[keep3][:, columns])
    expected = (24 * 25 + 24) + (48 * 24 * 25 + 48) + (384 * 192 + 384) + (10 * 384 + 10)
    assert _params(pruned) == expected
    assert _params(model) == (32 * 25 + 32) + (64 * 32 * 25 + 64) + (512 * 256 + 512) + 5130


def test_mlp_hidden_units_removed_when_silent_leave_the_logits_unchanged() -> None:
    torch.manual_seed(0)
    model = mlp((64,), 10, 16).eval()
    _silence(model[1], [0, 5, 9, 15])
    _silence(model[3], [2, 3, 4, 8])
    x = torch.randn(8, 64)
    pruned = channel_prune(model, 0.25, x[:1])
    assert pruned is not None
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)
    assert [m.weight.shape for m in pruned if isinstance(m, nn.Linear)] == [
        (12, 64), (12, 12), (10, 12),
    ]  # fmt: skip


class _ConvNormNet(nn.Module):
    """Functional ops and a batch norm between two convs; the output conv stays whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def test_batch_norm_between_producer_and_consumer_is_shrunk_with_it() -> None:
    """BN(0) is not 0, so the removed channels are made to not matter downstream instead."""
    torch.manual_seed(0)
    model = _ConvNormNet()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    gone = [1, 6]
    _silence(model.conv1, gone)
    with torch.no_grad():
        model.conv2.weight[:, gone] = 0
    x = torch.randn(5, 3, 8, 8)
    pruned = channel_prune(model, 0.25, x[:1])
    assert isinstance(pruned, _ConvNormNet)
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)
    keep = _others(8, gone)
    assert pruned.bn.num_features == 6
    assert torch.equal(pruned.bn.running_mean, model.bn.running_mean[keep])
    assert torch.equal(pruned.bn.weight, model.bn.weight[keep])
    assert pruned.conv2.out_channels == 3  # conv2 -> flatten -> fc: pruned too
    assert pruned.fc.in_features == 3 * 4 and not pruned.training


class _Unsafe(nn.Module):
    """Every producer is unsafe: a residual add, two readers, a concat, the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x)) + x  # a: residual add
        z = self.b(y)  # b: read by relu and by the concat
        return self.c(torch.cat([torch.relu(z), z], 1))  # c: the output


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x  # data-dependent: torch.fx cannot trace it


def test_unsafe_or_untraceable_models_are_left_whole() -> None:
    assert channel_prune(_Unsafe(), 0.5, torch.randn(1, 4, 3, 3)) is None
    assert channel_prune(_Branchy(), 0.5, torch.randn(1, 4)) is None


def test_resnet18_prunes_only_the_first_conv_of_each_block() -> None:
    """Every block output feeds a residual add; inside a block conv1 -> bn1 -> relu ->
    conv2 is a safe chain (the block's ReLU module is reused, which is fine)."""
    model = resnet18_cifar((3, 32, 32), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = channel_prune(model, 0.5, x[:1])
    assert pruned is not None and pruned(x).shape == (2, 10)
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for block in (0, 1):
            old, new = (
                model.get_submodule(f"{layer}.{block}"),
                pruned.get_submodule(f"{layer}.{block}"),
            )
            assert new.conv1.out_channels == old.conv1.out_channels // 2 == new.bn1.num_features
            assert new.conv2.out_channels == old.conv2.out_channels
    assert pruned.conv1.out_channels == 64 and pruned.fc.in_features == 512


# --- fedpipe export ----------------------------------------------------------------------


def test_export_writes_pruned_artifacts_checked_on_the_test_set(
    digits_run: Path, private_copy: Callable[[Path], Path]
) -> None:
    run = private_copy(digits_run)
    rows = {r.artifact: r for r in export_run(run, overrides=["export.prune_amount=0.7"])}
    fp32 = rows["torchscript-fp32"]
    assert {"pruned-fp32", "pruned-int8", "channels-fp32", "channels-int8"} <= rows.keys()
    for name in ("pruned-fp32", "pruned-int8"):
        row = rows[name]
        assert row.path.endswith(".pt.xz") and row.sparsity == pytest.approx(0.7, abs=0.01)
        assert abs(row.accuracy - fp32.accuracy) <= 0.03  # 64-unit MLP on 360 test digits
        assert row.size_bytes < rows[name.replace("pruned", "torchscript")].size_bytes
    for row in rows.values():  # sizes as stored: one file each, no other file counted
        assert row.size_bytes == (run / "export" / row.path).stat().st_size
    assert rows["channels-fp32"].sparsity == 0.0 and rows["channels-fp32"].path.endswith(".pt")
    assert abs(rows["channels-fp32"].accuracy - fp32.accuracy) <= 0.05
    model, cfg, _ = load_run_model(run)
    sparse = load_artifact(run / "export" / "model_pruned_fp32.pt.xz")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(sparse(x), magnitude_prune(model, 0.7)(x))
    report = json.loads((run / "export" / "export.json").read_text())
    assert report["export"] == {"prune_amount": 0.7, "channel_fraction": 0.25}
    assert all("sparsity" in a for a in report["artifacts"])
    assert "| sparsity |" in (run / "export" / "export.md").read_text()


def test_zero_amounts_skip_their_rows_and_say_so(
    digits_run: Path, private_copy: Callable[[Path], Path]
) -> None:
    run = private_copy(digits_run)
    zero = ["export.prune_amount=0", "export.channel_fraction=0"]
    assert fedpipe_main(["export", str(run), *zero]) == 0
    report = json.loads((run / "export" / "export.json").read_text())
    assert [a["artifact"] for a in report["artifacts"]][:2] == [
        "torchscript-fp32", "torchscript-int8",
    ]  # fmt: skip
    assert not any(a["artifact"].startswith(("pruned", "channels")) for a in report["artifacts"])
    assert report["skipped"]["pruned"] == "export.prune_amount=0"
    assert report["skipped"]["channels"] == "export.channel_fraction=0"
    assert fedpipe_main(["export", str(run), "--force", "model.hidden=8"]) == 2  # the run's
    assert fedpipe_main(["export", str(run), "--force", "export.prune_amount=2"]) == 2


@pytest.mark.slow
def test_cnn_export_has_channel_pruned_artifacts(finished_run: RunFactory) -> None:
    run = finished_run(["model.name='cnn'", "federation.rounds=2"])
    rows = {r.artifact: r for r in export_run(run)}
    fp32, slim = rows["torchscript-fp32"], rows["channels-fp32"]
    assert slim.size_bytes < 0.8 * fp32.size_bytes  # 1 - 0.75^2 of most weights removed
    assert abs(slim.accuracy - fp32.accuracy) <= 0.05
    assert abs(rows["pruned-int8"].accuracy - fp32.accuracy) <= 0.03
    assert rows["channels-int8"].size_bytes < slim.size_bytes
