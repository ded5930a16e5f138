"""``registry.unsupported``: every module holding a weight tnquant cannot handle has a reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnquant.layers import LowRankLinear, QuantLinear
from tnquant.registry import UNSUPPORTED, holds_weight, lookup, unsupported


class Gate(nn.Module):
    """A module tnquant has never heard of, holding a weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Scale(nn.Module):
    """A 1-D weight (a norm's scale): left float on purpose, not reported."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))


@pytest.mark.parametrize(
    ("module", "start"),
    [
        (nn.Conv3d(2, 3, 3), "Conv3d is not supported"),
        (nn.ConvTranspose1d(2, 3, 3), "ConvTranspose1d is not supported: a transposed"),
        (nn.ConvTranspose2d(2, 3, 3), "ConvTranspose2d is not supported: a transposed"),
        (nn.ConvTranspose3d(2, 3, 3), "ConvTranspose3d is not supported: a transposed"),
        (nn.LSTM(4, 5), "LSTM is not supported: its weights (weight_ih_l*"),
        (nn.GRU(4, 5), "GRU is not supported"),
        (nn.RNN(4, 5), "RNN is not supported"),
        (nn.LSTMCell(4, 5), "LSTMCell is not supported"),
        (nn.MultiheadAttention(8, 2), "MultiheadAttention is not supported: "),
        (nn.MultiheadAttention(8, 2).out_proj, "NonDynamicallyQuantizableLinear is a subclass"),
        (Gate(), "no registry entry for Gate"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_every_weight_tnquant_cannot_handle_has_a_reason(module, start):
    reason = unsupported(module)
    assert reason is not None and reason.startswith(start), reason


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(2, 2),
        nn.Conv2d(2, 2, 3),
        nn.Conv2d(4, 4, 3, groups=4),  # quantized per channel; only factorize refuses it
        nn.Conv1d(4, 4, 3, groups=2),
        nn.Embedding(5, 2),
        QuantLinear(2, 2),
        LowRankLinear([torch.randn(3, 1), torch.randn(1, 2)]),
        nn.LayerNorm(4),
        nn.BatchNorm1d(4),
        Scale(),
        nn.Sequential(nn.LSTM(2, 2)),  # a container: its child is asked, not it
        nn.ReLU(),
    ],
    ids=lambda m: type(m).__name__,
)
def test_supported_kinds_norms_and_containers_have_none(module):
    assert unsupported(module) is None


def test_the_table_and_the_rule_agree():
    for cls in UNSUPPORTED:
        assert lookup(cls.__new__(cls)) is None  # an entry would make the table lie
    assert holds_weight(nn.MultiheadAttention(4, 2))  # in_proj_weight
    assert not holds_weight(Scale()) and not holds_weight(nn.Sequential(Gate()))
    with pytest.raises(TypeError, match="module must be an nn.Module, got int"):
        unsupported(3)  # type: ignore[arg-type]
