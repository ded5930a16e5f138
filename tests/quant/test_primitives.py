"""Tests of tnquant.quant.primitives against numpy references and hand tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant import Binary, Codebook, FixedPoint, QuantSpec, Ternary
from tnquant.quant.primitives import (
    HANDLERS,
    choose_qparams,
    code_dtype,
    dequantize,
    fake_quantize,
    pow2_scale,
    qparams_from_range,
    quantize,
    rebind_qparams,
    round_tensor,
)

# one float32 rounding of the value and one of x / scale
REL_EPS = 4 * float(np.finfo(np.float32).eps)
SETTINGS = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- #
# An independent numpy reference (float32 arithmetic, the documented formulas)
# --------------------------------------------------------------------------- #


def np_quantize(
    x: np.ndarray,
    bits: int,
    symmetric: bool,
    narrow: bool = False,
    axis: int | None = None,
    group: int | None = None,
):
    """Codes, scale, zero point of a uniform quantizer, written from the docs.

    ``axis`` alone: per channel; ``axis`` and ``group``: groups along ``axis``.
    Returns the codes (int64) and per-element scale and zero point.
    """
    x = np.asarray(x, dtype=np.float32)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if narrow else -qmax - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    if axis is None:
        blocks = x.reshape(1, -1)
    elif group is None:
        blocks = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    else:
        moved = np.moveaxis(x, axis, -1)
        blocks = moved.reshape(-1, group)
    lo = np.minimum(blocks.min(axis=1, keepdims=True), np.float32(0))
    hi = np.maximum(blocks.max(axis=1, keepdims=True), np.float32(0))
    if symmetric:
        steps = np.float32(qmax if qmax > 0 else -qmin)
        scale = np.maximum(-lo, hi) / steps
        zp = np.zeros_like(scale)
    else:
        scale = (hi - lo) / np.float32(qmax - qmin)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    if not symmetric:
        zp = np.clip(qmin - np.round(lo / scale), qmin, qmax).astype(np.float32)
    codes = np.clip(np.round(blocks / scale) + zp, qmin, qmax)
    values = ((codes - zp) * scale).astype(np.float32)

    def back(a: np.ndarray) -> np.ndarray:
        a = np.broadcast_to(a, blocks.shape)
        if axis is None:
            return a.reshape(x.shape)
        if group is None:
            shape = (x.shape[axis],) + tuple(np.delete(x.shape, axis))
            return np.moveaxis(a.reshape(shape), 0, axis)
        return np.moveaxis(a.reshape(moved.shape), -1, axis)

    return back(codes).astype(np.int64), back(scale), back(zp), back(values)


def _blocks_params(qp) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element scale and zero point (broadcast through block_size by hand)."""
    scale = qp.scale
    zp = torch.zeros_like(scale) if qp.zero_point is None else qp.zero_point.to(scale.dtype)
    for d, b in enumerate(qp.block_size):
        scale = scale.repeat_interleave(b, dim=d)
        zp = zp.repeat_interleave(b, dim=d)
    return scale, zp


# --------------------------------------------------------------------------- #
# Rounding
# --------------------------------------------------------------------------- #

TIES = [0.5, 1.5, -0.5, -1.5, 2.5, -2.5, 0.49999997, -2.7, 3.2, 7.0]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("nearest_even", [0, 2, 0, -2, 2, -2, 0, -3, 3, 7]),
        ("half_up", [1, 2, 0, -1, 3, -2, 0, -3, 3, 7]),
        ("floor", [0, 1, -1, -2, 2, -3, 0, -3, 3, 7]),
    ],
)
def test_round_modes_hand_values(mode, expected):
    for dtype in (torch.float32, torch.float64):
        out = round_tensor(torch.tensor(TIES, dtype=dtype), mode)
        assert out.dtype == dtype
        assert out.tolist() == [float(e) for e in expected]


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.tensor([0.3, -1.7, 2.5, 4.0, -0.05])
    n = 20000
    draws = torch.stack([x] * n)
    gen = torch.Generator().manual_seed(1234)
    out = round_tensor(draws, "stochastic", gen)
    assert torch.all((out == torch.floor(draws)) | (out == torch.ceil(draws)))
    frac = (x - torch.floor(x)).double()
    tol = 5 * torch.sqrt(frac * (1 - frac) / n) + 1e-12
    assert torch.all((out.double().mean(0) - x.double()).abs() <= tol)
    again = round_tensor(draws, "stochastic", torch.Generator().manual_seed(1234))
    assert torch.equal(out, again)
    other = round_tensor(draws, "stochastic", torch.Generator().manual_seed(99))
    assert not torch.equal(out, other)


