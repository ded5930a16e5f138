"""hls4ml's table activations: the numpy model vs hls4ml's own C++, bit for bit.

Three references: a C++ program built on hls4ml's ``nnet_activation.h`` that
prints its tables and runs ``nnet::sigmoid``/``tanh``/``softmax`` (one g++
build, about 10 s); hls4ml itself (two ``compile()`` builds of a PyTorch model,
C simulation through ``predict``); and exact float references for the
non-compiling tests. The compiling tests are ``slow`` and skip without g++ or
hls4ml.
"""

from __future__ import annotations

import ctypes.util
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tnquant.export import tables
from tnquant.export.softmax import _reduce_add, softmax, softmax_types
from tnquant.export.tables import (
    DEFAULT_ACCUM_T,
    DEFAULT_SOFTMAX_T,
    DEFAULT_TABLE_T,
    exp_table,
    exp_table_legacy,
    invert_table,
    invert_table_legacy,
    sigmoid,
    sigmoid_table,
    tanh,
    tanh_table,
)
from tnquant.quant.fixed_point import to_mantissa
from tnquant.specs import FixedPoint

HAS_GXX = shutil.which("g++") is not None


def _fp(w: int, i: int, q: str = "TRN", o: str = "WRAP", signed: bool = True) -> FixedPoint:
    return FixedPoint(w, i, signed=signed, rounding=q, overflow=o)


def _c(t: FixedPoint) -> str:
    """The C++ spelling of a type."""
    return (
        f"ap_{'' if t.signed else 'u'}fixed<{t.width},{t.integer},AP_{t.rounding},AP_{t.overflow}>"
    )


def _values(m: np.ndarray, t: FixedPoint) -> np.ndarray:
    return np.ldexp(np.asarray(m, np.float64), -t.frac)


def _mantissas(values: np.ndarray, t: FixedPoint) -> np.ndarray:
    return to_mantissa(torch.from_numpy(np.asarray(values, np.float64)), t).numpy()


