"""Finite inputs never give non-finite outputs: widened arithmetic, or a clear refusal.

References are independent of the code under test: numpy float64 means and
thresholds for Binary/Ternary, exact rationals for the fixed-point overflow
boundary, and a plain rule for when a uniform quantizer may refuse (only a
range within a factor of two of the dtype's largest value can put a grid
point past it).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant.quant import Quantizer
from tnquant.quant.binary import binary_scale
from tnquant.quant.fixed_point import from_mantissa, to_mantissa
from tnquant.quant.observers import EMAObserver, PercentileObserver, percentile_range
from tnquant.quant.primitives import (
    check_finite,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
)
from tnquant.quant.ternary import twn_params
from tnquant.specs import Binary, FixedPoint, QuantSpec, Ternary

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def top(dtype):
    return torch.finfo(dtype).max


# --------------------------------------------------------------------------- #
# the cases of the issue
# --------------------------------------------------------------------------- #


def test_bfloat16_cast_to_float16_saturates_in_a_wide_dtype():
    """bf16 1e6 clamped in bf16 at 65504 rounded the bound to 65536 -> inf in float16."""
    x = torch.tensor([1e6, -1e6, 3.0], dtype=torch.bfloat16)
    y = fake_quantize(x, QuantSpec(dtype="float16"))
    assert bool(torch.isfinite(y).all())
    # float32 gives 65504; its nearest bfloat16 is what a bfloat16 tensor can hold
    expected = torch.tensor([65504.0, -65504.0, 3.0]).to(torch.bfloat16)
    assert torch.equal(y, expected)
    codes, qp = quantize(x, QuantSpec(dtype="float16"))
    assert codes.dtype == torch.float16 and codes.tolist() == [65504.0, -65504.0, 3.0]
    assert torch.equal(dequantize(codes, qp), y)


def test_float16_cast_to_bfloat16_stays_in_float16():
    """A bfloat16 cast of float16 values saturates at the largest bf16 value float16 holds."""
    x = torch.tensor([65504.0, -65504.0, 60000.0, 1.0], dtype=torch.float16)
    y = fake_quantize(x, QuantSpec(dtype="bfloat16"))
    bf16_fp16_max = 65280.0  # 0xFF00: 8 significant bits under 65504
    assert y.tolist() == [bf16_fp16_max, -bf16_fp16_max, 59904.0, 1.0]
    codes, qp = quantize(x, QuantSpec(dtype="bfloat16"))
    assert torch.equal(dequantize(codes, qp), y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_of_huge_weights_is_finite(dtype):
    big = top(dtype) * 0.9
    w = torch.tensor([[big, -big, big / 3], [-big, big, 0.0]]).to(dtype)
    for spec in (Binary(), Binary(granularity="channel")):
        y = fake_quantize(w, spec)
        assert bool(torch.isfinite(y).all())
        ref = np.abs(w.double().numpy())
        ref = ref.mean(axis=None if spec.granularity == "tensor" else 1, keepdims=True)
        np.testing.assert_allclose(binary_scale(w, spec).double().numpy(), ref, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_of_huge_weights_keeps_its_codes(dtype):
    big = top(dtype) * 0.9
    w = torch.tensor([big, -big, big / 100, 0.0]).to(dtype)
    codes, qp = quantize(w, Ternary())
    assert codes.tolist() == [1, -1, 0, 0]  # delta = 0.7 * mean|w| ~ 0.32 big
    assert bool(torch.isfinite(qp.scale).all())
    y = fake_quantize(w, Ternary())
    assert bool(torch.isfinite(y).all()) and y[0] > 0 > y[1]


def test_ternary_delta_beyond_the_dtype_is_capped():
    """threshold 1.9 of equal huge weights: truly below the threshold, delta finite."""
    w = torch.full((4,), top(torch.float32))
    delta, alpha = twn_params(w, Ternary(threshold=1.9))
    assert bool(torch.isfinite(delta).all()) and float(alpha) == top(torch.float32)
    assert quantize(w, Ternary(threshold=1.9))[0].tolist() == [0, 0, 0, 0]


def test_fixed_point_value_beyond_the_dtype_is_refused():
    spec = FixedPoint(8, 1030)
    with pytest.raises(
        ValueError,
        match=r"ap_fixed<8,1030>: 1 of 1 value\(s\) are beyond "
        r"torch.float32's largest",
    ):
        fake_quantize(torch.tensor([-1.0]), spec)
    with pytest.raises(ValueError, match="beyond torch.float32"):
        quantize(torch.tensor([-1.0]), spec)
    # float64 holds -2**1022 (the mantissa -1 times the step 2**1022)
    assert fake_quantize(torch.tensor([-1.0], dtype=torch.float64), spec).item() == -(2.0**1022)
    assert fake_quantize(torch.tensor([1.0]), spec).item() == 0.0  # floor(2**-1022) = 0


def test_fixed_point_step_beyond_float64():
    with pytest.raises(ValueError, match=r"^integer 2000 with width 8 .*beyond float64"):
        _ = FixedPoint(8, 2000).scale
    with pytest.raises(ValueError, match="beyond float64"):
        quantize(torch.tensor([1.0]), FixedPoint(8, 2000))
    with pytest.raises(ValueError, match="beyond float64"):
        quantize(torch.tensor([1.0]), FixedPoint(8, -1100))
    # mantissas work for any type
    assert to_mantissa(torch.tensor([-1.0]), FixedPoint(8, 2000)).tolist() == [-1]
    with pytest.raises(ValueError, match="beyond torch.float64"):
        from_mantissa(torch.tensor([-1]), FixedPoint(8, 2000), torch.float64)


def test_fixed_point_step_below_float32_keeps_a_float64_scale():
    spec = FixedPoint(16, -142)  # step 2**-158: a float64, not a float32
    x = torch.tensor([2.0**-149, -(2.0**-148), 0.0])  # float32 subnormals
    codes, qp = quantize(x, spec)
    assert codes.tolist() == [512, -1024, 0]
    assert qp.scale.dtype == torch.float64 and qp.scale.item() == 2.0**-158
    assert torch.equal(dequantize(codes, qp), fake_quantize(x, spec))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_int_at_the_largest_value(dtype):
    """max|x| == the dtype's largest: qmax * (amax / qmax) rounded past it (inf) before."""
    x = torch.tensor([top(dtype), -top(dtype), 1.0]).to(dtype)
    for bits in (2, 8, 16):
        spec = QuantSpec(bits=bits)
        y = fake_quantize(x, spec)
        assert bool(torch.isfinite(y).all())
        assert abs(float(y[0]) - top(dtype)) <= top(dtype) / spec.qmax  # within one step
        codes, qp = quantize(x, spec)
        assert torch.equal(dequantize(codes, qp), y)