def test_unknown_rounding_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="nearest_even.*half_up.*floor.*stochastic.*got 'banker'"):
        round_tensor(torch.ones(2), "banker")
    with pytest.raises(ValueError, match="rounding"):
        QuantSpec(rounding="banker")


# --------------------------------------------------------------------------- #
# Hand tables and the numpy reference
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "x, spec, codes, scale, zp",
    [
        ([-1.0, -0.6, 0.0, 0.3, 0.75, 1.0], QuantSpec(bits=4), [-7, -4, 0, 2, 5, 7], 1 / 7, None),
        ([-1.0, 0.0, 0.62, 2.0], QuantSpec(bits=4, symmetric=False), [0, 5, 8, 15], 0.2, 5),
        ([0.0, 1.0, 2.55], QuantSpec(bits=8, symmetric=False), [0, 100, 255], 0.01, 0),
        ([-2.54, 0.031, 1.0], QuantSpec(bits=8, narrow_range=True), [-127, 2, 50], 0.02, None),
        ([3.0, 1.0], QuantSpec(bits=2), [1, 0], 3.0, None),
        ([-3.0, 1.0], QuantSpec(bits=1, symmetric=True), [-1, 0], 3.0, None),
        ([0.4, 1.1, 2.0], QuantSpec(bits=2, symmetric=False), [1, 2, 3], 2 / 3, 0),
    ],
)
def test_hand_table(x, spec, codes, scale, zp):
    t = torch.tensor(x)
    got, qp = quantize(t, spec)
    assert got.tolist() == codes
    assert got.dtype == code_dtype(spec.qmin, spec.qmax)
    assert qp.scale.item() == pytest.approx(scale, rel=1e-6)
    if zp is None:
        assert qp.zero_point is None
    else:
        assert qp.zero_point.item() == zp


def test_hand_table_per_channel_int8():
    w = torch.tensor([[0.5, -1.27], [2.54, 0.031]])
    codes, qp = quantize(w, QuantSpec(bits=8, granularity="channel"))
    assert codes.tolist() == [[50, -127], [127, 2]]
    assert qp.scale.shape == (2, 1)
    assert qp.scale.flatten().tolist() == pytest.approx([0.01, 0.02], rel=1e-6)


def test_code_dtypes():
    assert code_dtype(-8, 7) == torch.int8
    assert code_dtype(-128, 127) == torch.int8
    assert code_dtype(0, 255) == torch.int16
    assert code_dtype(-32768, 32767) == torch.int16
    assert code_dtype(0, 65535) == torch.int32


GRANULARITIES = [
    ("tensor", None, None),
    ("channel", 0, None),
    ("channel", 1, None),
    ("channel", -1, None),
    (("group", 4), 1, 4),
    (("group", 2), 0, 2),
]


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric, narrow", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("granularity, axis, group", GRANULARITIES)
def test_against_numpy_reference(bits, symmetric, narrow, granularity, axis, group):
    gen = torch.Generator().manual_seed(bits * 7 + symmetric)
    x = torch.randn(6, 8, generator=gen) * torch.linspace(0.1, 3.0, 8)
    spec = QuantSpec(
        bits=bits,
        symmetric=symmetric,
        narrow_range=narrow,
        granularity=granularity,
        axis=0 if axis is None else axis,
    )
    codes, qp = quantize(x, spec)
    np_axis = None if axis is None else axis % 2
    ref_codes, ref_scale, ref_zp, ref_values = np_quantize(
        x.numpy(), bits, symmetric, narrow, np_axis, group
    )
    np.testing.assert_array_equal(codes.numpy().astype(np.int64), ref_codes)
    scale, zp = _blocks_params(qp)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zp.numpy(), ref_zp)
    np.testing.assert_array_equal(dequantize(codes, qp).numpy(), ref_values)
    np.testing.assert_array_equal(fake_quantize(x, spec).numpy(), ref_values)


