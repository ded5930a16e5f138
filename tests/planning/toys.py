"""Small models and data for the search tests (seeded)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)
    ).eval()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


class TwoBranch(nn.Module):
    """``big(x) + small(x)``: ``big`` is scaled so its output dominates the sum."""

    def __init__(self, scale: float = 100.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.big = nn.Linear(32, 32)
        self.small = nn.Linear(32, 32)
        with torch.no_grad():
            self.big.weight.mul_(scale)
            self.big.bias.mul_(scale)

    def forward(self, x):
        return self.big(x) + self.small(x)


def batches(shape=(64, 32), n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]
