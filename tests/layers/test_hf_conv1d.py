"""The layers standing for Hugging Face's ``Conv1D``, against plain ``x @ W + b`` references.

Each reference weight is rebuilt from the raw cores with numpy
(``tests.layers.refs``) and used in Conv1D's own layout ``(in, out)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from tests.layers.refs import np64, rel_err, tt_weight_np, tucker_weight_np  # noqa: E402
from tnquant import TT, LowRank, QuantSpec, Tucker  # noqa: E402
from tnquant.layers import LowRankHFConv1D, LowRankLinear, QuantHFConv1D, TTHFConv1D, TuckerHFConv1D  # noqa: E402
from tnquant.quant import Quantizer  # noqa: E402
from tnquant.quant.frozen import FrozenTensor  # noqa: E402


def _conv1d(nf: int = 12, nx: int = 8, seed: int = 0) -> Conv1D:
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx).double()
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def _reference_matrix(layer) -> np.ndarray:
    """The ``(out, in)`` matrix of a layer's cores, rebuilt by numpy."""
    cores = list(layer.cores)
    if isinstance(layer, LowRankHFConv1D):
        return np64(cores[0]) @ np64(cores[1])
    if isinstance(layer, TTHFConv1D):
        return tt_weight_np(cores, layer.out_features, layer.in_features)
    return tucker_weight_np(cores, layer.out_features, layer.in_features)


SPECS = [
    (LowRankHFConv1D, LowRank(rank=3)),
    (TTHFConv1D, TT(rank=2, order=2)),
    (TuckerHFConv1D, Tucker(rank=(3, 2))),
    (TuckerHFConv1D, Tucker(rank=2, order=2)),
]


@pytest.mark.parametrize(("cls", "spec"), SPECS, ids=lambda v: repr(v)[:24])
def test_forward_is_x_at_the_rebuilt_weight_plus_bias(cls, spec):
    dense = _conv1d()
    layer = cls.from_dense(dense, spec)
    assert type(layer) is cls and (layer.nf, layer.nx) == (12, 8)
    w = _reference_matrix(layer).T  # Conv1D's layout (in, out)
    assert w.shape == (8, 12)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    ref = np64(x) @ w + np64(dense.bias)
    assert rel_err(np64(layer(x)), ref) < 1e-9
    np.testing.assert_allclose(np64(layer.dense_weight()), w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np64(layer.eval().weight), w, rtol=1e-10, atol=1e-12)
    back = layer.to_dense()
    assert type(back) is Conv1D and (back.nf, back.nx) == (12, 8)
    assert rel_err(np64(back(x)), ref) < 1e-9
    assert layer.decomposition_info["rel_error"] == pytest.approx(
        rel_err(w, np64(dense.weight)), rel=1e-6
    )


@pytest.mark.parametrize(("cls", "spec"), [(LowRankHFConv1D, LowRank(rank="full"))])
def test_full_rank_is_the_conv1d_itself(cls, spec):
    dense = _conv1d()
    layer = cls.from_dense(dense, spec)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert rel_err(np64(layer(x)), np64(dense(x))) < 1e-10


def test_a_gram_gives_a_data_aware_fit_of_the_conv1d():
    dense = _conv1d()
    x = torch.randn(200, 8, dtype=torch.float64) * torch.linspace(0.01, 3, 8, dtype=torch.float64)
    plain = LowRankHFConv1D.from_dense(dense, LowRank(rank=2))
    aware = LowRankHFConv1D.from_dense(dense, LowRank(rank=2), gram=x.T @ x)
    ref = np64(dense(x))
    assert aware.decomposition_info["out_rel_error"] is not None
    assert rel_err(np64(aware(x)), ref) < rel_err(np64(plain(x)), ref)


def test_factorized_layers_of_conv1d_and_linear_are_told_apart():
    with pytest.raises(TypeError, match=r"expects a transformers.pytorch_utils.Conv1D"):
        LowRankHFConv1D.from_dense(nn.Linear(8, 12), LowRank(rank=2))
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv1D"):
        LowRankLinear.from_dense(_conv1d(), LowRank(rank=2))
    with pytest.raises(TypeError, match=r"expects a transformers.pytorch_utils.Conv1D"):
        QuantHFConv1D.from_float(nn.Linear(8, 12))


def _np_int4_out_channels(w_in_out: torch.Tensor) -> np.ndarray:
    """Symmetric int4 per output feature (a column of Conv1D's weight), numpy float32."""
    a = w_in_out.detach().float().numpy().T  # (out, in)
    scale = (np.max(np.abs(a), axis=1, keepdims=True) / np.float32(7)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)
    return (np.clip(np.round(a / scale), -8, 7) * scale).astype(np.float32).T


def test_quantized_conv1d_quantizes_per_output_feature_and_reads_like_a_conv1d():
    torch.manual_seed(0)
    dense = Conv1D(12, 8)
    layer = QuantHFConv1D.from_float(dense)
    assert layer.weight is dense.weight and layer.bias is dense.bias
    layer.weight_quantizer = Quantizer(QuantSpec(bits=4, granularity="channel"))
    x = torch.randn(3, 8)
    wq = _np_int4_out_channels(dense.weight)
    ref = x.numpy() @ wq + dense.bias.detach().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=0, atol=1e-5)
    assert layer.to_float().weight is dense.weight
    codes = FrozenTensor.from_quantizer(layer.weight_quantizer, dense.weight.detach().mT)
    layer.weight_quantizer = codes
    layer.weight = nn.Parameter(dense.weight.new_empty(0), requires_grad=False)
    np.testing.assert_allclose(layer.weight.detach().numpy(), wq, rtol=0, atol=1e-7)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=0, atol=1e-5)
    with pytest.raises(AttributeError, match="read-only after convert"):
        layer.weight = nn.Parameter(torch.zeros(8, 12))
    back = layer.to_float()
    assert type(back) is Conv1D
    np.testing.assert_allclose(back.weight.detach().numpy(), wq, rtol=0, atol=1e-7)
