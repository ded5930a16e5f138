"""The entry points: input checks, dtype/device, determinism, no global state, speed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
import torch

from tnquant.decompose import (
    Decomposition,
    decompose_conv,
    decompose_embedding,
    decompose_linear,
    reconstruct,
)
from tnquant.specs import CP, TT, LowRank, Tucker

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

LINEAR_SPECS = [
    TT(rank=3, order=2),
    TT(ratio=0.3, order=3, svd="randomized"),
    Tucker(rank=4),
    Tucker(rank=2, order=2),
    Tucker(ratio=0.3, order=2, svd="randomized"),
    LowRank(rank=5),
    LowRank(tol=0.5, svd="randomized"),
]
CONV_SPECS = [Tucker(rank=(4, 3)), CP(rank=4, n_iter_max=30), LowRank(rank=3)]


def _ids(spec):
    return type(spec).__name__


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor(value):
    w = torch.randn(6, 4)
    w[2, 1] = value
    with pytest.raises(ValueError, match="encoder.layer.0.query.weight has 1 non-finite"):
        decompose_linear(w, LowRank(rank=2), name="encoder.layer.0.query.weight")
    with pytest.raises(ValueError, match="emb.weight has 1 non-finite"):
        decompose_embedding(w, TT(rank=2), name="emb.weight")
    k = torch.randn(4, 3, 3, 3)
    k[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="conv1.weight has 1 non-finite"):
        decompose_conv(k, Tucker(rank=2), name="conv1.weight")


def test_in_shape_too_small():
    with pytest.raises(ValueError, match=r"in_shape \(4, 4\) has product 16, below the dim.* 20"):
        decompose_linear(torch.randn(16, 20), TT(rank=2, in_shape=(4, 4)))
    with pytest.raises(ValueError, match=r"out_shape \(2, 2\) has product 4, below the dim.* 16"):
        decompose_linear(torch.randn(16, 20), Tucker(rank=2, out_shape=(2, 2)))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: decompose_linear(torch.randn(4, 4), CP(rank=2)), "Linear weight, got CP"),
        (lambda: decompose_linear(torch.randn(4, 4), {"rank": 2}), "Linear weight, got dict"),
        (lambda: decompose_conv(torch.randn(4, 4, 3, 3), TT(rank=2)), "Conv2d weight, got TT"),
        (lambda: decompose_embedding(torch.randn(9, 4), CP(rank=2)), "Embedding weight, got CP"),
        (lambda: decompose_embedding(torch.randn(9, 4), Tucker(rank=2)), "Embedding weight"),
        (lambda: decompose_linear(np.ones((4, 4)), LowRank(rank=2)), "torch.Tensor, got ndarray"),
        (
            lambda: decompose_linear(torch.ones(4, 4, dtype=torch.int64), LowRank(rank=2)),
            "floating-point tensor, got dtype torch.int64",
        ),
    ],
)
def test_wrong_types(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_wrong_shapes():
    with pytest.raises(ValueError, match=r"2-D tensor \(out, in\), got shape \(4, 4, 3\)"):
        decompose_linear(torch.randn(4, 4, 3), LowRank(rank=2))
    with pytest.raises(ValueError, match=r"4-D tensor \(O, I, kh, kw\), got shape \(4, 4\)"):
        decompose_conv(torch.randn(4, 4), Tucker(rank=2))


# --- results -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", LINEAR_SPECS, ids=_ids)
def test_linear_result_fields(spec):
    w = torch.randn(24, 18, dtype=torch.float64)
    dec = decompose_linear(w, spec)
    assert isinstance(dec, Decomposition) and dec.shape == (24, 18)
    assert dec.n_params == sum(c.numel() for c in dec.cores)
    what = reconstruct(dec)
    assert tuple(what.shape) == (24, 18)
    assert dec.rel_error == pytest.approx(float((w - what).norm() / w.norm()), rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cores_keep_dtype_and_device(dtype, device):
    w = torch.randn(32, 24, device=device).to(dtype)
    for spec in (TT(rank=4, order=2), Tucker(rank=4), LowRank(rank=4)):
        dec = decompose_linear(w, spec, gram=torch.eye(24, device=device, dtype=dtype))
        assert all(c.dtype == dtype and c.device.type == device for c in dec.cores)
    k = torch.randn(8, 4, 3, 3, device=device).to(dtype)
    for spec in CONV_SPECS:
        dec = decompose_conv(k, spec)
        assert all(c.dtype == dtype and c.device.type == device for c in dec.cores)
        assert math.isfinite(dec.rel_error)


def test_float32_full_rank_is_accurate_to_float32():
    w = torch.randn(64, 48)
    for spec in (TT(rank="full", order=3), Tucker(rank="full"), LowRank(rank="full")):
        assert decompose_linear(w, spec).rel_error < 1e-5


def test_zero_weight():
    dec = decompose_linear(torch.zeros(8, 6), TT(tol=0.1, order=2))
    assert dec.rel_error == 0.0
    for spec in (CP(rank=2), CP(tol=0.1), Tucker(rank=2)):
        assert decompose_conv(torch.zeros(4, 3, 3, 3), spec).rel_error == 0.0
    for spec in (Tucker(rank=2, order=2), LowRank(tol=0.3)):
        assert decompose_linear(torch.zeros(8, 6), spec, gram=torch.eye(6)).rel_error == 0.0


# --- determinism and global state ----------------------------------------------------


@pytest.mark.parametrize("spec", LINEAR_SPECS, ids=_ids)
def test_linear_is_deterministic(spec):
    w = torch.randn(40, 30)
    g = torch.randn(100, 30)
    g = g.T @ g
    for gram in (None, g):
        a, b = decompose_linear(w, spec, gram=gram), decompose_linear(w, spec, gram=gram)
        assert all(torch.equal(x, y) for x, y in zip(a.cores, b.cores, strict=True))


@pytest.mark.parametrize("spec", [*CONV_SPECS, CP(tol=0.5, n_iter_max=20)], ids=_ids)
def test_conv_is_deterministic(spec):
    k = torch.randn(8, 6, 3, 3)
    a, b = decompose_conv(k, spec), decompose_conv(k, spec)
    assert all(torch.equal(x, y) for x, y in zip(a.cores, b.cores, strict=True))


def test_no_global_state_is_touched():
    k, w, big = torch.randn(6, 4, 3, 3), torch.randn(16, 16), torch.randn(64, 64)
    backend = tl.get_backend()
    rng = torch.random.get_rng_state()
    decompose_conv(k, CP(rank=3, n_iter_max=5))
    decompose_conv(k, Tucker(rank=2))
    decompose_linear(w, Tucker(rank=2, order=2))
    decompose_linear(big, LowRank(rank=2, svd="randomized"))
    decompose_linear(big, TT(rank=2, svd="randomized"))
    assert tl.get_backend() == backend
    torch.testing.assert_close(torch.random.get_rng_state(), rng, rtol=0, atol=0)


def test_works_under_no_grad_and_with_grad_inputs():
    w = torch.randn(16, 12, requires_grad=True)
    x = torch.randn(50, 12)
    with torch.no_grad():
        dec = decompose_linear(w, TT(rank=2, order=2), gram=x.T @ x)
    assert not any(c.requires_grad for c in dec.cores)


# --- speed (the target) ------------------------------------------------------

MINILM_SHAPES = [(384, 384)] * 25 + [(1536, 384)] * 6 + [(384, 1536)] * 6  # 37 Linear layers


@pytest.mark.slow
@pytest.mark.parametrize("spec", [TT(ratio=0.25), Tucker(ratio=0.25)], ids=_ids)
def test_a_minilm_shaped_model_factorizes_to_its_ratio(spec):
    # the time it takes is a benchmark (benchmarks/bench_factorize.py), not a test
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(*s, generator=gen) / math.sqrt(s[1]) for s in MINILM_SHAPES]
    decs = [decompose_linear(w, spec) for w in weights]
    for dec, w in zip(decs, weights, strict=True):
        assert abs(dec.n_params / w.numel() - 0.25) <= 0.025
