"""calibrate(): observed ranges against numpy references, determinism, bias correction."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tnquant import LowRank, QuantSpec, Ternary, factorize
from tnquant.layers import LowRankLinear, TuckerConv2d
from tnquant.layers.quantized import QuantLinear
from tnquant.ptq import calibrate, correct_biases, find_quantizers
from tnquant.quant.quantizer import Quantizer
from tnquant.quantization import convert, quantize

RTOL = 1e-5  # float32 activations vs the float64 numpy reference


def QLinear(n_in: int, n_out: int, spec, bias: bool = True) -> QuantLinear:  # noqa: N802
    """A QuantLinear with ``spec`` on its weight (as ``quantize(weights=spec)`` makes it)."""
    layer = QuantLinear.from_float(nn.Linear(n_in, n_out, bias=bias))
    layer.weight_quantizer = Quantizer(spec)
    return layer


class ActNet(nn.Module):
    """fc1 -> act1 -> relu -> fc2 -> act2, activation quantizers only."""

    def __init__(self, spec1, spec2):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act1 = Quantizer(spec1)
        self.fc2 = nn.Linear(8, 4)
        self.act2 = Quantizer(spec2)

    def forward(self, x):
        return self.act2(self.fc2(torch.relu(self.act1(self.fc1(x)))))


def _batches(seed: int, n: int = 3, rows: int = 16, cols: int = 6, mean: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, cols, generator=gen) + mean for _ in range(n)]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _hand_activations(model: ActNet, data):
    """fc1 and fc2 outputs of the float model, in float64 numpy."""
    w1, b1, w2, b2 = (
        _np(p) for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias)
    )
    h1 = [_np(x) @ w1.T + b1 for x in data]
    h2 = [np.maximum(h, 0) @ w2.T + b2 for h in h1]
    return h1, h2


def _hand_qparams(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec):
    """primitives.py conventions: range contains 0; symmetric amax/qmax; affine (hi-lo)/steps."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if spec.symmetric:
        return np.maximum(-lo, hi) / spec.qmax, None
    scale = (hi - lo) / (spec.qmax - spec.qmin)
    zp = np.clip(spec.qmin - np.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zp


def _check_qparams(q: Quantizer, lo, hi, spec):
    scale, zp = _hand_qparams(np.asarray(lo), np.asarray(hi), spec)
    qp = q.qparams()
    np.testing.assert_allclose(_np(qp.scale).reshape(-1), np.reshape(scale, -1), rtol=RTOL)
    if zp is not None:
        np.testing.assert_array_equal(qp.zero_point.reshape(-1).numpy(), np.reshape(zp, -1))


MINMAX_SPECS = [
    (QuantSpec(bits=8), QuantSpec(bits=4, symmetric=False)),
    (
        QuantSpec(bits=6, symmetric=False, granularity="channel", axis=1),
        QuantSpec(bits=8, granularity="channel", axis=1),
    ),
]


@pytest.mark.parametrize("spec1,spec2", MINMAX_SPECS, ids=["tensor", "channel"])
def test_minmax_ranges_equal_hand_reference(spec1, spec2):
    torch.manual_seed(0)
    model = ActNet(spec1, spec2)
    data = _batches(1)
    report = calibrate(model, data, progress=False)
    h1, h2 = _hand_activations(model, data)
    per_channel = spec1.granularity == "channel"
    for q, acts, spec in ((model.act1, h1, spec1), (model.act2, h2, spec2)):
        stacked = np.concatenate(acts)
        axis = 0 if per_channel else None
        _check_qparams(q, stacked.min(axis=axis), stacked.max(axis=axis), spec)
        assert q.mode == "quantize" and q.initialized
    assert [r["kind"] for r in report] == ["activation", "activation"]
    assert report["act2"]["range_max"] == pytest.approx(np.concatenate(h2).max(), rel=RTOL)


def test_ema_and_percentile_observers_follow_hand_reference():
    torch.manual_seed(1)
    ema, pct = (
        QuantSpec(bits=8, observer="ema", ema_decay=0.5),
        QuantSpec(bits=8, observer="percentile", percentile=90.0, symmetric=False),
    )
    model = ActNet(ema, pct)
    data = _batches(2, n=4)
    calibrate(model, data, progress=False)
    h1, h2 = _hand_activations(model, data)
    lo, hi = h1[0].min(), h1[0].max()
    for h in h1[1:]:
        lo, hi = 0.5 * lo + 0.5 * h.min(), 0.5 * hi + 0.5 * h.max()
    _check_qparams(model.act1, lo, hi, ema)
    lo = np.mean([np.percentile(h, 10.0) for h in h2])
    hi = np.mean([np.percentile(h, 90.0) for h in h2])
    _check_qparams(model.act2, lo, hi, pct)


def _mse_range_ok(q: Quantizer, acts) -> None:
    obs = q.observer
    assert obs is not None and obs.num_batches.item() == len(acts)
    assert 0 < obs.max_val.item() <= max(a.max() for a in acts) * (1 + RTOL)


def test_mse_observer_clips_within_minmax():
    torch.manual_seed(2)
    model = ActNet(QuantSpec(bits=3, observer="mse"), QuantSpec(bits=4))
    data = _batches(3)
    calibrate(model, data, progress=False)
    h1, _ = _hand_activations(model, data)
    _mse_range_ok(model.act1, h1)


def test_weights_frozen_and_activations_see_quantized_weights():
    """Weight qparams by the formula; downstream ranges from hand-quantized cores."""
    torch.manual_seed(3)
    spec_w, spec_a = QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=8, symmetric=False)
    u, v = torch.randn(5, 3), torch.randn(3, 6)
    layer = LowRankLinear([u, v], bias=torch.randn(5))
    layer.core_quantizers = nn.ModuleList([Quantizer(spec_w), Quantizer(spec_w)])
    layer.act_quantizers = nn.ModuleDict(
        {"inter_0": Quantizer(spec_a), "output": Quantizer(spec_a)}
    )
    data = _batches(4)
    report = calibrate(layer, data, progress=False)
    cores_q = []
    for core, q in zip((u, v), layer.core_quantizers, strict=True):
        c = _np(core)
        amax = np.abs(c).max(axis=1)
        scale = amax / spec_w.qmax
        np.testing.assert_allclose(_np(q.qparams().scale).reshape(-1), scale, rtol=RTOL)
        cores_q.append(
            np.clip(np.round(c / scale[:, None]), spec_w.qmin, spec_w.qmax) * scale[:, None]
        )
    inter = [_np(x) @ cores_q[1].T for x in data]
    out = [i @ cores_q[0].T + _np(layer.bias) for i in inter]  # inter_0 unquantized
    for name, acts in (("inter_0", inter), ("output", out)):
        stacked = np.concatenate(acts)
        _check_qparams(layer.act_quantizers[name], stacked.min(), stacked.max(), spec_a)
    kinds = {r["name"]: r["kind"] for r in report}
    assert kinds == {
        "core_quantizers.0": "weight",
        "core_quantizers.1": "weight",
        "act_quantizers.inter_0": "activation",
        "act_quantizers.output": "activation",
    }


