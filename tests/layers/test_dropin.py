"""Factorized and converted layers read like the layers they replace (`.weight`, sizes, bias).

References: every dense weight is rebuilt from the raw cores with numpy
(:mod:`tests.layers.refs`); quantized values come from a numpy int4 rounding.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.layers.refs import (
    cp_kernel_np,
    np64,
    random_cores,
    tt_weight_np,
    tucker_kernel_np,
    tucker_weight_np,
)
from tnquant import TT, LowRank, QuantSpec, Tucker
from tnquant.conversion import convert
from tnquant.layers import (
    CPConv2d,
    LowRankLinear,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantHFConv1D,
    QuantLinear,
    TTEmbedding,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)
from tnquant.layers.dropin import declines_fused_kernels
from tnquant.ptq import calibrate
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.quantization import quantize

RTOL = 1e-10  # float64 reconstruction vs the numpy reference


def _lowrank():
    cores = random_cores([(6, 2), (2, 5)], seed=0)
    layer = LowRankLinear(cores, bias=torch.zeros(6, dtype=torch.float64))
    return layer, lambda cs: np64(cs[0]) @ np64(cs[1])


def _tt():
    cores = random_cores([(1, 2, 3, 2), (2, 4, 5, 1)], seed=1)
    layer = TTLinear(cores, in_features=14, out_features=7)  # padded on both sides
    return layer, lambda cs: tt_weight_np(cs, 7, 14)


def _tucker():
    cores = random_cores([(6, 3), (3, 2), (5, 2)], seed=2)
    return TuckerLinear(cores), lambda cs: tucker_weight_np(cs)


def _tucker_conv():
    cores = random_cores([(6, 2), (2, 3, 3, 3), (4, 3)], seed=3)
    return TuckerConv2d(cores, stride=2, padding=1), tucker_kernel_np


def _cp_conv():
    cores = random_cores([(6, 2), (4, 2), (3, 2), (3, 2)], seed=4)
    return CPConv2d(cores, padding=1), cp_kernel_np


def _tt_embedding():
    cores = random_cores([(1, 3, 2, 2), (2, 4, 3, 1)], seed=5)
    layer = TTEmbedding(cores, num_embeddings=11, embedding_dim=5)
    return layer, lambda cs: tt_weight_np(cs, 11, 5)


BUILDERS = [_lowrank, _tt, _tucker, _tucker_conv, _cp_conv, _tt_embedding]
IDS = ["lowrank", "tt", "tucker", "tucker_conv", "cp_conv", "tt_embedding"]


def _int4(c: torch.Tensor, scale_of: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric int4 per tensor in numpy (QuantSpec(bits=4)), its scale from ``scale_of``."""
    a = np64(c)
    scale = np.max(np.abs(np64(c if scale_of is None else scale_of))) / 7
    return torch.from_numpy(np.clip(np.round(a / scale), -8, 7) * scale)


def _attach_int4(layer) -> list[Quantizer]:
    qs = [Quantizer(QuantSpec(bits=4)).freeze(c.detach()) for c in layer.cores]
    layer.core_quantizers = nn.ModuleList(qs)
    return qs


