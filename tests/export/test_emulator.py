"""Tests of tnquant.export.emulator against independent references."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from tests.export.refs import ref_dense
from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export.emulator import IntegerModel, contract_step
from tnquant.export.graph import build_graph
from tnquant.layers import LowRankLinear, TTLinear

MODES = [
    ("TRN", "WRAP"),
    ("RND", "SAT"),
    ("RND_CONV", "SAT_SYM"),
    ("TRN_ZERO", "SAT_ZERO"),
    ("RND_INF", "WRAP"),
    ("RND_MIN_INF", "SAT"),
    ("RND_ZERO", "WRAP"),
]


@pytest.mark.parametrize(("rounding", "overflow"), MODES)
def test_dense_step_matches_rational_reference(rounding: str, overflow: str) -> None:
    rng = np.random.default_rng(hash((rounding, overflow)) % 2**32)
    in_t, w_t, b_t = FixedPoint(6, 2), FixedPoint(5, 1), FixedPoint(9, 2)
    accum = FixedPoint(8, 3, rounding=rounding, overflow=overflow)  # narrow: rounds, overflows
    result = FixedPoint(6, 2, rounding=rounding, overflow=overflow)
    x = rng.integers(in_t.qmin, in_t.qmax + 1, size=(40, 7))
    w = rng.integers(w_t.qmin, w_t.qmax + 1, size=(4, 7))
    b = rng.integers(b_t.qmin, b_t.qmax + 1, size=4)
    got = contract_step(x[:, :, None], w, in_t, w_t, accum, result, b[:, None], b_t)[..., 0]
    ref = [ref_dense(list(r), w.tolist(), b.tolist(), in_t, w_t, b_t, accum, result) for r in x]
    assert got.tolist() == ref


def test_lossless_dense_equals_exact_rational_then_one_cast() -> None:
    rng = np.random.default_rng(3)
    in_t, w_t = FixedPoint(7, 3), FixedPoint(6, 1)
    accum = FixedPoint(20, 11)  # frac 9 = F1 + F2
    x = rng.integers(in_t.qmin, in_t.qmax + 1, size=(20, 9))
    w = rng.integers(w_t.qmin, w_t.qmax + 1, size=(3, 9))
    got = contract_step(x[:, :, None], w, in_t, w_t, accum, accum)[..., 0]
    # exact integer dot products (Python ints), binary point at F1 + F2 = accum.frac
    ref = [[sum(int(a) * int(b) for a, b in zip(r, row, strict=True)) for row in w] for r in x]
    assert got.tolist() == ref


def _grid_bias(n: int, frac: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-200, 200, (n,), generator=g).float() * 2.0**-frac


def test_lossless_emulator_equals_fake_quant_model() -> None:
    torch.manual_seed(0)
    in_t = FixedPoint(10, 4, rounding="RND_CONV", overflow="SAT")
    # biases on the products' grid (input frac 6 + core frac): no bias rounding at all
    model = nn.Sequential(
        LowRankLinear([torch.randn(8, 3), torch.randn(3, 12)], bias=_grid_bias(8, 6 + 5, 1)),
        nn.ReLU(),
        nn.Linear(8, 4),
    ).double()
    quantize(
        model, cores=FixedPoint(8, 3), weights={"2": QuantSpec(6, scale="pow2")}, progress=False
    )
    ops = build_graph(model, in_t)
    frac_last = ops[-2].result_type.frac + ops[-1].weight_types[0].frac
    with torch.no_grad():
        cast(nn.Linear, model[2]).bias.copy_(_grid_bias(4, frac_last, 2))
    em = IntegerModel(build_graph(model, in_t))
    x = torch.randn(200, 12, dtype=torch.float64) * 3
    xq = torch.from_numpy(np.ldexp(em.quantize_input(x).astype(np.float64), -in_t.frac))
    with torch.no_grad():
        ref = model(xq).numpy()
    assert np.array_equal(em.predict(x), ref)


def test_narrow_output_within_one_lsb_of_fake_quant() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 5)).double()
    quantize(model, weights=QuantSpec(6, scale="pow2", granularity="channel"), progress=False)
    out_t = FixedPoint(14, 5, rounding="RND", overflow="SAT")
    em = IntegerModel(build_graph(model, FixedPoint(10, 3), result=out_t))
    x = torch.randn(100, 10, dtype=torch.float64)
    xq = torch.from_numpy(np.ldexp(em.quantize_input(x).astype(np.float64), -7))
    with torch.no_grad():
        ref = model(xq).numpy()
    assert np.abs(em.predict(x) - ref).max() <= out_t.scale


def test_tt_lossless_equals_float_model() -> None:
    torch.manual_seed(2)
    cores = [torch.randn(1, 3, 2, 2), torch.randn(2, 2, 3, 3), torch.randn(3, 2, 2, 1)]
    layer = TTLinear(
        cores, in_features=10, out_features=11, bias=_grid_bias(11, 5 + 4 * 3, 4)
    ).double()
    model = nn.Sequential(layer)
    quantize(model, cores=FixedPoint(6, 2), progress=False)
    in_t = FixedPoint(8, 3)
    em = IntegerModel(build_graph(model, in_t))
    x = torch.randn(64, 10, dtype=torch.float64) * 2
    xq = torch.from_numpy(np.ldexp(em.quantize_input(x).astype(np.float64), -5))
    with torch.no_grad():
        ref = model(xq).numpy()
    assert np.array_equal(em.predict(x), ref)


def test_save_load_round_trip(tmp_path: object) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        LowRankLinear([torch.randn(5, 2), torch.randn(2, 6)], bias=torch.randn(5)),
        nn.ReLU(),
        TTLinear(
            [torch.randn(1, 2, 2, 2), torch.randn(2, 2, 3, 1)], in_features=5, bias=torch.randn(4)
        ),
    )
    quantize(model, cores=QuantSpec(6, scale="pow2", granularity="channel", axis=0), progress=False)
    em = IntegerModel(
        build_graph(
            model,
            FixedPoint(9, 3, rounding="RND", overflow="SAT"),
            accum={"2.1": FixedPoint(12, 4, overflow="SAT")},
        )
    )
    em.save(tmp_path)  # type: ignore[arg-type]
    back = IntegerModel.load(tmp_path)  # type: ignore[arg-type]
    x = np.random.default_rng(0).integers(-256, 256, size=(50, 6))
    assert np.array_equal(back.run(x), em.run(x))
    assert (back.input_type, back.output_type) == (em.input_type, em.output_type)


def test_run_checks_its_input() -> None:
    t = FixedPoint(4, 2)
    model = nn.Sequential(nn.Linear(2, 1))
    quantize(model, weights=t, progress=False)
    em = IntegerModel(build_graph(model, t))
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\]"):
        em.run(np.array([[8, 0]]))
    with pytest.raises(TypeError, match="integer mantissas"):
        em.run(np.array([[0.5, 0.0]]))
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        em.run(np.array([[1, 2, 3]]))
