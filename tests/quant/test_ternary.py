"""Ternary quantization (TWN, TTQ) against numpy references and analytic gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tnquant.quant.ternary import ternary_codes, ternary_fake_quantize, ternary_quantize, twn_params
from tnquant.specs import Ternary

SPECS = [
    Ternary(),
    Ternary(threshold=0.5, granularity="channel"),
    Ternary(granularity="channel", axis=1, method="ttq"),
    Ternary(threshold=1.5, granularity="channel", axis=-1),
]


def np_twn(w: np.ndarray, spec: Ternary) -> tuple[np.ndarray, np.ndarray]:
    """Loop over blocks: delta = t * mean|w|, alpha = mean(|w| > delta), else max|w|."""
    if spec.granularity == "tensor":
        blocks = [(slice(None),) * w.ndim]
        out_shape = (1,) * w.ndim
    else:
        ax = spec.axis % w.ndim
        blocks = [
            tuple(c if d == ax else slice(None) for d in range(w.ndim)) for c in range(w.shape[ax])
        ]
        out_shape = tuple(w.shape[ax] if d == ax else 1 for d in range(w.ndim))
    deltas, alphas = [], []
    for idx in blocks:
        a = np.abs(w[idx]).ravel()
        delta = spec.threshold * a.mean()
        big = a[a > delta]
        deltas.append(delta)
        alphas.append(big.mean() if big.size else a.max())
    return np.reshape(deltas, out_shape), np.reshape(alphas, out_shape)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2)])
def test_twn_matches_numpy(spec: Ternary, shape: tuple[int, ...]) -> None:
    w = np.random.default_rng(0).standard_normal(shape)
    delta, alpha = twn_params(torch.from_numpy(w), spec)
    ref_delta, ref_alpha = np_twn(w, spec)
    assert delta.shape == ref_delta.shape and alpha.shape == ref_alpha.shape
    np.testing.assert_allclose(delta.numpy(), ref_delta, rtol=1e-12)
    np.testing.assert_allclose(alpha.numpy(), ref_alpha, rtol=1e-12)
    codes, qp = ternary_quantize(torch.from_numpy(w), spec)
    ref_codes = np.where(w > ref_delta, 1, np.where(w < -ref_delta, -1, 0))
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    assert codes.dtype == torch.int8
    assert (qp.qmin, qp.qmax, qp.zero_point) == (-1, 1, None)
    np.testing.assert_allclose(qp.scale.numpy(), ref_alpha, rtol=1e-12)
    if spec.method == "ttq":
        assert qp.scale_neg is not None and qp.scale_neg is not qp.scale
        torch.testing.assert_close(qp.scale_neg, qp.scale, atol=0, rtol=0)
        assert qp.scale_neg.data_ptr() != qp.scale.data_ptr()
    else:
        assert qp.scale_neg is None


def test_fallbacks_never_divide_by_zero() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 1.0]])
    delta, alpha = twn_params(x, Ternary(threshold=1.5, granularity="channel"))
    assert delta.flatten().tolist() == [0.0, 1.5]
    assert alpha.flatten().tolist() == [0.0, 1.0]  # none above delta: max|x|
    codes, _ = ternary_quantize(x, Ternary(threshold=1.5, granularity="channel"))
    assert codes.abs().sum() == 0
    d0, a0 = twn_params(torch.tensor(-2.0), Ternary())
    assert (float(d0), float(a0)) == (pytest.approx(1.4), 2.0)


@settings(max_examples=100, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 5), st.integers(1, 7)),
        elements=st.floats(-1e3, 1e3, allow_nan=False),
    ),
    st.sampled_from(SPECS),
)
def test_output_in_minus_alpha_zero_alpha(w: np.ndarray, spec: Ternary) -> None:
    x = torch.from_numpy(w)
    codes, qp = ternary_quantize(x, spec)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    a = qp.scale.expand_as(x)
    delta, _ = twn_params(x, spec)
    y = ternary_fake_quantize(x, delta, qp.scale, qp.scale)
    assert bool(((y == a) | (y == -a) | (y == 0)).all())
    torch.testing.assert_close(y, codes * qp.scale, atol=0, rtol=0)


def test_fake_quantize_gradients_ttq() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 6))
    g = rng.standard_normal((4, 6))
    delta0 = 0.7 * np.abs(w).mean(axis=1, keepdims=True)
    ap0 = np.array([[1.0], [2.0], [3.0], [4.0]])
    an0 = np.array([[0.5], [1.5], [2.5], [3.5]])
    x = torch.tensor(w, requires_grad=True)
    ap = torch.tensor(ap0, requires_grad=True)
    an = torch.tensor(an0, requires_grad=True)
    y = ternary_fake_quantize(x, torch.tensor(delta0), ap, an)
    pos, neg = w > delta0, w < -delta0
    np.testing.assert_array_equal(y.detach().numpy(), np.where(pos, ap0, np.where(neg, -an0, 0.0)))
    y.backward(torch.tensor(g))
    # TTQ (Zhu et al. 2017, eqs. 7-8)
    expected_x = np.where(pos, ap0 * g, np.where(neg, an0 * g, g))
    np.testing.assert_allclose(x.grad.numpy(), expected_x, rtol=1e-15)
    np.testing.assert_allclose(ap.grad.numpy(), (g * pos).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(an.grad.numpy(), -(g * neg).sum(axis=1, keepdims=True))


def test_scale_gradients_gradcheck() -> None:
    """y is linear in alpha_p and alpha_n: their gradients are exact."""
    x = torch.randn(3, 5, dtype=torch.float64)
    delta = torch.full((3, 1), 0.3, dtype=torch.float64)
    ap = torch.rand(3, 1, dtype=torch.float64, requires_grad=True)
    an = torch.rand((), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, n: ternary_fake_quantize(x, delta, p, n), (ap, an))


def test_codes_helper() -> None:
    x = torch.tensor([0.3, -0.3, 0.31, -0.31, 0.0])
    assert ternary_codes(x, torch.tensor(0.3)).tolist() == [0, 0, 1, -1, 0]


def test_validation() -> None:
    with pytest.raises(ValueError, match="finite"):
        twn_params(torch.tensor([1.0, float("inf")]), Ternary())
    with pytest.raises(TypeError, match="floating"):
        ternary_quantize(torch.tensor([1, 2]), Ternary())
    with pytest.raises(TypeError, match="Ternary"):
        twn_params(torch.tensor([1.0]), "twn")  # type: ignore[arg-type]
    x, one = torch.randn(3, 4), torch.tensor(1.0)
    with pytest.raises(ValueError, match="alpha_p must broadcast"):
        ternary_fake_quantize(x, one, torch.rand(4, 1), one)
