"""Model registry: a name from the run config -> a PyTorch module.

Every model is Opacus-compatible (GroupNorm, never BatchNorm: per-sample gradients must
not mix examples), so the same architecture serves non-private and DP-SGD training.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """Two hidden layers for flat features (8x8 digits, tabular files)."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LogReg(nn.Module):
    """Multinomial logistic regression: one linear layer, for tabular files (and a DP baseline:
    fewest parameters, so the least noise per coordinate for a given update norm)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class CNN1D(nn.Module):
    """Three 1-D convolutions with GroupNorm for sequences such as MNIST-1D (40 steps)."""

    def __init__(self, num_features: int, num_classes: int, channels: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size=5, padding=2),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1, stride=2),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1, stride=2),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
        )
        length = (num_features + 1) // 2
        length = (length + 1) // 2
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.features(x.unsqueeze(1))
        return self.head(hidden.flatten(1))


MODELS: dict[str, Callable[[int, int], nn.Module]] = {"mlp": MLP, "logreg": LogReg, "cnn1d": CNN1D}


def build_model(name: str, num_features: int, num_classes: int, seed: int | None = None) -> nn.Module:
    """A freshly initialised model; with ``seed`` the initial weights are reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name](num_features, num_classes)
