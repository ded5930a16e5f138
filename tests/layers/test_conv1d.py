"""``TuckerConv1d`` and ``QuantConv1d`` against ``F.conv1d`` of an independently rebuilt kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.layers.refs import F64_RTOL, np64, random_cores, rel_err, tucker_kernel_np
from tnquant import QuantSpec, Tucker
from tnquant.layers import QuantConv1d, TuckerConv1d
from tnquant.quant import Quantizer

GEOMETRIES = [
    {},
    {"stride": 2, "padding": 1},
    {"padding": "same", "dilation": 2},
    {"padding": "valid"},
    {"padding": 2, "padding_mode": "reflect"},
    {"padding": "same", "padding_mode": "circular"},
    {"padding": 1, "padding_mode": "replicate", "stride": 3},
]


def _reference(x: torch.Tensor, kernel: np.ndarray, bias, geometry: dict) -> torch.Tensor:
    """``nn.Conv1d``'s own forward with the numpy-rebuilt kernel."""
    conv = nn.Conv1d(
        kernel.shape[1], kernel.shape[0], kernel.shape[2], bias=bias is not None, **geometry
    ).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel))
        if bias is not None:
            conv.bias.copy_(bias)
        return conv(x)


@pytest.mark.parametrize("impl", ["auto", "factorized", "reconstructed"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_forward_matches_conv1d_of_the_rebuilt_kernel(impl, geometry):
    cores = random_cores([(6, 2), (2, 3, 3), (5, 3)], seed=1)
    bias = torch.randn(6, dtype=torch.float64)
    layer = TuckerConv1d(cores, bias=bias, **geometry)
    layer.implementation = impl
    x = torch.randn(2, 5, 11, dtype=torch.float64)
    ref = _reference(x, tucker_kernel_np(cores), bias, geometry)
    assert layer(x).shape == ref.shape
    assert rel_err(np64(layer(x)), np64(ref)) < F64_RTOL
    np.testing.assert_allclose(np64(layer.dense_weight()), tucker_kernel_np(cores), rtol=1e-12)
    dense = layer.to_dense()
    assert type(dense) is nn.Conv1d and rel_err(np64(dense(x)), np64(ref)) < F64_RTOL
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups"):
        assert getattr(layer, attr) == getattr(dense, attr), attr  # drop-in attributes
    assert layer.weight.shape == dense.weight.shape


def test_from_dense_full_rank_is_exact_and_ranks_are_capped():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, padding=1).double()
    layer = TuckerConv1d.from_dense(conv, Tucker(rank=30))  # above both channel counts
    assert layer.ranks == (6, 4) and layer.decomposition_info["capped"] is not None
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    assert rel_err(np64(layer(x)), np64(conv(x))) < 1e-10
    assert rel_err(np64(layer(x[0])), np64(conv(x[0]))) < 1e-10  # unbatched
    low = TuckerConv1d.from_dense(conv, Tucker(rank=(2, 2)))
    assert low.ranks == (2, 2) and low.n_params < conv.weight.numel() + 6
    assert low.decomposition_info["rel_error"] == pytest.approx(
        rel_err(np64(low.dense_weight()), np64(conv.weight)), rel=1e-9
    )


def test_refusals():
    conv = nn.Conv1d(4, 4, 3)
    with pytest.raises(ValueError, match="only groups=1 convolutions, got groups=2"):
        TuckerConv1d.from_dense(nn.Conv1d(4, 4, 3, groups=2), Tucker(rank=2))
    with pytest.raises(TypeError, match="expects an nn.Conv1d, got Conv2d"):
        TuckerConv1d.from_dense(nn.Conv2d(4, 4, 3), Tucker(rank=2))
    with pytest.raises(ValueError, match="takes no gram"):
        TuckerConv1d.from_dense(conv, Tucker(rank=2), gram=torch.eye(4))
    with pytest.raises(ValueError, match="takes no order/in_shape/out_shape"):
        TuckerConv1d.from_dense(conv, Tucker(rank=2, order=2))
    with pytest.raises(ValueError, match="G.shape\\[1\\] \\(U_in.shape\\[1\\]\\) must be 3"):
        TuckerConv1d([torch.randn(4, 2), torch.randn(2, 2, 3), torch.randn(4, 3)])
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        TuckerConv1d(random_cores([(4, 2), (2, 2, 3), (4, 2)], 0), padding="same", stride=2)
    layer = TuckerConv1d(random_cores([(4, 2), (2, 2, 3), (4, 2)], 0))
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 4, L\)"):
        layer(torch.randn(2, 3, 8))


def test_intermediate_quantizers_run_the_chain():
    cores = random_cores([(6, 2), (2, 3, 3), (5, 3)], seed=2, dtype=torch.float32)
    layer = TuckerConv1d(cores, padding=1)
    seen = []

    class Spy(nn.Module):
        def forward(self, t):
            seen.append(tuple(t.shape))
            return t

    layer.act_quantizers = nn.ModuleDict({"inter_0": Spy(), "inter_1": Spy()})
    x = torch.randn(2, 5, 7)
    ref = F.conv1d(x, torch.from_numpy(tucker_kernel_np(cores)).float(), padding=1)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    assert seen == [(2, 3, 7), (2, 2, 7)]
    layer.implementation = "reconstructed"
    with pytest.raises(ValueError, match="has no intermediate results"):
        layer(x)


def _np_int4_channels(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per output channel, numpy float32 (the independent reference)."""
    a = w.detach().numpy()
    amax = np.max(np.abs(a.reshape(a.shape[0], -1)), axis=1).reshape(-1, 1, 1)
    scale = np.where(amax == 0, np.float32(1), amax / np.float32(7)).astype(np.float32)
    return torch.from_numpy((np.clip(np.round(a / scale), -8, 7) * scale).astype(np.float32))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_quant_conv1d_quantizes_per_channel_grouped_and_depthwise_too(groups):
    torch.manual_seed(0)
    dense = nn.Conv1d(4, 8, 3, padding=1, groups=groups)
    layer = QuantConv1d.from_float(dense)
    assert layer.weight is dense.weight and layer.bias is dense.bias and not layer.converted
    layer.weight_quantizer = Quantizer(QuantSpec(bits=4, granularity="channel"))
    x = torch.randn(2, 4, 9)
    ref = F.conv1d(x, _np_int4_channels(dense.weight), dense.bias, padding=1, groups=groups)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-6)
    back = layer.to_float()
    assert type(back) is nn.Conv1d and back.groups == groups and back.weight is dense.weight
    with pytest.raises(TypeError, match="expects a torch.nn.modules.conv.Conv1d"):
        QuantConv1d.from_float(nn.Conv2d(4, 8, 3))