# --------------------------------------------------------------------------- #
# Properties (hypothesis)
# --------------------------------------------------------------------------- #


@st.composite
def tensors_and_specs(draw, rounding=("nearest_even", "half_up")):
    rows = draw(st.integers(1, 5))
    cols = draw(st.sampled_from([1, 2, 4, 6]))
    values = draw(
        st.lists(
            st.floats(-1e3, 1e3, allow_nan=False, width=32),
            min_size=rows * cols,
            max_size=rows * cols,
        )
    )
    x = torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
    symmetric = draw(st.booleans())
    bits = draw(st.integers(1 if not symmetric else 2, 12))
    kind = draw(st.sampled_from(["tensor", "channel", "group"]))
    axis = draw(st.sampled_from([0, 1, -1, -2]))
    if kind == "group":
        size = x.shape[axis]
        granularity = (
            "group",
            draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0])),
        )
    else:
        granularity = kind
    spec = QuantSpec(
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,
        axis=axis,
        narrow_range=symmetric and draw(st.booleans()),
        rounding=draw(st.sampled_from(rounding)),
        scale=draw(st.sampled_from(["float", "pow2"])),
        pow2_rounding="ceil",
    )
    return x, spec


@SETTINGS
@given(tensors_and_specs())
def test_error_at_most_half_a_step(case):
    x, spec = case
    codes, qp = quantize(x, spec)
    assert codes.dtype == code_dtype(spec.qmin, spec.qmax)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    scale, zp = _blocks_params(qp)
    assert torch.all(scale > 0) and torch.all(torch.isfinite(scale))
    y = fake_quantize(x, spec)
    err = (x.double() - y.double()).abs()
    # the range chosen from min/max is never clipped by more than half a step
    bound = scale.double() / 2 * (1 + REL_EPS) + REL_EPS * x.double().abs()
    assert torch.all(err <= bound)
    assert torch.equal(y, dequantize(codes, qp))


@SETTINGS
@given(
    tensors_and_specs(rounding=("nearest_even", "half_up", "floor")),
    st.sampled_from([1.0, 0.5, 0.25, 0.125, 0.9, 0.3, 0.05]),
)
def test_given_qparams_inside_range_and_idempotent(case, shrink):
    x, spec = case
    qp = choose_qparams(x, spec)
    small = qp.replace(scale=qp.scale * shrink)  # clips part of x
    y = fake_quantize(x, spec, small)
    exact_scale = spec.scale == "pow2" and math.frexp(shrink)[0] == 0.5
    if spec.rounding != "floor" or exact_scale:
        # floor is idempotent only with exact (power of two) scales: with another
        # scale, (q * s) / s may land one ulp below q
        assert torch.equal(fake_quantize(y, spec, small), y)
    scale, zp = _blocks_params(small)
    lo = (spec.qmin - zp) * scale
    hi = (spec.qmax - zp) * scale
    inside = (x >= lo) & (x <= hi)
    step = 1.0 if spec.rounding == "floor" else 0.5
    bound = scale.double() * step * (1 + REL_EPS) + REL_EPS * x.double().abs()
    err = (x.double() - y.double()).abs()
    assert torch.all(err[inside] <= bound[inside])
    # outside the range the value saturates at the nearest end
    assert torch.all(y[x > hi] == hi[x > hi]) and torch.all(y[x < lo] == lo[x < lo])


@SETTINGS
@given(tensors_and_specs())
def test_qparam_shapes(case):
    x, spec = case
    qp = choose_qparams(x, spec)
    shape = list(x.shape)
    if spec.granularity == "tensor":
        expected = [1, 1]
    elif spec.granularity == "channel":
        expected = [1, 1]
        expected[spec.axis % 2] = shape[spec.axis % 2]
    else:
        expected = list(shape)
        expected[spec.axis % 2] = shape[spec.axis % 2] // spec.granularity[1]
    assert list(qp.scale.shape) == expected
    assert qp.shape == tuple(shape)
    if spec.symmetric:
        assert qp.zero_point is None
    else:
        assert list(qp.zero_point.shape) == expected


