"""Tests of quantize / convert / model_size_bits against independent references.

References: cores dequantized with numpy (float64) and contracted with
``torch.einsum`` written here; bit counts written out by hand.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnquant import TT, Binary, FixedPoint, QuantSpec, Ternary
from tnquant.layers import (
    CPConv2d,
    LowRankLinear,
    TTEmbedding,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)
from tnquant.layers.quantized import QuantEmbedding, QuantLinear
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.quantization import convert, model_size_bits, quantize, size_report

F64_ATOL = 1e-10  # float64 contraction order vs the einsum reference

SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=4, granularity="channel"),
    QuantSpec(bits=3),
    QuantSpec(bits=2, granularity="channel"),
    QuantSpec(bits=8, symmetric=False, granularity="channel"),
    QuantSpec(bits=4, granularity=("group", 2)),
    QuantSpec(bits=6, scale="pow2"),
    QuantSpec(bits=4, learnable=True, granularity="channel"),
    QuantSpec(dtype="float8_e4m3fn"),
    QuantSpec(dtype="bfloat16"),
    Binary(granularity="channel"),
    Ternary(),
    Ternary(method="ttq", granularity="channel"),
    FixedPoint(8, 2, rounding="RND", overflow="SAT"),
]


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _build(kind: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    r = [_rand(*s, seed=i, dtype=dtype) for i, s in enumerate(SHAPES.get(kind, []))]
    bias = _rand(16 if kind == "tt" else 12, seed=9, dtype=dtype)
    if kind == "tt":
        return TTLinear(r, bias=bias)
    if kind == "tucker":
        return TuckerLinear(r, bias=bias)
    if kind == "lowrank":
        return LowRankLinear(r, bias=bias)
    if kind == "tucker_conv":
        return TuckerConv2d(r, padding=1, bias=_rand(6, seed=9, dtype=dtype))
    if kind == "cp_conv":
        return CPConv2d(r, padding=1, stride=2, bias=_rand(6, seed=9, dtype=dtype))
    if kind == "linear":
        return nn.Linear(10, 12, dtype=dtype)
    return nn.Conv2d(4, 6, 3, padding=1, dtype=dtype)


SHAPES = {
    "tt": [(1, 4, 3, 2), (2, 2, 4, 3), (3, 2, 2, 1)],  # out 4*2*2 = 16, in 3*4*2 = 24
    "tucker": [(12, 4), (4, 3), (10, 3)],
    "lowrank": [(12, 4), (4, 10)],
    "tucker_conv": [(6, 4), (4, 2, 3, 3), (4, 2)],
    "cp_conv": [(6, 4), (4, 4), (3, 4), (3, 4)],
}
KINDS = ["tt", "tucker", "lowrank", "tucker_conv", "cp_conv", "linear", "conv"]


def _input(kind: str, dtype=torch.float32) -> torch.Tensor:
    if kind in ("tucker_conv", "cp_conv", "conv"):
        return _rand(2, 4, 6, 6, seed=42, dtype=dtype)
    return _rand(5, {"tt": 24}.get(kind, 10), seed=42, dtype=dtype)


def _fit(spec, shape):
    """``spec`` with a group axis whose size the group divides (the first even axis)."""
    if isinstance(spec, QuantSpec) and isinstance(spec.granularity, tuple):
        axis = next(d for d, s in enumerate(shape) if s % spec.granularity[1] == 0)
        return dataclasses.replace(spec, axis=axis)
    return spec


def _quantize_all(model: nn.Module, spec, **kwargs):
    layer = model[0]
    if isinstance(layer, (TTLinear, TuckerLinear, LowRankLinear, TuckerConv2d, CPConv2d)):
        cores = {k: _fit(spec, tuple(c.shape)) for k, c in enumerate(layer.cores)}
        return quantize(model, cores=cores, progress=False, **kwargs)
    return quantize(model, weights=_fit(spec, tuple(layer.weight.shape)), progress=False, **kwargs)


def _calibrate_activations(model: nn.Module, x: torch.Tensor) -> None:
    acts = [
        q
        for m in model.modules()
        if getattr(m, "act_quantizers", None) is not None
        for q in m.act_quantizers.values()
        if getattr(q, "observer", None) is not None
    ]
    for q in acts:
        q.observe()
    with torch.no_grad():
        model(x)
    for q in acts:
        q.freeze()


# --------------------------------------------------------------------------- #
# fake-quant == converted, bitwise
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SPECS, ids=[repr(s)[:40] for s in SPECS])
def test_convert_equals_fake_quant(spec, kind):
    model = nn.Sequential(_build(kind))
    _quantize_all(model, spec)
    x = _input(kind)
    y_fake = model(x).detach()
    bits = model_size_bits(model)
    report = convert(model, progress=False)
    assert torch.equal(model(x), y_fake)
    bias_bits = model[0].bias.numel() * 32
    assert model_size_bits(model) == bits == report["0"]["bits_after"] + bias_bits
    for name, p in model.named_parameters():  # the float weights are gone
        assert p.numel() == 0 or name.endswith("bias") or name.endswith(".scale"), name


@pytest.mark.parametrize("kind", KINDS)
def test_convert_equals_fake_quant_with_calibrated_activations(kind):
    model = nn.Sequential(_build(kind, torch.float64))
    x = _input(kind, torch.float64)
    _quantize_all(
        model,
        QuantSpec(bits=4, granularity="channel"),
        activations={"*.inter_*": QuantSpec(bits=12), "*": QuantSpec(8, symmetric=False)},
    )
    _calibrate_activations(model, x)
    y_fake = model(x).detach()
    convert(model, progress=False)
    assert torch.equal(model(x), y_fake)
    assert all(isinstance(q, Quantizer) for q in model[0].act_quantizers.values())


def test_convert_embeddings():
    model = nn.Sequential(nn.Embedding(12, 4), TTEmbedding([_rand(1, 3, 2, 2), _rand(2, 4, 2, 1)]))
    quantize(
        model,
        weights={"0": QuantSpec(bits=2, granularity="channel")},
        cores={"1.cores.0": Ternary(), "1.cores.1": FixedPoint(6, 2)},
        progress=False,
    )
    assert isinstance(model[0], QuantEmbedding)
    idx = torch.tensor([[0, 5, 11]])
    y0, y1 = model[0](idx).detach(), model[1](idx).detach()
    convert(model, progress=False)
    assert torch.equal(model[0](idx), y0) and torch.equal(model[1](idx), y1)


# --------------------------------------------------------------------------- #
# per-core quantizers against hand-built references
# --------------------------------------------------------------------------- #


def _np_sym(c: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """Symmetric per-channel (or per-tensor, axis None) dequantized values, numpy float64."""
    a = c.detach().numpy()
    qmax = 2 ** (bits - 1) - 1
    red = tuple(d for d in range(a.ndim) if d != axis)
    scale = np.max(np.abs(a), axis=red, keepdims=True) / qmax
    return torch.from_numpy(np.clip(np.round(a / scale), -qmax - 1, qmax) * scale)


# (kind, per-core (bits, axis), einsum giving the dense weight or kernel)
REFERENCES = [
    ("tt", [(4, 3), (8, 0), (2, 1)], "aoib,bpjc,cqkd->opqijk"),
    ("tucker", [(4, 1), (3, None), (8, 0)], "op,pq,iq->oi"),
    ("lowrank", [(2, 1), (4, 0)], "or,ri->oi"),
    ("tucker_conv", [(4, 1), (8, 1), (3, None)], "op,pqhw,iq->oihw"),
    ("cp_conv", [(4, 1), (2, None), (8, 0), (4, 1)], "or,ir,hr,wr->oihw"),
]


@pytest.mark.parametrize("kind, plan, eq", REFERENCES, ids=[r[0] for r in REFERENCES])
def test_factorized_output_equals_einsum_of_dequantized_cores(kind, plan, eq):
    layer = _build(kind, torch.float64)
    model = nn.Sequential(layer)
    gran = {None: "tensor"}
    cores = {
        k: QuantSpec(bits=b, granularity=gran.get(ax, "channel"), axis=ax or 0)
        for k, (b, ax) in enumerate(plan)
    }
    quantize(model, cores=cores, progress=False)
    deq = [_np_sym(c, b, ax) for c, (b, ax) in zip(layer.cores, plan, strict=True)]
    w = torch.einsum(eq, *deq)
    x = _input(kind, torch.float64)
    if kind == "tt":
        ref = x @ w.reshape(16, 24).T + layer.bias
    elif kind in ("tucker", "lowrank"):
        ref = x @ w.T + layer.bias
    else:
        ref = F.conv2d(x, w, layer.bias, layer.stride, 1)
    assert torch.allclose(model(x), ref, rtol=0, atol=F64_ATOL)
    for q, c, d in zip(layer.core_quantizers, layer.cores, deq, strict=True):
        assert torch.equal(q(c), d)  # each core bitwise its own numpy reference


def test_each_core_has_its_own_qparams():
    layer = _build("tt")
    quantize(
        nn.Sequential(layer),
        cores={
            0: QuantSpec(4, granularity="channel", axis=3),
            1: QuantSpec(8, symmetric=False),
            2: QuantSpec(2, granularity="channel", axis=1),
        },
        progress=False,
    )
    qps = [q.qparams(c) for q, c in zip(layer.core_quantizers, layer.cores, strict=True)]
    assert [tuple(qp.scale.shape) for qp in qps] == [(1, 1, 1, 2), (1, 1, 1, 1), (1, 2, 1, 1)]
    assert [(qp.qmin, qp.qmax) for qp in qps] == [(-8, 7), (0, 255), (-2, 1)]
    assert qps[0].zero_point is None and qps[1].zero_point is not None
    c0 = layer.cores[0].detach().numpy()
    np.testing.assert_allclose(
        qps[0].scale.flatten().numpy(), np.abs(c0).max(axis=(0, 1, 2)) / 7, rtol=1e-6
    )
    c1 = layer.cores[1].detach().numpy()
    assert qps[1].scale.item() == pytest.approx((c1.max() - c1.min()) / 255, rel=1e-6)


# --------------------------------------------------------------------------- #
# model_size_bits: hand counts
# --------------------------------------------------------------------------- #


def _small_model() -> nn.Sequential:
    torch.manual_seed(0)
    tt = TTLinear([_rand(1, 4, 2, 3), _rand(3, 2, 4, 1)], bias=torch.zeros(8))
    return nn.Sequential(nn.Linear(10, 8), nn.LayerNorm(8), tt)


def test_model_size_bits_hand_count():
    model = _small_model()
    # float: Linear 80 + 8, LayerNorm 8 + 8, TT cores 24 + 24 and bias 8; all float32
    assert model_size_bits(model) == (88 + 16 + 56) * 32 == 5120
    quantize(
        model,
        weights={"0": QuantSpec(bits=4, granularity="channel")},
        cores={0: QuantSpec(bits=8), 1: Ternary()},
        activations={"2.output": QuantSpec(bits=8, symmetric=False)},
        progress=False,
    )
    _calibrate_activations(model, _rand(3, 10))
    expected = (
        80 * 4
        + 8 * 32
        + 8 * 32  # Linear: int4 codes (40 bytes), 8 scales, bias
        + 16 * 32  # LayerNorm weight and bias
        + 24 * 8
        + 32  # TT core 0: int8 codes, one scale
        + (24 * 2)
        + 32  # TT core 1: ternary, 2 bits each (6 bytes), one scale
        + 8 * 32  # TT bias
        + 32
        + 16  # output quantizer: float32 scale, int16 zero point
    )
    assert expected == 1952
    assert model_size_bits(model) == expected  # fake-quant: what convert will store
    rows = size_report(model)
    assert rows.totals()["size_bits"] == expected
    assert [r["name"] for r in rows] == ["0", "1", "2"]
    assert rows["0"]["codes_bits"] == 320 and rows["0"]["state"] == "fake-quant"
    convert(model, progress=False)
    assert model_size_bits(model) == expected
    assert size_report(model)["2"]["state"] == "converted"


def test_model_size_bits_odd_sizes_and_shared_tensors():
    lin = nn.Linear(3, 3, bias=False)  # 9 weights
    model = nn.Sequential(lin, nn.ReLU(), lin)  # shared: counted once
    assert model_size_bits(model) == 9 * 32
    quantize(model, weights=QuantSpec(bits=3, symmetric=False), progress=False)
    # 9 codes of 3 bits = 27 bits: 4 bytes (padded); a float32 scale; a uint8 zero point
    assert model_size_bits(model) == 4 * 8 + 32 + 8
    bn = nn.BatchNorm1d(4)  # weight, bias, running mean/var: float32; num_batches_tracked int64
    assert model_size_bits(bn) == 16 * 32 + 64


# --------------------------------------------------------------------------- #
# patterns, precedence, errors
# --------------------------------------------------------------------------- #


def _specs_of(layer):
    return [getattr(q, "spec", None) for q in layer.core_quantizers]


def test_cores_take_precedence_over_weights_and_negative_index():
    layer = _build("tt")
    model = nn.Sequential(layer, nn.Linear(16, 4))
    quantize(
        model,
        weights=QuantSpec(bits=8),
        cores={1: QuantSpec(bits=4), -1: Ternary()},
        progress=False,
    )
    assert _specs_of(layer) == [QuantSpec(bits=8), QuantSpec(bits=4), Ternary()]
    assert model[1].weight_quantizer.spec == QuantSpec(bits=8)


def test_first_match_wins_and_shadowed_patterns_raise():
    model = nn.Sequential(_build("tucker"))
    report = quantize(
        model,
        cores={"*.cores.1": Binary(), "*": QuantSpec(bits=4)},
        activations={"*.inter_*": QuantSpec(16), "*": QuantSpec(8)},
        progress=False,
    )
    assert _specs_of(model[0]) == [QuantSpec(bits=4), Binary(), QuantSpec(bits=4)]
    assert report["0"]["activations"] == (
        "input=int8/tensor, output=int8/tensor, inter_0=int16/tensor, inter_1=int16/tensor"
    )
    with pytest.raises(
        ValueError,
        match=r"pattern '\*.inter_\*' is never used.*matched first "
        r"by '\*'",
    ):
        quantize(model, activations={"*": QuantSpec(8), "*.inter_*": QuantSpec(16)})
    with pytest.raises(ValueError, match="pattern 1 is never used"):
        quantize(model, cores={"*.cores.1": Binary(), 1: QuantSpec(4)})


def test_none_removes_and_requantize_replaces():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    quantize(model, weights=QuantSpec(bits=4), progress=False)
    first = model[0].weight_quantizer
    report = quantize(
        model, weights={"1": None, "*": Binary()}, activations=QuantSpec(8), progress=False
    )
    assert model[0].weight_quantizer is not first and model[0].weight_quantizer.spec == Binary()
    assert model[1].weight_quantizer is None
    assert report["0"]["note"] == "re-quantized" and report["1"]["weights"] == "float"
    quantize(model, activations={"0.input": None}, progress=False)
    assert list(model[0].act_quantizers) == ["output"]
    assert model[0].weight_quantizer.spec == Binary()  # weights= not given: kept


def test_include_exclude_and_unmatched_patterns():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    report = quantize(
        model,
        weights={"*": QuantSpec(4), "decoder.*": QuantSpec(2)},
        include=["0", "1"],
        exclude=["1"],
        progress=False,
    )
    assert type(model[0]) is QuantLinear and type(model[1]) is nn.Linear
    assert type(model[2]) is nn.Linear
    assert any(s["name"] == "weights['decoder.*']" for s in report.skipped)


def test_report_contents():
    model = nn.Sequential(_build("tt"), nn.Linear(16, 4))
    report = quantize(
        model,
        cores={
            0: QuantSpec(4, granularity="channel", axis=3),
            1: Ternary(method="ttq"),
            2: FixedPoint(8, 3),
        },
        weights=QuantSpec(8, scale="pow2"),
        activations={"1.*": QuantSpec(8)},
        progress=False,
    )
    row = report["0"]
    assert row["kind"] == "TTLinear"
    assert row["weights"] == (
        "cores.0=int4/channel(axis=3), cores.1=ternary-ttq, cores.2=ap_fixed<8,3>"
    )
    assert row["params"] == 24 + 48 + 12 + 16  # three cores and the bias
    assert row["bits_before"] == 100 * 32
    # core 0: 24 4-bit codes (12 bytes), 2 scales; core 1: 48 2-bit codes (12 bytes), scale
    # and scale_neg; core 2: 12 8-bit mantissas, no scale (fixed by the format); the bias
    assert row["bits_after"] == (12 * 8 + 2 * 32) + (12 * 8 + 2 * 32) + 12 * 8 + 16 * 32
    assert report["1"]["weights"] == "int8/tensor,pow2"
    assert report["1"]["activations"] == "input=int8/tensor, output=int8/tensor"
    totals = report.totals()
    assert totals["bits_before"] == 100 * 32 + 68 * 32
    assert "bits_before" in report.to_dict()["rows"][0]


def test_argument_errors():
    model = nn.Sequential(_build("tt"))
    with pytest.raises(ValueError, match="at least one of"):
        quantize(model)
    with pytest.raises(TypeError, match="weights must be a QuantSpec.*got TT"):
        quantize(model, weights=TT(rank=2))
    with pytest.raises(TypeError, match=r"cores\['\*'\] must be a QuantSpec"):
        quantize(model, cores={"*": 8})
    with pytest.raises(TypeError, match="weights keys must be glob strings"):
        quantize(model, weights={0: QuantSpec()})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize("model", weights=QuantSpec())
    with pytest.raises(
        ValueError,
        match=r"int4/group3\(axis=0\) cannot quantize '0.cores.0' of shape "
        r"\(1, 4, 3, 2\): group size 3 does not divide axis 0",
    ):
        quantize(model, cores={0: QuantSpec(4, granularity=("group", 3))})
    with pytest.raises(ValueError, match="axis must be in"):
        quantize(model, weights=QuantSpec(4, granularity="channel", axis=4))
    with pytest.raises(ValueError, match="activation quantizers are per tensor.*'0.input'"):
        quantize(model, activations=QuantSpec(8, granularity="channel"))
    with pytest.raises(ValueError, match="Ternary"):
        quantize(model, activations=Ternary(method="ttq"))
    assert model[0].core_quantizers is None  # nothing changed on error


def test_convert_errors_and_dynamic_activations():
    model = nn.Sequential(nn.Linear(4, 4))
    quantize(model, weights=QuantSpec(4), activations=QuantSpec(8), progress=False)
    with pytest.raises(
        ValueError,
        match=r"\['0.act_quantizers.input', "
        r"'0.act_quantizers.output'\] have no calibrated",
    ):
        convert(model)
    x = _rand(2, 4)
    y = model(x).detach()
    report = convert(model, dynamic_activations=True, progress=False)
    assert torch.equal(model(x), y) and report.model is model
    with pytest.raises(ValueError, match="'0.weight' is converted"):
        quantize(model, weights=QuantSpec(8))
    quantize(model, activations=QuantSpec(dtype="bfloat16"), progress=False)  # allowed
    other = nn.Sequential(nn.Linear(4, 4))
    quantize(other, weights=QuantSpec(4), progress=False)
    other[0].weight_quantizer.observe()
    with pytest.raises(ValueError, match=r"\['0.weight'\] are still observing"):
        convert(other)


def test_convert_not_inplace_and_off_quantizers():
    model = nn.Sequential(_build("lowrank"))
    quantize(model, cores={0: QuantSpec(4), 1: QuantSpec(8)}, progress=False)
    model[0].core_quantizers[1].disable()
    x = _input("lowrank")
    y = model(x).detach()
    report = convert(model, inplace=False, progress=False)
    new = report.model
    assert new is not model and model[0].cores[0].numel() == 48
    assert isinstance(new[0].core_quantizers[0], FrozenTensor)
    assert isinstance(new[0].core_quantizers[1], Quantizer)  # off: kept, core stays float
    assert new[0].cores[0].numel() == 0 and new[0].cores[1].numel() == 40
    assert new[0].n_params == model[0].n_params
    assert torch.equal(new(x), y)
    assert report["0"]["tensors"] == "cores.0=int4/tensor"


def test_shared_modules_and_attention_out_proj():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    report = quantize(model, weights=QuantSpec(4), progress=False)
    assert model[0] is model[2] and type(model[0]) is QuantLinear
    assert report["0"]["note"] == "shared with 2"
    attn = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    report = quantize(attn, weights=QuantSpec(8), progress=False)
    assert type(attn["attn"].out_proj) is not QuantLinear and type(attn["fc"]) is QuantLinear
    assert any(s["name"] == "attn.out_proj" for s in report.skipped)
    q = _rand(3, 1, 8)
    attn["attn"](q, q, q)


def test_factorized_root_module():
    layer = _build("lowrank")
    report = quantize(
        layer, cores=QuantSpec(4), activations={"inter_0": QuantSpec(8)}, progress=False
    )
    assert [r["name"] for r in report] == [""] and list(layer.act_quantizers) == ["inter_0"]
    with pytest.raises(ValueError, match="at least one"):
        quantize(nn.Linear(2, 2))
    assert (
        quantize(nn.Linear(2, 2), weights=QuantSpec())
        .skipped[0]["reason"]
        .startswith("the model itself")
    )


def test_learnable_scales_survive_training_step_then_convert():
    model = nn.Sequential(_build("tucker"))
    quantize(model, cores=QuantSpec(4, learnable=True, granularity="channel"), progress=False)
    x = _input("tucker")
    model(x).square().sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
    y = model(x).detach()
    convert(copy.deepcopy(model), progress=False)
    report = convert(model, progress=False)
    assert torch.equal(model(x), y) and len(report) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_convert_equals_fake_quant(kind):
    model = nn.Sequential(_build(kind)).cuda()
    _quantize_all(
        model,
        QuantSpec(bits=4, granularity="channel"),
        activations={"*.inter_*": QuantSpec(12), "*": QuantSpec(8)},
    )
    x = _input(kind).cuda()
    _calibrate_activations(model, x)
    y = model(x).detach()
    convert(model, progress=False)
    assert torch.equal(model(x), y)
    assert all(b.is_cuda for b in model.buffers())
