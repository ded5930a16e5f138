"""Packed int8/int4 kernels and the convert paths, against numpy references.

Exactness, per path (what ``convert``'s docstring states):

- ``kernels='exact'``: bit-identical (``torch.equal``) to the fake-quant model;
- the code mapping into int8pack / int4pack: exact (the kernel's weight, read
  back with an identity input, equals ``codes * scale`` bit for bit);
- ``kernels='packed'`` outputs: float32 compute within float32 accumulation
  error of a float64 numpy reference; bfloat16 compute within the bf16 rounding
  of the activations, scales and output (``2**-7`` relative to ``sum |x w|``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import LowRank, QuantSpec, Tucker, convert, factorize, model_size_bits, quantize
from tnquant.packed import PackedChain, PackedLinear, to_packed_kernels
from tnquant.quant import Quantizer
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.packed_kernels import (
    DENSE_ROWS,
    available,
    dequantize_operands,
    int4pack_operands,
    int8pack_operands,
    packed_linear,
)

pytestmark = pytest.mark.skipif(not all(available().values()), reason="no packed kernels")

EPS32 = 2.0**-24
BF16 = 2.0**-7  # bf16 rounding of x, of the scale and of the result: 3 * 2**-9, rounded up


def _codes(n, k, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n, k), generator=g)


def _ref(x, codes, scale_full):
    """float64 numpy ``x @ (codes * scale)^T`` and ``|x| @ |codes * scale|^T``."""
    w = codes.double().numpy() * scale_full.double().numpy()
    xs = x.double().numpy()
    return xs @ w.T, np.abs(xs) @ np.abs(w).T


@pytest.mark.parametrize(
    ("n", "k", "scale_cols"), [(32, 64, 1), (48, 256, 1), (64, 256, 2), (16, 128, 4), (32, 512, 16)]
)
def test_int4_mapping_is_exact_and_outputs_within_accumulation_error(n, k, scale_cols):
    codes = _codes(n, k, -8, 7, seed=n + k)
    scale = torch.rand(n, scale_cols, generator=torch.Generator().manual_seed(1)) + 0.01
    full = scale.repeat_interleave(k // scale_cols, dim=1)
    ops = int4pack_operands(codes, scale, torch.float32)
    assert ops.group == next(g for g in (256, 128, 64, 32) if (k // scale_cols) % g == 0)
    layer = PackedLinear(ops)
    assert torch.equal(layer.weight, codes.float() * full)  # the mapping, bit for bit
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(2))
    ref, mag = _ref(x, codes, full)
    err = np.abs(layer(x).double().numpy() - ref)
    assert np.all(err <= 2 * k * EPS32 * mag + 1e-30)


@pytest.mark.parametrize("rows", [1, 24])
def test_int8_mapping_is_exact_and_bf16_outputs_within_rounding(rows):
    n, k = 24, 96
    codes = _codes(n, k, -128, 127)
    scale = torch.rand(rows, 1, generator=torch.Generator().manual_seed(3)) * 0.01 + 1e-3
    full = scale.expand(n, k)
    assert torch.equal(PackedLinear(int8pack_operands(codes, scale)).weight, codes.float() * full)
    ops = int8pack_operands(codes, scale, torch.bfloat16)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(4))
    y = packed_linear(x, ops)
    assert y.dtype == torch.float32
    ref, mag = _ref(x, codes, full)
    err = np.abs(y.double().numpy() - ref)
    assert np.all(err <= BF16 * mag)
    assert err.max() > 0  # bf16 is not exact: the bound is what it claims


@pytest.mark.parametrize(("kind", "n"), [("int4", 128), ("int4", 96), ("int8", 40)])
def test_many_rows_read_the_weight_back_exactly(kind, n):
    k = 256
    codes = _codes(n, k, -8, 7, seed=n)
    scale = torch.rand(n, 2, generator=torch.Generator().manual_seed(7)) + 0.01
    if kind == "int8":
        scale = scale[:, :1]
    full = scale.repeat_interleave(k // scale.shape[1], dim=1)
    make = int4pack_operands if kind == "int4" else int8pack_operands
    ops = make(codes, scale, torch.float32)
    assert ops.unpackable == (kind == "int8" or n % 64 == 0)
    if ops.unpackable:
        assert torch.equal(dequantize_operands(ops), codes.float() * full)
    x = torch.randn(DENSE_ROWS[kind] + 3, k, generator=torch.Generator().manual_seed(8))
    ref, mag = _ref(x, codes, full)
    assert np.all(np.abs(packed_linear(x, ops).double().numpy() - ref) <= 2 * k * EPS32 * mag)


def test_operand_refusals_name_the_constraint():
    with pytest.raises(ValueError, match="divisible by 16"):
        int4pack_operands(_codes(8, 64, -8, 7), torch.ones(8, 1))
    with pytest.raises(ValueError, match="K=48, block=48"):
        int4pack_operands(_codes(16, 48, -8, 7), torch.ones(16, 1))
    with pytest.raises(ValueError, match=r"codes must be in \[-8, 7\], got values in \[-9"):
        int4pack_operands(torch.full((16, 32), -9), torch.ones(16, 1))
    with pytest.raises(ValueError, match="one scale per output row"):
        int8pack_operands(_codes(4, 64, -8, 7), torch.ones(4, 2))
    with pytest.raises(TypeError, match="integer tensor"):
        int8pack_operands(torch.ones(4, 4), torch.ones(4, 1))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, granularity="channel"),
        QuantSpec(bits=8, symmetric=False),
        QuantSpec(bits=4, granularity=("group", 16), axis=1),
        QuantSpec(bits=4, symmetric=False, granularity="channel"),
    ],
)
def test_fast_dequantize_matches_numpy(spec):
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(5))
    q = Quantizer(spec)
    frozen = FrozenTensor.from_quantizer(q, w)
    codes, qp = q.quantize_codes(w)
    scale = qp.expanded_scale().reshape(qp.scale.shape).double().numpy()
    block = np.kron(scale, np.ones(qp.block_size))  # numpy reference of the scale grid
    zp = 0.0
    if qp.zero_point is not None:
        zp = np.kron(qp.zero_point.double().numpy(), np.ones(qp.block_size))
    ref = ((codes.double().numpy() - zp) * block).astype(np.float32)
    assert np.array_equal(frozen.codes().numpy(), codes.numpy())
    assert np.array_equal(frozen().numpy(), ref)
    assert torch.equal(frozen(), q(w))


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, 32))
    factorize(model, {"2": LowRank(rank=32)}, progress=False)
    quantize(
        model,
        weights={"0": QuantSpec(bits=4, granularity=("group", 64), axis=1)},
        cores={
            0: QuantSpec(bits=4, granularity="channel", axis=0),
            1: QuantSpec(bits=4, granularity="channel", axis=0),
        },
        progress=False,
    )
    quantize(model, weights={"3": QuantSpec(bits=3, symmetric=False)}, progress=False)
    return model


def test_convert_paths_exact_auto_packed():
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(6))
    fake = _model()
    with torch.no_grad():
        ref = fake(x)
        for kernels in ("exact", "auto"):
            model = convert(_model(), kernels=kernels, inplace=False, progress=False).model
            assert torch.equal(model(x), ref)  # bit-identical
        model = _model()
        bits = model_size_bits(model)
        report = convert(model, kernels="packed", kernel_dtype=torch.float32, progress=False)
        notes = {r["name"]: r["note"] for r in report.rows}
        assert notes == {"0": "int4 kernel", "2": "int4 kernel", "3": None}
        assert isinstance(model[0], PackedLinear) and isinstance(model[2], PackedChain)
        assert type(model[3]).__name__ == "QuantLinear"  # affine: stays exact
        y = model(x)
    assert not torch.equal(y, ref)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    # stored bits: the int4 codes once (no float weight beside them) + the kernel's scales
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert all(not m.packed_weight.is_floating_point() for m in packed)
    scales = sum(m.scales.numel() * 32 for m in packed)
    codes = sum(m.in_features * m.out_features * 4 for m in packed)
    others = model_size_bits(model[3]) + sum(
        p.numel() * 32 for i in (0, 2) for p in model[i].parameters()
    )
    assert model_size_bits(model) == codes + scales + others
    assert model_size_bits(model) - bits == scales - (256 * 2 + 32 + 64) * 32  # scales grew


def test_tucker_chain_and_int8_choice():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48))
    factorize(model, Tucker(rank=(16, 32)), progress=False)
    quantize(
        model,
        cores={
            0: QuantSpec(bits=8, granularity="channel", axis=0),
            1: QuantSpec(bits=8, granularity="channel", axis=0),
            2: QuantSpec(bits=8, granularity="channel", axis=1),
        },
        progress=False,
    )
    convert(model, progress=False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        exact = model(x)
        w = model[0].dense_weight().double().numpy()
        b = model[0].bias.double().numpy()
        report = to_packed_kernels(
            model, kernel="int8", compute_dtype=torch.float32, progress=False
        )
        assert report.rows[0]["status"] == "int8 kernel"
        y = model(x).double().numpy()
    ref = x.double().numpy() @ w.T + b
    assert np.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(y, exact.double().numpy())


def test_kept_layers_and_argument_errors():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    quantize(
        model,
        weights={"0": QuantSpec(bits=8, granularity=("group", 8), axis=1), "1": QuantSpec(bits=4)},
        activations={"1.input": QuantSpec(bits=8)},
        progress=False,
    )
    reasons = {r["name"]: r["reason"] for r in to_packed_kernels(model, progress=False).rows}
    assert "not converted" in reasons["0"] and "activation quantizers" in reasons["1"]
    convert(model, dynamic_activations=True, progress=False)
    reasons = {r["name"]: r["reason"] for r in to_packed_kernels(model, progress=False).rows}
    assert "scale varies along K" in reasons["0"]
    with pytest.raises(ValueError, match="kernel must be one of"):
        to_packed_kernels(model, kernel="int2")
    with pytest.raises(ValueError, match="compute_dtype must be"):
        to_packed_kernels(model, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="kernels must be one of"):
        convert(model, kernels="fast")


def test_tt_layers_stay_exact_with_the_reason():
    from tnquant import TT

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 64))
    factorize(model, TT(ratio=0.5, order=2), progress=False)
    quantize(model, cores={0: QuantSpec(bits=8), -1: QuantSpec(bits=8)}, progress=False)
    convert(model, progress=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = model(x)
        report = convert(model, kernels="packed", progress=False)  # already converted: no rows
        rows = to_packed_kernels(model, progress=False).rows
        assert torch.equal(model(x), before)
    assert report.rows == []
    assert rows[0]["status"] == "kept" and "not a GEMM chain" in rows[0]["reason"]