def _rows(t: FixedPoint, n: int, rng: np.random.Generator, rows: int = 300) -> np.ndarray:
    """Mantissas of ``t``: small values, values across the range, and the extremes."""
    small = np.round(rng.normal(size=(rows // 3, n)) * 4 * 2.0**t.frac)
    wide = rng.integers(t.qmin, t.qmax, size=(rows - rows // 3 - 4, n), endpoint=True)
    ends = np.array([[t.qmin] * n, [t.qmax] * n, [t.qmin, t.qmax] * (n // 2) + [0] * (n % 2)])
    out = np.concatenate([small, wide, ends, np.zeros((1, n))])
    return np.clip(out, t.qmin, t.qmax).astype(np.int64)


# --- independent references: exact rationals, float math, hand-worked cases ------------------

FINE = FixedPoint(30, 2)  # a table type whose entries all differ: indices show through
S18 = DEFAULT_SOFTMAX_T


def _float_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.skipif(ctypes.util.find_library("m") is None, reason="no C math library")
def test_expf_and_tanhf_come_from_the_c_library() -> None:
    assert tables.FLOAT_LIBRARY == "libm"


@pytest.mark.parametrize(("fn", "span"), [(sigmoid, 16), (tanh, 8)], ids=["sigmoid", "tanh"])
@pytest.mark.parametrize(
    "in_t", [_fp(12, 4), _fp(8, 12), _fp(10, -1), _fp(9, 3, signed=False), _fp(16, 6)], ids=str
)
def test_the_index_is_int_of_x_times_size_over_span(fn: Any, span: int, in_t: FixedPoint) -> None:
    """``int(x * N / span)`` truncates toward zero (not floor), then ``+ N / 2``, clamped."""
    m = np.arange(in_t.qmin, in_t.qmax + 1)
    step = Fraction(2) ** -in_t.frac
    index = [min(max(int(int(v) * step * 1024 / span) + 512, 0), 1023) for v in m]
    table = (sigmoid_table if fn is sigmoid else tanh_table)(1024, FINE)
    np.testing.assert_array_equal(fn(m, in_t, FINE, 1024, FINE), table[index])


@pytest.mark.parametrize("size", [64, 1024, 4096])
def test_tables_follow_the_functions(size: int) -> None:
    grid16 = 16 * (np.arange(size) - size / 2) / size
    steps = [1.0 / (1 + np.exp(-grid16)), np.tanh(grid16 / 2), np.exp(grid16)]
    got = [sigmoid_table(size, FINE), tanh_table(size, FINE), exp_table_legacy(size, _fp(40, 13))]
    for want, table, t in zip(steps, got, [FINE, FINE, _fp(40, 13)], strict=True):
        err = np.abs(_values(table, t) - want)
        assert err.max() <= 2.0**-t.frac + 4e-7 * np.abs(want).max()  # floor + float32


def test_values_of_one_over_zero_follow_the_overflow_mode() -> None:
    """``1 / 0.0f = +inf`` assigned to ``ap_fixed``: the largest value if saturating, else 0."""
    index_t = _fp(4, 3, signed=False)
    got = {o: invert_table(4, _fp(8, 2, "RND", o), index_t)[0] for o in ("SAT", "SAT_SYM")}
    assert got == {"SAT": 127, "SAT_SYM": 127}
    assert invert_table(4, _fp(8, 2, "RND", "WRAP"), index_t)[0] == 0
    assert invert_table(4, _fp(8, 2, "RND", "SAT_ZERO"), index_t)[0] == 0
    np.testing.assert_array_equal(
        invert_table(4, _fp(8, 2, "RND", "SAT"), index_t)[1:], [32, 16, 11]
    )


def test_adder_tree_is_hls4ml_reduce() -> None:
    """Left ``pow2(floorlog2(N - 1))`` elements, then the rest; each sum cast to ``accum_t``."""
    acc = _fp(6, 2, "TRN", "SAT")  # [-2, 2) in steps of 1/16
    # N = 3: (x0 + x1) + x2; 1.5 + 1.5 saturates to 31/16, minus 1.5 is 7/16
    assert _reduce_add(np.array([24, 24, -24]), acc) == 7
    assert _reduce_add(np.array([-24, 24, 24]), acc) == 24  # 0 + 1.5
    # N = 5: ((x0 + x1) + (x2 + x3)) + x4
    assert _reduce_add(np.array([24, 24, -24, -24, 24]), acc) == 31 - 32 + 24  # saturated
    assert _reduce_add(np.array([[24, 24, -24, 24, -24]]), acc).tolist() == [7]
    wide = FixedPoint(24, 14)
    for n in range(1, 10):  # lossless: the plain sum
        x = np.random.default_rng(n).integers(-1000, 1000, size=(7, n))
        np.testing.assert_array_equal(_reduce_add(x, wide), x.sum(-1))


def test_default_softmax_collapses_on_a_wide_input() -> None:
    """hls4ml's defaults on its own ``ap_fixed<36,16>`` dense result: every row ``1/n``."""
    x = np.random.default_rng(1).normal(size=(500, 5)) * 2
    wide = FixedPoint(36, 16)
    y = softmax(_mantissas(x, wide), wide, FixedPoint(16, 6))
    assert np.all(y == y[:1, :1]) and y[0, 0] == 205  # 0.2002: 1/5 through the tables
    narrow = FixedPoint(16, 6)  # a narrow input is not constant, but coarse
    err = np.abs(
        _values(softmax(_mantissas(x, narrow), narrow, narrow), narrow) - _float_softmax(x)
    )
    assert 0.1 < err.max() < 0.3


@pytest.mark.parametrize(
    "in_t",
    [
        FixedPoint(16, 6),
        FixedPoint(20, 9),
        FixedPoint(36, 16),
        FixedPoint(10, 3, rounding="RND", overflow="SAT"),
    ],
    ids=str,
)
@pytest.mark.parametrize("n", [2, 5, 10])
def test_proposed_softmax_types_follow_the_function(in_t: FixedPoint, n: int) -> None:
    x = np.random.default_rng(n).normal(size=(500, n)) * 2
    xm = _mantissas(x, in_t)
    res_t = FixedPoint(16, 0, signed=False, rounding="RND", overflow="SAT")
    y = _values(softmax(xm, in_t, res_t, **softmax_types(in_t, n_slice=n)), res_t)
    err = np.abs(y - _float_softmax(_values(xm, in_t)))
    assert err.max() < 0.005 and err.mean() < 0.001, (err.max(), err.mean())


def test_softmax_types_scale_with_the_softmax_length() -> None:
    t = softmax_types(FixedPoint(16, 6), n_slice=100)
    assert str(t["accum_t"]) == "ap_ufixed<24,7>" and t["inv_table_size"] == 2**14
    assert str(t["inv_inp_t"]) == "ap_ufixed<14,7,RND,SAT>"
    t = softmax_types(FixedPoint(8, 2))  # 6 fractional bits, d < 4: a 256-entry exp table
    assert str(t["inp_norm_t"]) == "ap_ufixed<8,2,RND,SAT>" and t["exp_table_size"] == 256


def test_softmax_defaults_are_hls4mls_derivation() -> None:
    """Without sizes: ``table_size`` capped by the input width, ``inp_norm_t`` derived."""
    in_t, res_t = FixedPoint(8, 3), FixedPoint(16, 6)
    x = np.random.default_rng(4).integers(in_t.qmin, in_t.qmax, size=(50, 4), endpoint=True)
    explicit = softmax(
        x, in_t, res_t, exp_table_size=128, inv_table_size=256,
        inp_norm_t=FixedPoint(7, 2, signed=False),
    )  # fmt: skip
    np.testing.assert_array_equal(softmax(x, in_t, res_t), explicit)


@pytest.mark.parametrize("in_t", [_fp(10, 4), _fp(12, 2, "RND", "SAT", signed=False)], ids=str)
def test_sigmoid_and_tanh_are_monotone(in_t: FixedPoint) -> None:
    m = np.arange(in_t.qmin, in_t.qmax + 1)
    for fn in (sigmoid, tanh):
        assert np.all(np.diff(fn(m, in_t, _fp(12, 2, "RND", "SAT"))) >= 0)
    assert sigmoid(m.reshape(-1, 2)[None], in_t, DEFAULT_TABLE_T).shape == (1, len(m) // 2, 2)


def test_argmax_marks_the_first_maximum() -> None:
    y = softmax(
        np.array([[3, 7, 7, 1], [0, 0, 0, 0]]), _fp(8, 4), _fp(8, 2), implementation="argmax"
    )
    np.testing.assert_array_equal(y, [[0, 64, 0, 0], [64, 0, 0, 0]])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: softmax(np.zeros((2, 3), int), _fp(8, 3), _fp(8, 3), implementation="fast"),
         ValueError, r"implementation must be one of \['stable', 'latency', 'legacy', 'argmax'\]"),
        (lambda: exp_table(1000, S18, _fp(16, 6)), ValueError, "must be a power of two >= 2"),
        (lambda: exp_table(1024, S18, _fp(8, 2)), ValueError,
         r"exp_table_size 1024 needs 10 address bits, more than ap_fixed<8,2>'s 8"),
        (lambda: sigmoid(np.array([0.5]), _fp(8, 2), _fp(8, 2)), TypeError,
         "must hold integer mantissas, got dtype float64"),
        (lambda: tanh(np.array([300]), _fp(8, 2), _fp(8, 2)), ValueError,
         r"must be mantissas of ap_fixed<8,2> in \[-128, 127\], got \[300, 300\]"),
        (lambda: softmax(np.zeros((3, 0), int), _fp(8, 3), _fp(8, 3)), ValueError,
         r"non-empty last axis, got shape \(3, 0\)"),
        (lambda: sigmoid(np.array([1]), "ap_fixed<8,2>", _fp(8, 2)), TypeError,  # type: ignore
         "in_type must be a FixedPoint, got str"),
        (lambda: sigmoid_table(1024, FixedPoint(63, 8)), ValueError, "widths above 62 bits"),
        (lambda: tanh_table(0), ValueError, "table_size must be an int >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused(call: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_tables_are_fresh_arrays() -> None:
    a = invert_table(1024, S18, S18)
    a[:] = 0
    assert invert_table(1024, S18, S18)[1] != 0


# --- the C++ program: tables and functions from hls4ml's nnet_activation.h -------------------

WIDE_T, SCALED_T = _fp(24, 1, "RND"), _fp(20, 9, "RND_CONV")
PROPOSED = softmax_types(_fp(16, 6), n_slice=5)
P_EXP, P_INV = PROPOSED["exp_table_t"], PROPOSED["inv_table_t"]
TABLES: dict[str, tuple[str, Any, FixedPoint, np.ndarray]] = {
    # name: (C++ init call, config pieces, table type, the model's table)
    "sigmoid": ("nnet::init_sigmoid_table<CFG, 1024>(t)", (1024, DEFAULT_TABLE_T), DEFAULT_TABLE_T,
                sigmoid_table()),
    "tanh": ("nnet::init_tanh_table<CFG, 1024>(t)", (1024, DEFAULT_TABLE_T), DEFAULT_TABLE_T,
             tanh_table()),
    # wide enough that tanhf, tanh (double) and float64 rounded to float32 differ
    "tanh_wide": ("nnet::init_tanh_table<CFG, 4096>(t)", (4096, WIDE_T), WIDE_T,
                  tanh_table(4096, WIDE_T)),
    "sigmoid_wide": ("nnet::init_sigmoid_table<CFG, 4096>(t)", (4096, WIDE_T), WIDE_T,
                     sigmoid_table(4096, WIDE_T)),
    "exp_stable_default": ("nnet::init_exp_table<ap_ufixed<15,5>, CFG>(t, true)", (1024, S18), S18,
                           exp_table(1024, S18, _fp(15, 5, signed=False), negative=True)),
    "exp_stable_wide": ("nnet::init_exp_table<ap_ufixed<27,11>, CFG>(t, true)", (1024, S18), S18,
                        exp_table(1024, S18, _fp(27, 11, signed=False), negative=True)),
    "exp_latency_default": ("nnet::init_exp_table<ap_fixed<16,6>, CFG>(t)", (1024, S18), S18,
                            exp_table(1024, S18, _fp(16, 6))),
    "inv_default": ("nnet::init_invert_table<" + _c(S18) + ", CFG>(t)", (1024, S18), S18,
                    invert_table(1024, S18, S18)),
    "exp_proposed": (f"nnet::init_exp_table<{_c(PROPOSED['inp_norm_t'])}, CFG>(t, true)",
                     (1024, P_EXP), P_EXP,
                     exp_table(1024, P_EXP, PROPOSED["inp_norm_t"], negative=True)),
    "inv_proposed": (f"nnet::init_invert_table<{_c(PROPOSED['inv_inp_t'])}, CFG>(t)",
                     (1024, P_INV), P_INV, invert_table(1024, P_INV, PROPOSED["inv_inp_t"])),
    "exp_scaled": ("nnet::init_exp_table<ap_fixed<10,3>, CFG>(t)", (1024, SCALED_T, 0.7), SCALED_T,
                   exp_table(1024, SCALED_T, _fp(10, 3), exp_scale=0.7)),
    "inv_wrap": ("nnet::init_invert_table<ap_fixed<12,4>, CFG>(t)", (1024, _fp(16, 4)), _fp(16, 4),
                 invert_table(1024, _fp(16, 4), _fp(12, 4))),
    "exp_legacy": ("nnet::init_exp_table_legacy<CFG, 1024>(t)", (1024, DEFAULT_TABLE_T),
                   DEFAULT_TABLE_T, exp_table_legacy()),
    "inv_legacy": ("nnet::init_invert_table_legacy<CFG, 1024>(t)", (1024, DEFAULT_TABLE_T),
                   DEFAULT_TABLE_T, invert_table_legacy()),
}  # fmt: skip

RNG = np.random.default_rng(18)
# (name, kind, in_type, res_type, model kwargs, n); softmax kwargs are written out in full
FUNCTIONS: list[tuple[str, str, FixedPoint, FixedPoint, dict[str, Any], int]] = [
    ("sig_default", "sigmoid", _fp(16, 6, "RND", "SAT"), _fp(10, 2, "RND_CONV", "SAT"), {}, 4),
    ("sig_unsigned", "sigmoid", _fp(12, 4, signed=False), _fp(8, 1),
     {"table_size": 2048, "table_type": _fp(14, 1, "RND", "SAT")}, 4),
    ("sig_coarse", "sigmoid", _fp(8, 12), _fp(9, 0, "RND", "SAT", signed=False), {}, 4),
    ("tanh_wide_in", "tanh", _fp(28, 12), _fp(12, 1, "RND", "SAT"), {}, 4),
    ("tanh_tiny_in", "tanh", _fp(6, -1), _fp(16, 1), {"table_size": 4096,
                                                       "table_type": _fp(24, 1, "RND")}, 4),
    ("tanh_odd", "tanh", _fp(14, 3, "RND", "SAT"), _fp(6, 1, "RND_INF", "SAT_SYM"),
     {"table_size": 1000}, 3),
]  # fmt: skip
_SM = {"table_size": 1024, "exp_scale": 1.0, "table_t": DEFAULT_TABLE_T}
_SM_DEFAULT = {**_SM, "exp_table_t": S18, "inv_table_t": S18, "accum_t": DEFAULT_ACCUM_T,
               "inv_inp_t": S18, "exp_table_size": 1024, "inv_table_size": 1024}  # fmt: skip
FUNCTIONS += [
    ("sm_stable_default", "softmax", _fp(16, 6), _fp(16, 6),
     {**_SM_DEFAULT, "implementation": "stable", "inp_norm_t": _fp(15, 5, signed=False)}, 5),
    ("sm_stable_wide", "softmax", _fp(28, 12), _fp(16, 6),
     {**_SM_DEFAULT, "implementation": "stable", "inp_norm_t": _fp(27, 11, signed=False)}, 5),
    ("sm_latency", "softmax", _fp(16, 6), _fp(12, 0, "RND", "SAT", signed=False),
     {**_SM_DEFAULT, "implementation": "latency", "inp_norm_t": _fp(1, 0)}, 5),
    ("sm_legacy", "softmax", _fp(16, 6), _fp(16, 6),
     {**_SM_DEFAULT, "implementation": "legacy", "inp_norm_t": _fp(1, 0)}, 5),
    ("sm_argmax", "softmax", _fp(10, 4), _fp(8, 2),
     {**_SM_DEFAULT, "implementation": "argmax", "inp_norm_t": _fp(1, 0)}, 5),
    ("sm_proposed", "softmax", _fp(16, 6), _fp(16, 0, "RND", "SAT", signed=False),
     {**_SM, **PROPOSED}, 5),
    ("sm_narrow_tree", "softmax", _fp(12, 4, "RND", "SAT"), _fp(10, 1, "RND", "SAT"),
     {**_SM_DEFAULT, "implementation": "stable", "accum_t": _fp(12, 3, "RND", "SAT"),
      "inp_norm_t": _fp(8, 3, "RND", "SAT", signed=False), "exp_table_size": 256,
      "exp_scale": 1.5}, 7),
    ("sm_wrap_sum", "softmax", _fp(10, 3), _fp(12, 2, "RND_CONV", "WRAP"),
     {**_SM_DEFAULT, "implementation": "stable", "accum_t": _fp(9, 2),
      "inv_inp_t": _fp(8, 2, "RND", "WRAP"), "inv_table_size": 256,
      "inp_norm_t": _fp(9, 2, signed=False), "exp_table_size": 512}, 6),
    ("sm_single", "softmax", _fp(10, 3), _fp(12, 2, "RND", "SAT"),
     {**_SM_DEFAULT, "implementation": "stable", "inp_norm_t": _fp(9, 2, signed=False),
      "exp_table_size": 512}, 1),
]  # fmt: skip
INPUTS = {name: _rows(in_t, n, RNG) for name, _, in_t, _, _, n in FUNCTIONS}


def _model(kind: str, m: np.ndarray, in_t: FixedPoint, res_t: FixedPoint, kw: dict[str, Any]):
    fn = {"sigmoid": sigmoid, "tanh": tanh}.get(kind)
    return fn(m, in_t, res_t, **kw) if fn else softmax(m, in_t, res_t, **kw)


def _table_config(name: str, pieces: tuple[Any, ...]) -> str:
    size, t, *scale = pieces
    return (
        f"struct cfg_{name} : nnet::activ_config {{\n"
        f"  static const unsigned table_size = {size};\n"
        f"  static const unsigned exp_table_size = {size};\n"
        f"  static const unsigned inv_table_size = {size};\n"
        f"  static constexpr float exp_scale = {scale[0] if scale else 1.0};\n"
        f"  typedef {_c(t)} table_t; typedef {_c(t)} exp_table_t;\n"
        f"  typedef {_c(t)} inv_table_t;\n}};\n"
    )


def _function_config(name: str, kind: str, n: int, kw: dict[str, Any]) -> str:
    lines = [f"struct cfg_{name} : nnet::activ_config {{", f"  static const unsigned n_in = {n};"]
    if kind != "softmax":
        lines += [f"  static const unsigned table_size = {kw.get('table_size', 1024)};",
                  f"  typedef {_c(kw.get('table_type', DEFAULT_TABLE_T))} table_t;"]  # fmt: skip
    else:
        lines += [f"  static const unsigned n_slice = {n};",
                  f"  static const unsigned exp_table_size = {kw['exp_table_size']};",
                  f"  static const unsigned inv_table_size = {kw['inv_table_size']};",
                  "  static const nnet::softmax_implementation implementation ="
                  f" nnet::softmax_implementation::{kw['implementation']};",
                  f"  static constexpr float exp_scale = {kw['exp_scale']};"]  # fmt: skip
        for t in ("exp_table_t", "inv_table_t", "accum_t", "inv_inp_t", "inp_norm_t", "table_t"):
            lines.append(f"  typedef {_c(kw[t])} {t};")
    return "\n".join(lines + ["};\n"])


def _program() -> str:
    head = ['#include <cstdio>\n#include <cmath>\n#include "nnet_utils/nnet_activation.h"\n']
    body = ["int main() {"]
    for name, (call, pieces, t, _) in TABLES.items():
        head.append(_table_config(name, pieces))
        size = pieces[0]
        body.append(
            f"  {{ static {_c(t)} t[{size}]; {call.replace('CFG', 'cfg_' + name)};\n"
            f'    std::printf("# {name}\\n");\n'
            f'    for (int i = 0; i < {size}; i++) std::printf("%a\\n", t[i].to_double()); }}'
        )
    for name, kind, in_t, res_t, kw, n in FUNCTIONS:
        head.append(_function_config(name, kind, n, kw))
        x = INPUTS[name]
        data = ",".join(repr(float(v)) for v in _values(x, in_t).ravel())
        head.append(f"static const double x_{name}[{x.size}] = {{{data}}};\n")
        body.append(
            f'  {{ std::printf("# {name}\\n");\n'
            f"    for (int r = 0; r < {len(x)}; r++) {{ {_c(in_t)} in[{n}]; {_c(res_t)} out[{n}];\n"
            f"      for (int j = 0; j < {n}; j++) in[j] = x_{name}[r * {n} + j];\n"
            f"      nnet::{kind}<{_c(in_t)}, {_c(res_t)}, cfg_{name}>(in, out);\n"
            f'      for (int j = 0; j < {n}; j++) std::printf("%a\\n", out[j].to_double()); }} }}'
        )
    return "\n".join(head + body + ["  return 0;\n}\n"])


def _hls4ml_templates() -> Path:
    hls4ml = pytest.importorskip("hls4ml")
    return Path(hls4ml.__file__).parent / "templates" / "vivado"


@pytest.fixture(scope="module")
def cpp_output(tmp_path_factory: Any) -> dict[str, np.ndarray]:
    """Build and run the program once; its printed blocks by name, as float64 values."""
    if not HAS_GXX:
        pytest.skip("needs g++")
    root = _hls4ml_templates()
    work = tmp_path_factory.mktemp("tables_cpp")
    (work / "tables.cpp").write_text(_program())
    std = "-std=c++23" if _accepts("-std=c++23") else "-std=c++11"  # as hls4ml's build_lib.sh
    cmd = ["g++", "-O3", std, "-w", f"-I{root}", f"-I{root / 'ap_types'}", "tables.cpp", "-o", "t"]
    subprocess.run(cmd, cwd=work, check=True, capture_output=True, timeout=600)
    out = subprocess.run([str(work / "t")], check=True, capture_output=True, text=True).stdout
    blocks: dict[str, list[float]] = {}
    for line in out.splitlines():
        if line.startswith("# "):
            current = blocks.setdefault(line[2:], [])
        else:
            current.append(float.fromhex(line))
    return {k: np.array(v) for k, v in blocks.items()}


def _accepts(flag: str) -> bool:
    probe = subprocess.run(
        ["g++", "-Werror", "-fsyntax-only", flag, "-xc++", "-"], input="", capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLES))
def test_tables_equal_hls4ml_cpp(cpp_output: dict[str, np.ndarray], name: str) -> None:
    _, _, table_t, model = TABLES[name]
    got = _mantissas(cpp_output[name], table_t)
    assert np.all(_values(got, table_t) == cpp_output[name])  # every entry is a table_t value
    mismatches = int((got != model).sum())
    assert mismatches == 0, f"{name}: {mismatches} of {len(got)} entries differ"


@pytest.mark.slow
@pytest.mark.parametrize("case", FUNCTIONS, ids=[c[0] for c in FUNCTIONS])
def test_functions_equal_hls4ml_cpp(cpp_output: dict[str, np.ndarray], case: Any) -> None:
    name, kind, in_t, res_t, kw, n = case
    x = INPUTS[name]
    got = _mantissas(cpp_output[name], res_t).reshape(x.shape)
    want = _model(kind, x, in_t, res_t, kw)
    mismatches = int((got != want).sum())
    assert mismatches == 0, f"{name}: {mismatches} of {got.size} outputs differ"


# --- end to end: hls4ml's C simulation of a PyTorch model ------------------------------------

X_T = _fp(12, 5, "RND", "SAT")  # the input: far values saturate
W_T, B_T, FC_T = _fp(6, 2), _fp(6, 3), _fp(20, 9)  # FC_T: the lossless accumulator


class _Heads(nn.Module):
    """``fc`` then four heads on its output, concatenated (hls4ml merges two at a time)."""

    def __init__(self, a: nn.Module, b: nn.Module, c: nn.Module, d: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(18)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():  # dyadic: exact in W_T and B_T
            self.fc.weight.copy_(torch.randint(-8, 9, (5, 8)) / 8)
            self.fc.bias.copy_(torch.randint(-8, 9, (5,)) / 4)
        self.a, self.b, self.c, self.d = a, b, c, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        ab = torch.cat([self.a(h), self.b(h)], dim=-1)
        return torch.cat([ab, torch.cat([self.c(h), self.d(h)], dim=-1)], dim=-1)


def _dense(model: _Heads, x: np.ndarray) -> np.ndarray:
    """The fc layer in exact integers: input cast, products, bias, all in FC_T."""
    xm = _mantissas(x, X_T)
    wm = _mantissas(model.fc.weight.detach().double().numpy(), W_T)
    bm = _mantissas(model.fc.bias.detach().double().numpy(), B_T)
    acc = xm @ wm.T + (bm << (X_T.frac + W_T.frac - B_T.frac))
    assert X_T.frac + W_T.frac == FC_T.frac and np.abs(acc).max() <= FC_T.qmax  # lossless
    return acc


# head name -> (module, result type, hls4ml layer config, the model's function of fc's mantissas)
Head = tuple[nn.Module, FixedPoint, dict[str, Any], Any]
SIG_T, TANH_T = _fp(10, 1, "RND_CONV", "SAT", signed=False), _fp(10, 1, "RND", "SAT")
LAT_T, SM_T = _fp(12, 0, "RND", "SAT", signed=False), _fp(16, 6)
PROP_T = _fp(16, 0, "RND", "SAT", signed=False)
PROP = softmax_types(FC_T, n_slice=5)
T2 = _fp(14, 1, "RND_CONV", "SAT")
MODELS: dict[str, tuple[dict[str, Head], FixedPoint]] = {
    "defaults": ({
        "a": (nn.Sigmoid(), SIG_T, {}, lambda h: sigmoid(h, FC_T, SIG_T)),
        "b": (nn.Tanh(), TANH_T, {}, lambda h: tanh(h, FC_T, TANH_T)),
        "c": (nn.Softmax(dim=-1), SM_T, {}, lambda h: softmax(h, FC_T, SM_T)),
        "d": (nn.Softmax(dim=-1), LAT_T, {"Implementation": "latency"},
              lambda h: softmax(h, FC_T, LAT_T, implementation="latency")),
    }, _fp(20, 7)),
    "proposed": ({
        "a": (nn.Sigmoid(), _fp(8, 1, "RND", "SAT"), {"TableSize": 2048, "table_t": _c(T2)},
              lambda h: sigmoid(h, FC_T, _fp(8, 1, "RND", "SAT"), 2048, T2)),
        "b": (nn.Softmax(dim=-1), SM_T, {"Implementation": "argmax"},
              lambda h: softmax(h, FC_T, SM_T, implementation="argmax")),
        "c": (nn.Softmax(dim=-1), PROP_T,
              {"Implementation": PROP["implementation"],
               **{k: (_c(v) if isinstance(v, FixedPoint) else v) for k, v in PROP.items()
                  if k != "implementation"}},
              lambda h: softmax(h, FC_T, PROP_T, **PROP)),
        "d": (nn.Softmax(dim=-1), SM_T, {"Implementation": "legacy"},
              lambda h: softmax(h, FC_T, SM_T, implementation="legacy")),
    }, _fp(24, 7)),
}  # fmt: skip


def _inputs() -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(300, 8)) * 2.5
    x[:20] *= 10  # far outside the input range: the input cast saturates
    return x


@pytest.fixture(scope="module", params=list(MODELS))
def hls_run(request: Any, tmp_path_factory: Any) -> tuple[str, np.ndarray, np.ndarray, Any]:
    """Convert, compile and predict; the C simulation's outputs, the model's, the hls model."""
    if not HAS_GXX:
        pytest.skip("needs g++")
    hls4ml = pytest.importorskip("hls4ml")
    heads, cat_t = MODELS[request.param]
    model = _Heads(*(head[0] for head in heads.values())).double()
    cfg = hls4ml.utils.config_from_pytorch_model(model, (8,), granularity="name")
    layers = cfg["LayerName"]
    layers["x"]["Precision"]["result"] = _c(X_T)
    layers["fc"]["Precision"].update(weight=_c(W_T), bias=_c(B_T), accum=_c(FC_T), result=_c(FC_T))
    for name, (_, res_t, extra, _) in heads.items():
        layers[name]["Precision"]["result"] = _c(res_t)
        if "accum_t" in extra:  # through Precision: a plain accum_t key overrides with a warning
            layers[name]["Precision"]["accum"] = extra["accum_t"]
        layers[name].update({k: v for k, v in extra.items() if k != "accum_t"})
    for name in ("cat", "cat_1", "cat_2"):  # wide enough for every head: lossless
        layers[name]["Precision"]["result"] = _c(cat_t)
    out = tmp_path_factory.mktemp(f"hls_{request.param}")
    hls_model = hls4ml.converters.convert_from_pytorch_model(
        model, hls_config=cfg, output_dir=str(out), backend="Vivado"
    )
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x)), np.float64).reshape(len(x), -1)
    h = _dense(model, x)
    want = np.concatenate([_values(fn(h), res_t) for _, res_t, _, fn in heads.values()], -1)
    return request.param, got, want, hls_model


@pytest.mark.slow
def test_hls4ml_c_simulation_is_bit_exact(hls_run: tuple[str, np.ndarray, np.ndarray, Any]) -> None:
    name, got, want, _ = hls_run
    heads = list(MODELS[name][0])
    counts = {h: int((got[:, 5 * i : 5 * i + 5] != want[:, 5 * i : 5 * i + 5]).sum())
              for i, h in enumerate(heads)}  # fmt: skip
    assert counts == dict.fromkeys(heads, 0), f"{name}: mismatches per head {counts}"


@pytest.mark.slow
def test_hls4ml_took_the_softmax_config(hls_run: tuple[str, np.ndarray, np.ndarray, Any]) -> None:
    name, got, _, hls_model = hls_run
    layers = {layer.name: layer for layer in hls_model.get_layers()}
    for head, (_, _, extra, _) in MODELS[name][0].items():
        if "Implementation" in extra:
            assert layers[head].get_attr("implementation") == extra["Implementation"]
    if name == "proposed":
        for key in ("exp_table_t", "inv_table_t", "accum_t", "inv_inp_t", "inp_norm_t"):
            p, want = layers["c"].get_attr(key).precision, PROP[key]
            assert (p.width, p.integer, p.signed) == (want.width, want.integer, want.signed), key
    assert len(np.unique(got[:, :5])) > 20 and len(np.unique(got[:, 10:15])) > 20  # not constant