def test_calibrate_is_deterministic_and_idempotent():
    torch.manual_seed(4)
    model = nn.Sequential(
        QLinear(6, 8, QuantSpec(bits=4, observer="mse")),
        Quantizer(QuantSpec(bits=8, observer="percentile", percentile=99.0)),
        nn.ReLU(),
        QLinear(8, 4, QuantSpec(bits=3)),
        Quantizer(QuantSpec(bits=4, symmetric=False, observer="mse")),
    )
    twin = copy.deepcopy(model)
    data = _batches(5)
    calibrate(model, data, progress=False, bias_correction=True)
    calibrate(twin, data, progress=False, bias_correction=True)
    state, twin_state = model.state_dict(), twin.state_dict()
    assert state.keys() == twin_state.keys()
    assert all(torch.equal(state[k], twin_state[k]) for k in state)
    x = data[0]
    assert torch.equal(model(x), model(x))
    once = copy.deepcopy(twin)
    calibrate(once, data, progress=False)
    twice = copy.deepcopy(once)
    calibrate(twice, data, progress=False)  # observers start afresh: same qparams
    once_state, twice_state = once.state_dict(), twice.state_dict()
    assert all(torch.equal(once_state[k], twice_state[k]) for k in once_state)


def test_training_flag_and_skips():
    torch.manual_seed(5)
    unused = Quantizer(QuantSpec(bits=8))
    off = Quantizer(QuantSpec(bits=8)).disable()
    tern = Quantizer(Ternary())
    model = _WithUnused(
        nn.Sequential(nn.Linear(6, 6), off, tern, Quantizer(QuantSpec(bits=8))), unused
    )
    model.train()
    report = calibrate(model, _batches(6), progress=False)
    assert model.training
    assert off.mode == "off" and not off.initialized
    assert not unused.initialized and unused.mode == "quantize"
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"net.1", "net.2", "unused"}
    assert "off" in skipped["net.1"] and "observer" in skipped["net.2"]
    assert "not reached" in skipped["unused"]


