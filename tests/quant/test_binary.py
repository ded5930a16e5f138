"""Binary quantization against numpy references and analytic gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tnquant.quant.binary import binary_codes, binary_fake_quantize, binary_quantize, binary_scale
from tnquant.specs import Binary

SPECS = [
    Binary(),
    Binary(granularity="channel", axis=0),
    Binary(granularity="channel", axis=1),
    Binary(granularity="channel", axis=-1),
]


def np_alpha(w: np.ndarray, spec: Binary) -> np.ndarray:
    """mean|w| per tensor, or per index of the channel axis, keepdims."""
    if spec.granularity == "tensor":
        return np.abs(w).mean(axis=tuple(range(w.ndim)), keepdims=True)
    ax = spec.axis % w.ndim
    others = tuple(d for d in range(w.ndim) if d != ax)
    return np.abs(w).mean(axis=others, keepdims=True)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2)])
def test_quantize_matches_numpy(spec: Binary, shape: tuple[int, ...]) -> None:
    w = np.random.default_rng(0).standard_normal(shape)
    w.flat[0] = 0.0
    codes, qp = binary_quantize(torch.from_numpy(w), spec)
    assert codes.dtype == torch.int8
    np.testing.assert_array_equal(codes.numpy(), np.where(w >= 0, 1, -1))
    alpha = np_alpha(w, spec)
    assert qp.scale.shape == alpha.shape
    np.testing.assert_allclose(qp.scale.numpy(), alpha, rtol=1e-12)
    assert (qp.qmin, qp.qmax, qp.zero_point, qp.scale_neg) == (-1, 1, None, None)
    assert qp.shape == shape and qp.dtype == torch.float64
    np.testing.assert_allclose((codes * qp.scale).numpy(), np.where(w >= 0, 1, -1) * alpha)


def test_block_size_by_hand() -> None:
    x = torch.randn(8, 16)
    assert binary_quantize(x, Binary())[1].block_size == (8, 16)
    assert binary_quantize(x, Binary(granularity="channel"))[1].block_size == (1, 16)
    assert binary_quantize(x, Binary(granularity="channel", axis=1))[1].block_size == (8, 1)


def test_alpha_is_l2_optimal() -> None:
    """mean|w| minimises ||w - a * sign(w)||^2 over a (XNOR-Net eq. 4)."""
    w = torch.randn(50, dtype=torch.float64)
    codes, qp = binary_quantize(w, Binary())
    a = float(qp.scale)

    def err(s: float) -> float:
        return float(((w - s * codes) ** 2).sum())

    assert err(a) < err(a * 1.01) and err(a) < err(a * 0.99)


@settings(max_examples=100, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 5), st.integers(1, 7)),
        elements=st.floats(-1e3, 1e3, allow_nan=False),
    ),
    st.sampled_from(SPECS[:3]),
)
def test_output_is_plus_minus_alpha(w: np.ndarray, spec: Binary) -> None:
    x = torch.from_numpy(w)
    codes, qp = binary_quantize(x, spec)
    assert set(codes.unique().tolist()) <= {-1, 1}
    deq = codes * qp.scale
    a = qp.scale.expand_as(x)
    assert bool(((deq == a) | (deq == -a)).all())
    assert bool((deq[x >= 0] == a[x >= 0]).all())  # sign(0) = +1
    y = binary_fake_quantize(x, qp.scale)
    torch.testing.assert_close(y, deq, atol=0, rtol=0)


def test_zero_block_and_dtypes() -> None:
    x = torch.zeros(2, 3)
    x[1] = torch.tensor([1.0, -2.0, 3.0])
    codes, qp = binary_quantize(x, Binary(granularity="channel"))
    assert qp.scale.flatten().tolist() == [0.0, 2.0]
    assert codes[0].tolist() == [1, 1, 1]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        codes, qp = binary_quantize(x.to(dtype), Binary())
        assert qp.scale.dtype == dtype and qp.dtype == dtype
    assert float(binary_scale(torch.tensor(-3.0), Binary())) == 3.0


@pytest.mark.parametrize("clip", [1.0, 0.5, None])
def test_fake_quantize_gradients(clip: float | None) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 6)) * 1.2
    g = rng.standard_normal((4, 6))
    alpha0 = np.abs(w).mean(axis=1, keepdims=True)
    x = torch.tensor(w, requires_grad=True)
    alpha = torch.tensor(alpha0, requires_grad=True)
    y = binary_fake_quantize(x, alpha, clip=clip)
    sign = np.where(w >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(y.detach().numpy(), alpha0 * sign)
    y.backward(torch.tensor(g))
    mask = np.ones_like(w) if clip is None else (np.abs(w) <= clip)
    np.testing.assert_allclose(x.grad.numpy(), g * mask, rtol=0, atol=0)
    np.testing.assert_allclose(alpha.grad.numpy(), (g * sign).sum(axis=1, keepdims=True))


def test_alpha_gradient_gradcheck() -> None:
    """y is linear in alpha, so its gradient is exact: check it numerically."""
    x = torch.randn(3, 5, dtype=torch.float64)
    for shape in [(), (3, 1), (1, 5), (3, 5)]:
        alpha = torch.rand(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: binary_fake_quantize(x, a), (alpha,))


def test_codes_helper() -> None:
    assert binary_codes(torch.tensor([-0.0, 0.0, -1e-30])).tolist() == [1, 1, -1]


def test_validation() -> None:
    with pytest.raises(ValueError, match="finite"):
        binary_quantize(torch.tensor([1.0, float("nan")]), Binary())
    with pytest.raises(TypeError, match="floating"):
        binary_quantize(torch.tensor([1, 2]), Binary())
    with pytest.raises(TypeError, match="Binary"):
        binary_scale(torch.tensor([1.0]), "binary")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="broadcast"):
        binary_fake_quantize(torch.randn(3, 4), torch.rand(4, 1))
    with pytest.raises(ValueError, match="broadcast"):
        binary_fake_quantize(torch.randn(4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="clip"):
        binary_fake_quantize(torch.randn(4), torch.rand(()), clip=0.0)
    with pytest.raises(ValueError, match="axis"):
        binary_quantize(torch.randn(4, 4), Binary(granularity="channel", axis=2))