@SETTINGS
@given(tensors_and_specs(), st.sampled_from(["ceil", "round"]))
def test_pow2_scales_are_powers_of_two(case, rounding):
    x, spec = case
    pspec = QuantSpec(
        bits=spec.bits,
        symmetric=spec.symmetric,
        granularity=spec.granularity,
        axis=spec.axis,
        scale="pow2",
        pow2_rounding=rounding,
    )
    fspec = QuantSpec(
        bits=spec.bits, symmetric=spec.symmetric, granularity=spec.granularity, axis=spec.axis
    )
    ps = choose_qparams(x, pspec).scale.double().flatten().tolist()
    fs = choose_qparams(x, fspec).scale.double().flatten().tolist()
    for p, f in zip(ps, fs, strict=True):
        assert math.frexp(p)[0] == 0.5  # an exact power of two
        if rounding == "ceil":
            assert f <= p < 2 * f
        else:
            assert 2**-0.5 * f <= p <= 2**0.5 * f
    if rounding == "ceil":  # never clips: every gradient passes
        xg = x.clone().requires_grad_(True)
        fake_quantize(xg, pspec).sum().backward()
        if spec.symmetric:
            assert torch.all(xg.grad == 1)


def test_pow2_scale_exact_values():
    s = torch.tensor([0.3, 0.25, 0.36, 1.0, 3.0, 1e-30], dtype=torch.float64)
    assert pow2_scale(s, "ceil").tolist() == [0.5, 0.25, 0.5, 1.0, 4.0, 2.0**-99]
    assert pow2_scale(s, "round").tolist() == [0.25, 0.25, 0.5, 1.0, 4.0, 2.0**-100]
    with pytest.raises(ValueError, match="'ceil', 'round'"):
        pow2_scale(s, "up")


def test_per_channel_beats_per_tensor_on_unequal_channels():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen) * torch.logspace(-2, 0, 16).unsqueeze(1)
    for bits in (4, 8):
        mse = {}
        for g in ("tensor", "channel"):
            spec = QuantSpec(bits=bits, granularity=g)
            mse[g] = float((fake_quantize(w, spec) - w).square().mean())
        assert mse["channel"] < mse["tensor"] / 2


# --------------------------------------------------------------------------- #
# Degenerate tensors, dtypes, errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4),
        QuantSpec(bits=8, symmetric=False),
        QuantSpec(bits=4, granularity="channel", scale="pow2"),
        QuantSpec(bits=3, symmetric=False, granularity=("group", 2), axis=1),
    ],
)
def test_all_zero_tensor_dequantizes_exactly(spec):
    x = torch.zeros(3, 4)
    codes, qp = quantize(x, spec)
    assert torch.all(torch.isfinite(qp.scale)) and torch.all(qp.scale > 0)
    assert torch.equal(dequantize(codes, qp), x)
    assert torch.equal(fake_quantize(x, spec), x)


def test_zero_channel_next_to_nonzero_channel():
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    spec = QuantSpec(bits=4, symmetric=False, granularity="channel")
    y = fake_quantize(x, spec)
    assert torch.equal(y[0], torch.zeros(2))
    assert torch.allclose(y[1], x[1], atol=3 / 15 / 2 + 1e-6)