def test_grid_beyond_the_dtype_is_refused_clearly():
    x = torch.tensor([top(torch.float32), -top(torch.float32)])
    with pytest.raises(
        ValueError,
        match=r"value\(s\) quantize to grid points beyond "
        r"torch.float32's largest value",
    ):
        fake_quantize(x, QuantSpec(bits=4, scale="pow2"))
    with pytest.raises(ValueError, match="grid points beyond"):
        quantize(x, QuantSpec(bits=8, symmetric=False), name="w")
    with pytest.raises(ValueError, match="overflows its dtype"):
        quantize(x, QuantSpec(bits=1, symmetric=False))


def test_affine_range_wider_than_the_dtype_gets_a_finite_scale():
    """hi - lo overflows float32 where (hi - lo) / 255 does not: formed in float64."""
    big = top(torch.float32)
    qp = qparams_from_range(
        torch.tensor(-big * 0.9), torch.tensor(big * 0.9), QuantSpec(bits=8, symmetric=False), ()
    )
    expected = np.float32(np.float64(np.float32(big * 0.9)) * 2 / 255)
    assert qp.scale.item() == float(expected)


# --------------------------------------------------------------------------- #
# NaN / Inf say so (with the count), distinct from overflow
# --------------------------------------------------------------------------- #


def fake_quantize_dynamic(x):
    """The handler path of an unslotted quantizer (no observer, no stored qparams)."""
    from tnquant.quant.primitives import HANDLERS

    return HANDLERS[QuantSpec].fake_quantize(x, QuantSpec(), None, None)


def test_nan_input_says_nan_not_overflow():
    x = torch.tensor([float("nan"), 1.0, float("inf"), 2.0])
    for make in (lambda: Quantizer(QuantSpec())(x), lambda: fake_quantize_dynamic(x)):
        with pytest.raises(ValueError, match=r"holds 1 NaN and 1 Inf value\(s\) out of 4") as e:
            make()
        assert "overflow" not in str(e.value)
    with pytest.raises(ValueError, match=r"w contains 2 NaN or Inf value\(s\) \(1 NaN, 1 Inf"):
        check_finite(x, "w")
    with pytest.raises(ValueError, match="min_val/max_val hold NaN in 1 of 1 block"):
        qparams_from_range(torch.tensor(float("nan")), torch.tensor(1.0), QuantSpec(), ())


# --------------------------------------------------------------------------- #
# observers keep huge ranges finite
# --------------------------------------------------------------------------- #


def test_observers_average_huge_ranges_finitely():
    big = top(torch.float32)
    ema = EMAObserver(QuantSpec(symmetric=False))
    ema(torch.tensor([big, big * 0.99]))
    ema(torch.tensor([big, big]))
    assert bool(torch.isfinite(ema.max_val).all())
    mean = PercentileObserver(QuantSpec(observer="percentile", percentile=100.0, symmetric=False))
    mean(torch.tensor([big, big * 0.5]))
    mean(torch.tensor([-big, -big * 0.5]))
    assert float(mean.min_val) == pytest.approx(-big / 4, rel=1e-6)  # (big/2 - big) / 2
    assert float(mean.max_val) == pytest.approx(big / 4, rel=1e-6)  # (big - big/2) / 2
    lo, hi = percentile_range(torch.tensor([-big, big]), (2,), 50.0, symmetric=False)
    assert float(lo) == 0.0 and float(hi) == 0.0


