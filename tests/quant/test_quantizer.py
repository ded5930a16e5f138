"""Tests of the Quantizer module: states, exactness, learnable scales, state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tnquant import Binary, FixedPoint, QuantSpec, Ternary
from tnquant.quant.primitives import dequantize
from tnquant.quant.quantizer import MODES, Quantizer

UNIFORM_SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=4, symmetric=False),
    QuantSpec(bits=3, narrow_range=True, granularity="channel"),
    QuantSpec(bits=5, symmetric=False, granularity="channel", axis=1),
    QuantSpec(bits=4, granularity=("group", 4), axis=1),
    QuantSpec(bits=6, scale="pow2", pow2_rounding="round", granularity="channel"),
    QuantSpec(bits=4, observer="mse", granularity="channel"),
    QuantSpec(bits=8, observer="percentile", percentile=99.0, symmetric=False),
    QuantSpec(bits=4, learnable=True),
    QuantSpec(bits=4, learnable=True, symmetric=False, granularity="channel"),
    QuantSpec(bits=5, learnable=True, scale="pow2", granularity=("group", 4), axis=1),
]
OTHER_SPECS = [
    Binary(),
    Binary(granularity="channel", learnable=True),
    Ternary(),
    Ternary(method="ttq", granularity="channel"),
    Binary(granularity="channel", learnable=True, scale="pow2"),
    Ternary(method="ttq", granularity="channel", scale="pow2"),
    Ternary(scale="pow2"),
    FixedPoint(8, 3, rounding="RND", overflow="SAT"),
    QuantSpec(dtype="float8_e4m3fn"),
    QuantSpec(dtype="bfloat16"),
]
ALL_SPECS = UNIFORM_SPECS + OTHER_SPECS


def _x(seed: int, shape=(6, 8)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * torch.linspace(0.2, 2.0, shape[-1])


def _ids(specs):
    return [repr(s)[:60] for s in specs]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=_ids(ALL_SPECS))
def test_forward_equals_dequantize_of_codes(spec):
    q = Quantizer(spec)
    for seed in range(3):
        x = _x(seed)
        y = q(x)
        codes, qp = q.quantize_codes(x)
        assert torch.equal(y, dequantize(codes, qp))


@pytest.mark.parametrize(
    "spec",
    [s for s in UNIFORM_SPECS if not s.learnable],
    ids=_ids([s for s in UNIFORM_SPECS if not s.learnable]),
)
def test_frozen_after_observe_is_exact_and_uses_observer(spec):
    q = Quantizer(spec).observe()
    batches = [_x(s) for s in range(3)]
    for b in batches:
        assert q(b) is b  # observe: unchanged
    q.freeze()
    assert q.mode == "quantize" and q.initialized and not q.dynamic
    expected = q.observer.compute_qparams()
    assert torch.equal(q.qparams().scale, expected.scale)
    x = _x(9) * 3  # beyond the calibrated range: clipped
    y = q(x)
    codes, qp = q.quantize_codes(x)
    assert torch.equal(y, dequantize(codes, qp))
    assert torch.equal(qp.scale, expected.scale)


def _fresh_after(spec, state: str) -> tuple[Quantizer, Quantizer]:
    q = Quantizer(spec)
    if state == "observed":
        q.observe()
        for s in range(2):
            q(_x(s))
        q.freeze()
    elif state == "trained":
        x = _x(0).requires_grad_(True)
        opt = torch.optim.SGD(q.parameters(), lr=0.05) if list(q.parameters()) else None
        for _ in range(3):
            loss = (q(x) - 0.5).square().sum()
            if opt is not None:
                opt.zero_grad()
                loss.backward()
                opt.step()
    fresh = Quantizer(spec)
    fresh.load_state_dict(q.state_dict())
    return q, fresh


@pytest.mark.parametrize("state", ["dynamic", "observed", "trained"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=_ids(ALL_SPECS))
def test_state_dict_round_trip_into_fresh_quantizer(spec, state):
    if state == "observed" and (
        not isinstance(spec, QuantSpec) or spec.dtype is not None or spec.learnable
    ):
        pytest.skip("only integer QuantSpecs observe")
    q, fresh = _fresh_after(spec, state)
    assert fresh.mode == q.mode and fresh.initialized == q.initialized
    for seed in (11, 12):
        x = _x(seed)
        assert torch.equal(fresh(x), q(x))
    if q.initialized:
        assert torch.equal(fresh.qparams().scale, q.qparams().scale)


def test_mode_persists_through_state_dict():
    q = Quantizer(QuantSpec(bits=4)).disable()
    fresh = Quantizer(QuantSpec(bits=4))
    fresh.load_state_dict(q.state_dict())
    assert fresh.mode == "off"
    x = _x(0)
    assert fresh(x) is x


def test_lsq_scale_gets_the_analytic_gradient_and_moves():
    spec = QuantSpec(bits=3, learnable=True)
    q = Quantizer(spec)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)  # before the lazy init: identity kept
    x = _x(1)
    q(x)  # initialises the scale from min-max
    s0 = q.scale.detach().clone()
    assert torch.equal(s0, (x.abs().max() / 3).reshape(1, 1))
    g = _x(2)
    (q(x) * g).sum().backward()
    # LSQ: d/ds = round(v) - v inside, qmin/qmax outside, times 1/sqrt(N * Qp)
    xs, gs, s = x.double().numpy(), g.double().numpy(), float(s0)
    v = xs / np.float32(s)
    r = np.round(v)
    d = np.where(r < -4, -4.0, np.where(r > 3, 3.0, r - v))
    expected = (gs * d).sum() / np.sqrt(x.numel() * 3)
    assert q.scale.grad.item() == pytest.approx(expected, rel=1e-4)
    opt.step()
    assert not torch.equal(q.scale.detach(), s0)


def test_lsq_plus_offset_gets_gradient_when_clipping():
    spec = QuantSpec(bits=4, learnable=True, symmetric=False)
    q = Quantizer(spec)
    q.freeze(torch.tensor([-1.0, 1.0]))  # a range that clips the data below
    x = _x(3) * 3
    q(x).sum().backward()
    assert q.zero_point.grad is not None and q.zero_point.grad.abs().item() > 0
    assert q.scale.grad is not None


def test_learnable_initialised_from_observer():
    spec = QuantSpec(bits=4, learnable=True, granularity="channel", axis=1)
    q = Quantizer(spec).observe()
    for s in range(3):
        q(_x(s))
    q.enable()
    q(_x(5))
    assert torch.equal(q.scale.detach(), q.observer.compute_qparams().scale)


def test_binary_and_ttq_scales_learn():
    x = _x(4)
    qb = Quantizer(Binary(learnable=True))
    qb(x).square().sum().backward()
    assert qb.scale.grad is not None
    assert qb.scale.detach().item() == pytest.approx(float(x.abs().mean()), rel=1e-6)
    qt = Quantizer(Ternary(method="ttq"))
    qt(x).sum().backward()
    assert qt.scale.grad is not None and qt.scale_neg.grad is not None


def test_dynamic_weights_follow_the_tensor():
    q = Quantizer(QuantSpec(bits=4))
    assert q.dynamic
    a, b = _x(0), _x(1) * 10
    assert q.qparams(a).scale.item() == pytest.approx(float(a.abs().max()) / 7)
    assert q.qparams(b).scale.item() == pytest.approx(float(b.abs().max()) / 7)
    with pytest.raises(ValueError, match="pass x"):
        q.qparams()


def test_frozen_activations_take_any_batch_size():
    q = Quantizer(QuantSpec(bits=8, granularity="channel", axis=-1)).observe()
    q(_x(0, (5, 8)))
    q.freeze()
    x = _x(1, (3, 8))
    codes, qp = q.quantize_codes(x)
    assert qp.shape == (3, 8) and torch.equal(q(x), dequantize(codes, qp))


def test_states_and_errors():
    q = Quantizer(QuantSpec(bits=4))
    assert q.mode == "quantize" and MODES == ("quantize", "observe", "off")
    x = _x(0)
    assert q.disable()(x) is x
    with pytest.raises(ValueError, match=r"mode must be one of \['quantize', 'observe', 'off'\]"):
        q.mode = "train"
    with pytest.raises(ValueError, match="freeze\\(\\) needs a tensor x"):
        q.freeze()
    assert q.freeze(x).initialized
    q.reset()
    assert not q.initialized
    for spec in (Binary(), Ternary(), FixedPoint(8, 2), QuantSpec(dtype="float16")):
        with pytest.raises(ValueError, match="has no observer"):
            Quantizer(spec).observe()
    with pytest.raises(TypeError, match="spec must be one of"):
        Quantizer("int8")
    assert "mode='quantize'" in repr(Quantizer(QuantSpec()))


def test_fixed_point_and_cast_need_no_state():
    for spec in (FixedPoint(6, 2), QuantSpec(dtype="float8_e5m2")):
        q = Quantizer(spec)
        assert list(q.parameters()) == [] and q.freeze().mode == "quantize"
        assert not q.initialized


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ALL_SPECS, ids=_ids(ALL_SPECS))
def test_cuda_matches_forward_and_codes(spec):
    q = Quantizer(spec).cuda()
    x = _x(0).cuda()
    y = q(x)
    assert y.device.type == "cuda"
    codes, qp = q.quantize_codes(x)
    assert torch.equal(y, dequantize(codes, qp))