@pytest.mark.parametrize("build", BUILDERS, ids=IDS)
def test_weight_is_the_dense_reconstruction_in_eval_and_train(build):
    layer, ref = build()
    want = ref(list(layer.cores))
    layer.eval()
    w = layer.weight
    np.testing.assert_allclose(np64(w), want, rtol=RTOL, atol=1e-12)
    assert w.dtype == torch.float64 and not w.requires_grad and w.grad_fn is None
    assert layer.weight is w  # kept while nothing changed
    layer.train()
    wt = layer.weight
    np.testing.assert_allclose(np64(wt), want, rtol=RTOL, atol=1e-12)
    assert wt.requires_grad and layer.weight is not wt  # rebuilt at every read
    (wt * torch.arange(wt.numel(), dtype=wt.dtype).reshape(wt.shape)).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
    # the layer's own dense equivalent holds the same weight
    np.testing.assert_allclose(np64(layer.to_dense().weight), want, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("build", BUILDERS, ids=IDS)
def test_weight_cache_follows_cores_quantizers_dtype(build):
    layer, ref = build()
    layer.eval()
    first = layer.weight
    with torch.no_grad():
        layer.cores[0].mul_(2.0)  # in place: the version counter moves
    np.testing.assert_allclose(np64(layer.weight), ref(list(layer.cores)), rtol=RTOL)
    assert layer.weight is not first
    qs = _attach_int4(layer)  # quantizers attached
    quantized = [_int4(c) for c in layer.cores]
    np.testing.assert_allclose(np64(layer.weight), ref(quantized), rtol=1e-9, atol=1e-12)
    qs[1].mode = "off"  # a mode change
    mixed = [quantized[0], *list(layer.cores)[1:2], *quantized[2:]]
    np.testing.assert_allclose(np64(layer.weight), ref(mixed), rtol=1e-9, atol=1e-12)
    qs[1].mode = "quantize"
    qs[0].freeze(2 * layer.cores[0].detach())  # new qparams: twice the scale
    want = ref([_int4(layer.cores[0], scale_of=2 * layer.cores[0]), *quantized[1:]])
    np.testing.assert_allclose(np64(layer.weight), want, rtol=1e-9, atol=1e-12)
    layer.to(torch.float32)
    w32 = layer.weight
    assert w32.dtype == torch.float32 and w32.device == layer.cores[0].device
    np.testing.assert_allclose(np64(w32), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cuda"])
def test_weight_follows_the_device(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layer, ref = _tt()
    _attach_int4(layer)
    layer.eval()
    want = ref([_int4(c) for c in layer.cores])
    cpu = layer.weight
    layer.to(device)
    w = layer.weight
    assert w.device.type == device and w.shape == cpu.shape and w.dtype == torch.float64
    np.testing.assert_allclose(np64(w), want, rtol=1e-9, atol=1e-12)
    layer.to("cpu")
    assert layer.weight.device.type == "cpu"


@pytest.mark.parametrize("build", BUILDERS, ids=IDS)
def test_weight_is_read_only(build):
    layer, _ = build()
    shape = tuple(layer.weight.shape)
    with pytest.raises(AttributeError, match=r"weight is read-only.*to_dense\(\)"):
        layer.weight = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(AttributeError, match="weight is read-only"):
        layer.weight = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    with pytest.raises(KeyError, match="'weight' already exists"):  # nn.Module's own check
        layer.register_parameter("weight", nn.Parameter(torch.zeros(shape, dtype=torch.float64)))
    assert "weight" not in dict(layer.named_parameters())
    assert "weight" not in layer.state_dict()


def test_inference_cache_off_keeps_nothing():
    layer, _ = _lowrank()
    layer.eval()
    kept = layer.weight
    layer.inference_cache = False
    assert layer.weight is not kept and layer.weight is not layer.weight
    assert "_weight_cache" not in layer.__dict__
    layer.inference_cache = True
    assert layer.weight is layer.weight
    layer.clear_weight_cache()
    with torch.inference_mode():
        kept = layer.weight  # kept from inside inference mode ...
    scale = torch.ones((), dtype=kept.dtype, requires_grad=True)
    (scale * layer.weight).sum().backward()  # ... yet usable by autograd outside it
    assert layer.weight is kept and scale.grad is not None
    twin = copy.deepcopy(layer)  # the dense copy is not carried along (nor pickled)
    assert "_weight_cache" in layer.__dict__ and "_weight_cache" not in twin.__dict__
    assert torch.equal(twin.weight, layer.weight)
    with torch.no_grad():
        layer.cores[1].data.mul_(3.0)  # bypasses the version counter
    layer.clear_weight_cache()
    np.testing.assert_allclose(np64(layer.weight), np64(layer.cores[0]) @ np64(layer.cores[1]))


def test_factorized_layers_keep_the_dense_attributes():
    torch.manual_seed(0)

    lin = nn.Linear(12, 10)
    for layer in (
        LowRankLinear.from_dense(lin, LowRank(rank=3)),
        TTLinear.from_dense(lin, TT(rank=2, order=2)),
        TuckerLinear.from_dense(lin, Tucker(rank=(3, 3))),
    ):
        assert (layer.in_features, layer.out_features) == (12, 10)
        assert torch.equal(layer.bias, lin.bias) and layer.weight.shape == lin.weight.shape
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    for layer in (
        TuckerConv2d(random_cores([(6, 3), (3, 2, 3, 2), (4, 2)], seed=0), **geometry),
        CPConv2d(random_cores([(6, 3), (4, 3), (3, 3), (2, 3)], seed=0), **geometry),
    ):
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding"):
            assert getattr(layer, name) == getattr(conv, name), name
        assert (layer.dilation, layer.groups, layer.bias) == (conv.dilation, 1, None)
        assert layer.weight.shape == conv.weight.shape
    emb = nn.Embedding(30, 8, padding_idx=2)
    layer = TTEmbedding.from_dense(emb, TT(rank=3, order=2))
    for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "sparse"):
        assert getattr(layer, name) == getattr(emb, name), name
    assert layer.weight.shape == emb.weight.shape and layer.bias is None


def _quantized_layers():
    torch.manual_seed(3)
    return [
        (QuantLinear.from_float(nn.Linear(6, 4)), nn.Linear),
        (QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1)), nn.Conv2d),
        (QuantEmbedding.from_float(nn.Embedding(9, 4)), nn.Embedding),
        (QuantConv1d.from_float(nn.Conv1d(3, 4, 3, padding=1)), nn.Conv1d),
        (QuantHFConv1D.from_float(Conv1D(4, 6)), Conv1D),
    ]


