"""Bias snapping: the torch fake-quant model equals the emulator once its biases are stored ones.

The reference for the stored bias is :func:`tests.export.refs.ref_round` (exact
rationals); the reference for the emulator is the torch model itself, run in
float64 on the same saturated inputs.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.export.refs import ref_round
from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point, snap_biases
from tnquant.layers import LowRankLinear

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")  # [-4, 4), 7 fractional bits
N_ROWS = 320
N_SATURATED = 40


def _mlp() -> nn.Module:
    """Linear / LowRank / Linear with ReLUs, random float64 biases, a FixedPoint input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        LowRankLinear([torch.randn(12, 4) * 0.3, torch.randn(4, 16) * 0.3], bias=torch.zeros(12)),
        nn.ReLU(),
        nn.Linear(12, 4),
    ).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # float64 draws: off every grid the export can store them on
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    quantize(
        model,
        weights=QuantSpec(bits=6, scale="pow2", granularity="channel"),
        cores=QuantSpec(bits=6, scale="pow2", granularity="channel", axis=0),
        activations={"0.input": IN_T},
        progress=False,
    )
    return model.eval()


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N_ROWS, 8)) * 2.0
    x[:N_SATURATED] *= 20.0  # far outside [-4, 4): the input cast saturates, in both
    return x


def _torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _biases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}


def test_the_torch_input_quantizer_saturates_as_the_emulator(tmp_path: Path) -> None:
    model = _mlp()
    em = fixed_point(model, tmp_path, hls4ml=False)
    x = _inputs()
    lo, hi = IN_T.qmin * IN_T.scale, IN_T.qmax * IN_T.scale
    emulated = np.ldexp(em.quantize_input(x).astype(np.float64), -IN_T.frac)
    assert set(emulated[:N_SATURATED].flatten()) & {lo, hi}  # the saturated rows do saturate
    with torch.no_grad():
        fq = model[0].act_quantizers["input"](torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(fq, emulated)


def test_without_snapping_no_row_is_exact_and_each_layer_is_within_half_an_lsb(
    tmp_path: Path,
) -> None:
    model = _mlp()
    em = fixed_point(model, tmp_path, hls4ml=False, snap_biases=False)
    x = _inputs()
    got, want = em.predict(x), _torch(model, x)
    assert int(np.all(got == want, axis=1).sum()) == 0  # the 0/320
    # layer by layer, fed the emulator's own input to it, the only difference is the
    # rounding of the bias to the products' grid: at most half a step, never zero
    trace = em.trace(em.quantize_input(x))
    by_name = {op.name: (k, op) for k, op in enumerate(em.ops)}
    for layer, last in (("0", "0"), ("2", "2.1"), ("4", "4")):
        k, op = by_name[last]
        first = next(j for j, o in enumerate(em.ops) if o.layer == layer)
        if first == 0:
            xin = np.ldexp(em.quantize_input(x).astype(np.float64), -IN_T.frac)
        else:
            prev = em.ops[first - 1]
            xin = np.ldexp(trace[first - 1][0].astype(np.float64), -prev.result_type.frac)
        out = np.ldexp(trace[k][0].astype(np.float64), -op.result_type.frac)
        diff = np.abs(out - _torch(model.get_submodule(layer), xin))
        assert 0 < diff.max() <= 2.0**-op.result_type.frac / 2, layer


def test_fixed_point_snaps_biases_so_torch_equals_the_emulator(tmp_path: Path) -> None:
    model = _mlp()
    before = _biases(model)
    em = fixed_point(model, tmp_path, hls4ml=False)
    x = _inputs()
    got, want = em.predict(x), _torch(model, x)
    assert int(np.all(got == want, axis=1).sum()) == N_ROWS  # 320/320, saturated rows included
    np.testing.assert_array_equal(got, want)
    # each bias is now its stored value: the round-half-even of the old one on the products' grid
    for op in em.ops:
        if op.bias is None or op.bias_type is None:
            continue
        name = f"{op.layer}.bias"
        spec = FixedPoint(op.bias_type.width, op.bias_type.integer, rounding="RND_CONV")
        ref = [ref_round(Fraction(float(b)), spec) for b in before[name].tolist()]
        assert op.bias.tolist() == ref
        now = model.get_parameter(name).detach().tolist()
        assert now == [float(Fraction(m, 2**spec.frac)) for m in ref]
    assert IntegerModel.load(tmp_path).predict(x).tolist() == got.tolist()


def test_snapping_is_idempotent_and_matches_the_standalone_function(tmp_path: Path) -> None:
    model, twin = _mlp(), _mlp()
    fixed_point(model, tmp_path / "a", hls4ml=False)
    once = _biases(model)
    moved = snap_biases(twin)  # the input type comes from the model's '0.input' quantizer
    assert set(moved) == {"0", "2", "4"} and all(0 < v < 2.0**-10 for v in moved.values())
    assert all(torch.equal(once[n], b) for n, b in _biases(twin).items())
    assert snap_biases(model) == {"0": 0.0, "2": 0.0, "4": 0.0}
    em = fixed_point(model, tmp_path / "b", hls4ml=False)
    assert all(torch.equal(once[n], b) for n, b in _biases(model).items())
    x = _inputs()
    np.testing.assert_array_equal(em.predict(x), _torch(model, x))


def test_snap_biases_false_leaves_the_model_alone(tmp_path: Path) -> None:
    model = _mlp()
    before = _biases(model)
    fixed_point(model, tmp_path, hls4ml=False, snap_biases=False)
    assert all(torch.equal(before[n], b) for n, b in _biases(model).items())


def test_a_failed_export_restores_the_biases(tmp_path: Path) -> None:
    model = _mlp()
    before = _biases(model)
    with pytest.raises(ValueError, match=r"inputs must have shape \(batch >= 1, 8\)"):
        fixed_point(model, tmp_path, hls4ml=False, sample=np.zeros((3, 5)))
    assert all(torch.equal(before[n], b) for n, b in _biases(model).items())


def test_snap_biases_follows_the_given_types(tmp_path: Path) -> None:
    """``bias=`` and ``input_spec`` set the grid: snap with the export's own types."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.3, -1.7], dtype=torch.float64))
    quantize(model, weights=FixedPoint(6, 2), progress=False)
    coarse = FixedPoint(6, 2, rounding="RND_CONV", overflow="SAT")  # steps of 1/16
    snap_biases(model, FixedPoint(8, 3), bias=coarse)
    assert model[0].bias.tolist() == [0.3125, -1.6875]
    em = fixed_point(model, tmp_path, FixedPoint(8, 3), bias=coarse, hls4ml=False)
    assert model[0].bias.tolist() == [0.3125, -1.6875]
    x = np.random.default_rng(2).uniform(-4, 4, size=(64, 3))
    xq = np.ldexp(em.quantize_input(x).astype(np.float64), -5)
    np.testing.assert_array_equal(em.predict(x), _torch(model, xq))
