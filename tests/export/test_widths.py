"""Widths: near-zero channels do not blow up a tensor's type; every overflow names op, tensor, fix.

The jet tagger of the issue (16-64-32-32-5, ReLUs) is built here with a
seeded random init; its Tucker-2 (16, 8) cores hold rows of about ``1e-16``.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, LowRank, QuantSpec, Tucker, calibrate, factorize, quantize
from tnquant.export import fixed_point
from tnquant.export.graph import build_graph
from tnquant.quant import choose_qparams

W8 = QuantSpec(bits=8, granularity="channel", scale="pow2")
#: every width error starts so (op, then which tensor)
NAMED = re.compile(
    r"op '[^']+': its (input|weights|core \d+ weights|bias|accumulator|result|products)"
)


def _jet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 5),
    ).double()


def _tucker_jet() -> nn.Module:
    """Tucker-2 (16, 8) on every layer, 8-bit per-channel pow2 weights, calibrated activations."""
    model = _jet()
    factorize(model, Tucker(rank=(16, 8)), progress=False)
    quantize(
        model,
        weights=W8,
        cores=W8,
        activations={
            "0.input": QuantSpec(bits=8, scale="pow2"),
            "[246].input": QuantSpec(bits=8, symmetric=False, scale="pow2"),
            "*.inter_*": QuantSpec(bits=16, scale="pow2"),
        },
        progress=False,
    )
    g = torch.Generator().manual_seed(5)
    calibrate(model, [torch.randn(512, 16, generator=g, dtype=torch.float64)], progress=False)
    return model.eval()


def _inputs() -> np.ndarray:
    x = np.random.default_rng(3).normal(size=(320, 16))
    x[:32] *= 50.0  # beyond the calibrated input range: saturates
    return x


# --------------------------------------------------------------------------- #
# the quantizer's floor
# --------------------------------------------------------------------------- #


def test_pow2_channel_scales_span_at_most_24_octaves() -> None:
    w = torch.tensor(
        [[0.5, -0.25], [1e-16, -3e-17], [2.0**-20, 0.0], [0.0, 0.0]], dtype=torch.float64
    )
    got = choose_qparams(w, W8).scale.flatten().tolist()
    fl = choose_qparams(w, QuantSpec(bits=8, granularity="channel")).scale.flatten().tolist()
    # the reference, by hand: scale = 2^ceil(log2(amax / 127)), no finer than top * 2^-24
    top = 2.0 ** math.ceil(math.log2(0.5 / 127))
    assert got == [top, top * 2.0**-24, 2.0 ** math.ceil(math.log2(2.0**-20 / 127)), 1.0]
    assert fl[1] == 0.5 / 127 * 2.0**-24  # float scales are bounded alike
    assert all(f <= p < 2 * f for p, f in zip(got[:3], fl[:3], strict=True))


def test_the_tucker_core_has_near_zero_rows() -> None:
    """The issue's premise: rows of ~1e-16, whose own scale would be about 2^-60."""
    core = _tucker_jet().get_submodule("0").cores[1].detach()
    rows = core.abs().amax(dim=1)
    assert int((rows < 1e-12).sum()) >= 4 and float(rows.max()) > 0.1


def test_near_zero_rows_export_with_sane_widths_bit_exact(tmp_path: Path) -> None:
    model = _tucker_jet()
    em = fixed_point(model, tmp_path, hls4ml=False)
    dense = [op for op in em.ops if op.kind == "dense"]
    assert max(t.width for op in dense for t in op.weight_types) <= 32
    assert max(t.width for op in dense for t in op.accum_types) <= 32  # was ap_fixed<60,2> cores
    x = _inputs()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = em.predict(x)
    assert int(np.all(got == want, axis=1).sum()) == len(x)
    notes = em.report().notes
    assert any(re.match(r"0\.cores\.1: \d+ of 16 channels floored to 2\^-\d+ ", n) for n in notes)
    assert "floored to 2^" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_near_zero_rows_hls4ml_c_simulation_is_bit_exact(tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    from tnquant.export import to_hls4ml

    model = _tucker_jet()
    em = fixed_point(model, tmp_path / "files")
    hls_model = to_hls4ml(model, tmp_path / "hls", project_name="tnq_near_zero")
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))


# --------------------------------------------------------------------------- #
# width overflows: which op, which tensor, which override
# --------------------------------------------------------------------------- #


def _weights_only(arch: Any, bits: int = 8, granularity: str = "channel") -> nn.Module:
    model = _jet()
    if arch is not None:
        factorize(model, arch, progress=False)
    spec = QuantSpec(bits=bits, granularity=granularity, scale="pow2")
    quantize(model, weights=spec, cores=spec, progress=False)
    return model