@pytest.mark.parametrize(
    "index", [0, 1, 2, 3, 4], ids=["linear", "conv2d", "embedding", "conv1d", "hf_conv1d"]
)
def test_converted_weight_is_the_dequantized_one(index):
    layer, _ = _quantized_layers()[index]
    param = layer.weight
    assert isinstance(param, nn.Parameter) and layer.weight is layer._parameters["weight"]
    layer.weight_quantizer = Quantizer(QuantSpec(bits=4)).freeze(param.detach())
    assert layer.weight is param  # before convert: the shared float parameter
    want = _int4(param)
    keys = {k: v.shape for k, v in layer.state_dict().items()}
    model = nn.Sequential(layer)
    convert(model, progress=False)
    assert layer.converted and isinstance(layer.weight_quantizer, FrozenTensor)
    w = layer.weight
    assert not isinstance(w, nn.Parameter) and w.shape == param.shape and w.dtype == param.dtype
    np.testing.assert_allclose(np64(w), np64(want), rtol=1e-6, atol=1e-7)
    # the file format: the layer's own keys unchanged, the placeholder empty under 'weight'
    state = layer.state_dict()
    own = [k for k in state if not k.startswith("weight_quantizer.")]
    assert own == [k for k in keys if not k.startswith("weight_quantizer.")]
    assert "weight_quantizer.packed" in state
    assert state["weight"].numel() == 0
    np.testing.assert_allclose(np64(layer.to_float().weight), np64(want), rtol=1e-6, atol=1e-7)
    with pytest.raises(AttributeError, match="read-only after convert.*to_float"):
        layer.weight = nn.Parameter(torch.zeros(param.shape))
    with pytest.raises(AttributeError, match="read-only after convert"):
        layer.weight = torch.zeros(param.shape)
    with pytest.raises(AttributeError, match="read-only after convert"):
        layer.register_parameter("weight", nn.Parameter(torch.zeros(param.shape)))
    layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # what load does
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64


def _guarded(module: nn.Module) -> bool:
    return any(h is declines_fused_kernels for h in module._forward_pre_hooks.values())


def test_fused_guard_follows_what_the_forward_does_beyond_weight():
    torch.manual_seed(0)
    dense = QuantLinear.from_float(nn.Linear(4, 3))
    assert not _guarded(dense)  # forward == F.linear(x, weight, bias)
    dense.weight_quantizer = Quantizer(QuantSpec(bits=4)).freeze(dense.weight.detach())
    assert _guarded(dense)  # weight shows the float parameter, forward quantizes it
    convert(nn.Sequential(dense), progress=False)
    assert not _guarded(dense)  # weight is the dequantized one now
    dense.act_quantizers = nn.ModuleDict({"input": Quantizer(QuantSpec(bits=8))})
    assert _guarded(dense) and _guarded(copy.deepcopy(dense))
    dense.act_quantizers = None
    assert not _guarded(dense)
    layer, _ = _lowrank()
    _attach_int4(layer)
    assert not _guarded(layer)  # weight reconstructs the quantized cores
    layer.act_quantizers = nn.ModuleDict({"output": Quantizer(QuantSpec(bits=8))})
    assert _guarded(layer) and len(layer._forward_pre_hooks) == 1
    layer.act_quantizers = nn.ModuleDict({"input": Quantizer(QuantSpec(bits=8))})
    assert len(layer._forward_pre_hooks) == 1
    layer.act_quantizers = None
    assert not _guarded(layer)


def test_save_load_keeps_weight_and_guard(tmp_path):
    from tnquant import load, save

    torch.manual_seed(1)
    model = nn.Sequential(LowRankLinear([torch.randn(8, 2), torch.randn(2, 6)]), nn.Linear(8, 5))
    quantize(model, weights=QuantSpec(bits=4), activations=QuantSpec(bits=8), progress=False)
    x = torch.randn(7, 6)
    calibrate(model, [x], progress=False)
    convert(model, progress=False)
    model.eval()
    weights = [m.weight.clone() for m in model]
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", model=nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5))).eval()
    for before, m in zip(weights, loaded, strict=True):
        assert torch.equal(m.weight, before) and _guarded(m)
    assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded[1], QuantLinear) and loaded[1]._parameters["weight"].numel() == 0
