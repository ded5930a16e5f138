"""Tests of the straight-through estimators against analytic gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant import QuantSpec
from tnquant.quant.primitives import dequantize, quantize
from tnquant.quant.ste import (
    cast_fake_quantize,
    clipped_round,
    lsq_fake_quantize,
    lsq_grad_scale,
    pow2_ste,
    round_ste,
)

SETTINGS = settings(max_examples=60, deadline=None)


def np_lsq(x, s, zp, qmin, qmax, g, grad_scale):
    """Forward value and LSQ/LSQ+ gradients from the papers' formulas (numpy, float64).

    ``s`` and ``zp`` have one value per row of the 2-d ``x``.
    """
    x = x.astype(np.float64)
    s = s.astype(np.float64)[:, None]
    zp = np.zeros_like(s) if zp is None else np.round(np.clip(zp, qmin, qmax))[:, None]
    v = x / s
    r = np.round(v) + zp
    inside = (r >= qmin) & (r <= qmax)
    q = np.clip(r, qmin, qmax)
    y = (q - zp) * s
    dx = g * inside
    ds = (g * np.where(inside, np.round(v) - v, q - zp)).sum(axis=1) * grad_scale
    dzp = (g * np.where(inside, 0.0, -s)).sum(axis=1) * grad_scale
    return y, dx, ds, dzp


def _away_from_ties(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Nudge x so that x / s is not within 1e-3 of a half-integer."""
    v = x / s
    frac = v - torch.floor(v)
    bad = (frac - 0.5).abs() < 1e-3
    return torch.where(bad, x + 0.01 * s, x)


def test_round_ste_identity_gradient():
    x = torch.tensor([0.5, 1.5, -0.7, 2.2], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -1.0, 2.0]
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)
    x.grad = None
    y = round_ste(x, "half_up")
    assert y.tolist() == [1.0, 2.0, -1.0, 2.0]


def test_clipped_round_gradient_mask():
    x = torch.tensor([-9.6, -8.4, -8.6, 0.3, 6.6, 7.4, 7.6, 100.0], requires_grad=True)
    y = clipped_round(x, -8, 7)
    assert y.tolist() == [-8.0, -8.0, -8.0, 0.0, 7.0, 7.0, 7.0, 7.0]
    y.sum().backward()
    # rounded value inside [qmin, qmax]: -8 (from -8.4) and 7 (from 7.4) pass
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="qmin must be <= qmax"):
        clipped_round(x, 3, 2)


@SETTINGS
@given(st.integers(2, 8), st.booleans(), st.integers(0, 2**31 - 1), st.floats(0.05, 2.0))
def test_lsq_gradients_match_formula(bits, affine, seed, scale_mult):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = 3, 17
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 3
    s0 = (torch.rand(rows, generator=gen, dtype=torch.float64) + 0.2) * scale_mult
    x = _away_from_ties(x, s0[:, None])
    if affine:
        qmin, qmax = 0, 2**bits - 1
        zp0 = torch.rand(rows, generator=gen, dtype=torch.float64) * qmax
    else:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        zp0 = None
    gs = lsq_grad_scale(cols, qmax)
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    xv = x.clone().requires_grad_(True)
    s = s0.clone().requires_grad_(True)
    zp = None if zp0 is None else zp0.clone().requires_grad_(True)
    y = lsq_fake_quantize(xv, s[:, None], None if zp is None else zp[:, None], qmin, qmax, gs)
    (y * g).sum().backward()
    ry, rdx, rds, rdzp = np_lsq(
        x.numpy(), s0.numpy(), None if zp0 is None else zp0.numpy(), qmin, qmax, g.numpy(), gs
    )
    np.testing.assert_allclose(y.detach().numpy(), ry, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(xv.grad.numpy(), rdx)
    np.testing.assert_allclose(s.grad.numpy(), rds, rtol=1e-9, atol=1e-12)
    if zp is not None:
        np.testing.assert_allclose(zp.grad.numpy(), rdzp, rtol=1e-9, atol=1e-12)


def test_lsq_matches_torch_learnable_fake_quant():
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(200, generator=gen) * 2
    s0, z0 = torch.tensor([0.05]), torch.tensor([100.0])
    x0 = _away_from_ties(x0, s0)
    grad_factor = 0.37
    outs = []
    for fn in (
        lambda x, s, z: lsq_fake_quantize(x, s, z, 0, 255, grad_factor),
        lambda x, s, z: torch._fake_quantize_learnable_per_tensor_affine(
            x, s, z, 0, 255, grad_factor
        ),
    ):
        x, s, z = (t.clone().requires_grad_(True) for t in (x0, s0, z0))
        y = fn(x, s, z)
        y.sum().backward()
        outs.append((y.detach(), x.grad, s.grad, z.grad))
    for ours, ref in zip(*outs, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_lsq_scale_gradcheck_where_smooth():
    # every element clipped: y = (qmax - zp) * s or (qmin - zp) * s, smooth in s,
    # and the LSQ gradient (qmin/qmax - zp) is the true derivative
    x = torch.tensor([-50.0, 40.0, 33.0, -20.0], dtype=torch.float64)
    s = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s_: lsq_fake_quantize(x, s_, None, -8, 7), (s,))
    zp = torch.tensor([3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s_: lsq_fake_quantize(x, s_, zp, 0, 15), (s,))
    # the gradient to x is the identity inside the range (the STE of a linear map)
    xin = torch.tensor([0.31, -0.52, 0.93], dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(
        lambda t: lsq_fake_quantize(t, torch.tensor(0.25, dtype=torch.float64), None, -8, 7), xin
    )
    assert torch.equal(jac, torch.eye(3, dtype=torch.float64))


def test_lsq_forward_equals_dequantize_of_quantize():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=gen)
    spec = QuantSpec(bits=5, symmetric=False, granularity="channel")
    codes, qp = quantize(x, spec)
    y = lsq_fake_quantize(x, qp.scale, qp.zero_point.float(), spec.qmin, spec.qmax)
    assert torch.equal(y, dequantize(codes, qp))


def test_lsq_no_grad_requested_for_fixed_scale():
    x = torch.randn(10, requires_grad=True)
    y = lsq_fake_quantize(x, torch.tensor(0.1), torch.tensor(3.0), 0, 15)
    y.sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="qmin must be <= qmax"):
        lsq_fake_quantize(x, torch.tensor(0.1), None, 1, 0)


def test_lsq_grad_scale_values():
    assert lsq_grad_scale(100, 4) == pytest.approx(0.05)
    assert lsq_grad_scale(64, 127) == pytest.approx(1 / math.sqrt(64 * 127))
    assert lsq_grad_scale(10, 0) == pytest.approx(1 / math.sqrt(10))
    with pytest.raises(ValueError, match="numel must be >= 1"):
        lsq_grad_scale(0, 7)


def test_pow2_ste_value_and_gradient():
    s = torch.tensor([0.3, 0.26, 1.0], requires_grad=True)
    p = pow2_ste(s, "ceil")
    assert p.tolist() == [0.5, 0.5, 1.0]
    p.sum().backward()
    assert s.grad.tolist() == [1.0, 1.0, 1.0]
    assert pow2_ste(torch.tensor([0.3, 0.36]), "round").tolist() == [0.25, 0.5]


def test_cast_fake_quantize_gradient():
    x = torch.tensor([0.3, 500.0, -449.0, 448.0], requires_grad=True)
    y = cast_fake_quantize(x, torch.float8_e4m3fn)
    assert y.tolist() == [0.3125, 448.0, -448.0, 448.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0]
