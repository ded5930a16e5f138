"""observer='hqq': HQQ's half-quadratic fit of affine grids, against min-max and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant import QuantSpec
from tnquant.quant import Quantizer
from tnquant.quant.hqq import hqq_range, shrink_lp
from tnquant.quant.observers import estimate_qparams


def _np_fake(w: np.ndarray, s: np.ndarray, zp: np.ndarray, qmax: int) -> np.ndarray:
    """Affine fake quantization in numpy (round half to even, as torch.round)."""
    return (np.clip(np.round(w / s) + zp, 0, qmax) - zp) * s


def test_shrink_matches_the_formula():
    e = np.linspace(-3, 3, 61)
    beta, p = 4.0, 0.7
    ref = np.sign(e) * np.maximum(np.abs(e) - np.abs(e).clip(1e-12) ** (p - 1) / beta, 0)
    np.testing.assert_allclose(shrink_lp(torch.from_numpy(e), beta, p).numpy(), ref, atol=1e-12)


def test_spec_needs_an_affine_integer_grid():
    with pytest.raises(ValueError, match="observer='hqq' .* needs symmetric=False"):
        QuantSpec(bits=4, observer="hqq")
    with pytest.raises(ValueError, match="observer must be one of"):
        QuantSpec(bits=4, symmetric=False, observer="hq")


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.integers(2, 8), st.floats(0.0, 30.0), st.integers(0, 2**31 - 1))
def test_never_worse_than_minmax_per_block(bits, outlier, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 64, generator=gen, dtype=torch.float64)
    w[:, 3] += outlier
    spec = QuantSpec(bits, symmetric=False, granularity=("group", 32))
    hqq = estimate_qparams(w, QuantSpec(bits, symmetric=False, granularity=("group", 32),
                                        observer="hqq"))  # fmt: skip
    mm = estimate_qparams(w, spec)
    wn = w.numpy().reshape(6, 2, 32)
    err = {}
    for key, qp in (("hqq", hqq), ("minmax", mm)):
        s = qp.scale.numpy().reshape(6, 2, 1)
        zp = qp.zero_point.numpy().astype(np.float64).reshape(6, 2, 1)
        err[key] = ((_np_fake(wn, s, zp, spec.qmax) - wn) ** 2).sum(axis=2)
    assert bool((err["hqq"] <= err["minmax"] * (1 + 1e-9) + 1e-18).all())


def test_fits_a_heavy_tailed_weight_better_than_minmax():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256)).float() * 0.02
    mm = Quantizer(QuantSpec(4, symmetric=False, granularity=("group", 64)))
    hq = Quantizer(QuantSpec(4, symmetric=False, granularity=("group", 64), observer="hqq"))
    err = lambda q: float((q(w) - w).square().sum() / w.square().sum())  # noqa: E731
    assert err(hq) < 0.97 * err(mm), (err(hq), err(mm))
    lo, hi = hqq_range(w, hq.spec)
    assert lo.shape == (64, 4) and bool((lo <= 0).all() and (hi >= 0).all())