# --------------------------------------------------------------------------- #
# hypothesis: finite in, finite out (or a justified refusal)
# --------------------------------------------------------------------------- #

UNIFORM = [
    QuantSpec(bits=8),
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=4),
    QuantSpec(bits=2, symmetric=False),
    QuantSpec(bits=1),
    QuantSpec(bits=1, symmetric=False),
    QuantSpec(bits=16),
    QuantSpec(bits=4, scale="pow2"),
    QuantSpec(bits=4, scale="pow2", pow2_rounding="round"),
    QuantSpec(bits=8, narrow_range=True, granularity="channel"),
    QuantSpec(bits=3, symmetric=False, granularity=("group", 2), axis=1),
    QuantSpec(bits=4, rounding="half_up"),
    QuantSpec(bits=4, rounding="floor"),
    QuantSpec(bits=4, rounding="stochastic"),
]
CASTS = [QuantSpec(dtype=d) for d in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")]
OTHERS = [
    Binary(),
    Binary(granularity="channel"),
    Ternary(),
    Ternary(method="ttq"),
    Ternary(threshold=1.5, granularity="channel"),
    Ternary(threshold=0.3),
]
FIXED = [
    FixedPoint(8, 3),
    FixedPoint(16, 6, rounding="RND", overflow="SAT"),
    FixedPoint(32, 20, rounding="RND_CONV", overflow="SAT"),
    FixedPoint(8, 1030),
    FixedPoint(16, 130, overflow="SAT_SYM"),
    FixedPoint(12, 17, signed=False, overflow="SAT"),
    FixedPoint(64, 140, rounding="RND"),
    FixedPoint(6, -200),
]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    fraction = st.one_of(
        st.floats(-1, 1), st.sampled_from([1.0, -1.0, 0.999, -0.5, 0.0]), st.floats(-1e-30, 1e-30)
    )
    scale = draw(st.sampled_from([1.0, 1e-3, 1e-20]))
    values = draw(st.lists(fraction, min_size=4, max_size=4))
    x = torch.tensor(values, dtype=torch.float64).reshape(2, 2) * top(dtype) * scale
    return x.to(dtype)


def _overflow_threshold(dtype):
    """Exact: the smallest magnitude that rounds to inf in ``dtype``."""
    info = torch.finfo(dtype)
    digits = round(-math.log2(info.eps)) + 1
    emax = math.frexp(info.max)[1]  # max = (1 - 2**-digits) * 2**emax
    return Fraction(2) ** emax - Fraction(2) ** (emax - digits - 1)


def _fake_and_codes(x, spec):
    gen = torch.Generator().manual_seed(0)
    y = fake_quantize(x, spec, generator=gen)
    gen = torch.Generator().manual_seed(0)
    codes, qp = quantize(x, spec, generator=gen)
    return y, codes, qp


@settings(derandomize=True, deadline=None, max_examples=400)
@given(tensors(), st.sampled_from(UNIFORM + CASTS + OTHERS))
def test_finite_in_finite_out(x, spec):
    amax = float(x.abs().max())
    try:
        y, codes, qp = _fake_and_codes(x, spec)
    except ValueError as e:
        # only an int grid may not fit, and only for a range near the dtype's largest value
        assert isinstance(spec, QuantSpec) and spec.dtype is None, e
        assert amax > top(x.dtype) / 2, e
        assert "beyond" in str(e) or "overflows" in str(e), e
        with pytest.raises(ValueError):
            quantize(x, spec)  # quantize refuses what fake_quantize refuses
        return
    assert y.dtype == x.dtype and bool(torch.isfinite(y).all()), (x, y)
    assert torch.equal(dequantize(codes, qp), y)  # still bitwise the same
    if isinstance(spec, Ternary):
        w = np.abs(x.double().numpy())
        delta = spec.threshold * w.mean()
        clear = np.abs(w - delta) > 1e-2 * delta  # not at the threshold, up to rounding
        ref = np.where(x.double().numpy() > delta, 1, np.where(x.double().numpy() < -delta, -1, 0))
        if spec.granularity == "tensor":
            np.testing.assert_array_equal(codes.numpy()[clear], ref[clear])


@settings(derandomize=True, deadline=None, max_examples=300)
@given(tensors(), st.sampled_from(FIXED))
def test_fixed_point_finite_or_refused_exactly_when_beyond(x, spec):
    m = to_mantissa(x, spec)
    limit = _overflow_threshold(x.dtype)
    beyond = any(abs(Fraction(int(v)) * Fraction(2) ** -spec.frac) >= limit for v in m.flatten())
    if beyond:
        with pytest.raises(ValueError, match="beyond"):
            fake_quantize(x, spec)
        return
    y = fake_quantize(x, spec)
    assert bool(torch.isfinite(y).all())
    if -1023 <= spec.frac <= 1074:
        codes, qp = quantize(x, spec)
        assert torch.equal(codes, m) and torch.equal(dequantize(codes, qp), y)
