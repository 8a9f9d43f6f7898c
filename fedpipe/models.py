"""Model registry: the networks fedpipe trains, keyed by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedpipe.config import ModelConfig

__all__ = ["MODELS", "McMahanCNN", "build_model", "mlp", "resnet18_cifar"]


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int) -> nn.Module:
    """Two hidden layers; the tiny default for the embedded digits dataset."""
    features = 1
    for d in input_shape:
        features *= d
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class McMahanCNN(nn.Module):
    """The MNIST CNN of McMahan et al. 2017: two 5x5 convs (32, 64), fc 512.

    1,663,370 parameters for 1x28x28 inputs, as in the FedAvg paper.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 64 * (height // 4) * (width // 4)  # two 2x2 pools
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def resnet18_cifar(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 conv, stride 1, no max-pool).

    The ImageNet stem shrinks a 32x32 image to 8x8 before the first block, which costs
    several points of accuracy on CIFAR-10.
    """
    from torchvision.models import resnet18

    model: nn.Module = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


Builder = Callable[[tuple[int, ...], int, ModelConfig], nn.Module]

MODELS: dict[str, Builder] = {
    "mlp": lambda shape, classes, cfg: mlp(shape, classes, cfg.hidden),
    "cnn": lambda shape, classes, cfg: McMahanCNN(shape, classes),
    "resnet18": lambda shape, classes, cfg: resnet18_cifar(shape, classes),
}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate the configured model for inputs of `input_shape` (C, H, W)."""
    if cfg.name == "cnn" and len(input_shape) != 3:
        raise ValueError(f"model.name='cnn' needs (C, H, W) inputs, got shape {input_shape}")
    return MODELS[cfg.name](input_shape, num_classes, cfg)