class _WithUnused(nn.Module):
    def __init__(self, net: nn.Module, unused: nn.Module):
        super().__init__()
        self.net, self.unused = net, unused

    def forward(self, x):
        return self.net(x)


def test_errors():
    model = nn.Sequential(nn.Linear(6, 6), Quantizer(QuantSpec()))
    with pytest.raises(TypeError, match="nn.Module"):
        calibrate("model", [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, [], progress=False)
    assert model[1].mode == "quantize"  # restored after the failure
    with pytest.raises(ValueError, match="num_batches"):
        calibrate(model, _batches(0), num_batches=0, progress=False)
    with pytest.raises(TypeError, match="one-shot"):
        calibrate(model, iter(_batches(0)), bias_correction=True, progress=False)
    calibrate(model, iter(_batches(0)), progress=False)  # one pass is fine without it
    assert model[1].initialized


def test_batches_as_dicts_and_num_batches():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = Quantizer(QuantSpec())

        def forward(self, x, scale=1.0):
            return self.q(x * scale)

    model = Kw()
    data = [
        {"x": torch.tensor([[1.0, -2.0]]), "scale": 1.0},
        {"x": torch.tensor([[8.0, 0.0]]), "scale": 1.0},
    ]
    calibrate(model, data, num_batches=1, progress=False)
    assert model.q.observer.max_val.item() == 1.0 and model.q.observer.min_val.item() == -2.0


# --------------------------------------------------------------------------- #
# bias correction
# --------------------------------------------------------------------------- #


def _mean_shift(y_quant: torch.Tensor, y_float: torch.Tensor, channel_dim: int) -> torch.Tensor:
    d = (y_quant.double() - y_float.double()).movedim(channel_dim, -1)
    return d.reshape(-1, d.shape[-1]).mean(0)


def _lowrank(bits: int) -> tuple[nn.Module, object]:
    layer = LowRankLinear([torch.randn(12, 4), torch.randn(4, 10)], bias=torch.randn(12))
    layer.core_quantizers = nn.ModuleList([Quantizer(QuantSpec(bits=bits)) for _ in range(2)])
    u, v = (c.detach().clone() for c in layer.cores)
    bias = layer.bias.detach().clone()
    return layer, lambda x: F.linear(x, u @ v, bias)


def _qlinear(bits: int) -> tuple[nn.Module, object]:
    layer = QLinear(10, 12, QuantSpec(bits=bits))
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    return layer, lambda x: F.linear(x, w, b)


@pytest.mark.parametrize(
    "make,bits",
    [(_lowrank, 2), (_lowrank, 3), (_qlinear, 2)],
    ids=["lowrank-2bit", "lowrank-3bit", "dense-2bit"],
)
def test_bias_correction_removes_the_mean_shift(make, bits):
    torch.manual_seed(10 + bits)
    layer, float_ref = make(bits)
    calib, held_out = _batches(20, n=4, cols=10, mean=1.5), _batches(21, n=4, cols=10, mean=1.5)
    plain = copy.deepcopy(layer)
    calibrate(plain, calib, progress=False)
    report = calibrate(layer, calib, bias_correction=True, progress=False)
    with torch.no_grad():
        x = torch.cat(calib)
        before = _mean_shift(plain(x), float_ref(x), -1)
        after = _mean_shift(layer(x), float_ref(x), -1)
        xh = torch.cat(held_out)
        err_plain = _mean_shift(plain(xh), float_ref(xh), -1).abs().mean()
        err_corr = _mean_shift(layer(xh), float_ref(xh), -1).abs().mean()
    assert before.abs().max() > 0.05  # a real shift to remove
    assert after.abs().max() < 1e-5 * max(1.0, before.abs().max().item())
    assert err_corr < 0.5 * err_plain
    rows = [r for r in report if r["kind"] == "bias"]
    assert len(rows) == 1 and rows[0]["bias_shift"] == pytest.approx(before.norm().item(), rel=1e-4)


def test_bias_correction_conv_in_forward_order():
    """Two layers: the second is measured on inputs from the corrected first one."""
    torch.manual_seed(30)
    conv = TuckerConv2d(
        [torch.randn(6, 3), torch.randn(3, 2, 3, 3), torch.randn(4, 2)],
        padding=1,
        bias=torch.randn(6),
    )
    conv.core_quantizers = nn.ModuleList([Quantizer(QuantSpec(bits=3)) for _ in range(3)])
    head = QLinear(6, 5, QuantSpec(bits=2))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(2), _Mean(), head)
    ref_conv = copy.deepcopy(conv)
    ref_conv.core_quantizers = None
    ref_head = nn.Linear(6, 5)
    ref_head.load_state_dict({"weight": head.weight.detach(), "bias": head.bias.detach()})
    gen = torch.Generator().manual_seed(31)
    data = [torch.randn(4, 4, 6, 6, generator=gen) + 1.0 for _ in range(3)]
    report = calibrate(model, data, bias_correction=True, progress=False)
    assert [r["name"] for r in report if r["kind"] == "bias"] == ["0", "4"]
    with torch.no_grad():
        x = torch.cat(data)
        shift_conv = _mean_shift(conv(x), ref_conv(x), 1)
        h = model[:4](x)  # the head's inputs in the final (corrected) model
        shift_head = _mean_shift(head(h), ref_head(h), -1)
    assert shift_conv.abs().max() < 1e-5
    assert shift_head.abs().max() < 1e-5


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(-1)


