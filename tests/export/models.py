"""Small quantized networks several export test files share (no optional dependency)."""

from __future__ import annotations

import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.layers import LowRankLinear


def lowrank_mlp() -> nn.Module:
    """LowRank(8 -> 6, rank 3) -> ReLU -> Linear(6, 4): FixedPoint and pow2 per-channel cores."""
    torch.manual_seed(0)
    model = nn.Sequential(
        LowRankLinear([torch.randn(6, 3), torch.randn(3, 8)], bias=torch.randn(6)),
        nn.ReLU(),
        nn.Linear(6, 4),
    )
    quantize(
        model,
        cores={0: FixedPoint(8, 3), 1: QuantSpec(6, scale="pow2", granularity="channel", axis=0)},
        weights={"2": QuantSpec(5, scale="pow2")},
        progress=False,
    )
    return model
