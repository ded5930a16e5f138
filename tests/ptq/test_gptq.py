"""GPTQ against an independent numpy Optimal-Brain-Surgeon reference.

The reference does not use GPTQ's Cholesky trick or lazy blocks: after each
column it inverts the Hessian of the columns still free and applies the OBS
update ``W_F -= (w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_j,F`` (Frantar et al.
2023, eq. 2-3; the Cholesky form is an algebraic rewrite of it).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import TT, LowRank, QuantSpec, Ternary, factorize
from tnquant.ptq import calibrate, gptq, gptq_targets
from tnquant.ptq.gptq import column_qparams, gptq_weight
from tnquant.quantization import convert, quantize


def obs_reference(
    w: np.ndarray,
    h: np.ndarray,
    s: np.ndarray,
    zp: np.ndarray | None,
    qmin: int,
    qmax: int,
    damp: float,
    order: np.ndarray,
) -> np.ndarray:
    """Column-by-column OBS rounding with explicit inverses (float64, numpy)."""
    w = w[:, order].astype(np.float64).copy()
    h = h[np.ix_(order, order)].astype(np.float64).copy()
    s, zp = s[:, order], None if zp is None else zp[:, order]
    h += damp * np.mean(np.diag(h)) * np.eye(h.shape[0])
    q = np.zeros_like(w)
    n = w.shape[1]
    for j in range(n):
        hinv = np.linalg.inv(h[j:, j:])
        z = 0.0 if zp is None else zp[:, j]
        code = np.clip(np.round(w[:, j] / s[:, j]) + z, qmin, qmax)  # np.round: ties to even
        q[:, j] = (code - z) * s[:, j]
        e = (w[:, j] - q[:, j]) / hinv[0, 0]
        w[:, j:] -= np.outer(e, hinv[0, :])
    out = np.empty_like(q)
    out[:, order] = q
    return out


def problem(out_f=12, in_f=20, rows=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(rows, in_f, generator=g, dtype=torch.float64) @ mix
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    return w, x.T @ x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [1, 7, 128])
@pytest.mark.parametrize("affine", [False, True])
def test_gptq_weight_matches_obs_reference(act_order, block, affine):
    w, h = problem()
    s = (w.abs().amax(1, keepdim=True) / 3).expand_as(w).contiguous()
    zp = torch.full_like(w, 1.0) if affine else None
    got = gptq_weight(w, h, s, zp, -4, 3, damp=0.01, block=block, act_order=act_order)
    order = np.argsort(-np.diag(h.numpy()), kind="stable") if act_order else np.arange(20)
    ref = obs_reference(
        w.numpy(), h.numpy(), s.numpy(), None if zp is None else zp.numpy(), -4, 3, 0.01, order
    )
    codes_got = torch.round(got / s) + (0 if zp is None else zp)
    codes_ref = np.round(ref / s.numpy()) + (0 if zp is None else zp.numpy())
    assert np.array_equal(codes_got.numpy(), codes_ref)
    assert codes_got.min() >= -4 and codes_got.max() <= 3


def test_gptq_weight_identity_hessian_is_round_to_nearest():
    w, _ = problem()
    s = torch.full_like(w, 0.3)
    got = gptq_weight(w, torch.eye(20, dtype=torch.float64), s, None, -8, 7)
    assert torch.equal(got, torch.round(w / s).clamp(-8, 7) * s)


def test_gptq_weight_dead_inputs_and_errors():
    w, h = problem()
    h[3, :] = 0
    h[:, 3] = 0
    s = torch.full_like(w, 0.3)
    got = gptq_weight(w, h, s, None, -8, 7)
    assert torch.all(got[:, 3] == 0)
    with pytest.raises(ValueError, match="damp"):
        gptq_weight(w, h, s, None, -8, 7, damp=0)
    with pytest.raises(ValueError, match="hessian"):
        gptq_weight(w, h[:5, :5], s, None, -8, 7)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)
    )


def data(seed=1, batches=4):
    """Correlated inputs: one fixed mixing matrix, samples drawn with ``seed``."""
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 16, generator=g) @ mix for _ in range(batches)]


SPECS = [
    QuantSpec(bits=3, granularity="channel"),
    QuantSpec(bits=4),
    QuantSpec(bits=3, granularity=("group", 8), axis=1),
    QuantSpec(bits=3, granularity="channel", symmetric=False),
    QuantSpec(bits=3, granularity="channel", learnable=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: repr(s)[:60])
def test_gptq_model_beats_rtn_and_stays_on_grid(spec):
    model, xs = net(), data()
    quantize(model, weights=spec, progress=False)
    calibrate(model, xs, progress=False)
    rtn = copy.deepcopy(model)
    scales = {
        n: m.weight_quantizer.qparams().scale.clone()
        for n, m in model.named_modules()
        if getattr(m, "weight_quantizer", None) is not None
    }
    report = gptq(model, xs, progress=False)
    assert [r["name"] for r in report.rows] == ["0", "2", "4"]  # forward order
    for row in report.rows:
        assert row["error"] < row["rtn_error"]
        assert row["rows"] == 4 * 64
    for name, m in model.named_modules():
        if getattr(m, "weight_quantizer", None) is None:
            continue
        assert torch.equal(m.weight_quantizer.qparams().scale, scales[name])  # qparams kept
        assert torch.equal(m.weight_quantizer(m.weight), m.weight.detach())  # on the grid
    # the quantized model's outputs move closer to the float model's
    ref = net()
    x = torch.cat(data(seed=5))  # held-out samples, same distribution
    with torch.no_grad():
        e_gptq = (model(x) - ref(x)).pow(2).mean()
        e_rtn = (rtn(x) - ref(x)).pow(2).mean()
    assert e_gptq < e_rtn


def test_gptq_first_layer_hessian_matches_inputs():
    """The first layer's error is measured on exactly the calibration inputs."""
    model, xs = net(), data()
    quantize(model, weights=SPECS[0], progress=False)
    calibrate(model, xs, progress=False)
    w0 = model[0].weight.detach().clone()
    report = gptq(model, xs, progress=False)
    x = torch.cat(xs).double()
    h = x.T @ x
    qp = model[0].weight_quantizer.qparams()
    s, _ = column_qparams(qp, tuple(w0.shape))
    expect = gptq_weight(w0, h, s, None, qp.qmin, qp.qmax, act_order=True)
    assert torch.equal(model[0].weight.detach(), expect)
    d = (w0 - expect).double()
    err = float(
        torch.einsum("oi,ij,oj->", d, h, d)
        / torch.einsum("oi,ij,oj->", w0.double(), h, w0.double())
    )
    assert report.rows[0]["error"] == pytest.approx(err, rel=1e-9)