def test_bias_correction_skips_layers_without_bias():
    layer = QLinear(4, 3, QuantSpec(bits=2), bias=False)
    report = correct_biases(nn.Sequential(layer), [torch.randn(5, 4)], progress=False)
    assert len(report) == 0
    assert report.skipped == [
        {"name": "0", "kind": "QuantLinear", "reason": "no bias: not corrected"}
    ]


def test_find_quantizers_kinds():
    model = nn.Sequential(QLinear(4, 3, QuantSpec()), Quantizer(QuantSpec()))
    assert [(r.name, r.kind) for r in find_quantizers(model)] == [
        ("0.weight_quantizer", "weight"),
        ("1", "activation"),
    ]


def test_quantize_calibrate_convert_pipeline():
    """After calibrate the model is static: convert accepts it and keeps its outputs."""
    torch.manual_seed(40)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    factorize(model, {"2": LowRank(rank=4)}, progress=False)
    quantize(
        model,
        weights=QuantSpec(bits=4, granularity="channel"),
        cores={1: Ternary()},
        activations={"*.inter_*": QuantSpec(bits=8), "*": QuantSpec(bits=8, symmetric=False)},
        progress=False,
    )
    data = _batches(41, cols=10)
    report = calibrate(model, data, bias_correction=True, progress=False)
    kinds = [r["kind"] for r in report]
    assert kinds.count("weight") == 4 and kinds.count("bias") == 3
    assert kinds.count("activation") == 7 and not report.skipped
    roles = find_quantizers(model)
    assert all(r.quantizer.initialized for r in roles if r.kind == "activation")
    x = torch.cat(data)
    with torch.no_grad():
        before = model(x)
        convert(model, progress=False)  # refuses uncalibrated activation quantizers
        assert torch.equal(model(x), before)
    again = calibrate(model, data, bias_correction=True, progress=False)
    assert {s["reason"] for s in again.skipped} == {
        "converted weights (no float reference): not corrected"
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibrate_on_cuda_matches_cpu():
    torch.manual_seed(50)
    model = nn.Sequential(
        QLinear(6, 8, QuantSpec(bits=3)),
        Quantizer(QuantSpec(bits=8)),
        nn.ReLU(),
        LowRankLinear([torch.randn(4, 2), torch.randn(2, 8)], bias=torch.randn(4)),
    )
    model[3].core_quantizers = nn.ModuleList([Quantizer(QuantSpec(bits=2)) for _ in range(2)])
    gpu = copy.deepcopy(model).cuda()
    data = _batches(51, mean=1.0)
    calibrate(model, data, bias_correction=True, progress=False)
    calibrate(gpu, [x.cuda() for x in data], bias_correction=True, progress=False)
    cpu_state, gpu_state = model.state_dict(), gpu.state_dict()
    for key, value in cpu_state.items():
        assert gpu_state[key].is_cuda
        torch.testing.assert_close(gpu_state[key].cpu(), value, rtol=1e-4, atol=1e-5)
