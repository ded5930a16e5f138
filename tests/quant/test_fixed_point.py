"""ap_fixed<W,I,Q,O> semantics against hand-written values, an exact rational
reference (Python ``Fraction``) and, when g++ is present, the Vivado HLS
``ap_types`` headers that ship with hls4ml (compiled once per session)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant.quant.fixed_point import (
    apply_overflow,
    cast_mantissa,
    fixed_point_fake_quantize,
    fixed_point_quantize,
    from_mantissa,
    mantissa_bounds,
    range_of,
    round_shift,
    saturate,
    to_mantissa,
    wrap,
)
from tnquant.specs import AP_OVERFLOW, AP_ROUNDING, FixedPoint

F = FixedPoint.from_string
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# --------------------------------------------------------------------------- #
# hand-written tables (values worked out by hand from the mode definitions)
# --------------------------------------------------------------------------- #

# ap_fixed<8,4,Q>: 4 fractional bits, x = v / 16; v listed here.
ROUND_V = [2.5, 3.5, -2.5, -3.5, 2.25, 2.75, -2.25, -2.75, -0.25, -0.5, 0.5, 3.0]
ROUND_EXPECTED = {
    "TRN":         [2, 3, -3, -4, 2, 2, -3, -3, -1, -1, 0, 3],
    "TRN_ZERO":    [2, 3, -2, -3, 2, 2, -2, -2, 0, 0, 0, 3],
    "RND":         [3, 4, -2, -3, 2, 3, -2, -3, 0, 0, 1, 3],
    "RND_ZERO":    [2, 3, -2, -3, 2, 3, -2, -3, 0, 0, 0, 3],
    "RND_MIN_INF": [2, 3, -3, -4, 2, 3, -2, -3, 0, -1, 0, 3],
    "RND_INF":     [3, 4, -3, -4, 2, 3, -2, -3, 0, -1, 1, 3],
    "RND_CONV":    [2, 4, -2, -4, 2, 3, -2, -3, 0, 0, 0, 3],
}  # fmt: skip
ROUND_CASES = [
    (v / 16, f"ap_fixed<8,4,{q},WRAP>", e)
    for q, row in ROUND_EXPECTED.items()
    for v, e in zip(ROUND_V, row, strict=True)
]

# (x, {overflow mode: expected}) for one type each.
_OVF = {
    "ap_fixed<4,2,TRN,{}>": [  # step 0.25, mantissa [-8, 7]
        (2.0, dict(WRAP=-8, SAT=7, SAT_ZERO=0, SAT_SYM=7)),
        (2.25, dict(WRAP=-7, SAT=7, SAT_ZERO=0, SAT_SYM=7)),
        (-2.0, dict(WRAP=-8, SAT=-8, SAT_ZERO=-8, SAT_SYM=-7)),
        (-2.25, dict(WRAP=7, SAT=-8, SAT_ZERO=0, SAT_SYM=-7)),
        (5.0, dict(WRAP=4, SAT=7, SAT_ZERO=0, SAT_SYM=7)),
        (-5.0, dict(WRAP=-4, SAT=-8, SAT_ZERO=0, SAT_SYM=-7)),
        (1.75, dict(WRAP=7, SAT=7, SAT_ZERO=7, SAT_SYM=7)),
        (-2.2, dict(WRAP=7, SAT=-8, SAT_ZERO=0, SAT_SYM=-7)),  # floor(-8.8) = -9
        (1e300, dict(WRAP=0, SAT=7, SAT_ZERO=0, SAT_SYM=7)),  # a multiple of 2**64
        (-1e300, dict(WRAP=0, SAT=-8, SAT_ZERO=0, SAT_SYM=-7)),
    ],
    "ap_fixed<4,2,RND,{}>": [
        (1.9, dict(WRAP=-8, SAT=7, SAT_ZERO=0, SAT_SYM=7)),  # 7.6 rounds up to 8
        (1.875, dict(WRAP=-8, SAT=7, SAT_ZERO=0, SAT_SYM=7)),  # tie 7.5 -> 8
        (-2.1, dict(WRAP=-8, SAT=-8, SAT_ZERO=-8, SAT_SYM=-7)),  # -8.4 -> -8
    ],
    "ap_ufixed<4,2,TRN,{}>": [  # step 0.25, mantissa [0, 15]
        (4.0, dict(WRAP=0, SAT=15, SAT_ZERO=0, SAT_SYM=15)),
        (4.5, dict(WRAP=2, SAT=15, SAT_ZERO=0, SAT_SYM=15)),
        (-0.25, dict(WRAP=15, SAT=0, SAT_ZERO=0, SAT_SYM=0)),
        (-1.0, dict(WRAP=12, SAT=0, SAT_ZERO=0, SAT_SYM=0)),
        (3.75, dict(WRAP=15, SAT=15, SAT_ZERO=15, SAT_SYM=15)),
        (-0.1, dict(WRAP=15, SAT=0, SAT_ZERO=0, SAT_SYM=0)),  # floor(-0.4) = -1
    ],
    "ap_ufixed<4,2,RND_INF,{}>": [
        (-0.125, dict(WRAP=15, SAT=0, SAT_ZERO=0, SAT_SYM=0)),  # -0.5 away from 0
        (-0.1, dict(WRAP=0, SAT=0, SAT_ZERO=0, SAT_SYM=0)),  # -0.4 -> 0
    ],
    "ap_fixed<4,6,RND,{}>": [  # I > W: step 4
        (30.0, dict(WRAP=-8, SAT=7, SAT_ZERO=0, SAT_SYM=7)),  # 7.5 -> 8
        (-30.0, dict(WRAP=-7, SAT=-7, SAT_ZERO=-7, SAT_SYM=-7)),  # -7.5 -> -7
    ],
    "ap_fixed<4,6,TRN,{}>": [
        (100.0, dict(WRAP=-7, SAT=7, SAT_ZERO=0, SAT_SYM=7)),  # 25
        (-32.0, dict(WRAP=-8, SAT=-8, SAT_ZERO=-8, SAT_SYM=-7)),
    ],
    "ap_fixed<4,-2,TRN,{}>": [  # I < 0: step 1/64, range [-0.125, 0.109375]
        (0.2, dict(WRAP=-4, SAT=7, SAT_ZERO=0, SAT_SYM=7)),  # floor(12.8) = 12
        (-0.125, dict(WRAP=-8, SAT=-8, SAT_ZERO=-8, SAT_SYM=-7)),
    ],
    "ap_ufixed<3,-1,TRN,{}>": [  # step 1/16, mantissa [0, 7]
        (0.4, dict(WRAP=6, SAT=6, SAT_ZERO=6, SAT_SYM=6)),
        (0.5, dict(WRAP=0, SAT=7, SAT_ZERO=0, SAT_SYM=7)),
    ],
    "ap_fixed<64,32,TRN,{}>": [  # the widest signed type
        (1.5, dict(WRAP=6442450944, SAT=6442450944, SAT_ZERO=6442450944, SAT_SYM=6442450944)),
        (-(2.0**31), dict(WRAP=I64_MIN, SAT=I64_MIN, SAT_ZERO=I64_MIN, SAT_SYM=-I64_MAX)),
        (2.0**31, dict(WRAP=I64_MIN, SAT=I64_MAX, SAT_ZERO=0, SAT_SYM=I64_MAX)),
    ],
    "ap_ufixed<63,0,TRN,{}>": [
        (0.75, dict(WRAP=3 * 2**61, SAT=3 * 2**61, SAT_ZERO=3 * 2**61, SAT_SYM=3 * 2**61)),
        (1.0, dict(WRAP=0, SAT=I64_MAX, SAT_ZERO=0, SAT_SYM=I64_MAX)),
    ],
    "ap_fixed<1,1,RND,{}>": [  # mantissa {-1, 0}; SAT_SYM acts as SAT at W = 1
        (0.7, dict(WRAP=-1, SAT=0, SAT_ZERO=0, SAT_SYM=0)),
        (-0.3, dict(WRAP=0, SAT=0, SAT_ZERO=0, SAT_SYM=0)),
        (-1.0, dict(WRAP=-1, SAT=-1, SAT_ZERO=-1, SAT_SYM=-1)),
    ],
    "ap_ufixed<1,0,TRN,{}>": [  # mantissa {0, 1}, step 0.5
        (0.5, dict(WRAP=1, SAT=1, SAT_ZERO=1, SAT_SYM=1)),
        (1.0, dict(WRAP=0, SAT=1, SAT_ZERO=0, SAT_SYM=1)),
    ],
}
OVERFLOW_CASES = [
    (x, t.format(o), e) for t, rows in _OVF.items() for x, exp in rows for o, e in exp.items()
]
MISC_CASES = [
    (10.0, "ap_fixed<4,6,TRN>", 2),  # 2.5
    (10.0, "ap_fixed<4,6,RND_CONV>", 2),
    (14.0, "ap_fixed<4,6,RND_CONV>", 4),  # 3.5 -> 4
    (-13.0, "ap_fixed<4,6,TRN>", -4),  # -3.25
    (-13.0, "ap_fixed<4,6,TRN_ZERO>", -3),
    (0.05, "ap_fixed<4,-2,TRN>", 3),  # 3.2
    (0.0546875, "ap_fixed<4,-2,RND>", 4),  # 3.5
    (0.0546875, "ap_fixed<4,-2,RND_ZERO>", 3),
    (-1.25 * 2.0**-32, "ap_fixed<64,32,TRN>", -2),
    (-1.25 * 2.0**-32, "ap_fixed<64,32,RND>", -1),
    (0.7, "ap_fixed<1,1,TRN>", 0),
    (-0.3, "ap_fixed<1,1,TRN>", -1),
    (-0.0, "ap_fixed<8,4,TRN>", 0),
    (-1e-300, "ap_fixed<8,4,TRN>", -1),  # x * 16 is tiny but negative
    (-1e-300, "ap_fixed<8,4,TRN_ZERO>", 0),
    (1.0, "ap_fixed<8,2000,TRN>", 0),  # frac = -1992: 2**-1992 underflows float64
    (-1.0, "ap_fixed<8,2000,TRN>", -1),
    (1.0, "ap_fixed<8,-2000,TRN,SAT>", 127),  # 2**2008 overflows float64
    (1.0, "ap_fixed<8,-2000,TRN,WRAP>", 0),
]
TABLE = ROUND_CASES + OVERFLOW_CASES + MISC_CASES


@pytest.mark.parametrize(("x", "type_", "expected"), TABLE)
def test_to_mantissa_table(x: float, type_: str, expected: int) -> None:
    got = to_mantissa(torch.tensor([x], dtype=torch.float64), F(type_))
    assert got.dtype == torch.int64
    assert int(got[0]) == expected


@pytest.mark.parametrize(("x", "type_", "expected"), TABLE)
def test_cast_mantissa_table(x: float, type_: str, expected: int) -> None:
    """The same table through the integer path: x = m * 2**-frac_in exactly."""
    mant, exp = math.frexp(x)
    m, frac_in = int(mant * 2**53), 53 - exp
    assert Fraction(m) / Fraction(2) ** frac_in == Fraction(x)
    assert int(cast_mantissa(np.array([m]), frac_in, F(type_))[0]) == expected


# --------------------------------------------------------------------------- #
# exact rational reference, written from the mode definitions
# --------------------------------------------------------------------------- #


def ref_round(v: Fraction, mode: str) -> int:
    fl = math.floor(v)
    d = v - fl
    if mode == "TRN" or d == 0:
        return fl
    if mode == "TRN_ZERO":
        return fl + 1 if v < 0 else fl
    if d != Fraction(1, 2):
        return fl + 1 if d > Fraction(1, 2) else fl
    ties = {"RND": 1, "RND_ZERO": v < 0, "RND_MIN_INF": 0, "RND_INF": v > 0, "RND_CONV": fl % 2}
    return fl + int(ties[mode])


def ref_overflow(n: int, spec: FixedPoint) -> int:
    lo, hi = spec.qmin, spec.qmax
    sym_lo = -hi if spec.signed and spec.width >= 2 else lo
    if spec.overflow == "WRAP":
        n %= 2**spec.width
        return n - 2**spec.width if spec.signed and n > hi else n
    if spec.overflow == "SAT_ZERO":
        return n if lo <= n <= hi else 0
    if spec.overflow == "SAT_SYM":
        return min(max(n, sym_lo), hi)
    return min(max(n, lo), hi)


def ref_mantissa(value: Fraction, spec: FixedPoint) -> int:
    return ref_overflow(ref_round(value * Fraction(2) ** spec.frac, spec.rounding), spec)


@st.composite
def specs(draw: st.DrawFn, max_int: int = 70) -> FixedPoint:
    signed = draw(st.booleans())
    width = draw(st.integers(1, 64 if signed else 63))
    return FixedPoint(
        width,
        draw(st.integers(-20, max_int)),
        signed=signed,
        rounding=draw(st.sampled_from(AP_ROUNDING)),
        overflow=draw(st.sampled_from(AP_OVERFLOW)),
    )


# grid points, ties and random floats: k * 2**-e hits exact steps and half steps
grid_floats = st.builds(
    lambda k, e: math.ldexp(k, -e), st.integers(-(2**20), 2**20), st.integers(-30, 40)
)
any_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=400, deadline=None)
@given(specs(), st.lists(st.one_of(grid_floats, any_floats), min_size=1, max_size=8))
def test_to_mantissa_matches_rational_reference(spec: FixedPoint, xs: list[float]) -> None:
    got = to_mantissa(torch.tensor(xs, dtype=torch.float64), spec).tolist()
    assert got == [ref_mantissa(Fraction(x), spec) for x in xs]


@settings(max_examples=400, deadline=None)
@given(
    specs(),
    st.integers(-80, 80),
    st.lists(
        st.one_of(st.integers(I64_MIN, I64_MAX), st.integers(-4096, 4096)), min_size=1, max_size=8
    ),
)
def test_cast_mantissa_matches_rational_reference(
    spec: FixedPoint, frac_in: int, ms: list[int]
) -> None:
    expected = [ref_mantissa(Fraction(m, 1) / Fraction(2) ** frac_in, spec) for m in ms]
    got_np = cast_mantissa(np.array(ms, dtype=np.int64), frac_in, spec)
    got_t = cast_mantissa(torch.tensor(ms, dtype=torch.int64), frac_in, spec)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.int64
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.int64
    assert got_np.tolist() == expected
    assert got_t.tolist() == expected


@settings(max_examples=200, deadline=None)
@given(specs(), st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=8))
def test_cast_agrees_with_float_path(spec: FixedPoint, ms: list[int]) -> None:
    """m * 2**-frac_in converted from float64 (exact for |m| < 2**53) == the integer cast."""
    frac_in = 17
    x = torch.tensor([math.ldexp(m, -frac_in) for m in ms], dtype=torch.float64)
    assert cast_mantissa(torch.tensor(ms), frac_in, spec).tolist() == to_mantissa(x, spec).tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.booleans(), st.lists(st.integers(I64_MIN, I64_MAX), min_size=1))
def test_wrap_saturate_overflow(width: int, signed: bool, ms: list[int]) -> None:
    if not signed and width == 64:
        width = 63
    m = np.array(ms, dtype=np.int64)
    mod = 2**width
    exp_wrap = [(v % mod) - (mod if signed and v % mod >= mod // 2 else 0) for v in ms]
    lo, hi = (-(mod // 2), mod // 2 - 1) if signed else (0, mod - 1)
    assert wrap(m, width, signed).tolist() == exp_wrap
    assert wrap(torch.from_numpy(m), width, signed).tolist() == exp_wrap
    assert saturate(m, width, signed).tolist() == [min(max(v, lo), hi) for v in ms]
    sym_lo = -hi if signed and width >= 2 else lo
    assert saturate(m, width, signed, symmetric=True).tolist() == [
        min(max(v, sym_lo), hi) for v in ms
    ]
    for o in AP_OVERFLOW:
        spec = FixedPoint(width, 0, signed=signed, overflow=o)
        assert apply_overflow(m, spec).tolist() == [ref_overflow(v, spec) for v in ms]


@pytest.mark.parametrize("mode", AP_ROUNDING)
def test_round_shift_by_hand(mode: str) -> None:
    m = np.array([v * 4 for v in (2.5, 3.5, -2.5, -3.5, 2.25, 2.75, -2.25, -2.75)], dtype=np.int64)
    assert round_shift(m, 2, mode).tolist() == ROUND_EXPECTED[mode][:8]
    assert round_shift(m, 0, mode).tolist() == m.tolist()


EXTREME_CASTS = [  # (m, frac_in, target type, expected), worked out by hand
    (I64_MIN, 64, "ap_fixed<8,8,TRN>", -1),  # exactly -0.5
    (I64_MIN, 64, "ap_fixed<8,8,TRN_ZERO>", 0),
    (I64_MIN, 64, "ap_fixed<8,8,RND>", 0),
    (I64_MIN, 64, "ap_fixed<8,8,RND_ZERO>", 0),
    (I64_MIN, 64, "ap_fixed<8,8,RND_MIN_INF>", -1),
    (I64_MIN, 64, "ap_fixed<8,8,RND_INF>", -1),
    (I64_MIN, 64, "ap_fixed<8,8,RND_CONV>", 0),
    (I64_MAX, 64, "ap_fixed<8,8,RND_INF>", 0),  # just below 0.5
    (I64_MIN, 63, "ap_fixed<8,8,RND>", -1),  # exactly -1
    (-1, 200, "ap_fixed<8,8,TRN>", -1),
    (-1, 200, "ap_fixed<8,8,RND_INF>", 0),
    (1, -100, "ap_fixed<8,8,TRN,SAT>", 127),  # 2**100
    (1, -100, "ap_fixed<8,8,TRN,WRAP>", 0),
    (-1, -7, "ap_fixed<8,8,TRN,SAT>", -128),
    (-1, -7, "ap_fixed<8,8,TRN,SAT_SYM>", -127),
    (3, -6, "ap_ufixed<8,8,TRN,WRAP>", 192),
    (5, -6, "ap_ufixed<8,8,TRN,WRAP>", 64),
]


@pytest.mark.parametrize(("m", "frac_in", "type_", "expected"), EXTREME_CASTS)
def test_cast_extreme_shifts(m: int, frac_in: int, type_: str, expected: int) -> None:
    assert cast_mantissa(np.array([m]), frac_in, F(type_)).tolist() == [expected]
    assert cast_mantissa(torch.tensor([m]), frac_in, F(type_)).tolist() == [expected]


def test_from_mantissa_and_range() -> None:
    spec = F("ap_fixed<8,3>")
    out = from_mantissa(torch.tensor([16, -3, 127, -128]), spec, dtype=torch.float64)
    assert out.tolist() == [0.5, -0.09375, 3.96875, -4.0]
    assert from_mantissa(np.array([1]), F("ap_fixed<4,6>")).tolist() == [4.0]
    assert from_mantissa(torch.tensor([3]), spec).dtype == torch.float32
    assert range_of(spec) == (-4.0, 3.96875)
    assert range_of(F("ap_ufixed<4,-2>")) == (0.0, 15 / 64)
    assert mantissa_bounds(F("ap_fixed<8,3,TRN,SAT_SYM>")) == (-127, 127)
    assert mantissa_bounds(F("ap_ufixed<8,3,TRN,SAT_SYM>")) == (0, 255)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_quantize_and_fake_quantize(dtype: torch.dtype) -> None:
    spec = F("ap_fixed<8,3,RND_CONV,SAT>")
    x = (torch.randn(4, 5, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    codes, qp = fixed_point_quantize(x, spec)
    assert codes.dtype == torch.int64 and codes.shape == x.shape
    assert qp.zero_point is None and qp.scale_neg is None
    assert (qp.qmin, qp.qmax) == (-128, 127)
    assert qp.block_size == (4, 5) and qp.shape == (4, 5) and qp.dtype == dtype
    assert qp.scale.shape == (1, 1) and float(qp.scale) == 2.0**-5
    # independent reference: round-half-even of x * 32 (numpy), clamped
    ref = np.clip(np.rint(x.double().numpy() * 32), -128, 127)
    assert codes.tolist() == ref.astype(np.int64).tolist()
    xr = x.clone().requires_grad_(True)
    y = fixed_point_fake_quantize(xr, spec)
    assert y.dtype == dtype
    torch.testing.assert_close(y.detach(), (codes * qp.scale).to(dtype), atol=0, rtol=0)
    y.backward(torch.arange(20.0).reshape(4, 5).to(dtype))
    torch.testing.assert_close(xr.grad, torch.arange(20.0).reshape(4, 5).to(dtype))


def test_zero_dim_tensor() -> None:
    codes, qp = fixed_point_quantize(torch.tensor(1.3), F("ap_fixed<6,2,RND>"))
    assert codes.shape == () and int(codes) == 21 and qp.scale.shape == ()


def test_validation() -> None:
    spec = F("ap_fixed<8,3>")
    with pytest.raises(ValueError, match="finite"):
        to_mantissa(torch.tensor([1.0, float("nan")]), spec)
    with pytest.raises(ValueError, match="finite"):
        fixed_point_fake_quantize(torch.tensor([float("inf")]), spec)
    with pytest.raises(TypeError, match="floating"):
        to_mantissa(torch.tensor([1, 2]), spec)
    with pytest.raises(TypeError, match="FixedPoint"):
        to_mantissa(torch.tensor([1.0]), "ap_fixed<8,3>")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="int64"):
        to_mantissa(torch.tensor([1.0]), F("ap_ufixed<64,3>"))
    with pytest.raises(TypeError, match="integer"):
        cast_mantissa(np.array([1.5]), 3, spec)
    with pytest.raises(TypeError, match="integer"):
        cast_mantissa(torch.tensor([True]), 3, spec)
    with pytest.raises(TypeError, match="frac_in"):
        cast_mantissa(np.array([1]), 1.0, spec)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        wrap(np.array([1]), 0, True)
    with pytest.raises(ValueError, match="width"):
        saturate(np.array([1]), 64, False)
    with pytest.raises(ValueError, match="shift"):
        round_shift(np.array([1]), -1)


# --------------------------------------------------------------------------- #
# the Vivado HLS ap_types headers (shipped with hls4ml) as ground truth
# --------------------------------------------------------------------------- #

_WI = [(8, 3), (6, -2), (5, 8), (1, 1), (16, 6), (64, 20), (3, -4), (12, 12), (63, 1), (2, 1)]
_CAST_CFG = [  # (source W, I, signed), target (W, I): right/left shifts, shifts >= 64, W = 1, 64
    ((16, 6, True), (8, 3)), ((20, 4, True), (6, -2)), ((10, 10, True), (5, 8)),
    ((12, 2, True), (12, 8)), ((8, 6, True), (10, 2)), ((12, 6, False), (8, 4)),
    ((64, 40, True), (64, 50)), ((48, 48, True), (64, 20)), ((8, 1, True), (1, 1)),
    ((64, -10, True), (8, 8)), ((8, 70, True), (16, -2)), ((33, 3, False), (7, 5)),
]  # fmt: skip
_COMBOS = list(itertools.product(AP_ROUNDING, AP_OVERFLOW, (True, False)))


def _spec(w: int, i: int, signed: bool, q: str, o: str) -> FixedPoint:
    return FixedPoint(min(w, 63) if not signed else w, i, signed=signed, rounding=q, overflow=o)


# each (Q, O, signedness) combination gets 3 target types / 4 cast pairs, rotating
RANDOM_TYPES = [
    _spec(*_WI[(k + j) % len(_WI)], s, q, o)
    for k, (q, o, s) in enumerate(_COMBOS)
    for j in range(3)
]
CAST_PAIRS = [
    (src, _spec(*dst, s, q, o))
    for k, (q, o, s) in enumerate(_COMBOS)
    for src, dst in (_CAST_CFG[(k + j) % len(_CAST_CFG)] for j in range(4))
]
DOUBLE_TYPES = list(dict.fromkeys(RANDOM_TYPES + [F(t) for _, t, _ in TABLE]))


def _ctype(s: FixedPoint) -> str:
    name = "ap_fixed" if s.signed else "ap_ufixed"
    return f"{name}<{s.width},{s.integer},AP_{s.rounding},AP_{s.overflow}>"


def _program() -> str:
    lines = [
        "#include <cstdio>", "#include <cstring>", '#include "ap_fixed.h"',
        "template <class T> static void conv(double d) {",
        '  T y = d; printf(" %llu", (unsigned long long)y.bits_to_uint64()); }',
        "template <class S, class T> static void cast(unsigned long long b) {",
        '  S s; s.setBits(b); T y = s; printf(" %llu", (unsigned long long)y.bits_to_uint64()); }',
        "int main(int argc, char** argv) {", "  unsigned long long b; double d;",
        "  if (argv[1][0] == 'd') while (scanf(\"%llx\", &b) == 1) {",
        "    std::memcpy(&d, &b, 8);",
    ]  # fmt: skip
    lines += [f"    conv<{_ctype(s)} >(d);" for s in DOUBLE_TYPES]
    lines += ['    printf("\\n"); }', '  else while (scanf("%llx", &b) == 1) {']
    for (w, i, signed), t in CAST_PAIRS:
        src = f"{'ap_fixed' if signed else 'ap_ufixed'}<{w},{i}>"
        lines.append(f"    cast<{src}, {_ctype(t)} >(b);")
    lines += ['    printf("\\n"); }', "  return 0; }"]
    return "\n".join(lines) + "\n"


def _header_dir() -> Path | None:
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "templates/vivado/ap_types"
    return path if (path / "ap_fixed.h").exists() else None


@pytest.fixture(scope="module")
def ap_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    headers, gxx = _header_dir(), shutil.which("g++")
    if headers is None or gxx is None:
        pytest.skip("needs g++ and hls4ml's ap_types headers")
    tmp = tmp_path_factory.mktemp("ap_types")
    (tmp / "ref.cpp").write_text(_program())
    # NDEBUG: the headers assert when a cast shifts by more than the source width
    cmd = [gxx, "-O0", "-w", "-DNDEBUG", "-I", str(headers), "ref.cpp", "-o", "ref"]
    subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, timeout=300)
    return tmp / "ref"


def _run(binary: Path, mode: str, words: list[int]) -> list[list[int]]:
    text = "".join(f"{w:x}\n" for w in words)
    out = subprocess.run(
        [str(binary), mode], input=text, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return [[int(v) for v in line.split()] for line in out.splitlines() if line.strip()]


def _signed(raw: int, width: int, signed: bool) -> int:
    raw &= (1 << width) - 1
    return raw - (1 << width) if signed and raw >> (width - 1) else raw


def _double_inputs() -> np.ndarray:
    rng = np.random.default_rng(1234)
    normal = rng.standard_normal(300) * np.exp2(rng.integers(-12, 12, 300))
    grid = rng.integers(-4000, 4000, 300) * np.exp2(-rng.integers(-6, 14, 300).astype(float))
    special = [0.0, -0.0, 1e300, -1e300, 5e-324, -5e-324, 2.0**63, -(2.0**63), 2.0**19, -(2.0**19)]
    table = [x for x, _, _ in TABLE]
    return np.concatenate([normal, grid / 2, special, table]).astype(np.float64)


def test_to_mantissa_matches_ap_types_headers(ap_binary: Path) -> None:
    x = _double_inputs()
    rows = _run(ap_binary, "d", [int(b) for b in x.view(np.uint64)])
    assert len(rows) == len(x)
    xt = torch.from_numpy(x)
    for j, spec in enumerate(DOUBLE_TYPES):
        expected = [_signed(r[j], spec.width, spec.signed) for r in rows]
        assert to_mantissa(xt, spec).tolist() == expected, str(spec)


def test_table_matches_ap_types_headers(ap_binary: Path) -> None:
    """The hand-written table itself agrees with the headers."""
    rows = _run(ap_binary, "d", [int(np.float64(x).view(np.uint64)) for x, _, _ in TABLE])
    for row, (x, type_, expected) in zip(rows, TABLE, strict=True):
        spec = F(type_)
        got = _signed(row[DOUBLE_TYPES.index(spec)], spec.width, spec.signed)
        assert got == expected, (x, type_)


def test_cast_mantissa_matches_ap_types_headers(ap_binary: Path) -> None:
    rng = np.random.default_rng(99)
    raw = [int(v) for v in rng.integers(0, 2**64, 500, dtype=np.uint64)]
    raw += [int(v) for v in rng.integers(0, 2**12, 100)]  # small values: ties and near zero
    raw += [0, 1, 2**64 - 1, 2**63, 2**63 - 1, 2**64 - 2]
    rows = _run(ap_binary, "c", raw)
    assert len(rows) == len(raw)
    for j, ((w, i, signed), spec) in enumerate(CAST_PAIRS):
        m = np.array([_signed(r, w, signed) for r in raw], dtype=np.int64)
        expected = [_signed(r[j], spec.width, spec.signed) for r in rows]
        assert cast_mantissa(m, w - i, spec).tolist() == expected, (w, i, signed, str(spec))
        assert cast_mantissa(torch.from_numpy(m), w - i, spec).tolist() == expected