def test_gptq_lowrank_rounds_v_then_u_on_its_inputs():
    model, xs = net(), data()
    factorize(model, {"0": LowRank(rank=6)}, progress=False)
    quantize(model, weights={"0": QuantSpec(bits=3, granularity="channel")}, progress=False)
    calibrate(model, xs, progress=False)
    layer = model[0]
    u0, v0 = (c.detach().clone() for c in layer.cores)
    qu, qv = layer.core_quantizers
    x32 = torch.cat(xs)
    first_rtn = layer(x32).detach()
    report = gptq(model, xs, progress=False)
    assert [r["name"] for r in report.rows] == ["0.cores.1", "0.cores.0"]
    # independent reference: GPTQ of V on x, then of U on the rounded V x
    x = x32.double()
    v_new = gptq_weight(
        v0, x.T @ x, column_qparams(qv.qparams(), (6, 16))[0], None, -4, 3, act_order=True
    )
    z = x @ v_new.double().T
    u_new = gptq_weight(
        u0, z.T @ z, column_qparams(qu.qparams(), (32, 6))[0], None, -4, 3, act_order=True
    )
    assert torch.equal(layer.cores[1].detach(), v_new)
    assert torch.equal(layer.cores[0].detach(), u_new)
    for row in report.rows:
        assert row["error"] < row["rtn_error"]
    with torch.no_grad():  # closer to the float low-rank layer than round-to-nearest
        ref = x32 @ (u0 @ v0).T + layer.bias
        assert (layer(x32) - ref).pow(2).mean() < (first_rtn - ref).pow(2).mean()


def test_gptq_skips_with_reasons():
    model = net()
    factorize(
        model,
        {"2": LowRank(rank=4), "4": TT(rank=2, order=2, in_shape=(4, 6), out_shape=(2, 4))},
        progress=False,
    )
    quantize(
        model,
        weights={"0": Ternary(), "2": QuantSpec(bits=4), "4": QuantSpec(bits=4)},
        progress=False,
    )
    _, skipped = gptq_targets(model)
    reasons = {n: r for n, _, r in skipped}
    assert "Ternary" in reasons["0"]
    assert "calibrate" in reasons["2"]
    assert "TTLinear" in reasons["4"]
    calibrate(model, data(), progress=False)
    assert list(gptq_targets(model)[0]) == ["2"]
    convert(model, progress=False)
    assert gptq(model, data(), progress=False).rows == []
    assert "converted" in {n: r for n, _, r in gptq_targets(model)[1]}["2"]


def test_gptq_rejects_one_shot_iterators_and_empty_data():
    model, xs = net(), data()
    quantize(model, weights=SPECS[0], progress=False)
    calibrate(model, xs, progress=False)
    with pytest.raises((TypeError, ValueError)):
        gptq(model, iter(xs), progress=False)
    with pytest.raises(ValueError, match="at least one batch"):
        gptq(model, [], progress=False)
