"""Tests of the observers against by-hand ranges and numpy.percentile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tnquant import Binary, QuantSpec
from tnquant.quant.observers import (
    OBSERVER_TYPES,
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    estimate_qparams,
    make_observer,
    mse_range,
    percentile_range,
)
from tnquant.quant.primitives import choose_qparams, fake_quantize


def _batches(seed: int, n: int = 3, cols: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4 + i, cols, generator=gen) * (i + 1) for i in range(n)]


def test_minmax_per_tensor_equals_aminmax_of_concatenation():
    batches = _batches(0)
    obs = MinMaxObserver(QuantSpec(bits=8))
    for b in batches:
        assert obs(b) is b
    lo, hi = torch.aminmax(torch.cat(batches))
    assert obs.min_val.item() == lo.item() and obs.max_val.item() == hi.item()
    assert obs.num_batches.item() == len(batches)


def test_minmax_per_channel_equals_aminmax_of_concatenation():
    batches = _batches(1)
    obs = make_observer(QuantSpec(bits=8, granularity="channel", axis=-1))
    for b in batches:
        obs(b)
    lo, hi = torch.aminmax(torch.cat(batches), dim=0)
    assert torch.equal(obs.min_val.flatten(), lo) and torch.equal(obs.max_val.flatten(), hi)
    qp = obs.compute_qparams()
    assert qp.scale.shape == (1, 5)
    ref = torch.maximum(-lo.clamp(max=0), hi.clamp(min=0)) / 127
    assert torch.equal(qp.scale.flatten(), ref)


def test_minmax_per_group():
    x = torch.arange(12.0).reshape(2, 6) - 5
    obs = MinMaxObserver(QuantSpec(granularity=("group", 3), axis=1))
    obs(x)
    assert obs.min_val.tolist() == [[-5.0, -2.0], [1.0, 4.0]]
    assert obs.max_val.tolist() == [[-3.0, 0.0], [3.0, 6.0]]


def test_ema_formula_by_hand():
    decay = 0.75
    batches = _batches(2)
    obs = EMAObserver(QuantSpec(ema_decay=decay))
    lo = hi = None
    for b in batches:
        obs(b)
        bl, bh = float(b.min()), float(b.max())
        lo = bl if lo is None else decay * lo + (1 - decay) * bl
        hi = bh if hi is None else decay * hi + (1 - decay) * bh
    assert obs.min_val.item() == pytest.approx(lo, rel=1e-6)
    assert obs.max_val.item() == pytest.approx(hi, rel=1e-6)


@pytest.mark.parametrize("p", [50.0, 90.0, 99.9, 100.0])
def test_percentile_matches_numpy(p):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 301, generator=gen) ** 3
    xn = x.numpy().astype(np.float64)
    lo, hi = percentile_range(x, (7, 301), p, symmetric=True)
    assert hi.item() == pytest.approx(np.percentile(np.abs(xn), p), rel=1e-5)
    assert lo.item() == -hi.item()
    lo, hi = percentile_range(x, (1, 301), p, symmetric=False)  # per row
    np.testing.assert_allclose(
        lo.flatten().numpy(), np.percentile(xn, 100 - p, axis=1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        hi.flatten().numpy(), np.percentile(xn, p, axis=1), rtol=1e-5, atol=1e-6
    )


def test_percentile_observer_averages_batches():
    spec = QuantSpec(observer="percentile", percentile=99.0, symmetric=False)
    obs = make_observer(spec)
    assert isinstance(obs, PercentileObserver)
    batches = _batches(4)
    for b in batches:
        obs(b)
    lows = [np.percentile(b.numpy(), 1.0) for b in batches]
    highs = [np.percentile(b.numpy(), 99.0) for b in batches]
    assert obs.min_val.item() == pytest.approx(np.mean(lows), rel=1e-5)
    assert obs.max_val.item() == pytest.approx(np.mean(highs), rel=1e-5)


def test_percentile_beyond_quantile_size_limit():
    x = torch.randn(2**24 + 3, generator=torch.Generator().manual_seed(0))
    lo, hi = percentile_range(x, (x.numel(),), 99.9, symmetric=False)
    ref = np.percentile(x.numpy(), [0.1, 99.9])
    assert lo.item() == pytest.approx(ref[0], rel=1e-5)
    assert hi.item() == pytest.approx(ref[1], rel=1e-5)


def _mse(x: torch.Tensor, spec: QuantSpec, qp) -> float:
    return float((fake_quantize(x, spec, qp) - x).double().square().mean())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_mse_observer_beats_minmax_on_heavy_tails(symmetric, granularity):
    gen = torch.Generator().manual_seed(6)
    # Student-t with 4 degrees of freedom: heavy tails
    z = torch.randn(8, 512, generator=gen)
    chi = torch.randn(8, 512, 4, generator=gen).square().sum(-1)
    x = z / torch.sqrt(chi / 4)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity, observer="mse")
    mse_obs, mm_obs = MSEObserver(spec), MinMaxObserver(spec)
    mse_obs(x)
    mm_obs(x)
    mse_err = _mse(x, spec, mse_obs.compute_qparams())
    mm_err = _mse(x, spec, mm_obs.compute_qparams())
    assert mse_err <= mm_err
    assert mse_err < 0.9 * mm_err
    # per block, too: never worse than min-max
    for row in range(8):
        if granularity == "channel":
            sl = x[row : row + 1]
            lo, hi = mse_range(sl, QuantSpec(bits=4, symmetric=symmetric))
            a = _mse(
                sl,
                spec,
                choose_qparams(sl, spec, min_val=lo.reshape(1, 1), max_val=hi.reshape(1, 1)),
            )
            assert a <= _mse(sl, spec, choose_qparams(sl, spec))


def test_mse_observer_ties_keep_full_range_on_uniform_grid():
    # values already on a 4-bit grid: min-max is exact, so nothing smaller is better
    x = torch.arange(-7.0, 8.0) / 7
    spec = QuantSpec(bits=4, observer="mse")
    lo, hi = mse_range(x, spec)
    assert hi.item() == pytest.approx(1.0) and lo.item() == pytest.approx(-1.0)


def test_estimate_qparams_follows_spec_observer():
    x = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([3.0])])
    s_minmax = estimate_qparams(x, QuantSpec(bits=4)).scale.item()
    s_ema = estimate_qparams(x, QuantSpec(bits=4, observer="ema")).scale.item()
    s_pct = estimate_qparams(x, QuantSpec(bits=4, observer="percentile", percentile=99.0))
    s_mse = estimate_qparams(x, QuantSpec(bits=4, observer="mse")).scale.item()
    assert s_minmax == pytest.approx(3 / 7) and s_ema == s_minmax
    assert s_pct.scale.item() == pytest.approx(np.percentile(np.abs(x.numpy()), 99.0) / 7, rel=1e-5)
    assert s_mse < s_minmax


def test_observers_are_deterministic_and_reset():
    spec = QuantSpec(bits=4, observer="mse", granularity="channel", axis=1)
    batches = _batches(7)
    a, b = make_observer(spec), make_observer(spec)
    for x in batches:
        a(x)
        b(x)
    assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)
    a.reset()
    assert not a.has_data and a.num_batches.item() == 0
    with pytest.raises(ValueError, match="observed no data"):
        a.compute_qparams()


@pytest.mark.parametrize("name", list(OBSERVER_TYPES))
def test_state_dict_round_trip_into_fresh_observer(name):
    spec = QuantSpec(bits=6, observer=name, granularity="channel", axis=1, symmetric=False)
    obs = make_observer(spec)
    for x in _batches(8):
        obs(x)
    fresh = make_observer(spec)
    fresh.load_state_dict(obs.state_dict())
    q1, q2 = obs.compute_qparams(), fresh.compute_qparams()
    assert torch.equal(q1.scale, q2.scale) and torch.equal(q1.zero_point, q2.zero_point)
    assert q1.shape == q2.shape
    assert fresh.num_batches.item() == 3


def test_observer_errors():
    with pytest.raises(TypeError, match="QuantSpec"):
        make_observer(Binary())
    with pytest.raises(ValueError, match="float-format"):
        make_observer(QuantSpec(dtype="bfloat16"))
    with pytest.raises(ValueError, match="does not divide"):
        make_observer(QuantSpec(granularity=("group", 4), axis=1), shape=(2, 6))
    obs = make_observer(QuantSpec(granularity="channel"))
    obs(torch.randn(3, 4))
    with pytest.raises(ValueError, match="tracks ranges of shape"):
        obs(torch.randn(5, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        obs(torch.tensor([[float("nan")] * 4] * 3))
    with pytest.raises(ValueError, match="percentile must be in"):
        percentile_range(torch.ones(3), (3,), 0.0, True)
    with pytest.raises(ValueError, match="n_grid"):
        MSEObserver(QuantSpec(), n_grid=0)
