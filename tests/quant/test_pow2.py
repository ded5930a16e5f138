"""``pow2_codes``: codes and integer exponents that rebuild a pow2 Binary/Ternary weight exactly.

The rebuilt weight (numpy ``ldexp``) must equal the quantizer's output bit for
bit, and the exponents must be ``round(log2(alpha))`` of the numpy reference
scales.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.quant.pow2_refs import BINARY, TERNARY, np_binary_alpha, np_twn
from tests.quant.pow2_refs import weights as _w
from tnquant import Binary, QuantSpec, Ternary
from tnquant.quant import Quantizer, pow2_codes
from tnquant.quant.frozen import FrozenTensor


def _rebuild(codes: np.ndarray, exps: np.ndarray, exps_neg: np.ndarray) -> np.ndarray:
    """codes * 2**k (2**k_neg on the negative codes), in float64 numpy."""
    pos = np.broadcast_to(np.ldexp(1.0, exps.astype(np.int64)), codes.shape)
    neg = np.broadcast_to(np.ldexp(1.0, exps_neg.astype(np.int64)), codes.shape)
    return np.where(codes > 0, pos, 0.0) - np.where(codes < 0, neg, 0.0)


@pytest.mark.parametrize("spec", BINARY + TERNARY, ids=repr)
@pytest.mark.parametrize("frozen", [False, True])
def test_pow2_codes_rebuild_the_weight_exactly(spec, frozen):
    w = torch.from_numpy(_w((6, 5), 4))
    q = Quantizer(spec)
    target = q(w).detach().numpy()
    source = FrozenTensor.from_quantizer(q, w) if frozen else q
    codes, exps, exps_neg = pow2_codes(source, None if frozen else w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert not exps.is_floating_point() and not exps_neg.is_floating_point()
    allowed = {-1, 1} if isinstance(spec, Binary) else {-1, 0, 1}
    assert set(codes.unique().tolist()) <= allowed
    assert exps.shape == q.qparams(w).scale.shape
    assert torch.equal(exps, exps_neg)  # TTQ starts from one TWN scale too
    np.testing.assert_array_equal(_rebuild(codes.numpy(), exps.numpy(), exps_neg.numpy()), target)
    # and the exponents are the reference ones, computed independently
    ref = (
        np_binary_alpha(w.numpy(), spec) if isinstance(spec, Binary) else np_twn(w.numpy(), spec)[1]
    )
    np.testing.assert_array_equal(exps.numpy(), np.round(np.log2(ref)).astype(np.int64))


def test_pow2_codes_of_ttq_with_two_learned_exponents():
    w = torch.from_numpy(_w((2, 12), 7))
    q = Quantizer(Ternary(method="ttq", scale="pow2", granularity="channel"))
    q(w)
    with torch.no_grad():
        q.scale.copy_(torch.tensor([[0.3], [5.0]], dtype=torch.float64))
        q.scale_neg.copy_(torch.tensor([[0.7], [0.2]], dtype=torch.float64))
    codes, exps, exps_neg = pow2_codes(q, w)
    assert exps.flatten().tolist() == [-2, 2] and exps_neg.flatten().tolist() == [-1, -2]
    np.testing.assert_array_equal(
        _rebuild(codes.numpy(), exps.numpy(), exps_neg.numpy()), q(w).detach().numpy()
    )
    frozen = FrozenTensor.from_quantizer(q, w)
    assert all(
        torch.equal(a, b) for a, b in zip(pow2_codes(frozen), (codes, exps, exps_neg), strict=True)
    )


def test_pow2_codes_of_an_all_zero_block():
    w = torch.zeros(2, 3)
    w[1] = torch.tensor([0.5, -1.0, 0.25])
    codes, exps, _ = pow2_codes(Quantizer(Binary(scale="pow2", granularity="channel")), w)
    assert codes[0].tolist() == [0, 0, 0] and codes[1].tolist() == [1, -1, 1]
    assert exps.flatten().tolist() == [0, -1]  # 2**round(log2(0.5833))


@pytest.mark.parametrize(
    "spec", [Binary(), Ternary(), Ternary(method="ttq"), Binary(learnable=True)], ids=repr
)
def test_pow2_codes_refuses_float_scales(spec):
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"scale='pow2'.*got scale='float'"):
        pow2_codes(Quantizer(spec), w)
    with pytest.raises(ValueError, match=r"scale='pow2'.*got scale='float'"):
        pow2_codes(FrozenTensor.from_quantizer(Quantizer(spec), w))


def test_pow2_codes_refuses_other_inputs():
    w = torch.randn(4, 4)
    with pytest.raises(TypeError, match="Binary or Ternary"):
        pow2_codes(Quantizer(QuantSpec(bits=4, scale="pow2")), w)
    with pytest.raises(TypeError, match="Quantizer or a FrozenTensor"):
        pow2_codes(w, w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight"):
        pow2_codes(Quantizer(Binary(scale="pow2")))
    # a scale that is not a power of two (a forged buffer) is named, not rounded
    frozen = FrozenTensor.from_quantizer(Quantizer(Binary(scale="pow2")), w)
    frozen.scale.fill_(0.3)
    with pytest.raises(ValueError, match="not a power of two"):
        pow2_codes(frozen)