def test_jet_tagger_weights_only_names_the_accumulator_and_the_result_that_narrows_it(
    tmp_path: Path,
) -> None:
    in_t = FixedPoint(16, 6)
    with pytest.raises(
        ValueError,
        match=r"op '6': its accumulator needs \d+ bits \(lossless: 32 products .*\), wider than "
        r"62 bits .*narrow the input with result=\{'4': FixedPoint\(\d+, \d+, rounding='RND', "
        r"overflow='SAT'\)\} .*accum=\{'6': FixedPoint\(",
    ) as err:
        fixed_point(_weights_only(None), tmp_path, in_t, hls4ml=False)
    # the suggested override works as written
    fix = re.search(r"result=(\{'4': FixedPoint\([^)]*\)\})", str(err.value))
    assert fix is not None
    result = eval(fix.group(1), {"FixedPoint": FixedPoint})  # noqa: S307 -- our own message
    em = fixed_point(_weights_only(None), tmp_path, in_t, result=result, hls4ml=False)
    assert max(op.accum_types[0].width for op in em.ops if op.kind == "dense") <= 62


@pytest.mark.parametrize("arch", [None, Tucker(rank=(16, 8)), LowRank(rank=8)])
@pytest.mark.parametrize(("bits", "granularity"), [(8, "channel"), (16, "channel"), (8, "tensor")])
def test_no_raw_fixed_point_width_error(arch: Any, bits: int, granularity: str) -> None:
    """Weights only, input ap_fixed<16,6>: whatever overflows says so by op and tensor."""
    try:
        build_graph(_weights_only(arch, bits, granularity), FixedPoint(16, 6))
    except ValueError as e:
        assert "width must be in" not in str(e)
        assert NAMED.match(str(e)), str(e)
        assert re.search(r"(result|accum|bias)=\{'[^']+': FixedPoint\(", str(e)), str(e)


def test_bias_too_wide_names_the_bias_override() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    quantize(model, weights=FixedPoint(8, -40), progress=False)  # 48 fractional bits
    with pytest.raises(
        ValueError,
        match=r"op '0': its bias needs \d+ bits \(\d+ integer bits on the products' 62 "
        r"fractional bits\).*bias=\{'0': FixedPoint\(24, \d+, rounding='RND', overflow='SAT'\)\}"
        r".*a narrower input_spec",
    ):
        build_graph(model, FixedPoint(16, 2))


def _one(weights: FixedPoint | None = None) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    quantize(model, weights=weights or FixedPoint(8, 2), progress=False)
    return model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"input_spec": FixedPoint(63, 10), "accum": FixedPoint(40, 20)},
            r"op '0': its input needs 63 bits \(ap_fixed<63,10>\).*a narrower input_spec",
        ),
        (
            {"input_spec": FixedPoint(8, 3), "accum": FixedPoint(63, 30)},
            r"op '0': its accumulator needs 63 bits .*accum=\{'0': FixedPoint\(38, 30, "
            r"rounding='RND'\)\}",
        ),
        (
            {"input_spec": FixedPoint(8, 3), "result": FixedPoint(64, 12)},
            r"op '0': its result needs 64 bits .*result=\{'0': FixedPoint\(24, 12, "
            r"rounding='RND', overflow='SAT'\)\}",
        ),
    ],
)
def test_given_types_too_wide_name_the_tensor(kwargs: dict[str, Any], match: str) -> None:
    spec = kwargs.pop("input_spec")
    with pytest.raises(ValueError, match=match):
        build_graph(_one(), spec, **kwargs)


def test_products_and_weights_too_wide_name_the_weights() -> None:
    with pytest.raises(
        ValueError,
        match=r"op '0': its products need 70 bits \(its input ap_fixed<40,8> times its weights "
        r"ap_fixed<30,2>\).*a narrower input_spec.*quantize the weights with fewer bits",
    ):
        build_graph(_one(FixedPoint(30, 2)), FixedPoint(40, 8), accum=FixedPoint(40, 20))
    with pytest.raises(
        ValueError, match=r"op '0': its weights need 63 bits \(ap_fixed<63,2>\).*fewer bits"
    ):
        build_graph(_one(FixedPoint(63, 2)), FixedPoint(8, 3), accum=FixedPoint(40, 20))


def test_per_channel_scales_too_far_apart_name_the_weights() -> None:
    """Past the quantizer's floor (a learned scale): the aligned mantissas are refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    quantize(
        model,
        weights=QuantSpec(bits=8, scale="pow2", granularity="channel", learnable=True),
        progress=False,
    )
    q = model[0].weight_quantizer
    q.freeze(model[0].weight.detach())
    with torch.no_grad():
        q.scale[1] = 2.0**-70
    with pytest.raises(
        ValueError,
        match=r"op '0': its weights 0\.weight need \d+ bits \(power-of-two scales \d+ octaves "
        r"apart, aligned to one binary point\).*per tensor",
    ):
        build_graph(model, FixedPoint(8, 3))