@pytest.mark.parametrize("c", [0.37, -5.5, 1e-20, 123456.0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_tensor_within_one_rounding(c, symmetric):
    x = torch.full((5,), c)
    spec = QuantSpec(bits=8, symmetric=symmetric)
    y = fake_quantize(x, spec)
    assert torch.allclose(y.double(), x.double(), rtol=REL_EPS, atol=0)


def test_half_and_double_inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=gen)
    spec = QuantSpec(bits=6, symmetric=False, granularity="channel")
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        codes, qp = quantize(xh, spec)
        ref_codes, _ = quantize(xh.float(), spec)
        assert torch.equal(codes, ref_codes)  # arithmetic in float32
        y = fake_quantize(xh, spec)
        assert y.dtype == dtype and torch.equal(y, dequantize(codes, qp))
    codes, qp = quantize(x.double(), spec)
    assert qp.scale.dtype == torch.float64
    assert fake_quantize(x.double(), spec).dtype == torch.float64


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_float_formats_are_saturating_casts(fmt):
    spec = QuantSpec(dtype=fmt)
    dt = spec.torch_dtype
    big = torch.finfo(dt).max
    x = torch.tensor(
        [0.3, -1.7, 2.0 * big, -2.0 * big, 0.0], dtype=torch.float64, requires_grad=True
    )
    codes, qp = quantize(x, spec)
    assert codes.dtype == dt and qp.cast_dtype == dt
    assert torch.equal(qp.scale, torch.ones_like(qp.scale))
    ref = torch.tensor([0.3, -1.7, 0.0, 0.0, 0.0], dtype=torch.float64).to(dt).double()
    ref[2], ref[3] = big, -big
    y = fake_quantize(x, spec)
    assert torch.equal(y, ref)
    assert torch.equal(dequantize(codes, qp), ref)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_bits_validated_at_spec_level():
    for bits in (0, 17, -1):
        with pytest.raises(ValueError, match=r"bits must be in 1\.\.16, got"):
            QuantSpec(bits=bits)


def test_group_must_divide_and_axis_in_range():
    with pytest.raises(ValueError, match="group size 4 does not divide axis 1 of size 6"):
        quantize(torch.ones(4, 6), QuantSpec(granularity=("group", 4), axis=1))
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 1\].*got 2"):
        quantize(torch.ones(4, 6), QuantSpec(granularity="channel", axis=2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", [QuantSpec(), Binary(), Ternary(), FixedPoint(8, 3)])
def test_nonfinite_input_names_the_tensor(bad, spec):
    x = torch.tensor([1.0, bad, 0.5])
    with pytest.raises(ValueError, match="layer1.weight.*NaN or Inf"):
        quantize(x, spec, name="layer1.weight")
    with pytest.raises(ValueError, match="act.*NaN or Inf"):
        fake_quantize(x, spec, name="act")


def test_bad_qparams_and_inputs():
    x = torch.tensor([1.0, -1.0])
    spec = QuantSpec(bits=4)
    qp = choose_qparams(x, spec)
    for s in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            quantize(x, spec, qp.replace(scale=torch.tensor([s])))
    with pytest.raises(ValueError, match="code range"):
        quantize(x, QuantSpec(bits=8), qp)
    aspec = QuantSpec(bits=4, symmetric=False)
    aqp = choose_qparams(x, aspec)
    with pytest.raises(ValueError, match="zero_point must be integers"):
        quantize(x, aspec, aqp.replace(zero_point=torch.tensor([2.5])))
    with pytest.raises(TypeError, match="QParams"):
        quantize(x, spec, {"scale": 1.0})
    with pytest.raises(TypeError, match="floating point"):
        quantize(torch.tensor([1, 2]), spec)
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.ones(0), spec)
    with pytest.raises(ValueError, match="both min_val and max_val"):
        choose_qparams(x, spec, min_val=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        choose_qparams(x, spec, min_val=torch.tensor([1.0]), max_val=torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"qparam shape \(1,\)"):
        choose_qparams(x, spec, min_val=torch.zeros(2), max_val=torch.ones(2))
    with pytest.raises(ValueError, match="do not match"):
        dequantize(torch.zeros(3, dtype=torch.int8), qp)


def test_unknown_spec_type_lists_valid_ones():
    valid = r"\['QuantSpec', 'Binary', 'Ternary', 'FixedPoint', 'Codebook'\]"
    with pytest.raises(TypeError, match=valid):
        quantize(torch.ones(2), "int8")
    with pytest.raises(TypeError, match="got dict"):
        fake_quantize(torch.ones(2), {"bits": 8})
    assert set(HANDLERS) == {QuantSpec, Binary, Ternary, FixedPoint, Codebook}


def test_choose_from_given_ranges_matches_numpy():
    x = torch.zeros(2, 3)
    spec = QuantSpec(bits=8, symmetric=False, granularity="channel")
    qp = choose_qparams(
        x, spec, min_val=torch.tensor([[-1.0], [0.5]]), max_val=torch.tensor([[3.0], [2.0]])
    )
    scale = np.array([4.0, 2.0], dtype=np.float32) / np.float32(255)
    zp = np.clip(0 - np.round(np.array([-1.0, 0.0], dtype=np.float32) / scale), 0, 255)
    np.testing.assert_array_equal(qp.scale.flatten().numpy(), scale)
    np.testing.assert_array_equal(qp.zero_point.flatten().numpy(), zp)
    direct = qparams_from_range(
        torch.tensor([[-1.0], [0.5]]), torch.tensor([[3.0], [2.0]]), spec, (2, 3)
    )
    assert torch.equal(direct.scale, qp.scale)


def test_rebind_qparams_to_new_batch_size():
    spec = QuantSpec(bits=8, granularity="channel", axis=1)
    x = torch.randn(4, 3)
    qp = choose_qparams(x, spec)
    x2 = torch.randn(9, 3)
    codes, qp2 = quantize(x2, spec, qp)
    assert qp2.block_size == (9, 1) and torch.equal(qp2.scale, qp.scale)
    ref = np.clip(np.round(x2.numpy() / qp.scale.numpy()), -128, 127)
    np.testing.assert_array_equal(codes.numpy(), ref)
    per_tensor = choose_qparams(x, QuantSpec(bits=8))
    assert rebind_qparams(per_tensor, (2, 5, 7)).scale.shape == (1, 1, 1)
    with pytest.raises(ValueError, match="cannot quantize a tensor of shape"):
        quantize(torch.randn(4, 5), spec, qp)


# --------------------------------------------------------------------------- #
# Dispatch to the other spec types
# --------------------------------------------------------------------------- #


def test_binary_through_dispatch():
    w = torch.tensor([[0.5, -1.5, 0.0], [-2.0, 1.0, 3.0]])
    codes, qp = quantize(w, Binary(granularity="channel"))
    assert codes.tolist() == [[1, -1, 1], [-1, 1, 1]]
    alpha = np.abs(w.numpy()).mean(axis=1, keepdims=True)
    ref = np.where(w.numpy() >= 0, 1.0, -1.0) * alpha
    np.testing.assert_allclose(dequantize(codes, qp).numpy(), ref, rtol=1e-6)
    assert torch.equal(fake_quantize(w, Binary(granularity="channel")), dequantize(codes, qp))
    assert torch.equal(choose_qparams(w, Binary(granularity="channel")).scale, qp.scale)


def test_ternary_through_dispatch():
    w = torch.tensor([1.0, -0.1, -2.0, 0.2])
    for spec in (Ternary(), Ternary(method="ttq")):
        codes, qp = quantize(w, spec)
        a = np.abs(w.numpy())
        delta = 0.7 * a.mean()
        alpha = a[a > delta].mean()
        ref = np.where(w.numpy() > delta, alpha, np.where(w.numpy() < -delta, -alpha, 0.0))
        np.testing.assert_allclose(dequantize(codes, qp).numpy(), ref, rtol=1e-6)
        assert torch.equal(fake_quantize(w, spec), dequantize(codes, qp))
    # given TTQ scales: negative codes use scale_neg
    qp = qp.replace(scale=torch.tensor([2.0]), scale_neg=torch.tensor([3.0]))
    assert fake_quantize(w, Ternary(method="ttq"), qp).tolist() == [2.0, 0.0, -3.0, 0.0]
    assert dequantize(codes, qp).tolist() == [2.0, 0.0, -3.0, 0.0]


def test_fixed_point_through_dispatch():
    spec = FixedPoint(8, 3, rounding="RND", overflow="SAT")
    x = torch.tensor([0.5, 0.515625, 100.0, -100.0])
    codes, qp = quantize(x, spec)
    # RND: floor(x * 32 + 0.5), then saturate to [-128, 127]
    ref = np.clip(np.floor(x.numpy().astype(np.float64) * 32 + 0.5), -128, 127)
    np.testing.assert_array_equal(codes.numpy(), ref)
    assert torch.all(qp.scale == 2.0**-5)
    assert torch.equal(dequantize(codes, qp), torch.tensor(ref / 32, dtype=torch.float32))
    assert torch.equal(fake_quantize(x, spec), dequantize(codes, qp))
    with pytest.raises(ValueError, match="scale"):
        quantize(x, spec, qp.replace(scale=qp.scale * 2))
