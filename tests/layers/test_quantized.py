"""Tests of the quantized dense wrappers QuantLinear, QuantConv2d, QuantEmbedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnquant import QuantSpec
from tnquant.layers import LowRankLinear, TTEmbedding
from tnquant.layers.anatomy import activation_sites, quant_state, weight_pairs
from tnquant.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer


def _np_int4_rows(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per output channel (axis 0), in numpy float32."""
    a = w.detach().numpy()
    red = tuple(range(1, a.ndim))
    scale = (np.max(np.abs(a), axis=red, keepdims=True) / np.float32(7)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)  # an all-zero row keeps scale 1
    return torch.from_numpy((np.clip(np.round(a / scale), -8, 7) * scale).astype(np.float32))


def _int4_rows() -> Quantizer:
    return Quantizer(QuantSpec(bits=4, granularity="channel"))


def test_linear_from_float_shares_parameters_and_output():
    torch.manual_seed(0)
    dense = nn.Linear(6, 5)
    layer = QuantLinear.from_float(dense)
    assert layer.weight is dense.weight and layer.bias is dense.bias
    assert layer.weight_quantizer is None and layer.act_quantizers is None
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), dense(x))
    assert isinstance(layer, nn.Linear) and not layer.converted
    with pytest.raises(TypeError, match="expects a torch.nn.modules.linear.Linear"):
        QuantLinear.from_float(layer)
    with pytest.raises(TypeError, match="exactly, not a subclass"):
        QuantLinear.from_float(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))


def test_linear_weight_and_activation_quantizers():
    torch.manual_seed(1)
    dense = nn.Linear(8, 4)
    layer = QuantLinear.from_float(dense)
    layer.weight_quantizer = _int4_rows()
    x = torch.randn(5, 8)
    ref = F.linear(x, _np_int4_rows(dense.weight), dense.bias)
    assert torch.equal(layer(x), ref)
    layer.act_quantizers = nn.ModuleDict(
        {
            "input": Quantizer(QuantSpec(dtype="bfloat16")),
            "output": Quantizer(QuantSpec(dtype="float16")),
        }
    )
    ref = F.linear(x.bfloat16().float(), _np_int4_rows(dense.weight), dense.bias)
    assert torch.equal(layer(x), ref.half().float())


def test_conv_from_float_keeps_hyperparameters():
    torch.manual_seed(2)
    dense = nn.Conv2d(
        4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, padding_mode="reflect"
    )
    layer = QuantConv2d.from_float(dense)
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(layer, attr) == getattr(dense, attr)
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(layer(x), dense(x))
    layer.weight_quantizer = _int4_rows()
    w = _np_int4_rows(dense.weight)
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, dense.bias, (2, 1), 0, (1, 2), 2)
    assert torch.allclose(layer(x), ref, rtol=0, atol=1e-5)
    back = layer.to_float()
    assert type(back) is nn.Conv2d and back.weight is dense.weight and back.groups == 2


def test_embedding_output_only_and_no_max_norm():
    torch.manual_seed(3)
    dense = nn.Embedding(10, 4, padding_idx=0)
    layer = QuantEmbedding.from_float(dense)
    idx = torch.tensor([[0, 3, 9]])
    assert torch.equal(layer(idx), dense(idx))
    layer.weight_quantizer = _int4_rows()
    assert torch.equal(layer(idx), _np_int4_rows(dense.weight)[idx])
    with pytest.raises(ValueError, match="max_norm"):
        QuantEmbedding.from_float(nn.Embedding(4, 2, max_norm=1.0))
    assert activation_sites(layer) == ("output",)


def test_to_float_after_convert_holds_the_dequantized_weight():
    torch.manual_seed(4)
    dense = nn.Linear(6, 3)
    layer = QuantLinear.from_float(dense)
    layer.weight_quantizer = _int4_rows()
    frozen = FrozenTensor.from_quantizer(layer.weight_quantizer, layer.weight)
    layer.weight_quantizer = frozen
    layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    assert layer.converted and quant_state(layer) == "converted"
    back = layer.to_float()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, _np_int4_rows(dense.weight))
    x = torch.randn(2, 6)
    assert torch.equal(back(x), layer(x))


def test_anatomy_helpers():
    lr = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    assert [n for n, _, _ in weight_pairs(lr)] == ["cores.0", "cores.1"]
    assert activation_sites(lr) == ("input", "output", "inter_0")
    emb = TTEmbedding([torch.randn(1, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.randn(2, 2, 2, 1)])
    assert activation_sites(emb) == ("output", "inter_0")
    assert weight_pairs(nn.ReLU()) == [] and quant_state(nn.ReLU()) == "float"
    q = QuantLinear(2, 2)
    q.act_quantizers = nn.ModuleDict({"input": Quantizer(QuantSpec())})
    assert quant_state(q) == "fake-quant"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward():
    dense = nn.Linear(8, 4).cuda()
    layer = QuantLinear.from_float(dense)
    layer.weight_quantizer = _int4_rows().cuda()
    x = torch.randn(3, 8, device="cuda")
    ref = F.linear(x, _np_int4_rows(dense.weight.cpu()).cuda(), dense.bias)
    assert torch.allclose(layer(x), ref, rtol=0, atol=1e-5)
