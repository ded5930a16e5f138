"""C headers of the exported network, and the HLS C++ kernel of a TT-matrix layer.

Files written by :func:`write_headers`:

``tnquant_weights.h``
    ``typedef ap_fixed<...>`` for every type of every op (``<op>_input_t``,
    ``<op>_w<k>_t``, ``<op>_bias_t``, ``<op>_accum<s>_t``, ``<op>_res<s>_t``)
    and ``const <op>_w<k>_t <op>_w<k>[n] = {...}`` arrays (row-major, the
    shapes of the manifest), values written as exact decimal literals; a
    clip's ``<op>_w0`` is ``{lo, hi}`` (of its input type), a LeakyReLU's
    ``{alpha}`` (of alpha's type).
``tnquant_weights_int.h``
    The same arrays as plain ``int32_t``/``int64_t`` mantissas, with
    ``#define <OP>_W<k>_FRAC`` giving the binary point (value = m * 2^-FRAC).
``tt_linear.h``
    ``tnquant::tt_step``: one step of a TT contraction on plain loops, with
    hls4ml's dense semantics (product cast to ``accum_T``, accumulator from
    the bias, ``+=`` in ascending order, cast to ``res_T``).
``tnquant_tt_layers.h`` (only with TT layers)
    ``void <op>(const <op>_input_t x[IN], <op>_res<d-1>_t y[OUT])`` per TT
    layer: zero padding, the steps right to left (core ``d-1`` first), the
    bias on the last step, the slice to ``OUT``. Bit-exact with
    :class:`tnquant.export.IntegerModel`.

C names are ``layer_`` plus the op name with every character outside
``[A-Za-z0-9_]`` replaced by ``_``.

Examples
--------
>>> c_name("encoder.0.1")
'layer_encoder_0_1'
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import cast

import numpy as np

from tnquant.export.graph import Op
from tnquant.specs import FixedPoint

__all__ = ["c_name", "c_type", "write_headers", "TT_KERNEL"]

TT_KERNEL = r"""#ifndef TNQUANT_TT_LINEAR_H_
#define TNQUANT_TT_LINEAR_H_

// One step of a TT-matrix (MPO) contraction, written by tnquant.export.
//
// A TT layer with cores G_k of shape (R_{k-1}, O_k, I_k, R_k) is contracted
// right to left. Before step k the state is (P, I_k * R_k, Q) row-major with
// P = I_0 * .. * I_{k-1} and Q = O_{k+1} * .. * O_{d-1}; the core, read as a
// row-major (M = R_{k-1} * O_k, N = I_k * R_k) matrix, turns it into
// (P, M, Q), which is the next step's (P', I_{k-1} * R_{k-1}, Q') with no
// transposition. Every output element is computed as hls4ml's dense_latency
// kernel does: each product cast to accum_T, the accumulator started from
// the bias (cast to accum_T; zero without bias), the products added in
// ascending j (accum_T overflow after every add), the sum cast to res_T.

namespace tnquant {

template <class data_T, class core_T, class accum_T, class res_T, int P, int M, int N, int Q>
void tt_step(const data_T x[P * N * Q], const core_T core[M * N], res_T y[P * M * Q]) {
TTRows:
    for (int p = 0; p < P; p++) {
    TTOut:
        for (int m = 0; m < M; m++) {
        TTCols:
            for (int q = 0; q < Q; q++) {
                accum_T acc = 0;
            TTSum:
                for (int j = 0; j < N; j++) {
                    accum_T prod = x[(p * N + j) * Q + q] * core[m * N + j];
                    acc += prod;
                }
                y[(p * M + m) * Q + q] = (res_T)acc;
            }
        }
    }
}

template <class data_T, class core_T, class bias_T, class accum_T, class res_T, int P, int M,
          int N, int Q>
void tt_step_bias(const data_T x[P * N * Q], const core_T core[M * N], const bias_T bias[M * Q],
                  res_T y[P * M * Q]) {
TTRows:
    for (int p = 0; p < P; p++) {
    TTOut:
        for (int m = 0; m < M; m++) {
        TTCols:
            for (int q = 0; q < Q; q++) {
                accum_T acc = (accum_T)bias[m * Q + q];
            TTSum:
                for (int j = 0; j < N; j++) {
                    accum_T prod = x[(p * N + j) * Q + q] * core[m * N + j];
                    acc += prod;
                }
                y[(p * M + m) * Q + q] = (res_T)acc;
            }
        }
    }
}

} // namespace tnquant

#endif
"""


def c_name(name: str) -> str:
    """The C identifier of an op.

    Examples
    --------
    >>> c_name("0.1")
    'layer_0_1'
    """
    return "layer_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def c_type(t: FixedPoint) -> str:
    """The C++ spelling of a type (``AP_``-prefixed modes, as ``ap_fixed.h`` declares them).

    Examples
    --------
    >>> c_type(FixedPoint(8, 3, rounding="RND", overflow="SAT"))
    'ap_fixed<8,3,AP_RND,AP_SAT>'
    """
    name = "ap_fixed" if t.signed else "ap_ufixed"
    args = [str(t.width), str(t.integer)]
    if t.rounding != "TRN" or t.overflow != "WRAP":
        args += [f"AP_{t.rounding}", f"AP_{t.overflow}"]
    return f"{name}<{','.join(args)}>"


def _literal(m: int, t: FixedPoint) -> str:
    value = float(np.ldexp(float(m), -t.frac))
    if abs(m) >= 1 << 53:
        raise ValueError(f"mantissa {m} of {t} is not exact as a double literal")
    return repr(value)


def _array(ctype: str, name: str, values: np.ndarray, fmt: object) -> str:
    items = [fmt(int(v)) for v in values.reshape(-1)]  # type: ignore[operator]
    body = ",\n    ".join(", ".join(items[i : i + 8]) for i in range(0, len(items), 8))
    return f"const {ctype} {name}[{len(items)}] = {{\n    {body}\n}};\n"


def _typedefs(op: Op) -> list[tuple[str, FixedPoint]]:
    c = c_name(op.name)
    out = [(f"{c}_input_t", op.input_type)]
    out += [(f"{c}_w{k}_t", t) for k, t in enumerate(op.weight_types)]
    if op.bias_type is not None:
        out.append((f"{c}_bias_t", op.bias_type))
    out += [(f"{c}_accum{s}_t", t) for s, t in enumerate(op.accum_types)]
    out += [(f"{c}_res{s}_t", t) for s, t in enumerate(op.step_types)]
    return out


def _arrays(op: Op) -> list[tuple[str, np.ndarray, FixedPoint]]:
    c = c_name(op.name)
    out = [
        (f"{c}_w{k}", w, t)
        for k, (w, t) in enumerate(zip(op.weights, op.weight_types, strict=True))
    ]
    if op.bias is not None and op.bias_type is not None:
        out.append((f"{c}_bias", op.bias, op.bias_type))
    return out


def _fixed_header(ops: list[Op]) -> str:
    lines = [
        "#ifndef TNQUANT_WEIGHTS_H_",
        "#define TNQUANT_WEIGHTS_H_",
        "",
        "// Weights of a tnquant fixed-point export (see manifest.json).",
        '#include "ap_fixed.h"',
        "",
    ]
    for op in ops:
        lines.append(f"// op {op.name!r} ({op.kind}): {op.in_features} -> {op.out_features}")
        lines += [f"typedef {c_type(t)} {n};" for n, t in _typedefs(op)]
        for name, arr, t in _arrays(op):
            lines.append(f"// shape {list(arr.shape)}")
            lines.append(_array(f"{name}_t", name, arr, lambda m, t=t: _literal(m, t)))
    lines += ["#endif", ""]
    return "\n".join(lines)


def _int_header(ops: list[Op]) -> str:
    lines = [
        "#ifndef TNQUANT_WEIGHTS_INT_H_",
        "#define TNQUANT_WEIGHTS_INT_H_",
        "",
        "// Integer mantissas of a tnquant fixed-point export: value = m * 2^-FRAC.",
        "#include <stdint.h>",
        "",
    ]
    for op in ops:
        for name, arr, t in _arrays(op):
            ctype = "int32_t" if t.width <= 32 else "int64_t"
            suffix = "" if t.width <= 32 else "LL"
            lines.append(f"// {t}, shape {list(arr.shape)}")
            lines.append(f"#define {name.upper()}_FRAC {t.frac}")
            lines.append(_array(ctype, f"{name}_int", arr, lambda m, s=suffix: f"{m}{s}"))
    lines += ["#endif", ""]
    return "\n".join(lines)


def _tt_function(op: Op) -> str:
    c = c_name(op.name)
    cores = op.weights
    d = len(cores)
    in_shape = [w.shape[2] for w in cores]
    in_pad, out_pad = math.prod(in_shape), math.prod(w.shape[1] for w in cores)
    out_t = f"{c}_res{d - 1}_t"
    lines = [
        f"// TT layer {op.name!r}: cores {[list(w.shape) for w in cores]}, right to left",
        f"inline void {c}(const {c}_input_t x[{op.in_features}], {out_t} y[{op.out_features}]) {{",
        f"    {c}_input_t s_in[{in_pad}];",
        f"    for (int i = 0; i < {in_pad}; i++) s_in[i] = i < {op.in_features} ? x[i] : "
        f"({c}_input_t)0;",
    ]
    if op.bias is not None:
        bias = np.zeros(out_pad, dtype=np.int64)
        bias[: op.bias.shape[0]] = op.bias
        bt = cast(FixedPoint, op.bias_type)
        lines.append(
            "    static "
            + _array(f"{c}_bias_t", "bias_pad", bias, lambda m: _literal(m, bt)).rstrip()
        )
    prev, q = "s_in", 1
    for s in range(d):
        k = d - 1 - s
        r0, o, i, r1 = cores[k].shape
        p = math.prod(in_shape[:k])
        buf = f"s{s}"
        prev_t = f"{c}_input_t" if s == 0 else f"{c}_res{s - 1}_t"
        lines.append(f"    {c}_res{s}_t {buf}[{p * r0 * o * q}];")
        targs = f"{prev_t}, {c}_w{k}_t, "
        if s == d - 1 and op.bias is not None:
            targs += f"{c}_bias_t, "
        targs += f"{c}_accum{s}_t, {c}_res{s}_t, {p}, {r0 * o}, {i * r1}, {q}"
        if s == d - 1 and op.bias is not None:
            lines.append(f"    tnquant::tt_step_bias<{targs}>({prev}, {c}_w{k}, bias_pad, {buf});")
        else:
            lines.append(f"    tnquant::tt_step<{targs}>({prev}, {c}_w{k}, {buf});")
        prev, q = buf, o * q
    lines += [f"    for (int i = 0; i < {op.out_features}; i++) y[i] = {prev}[i];", "}", ""]
    return "\n".join(lines)


def write_headers(ops: list[Op], out_dir: str | Path) -> list[Path]:
    """Write the headers described in the module docs; return their paths.

    Examples
    --------
    >>> import tempfile
    >>> from tnquant.export.graph import Op
    >>> t = FixedPoint(4, 2)
    >>> op = Op("0", "dense", "0", 2, 1, t, t, weights=[np.array([[1, -2]])],
    ...         weight_types=[t], accum_types=[t], step_types=[t])
    >>> [p.name for p in write_headers([op], tempfile.mkdtemp())]
    ['tnquant_weights.h', 'tnquant_weights_int.h', 'tt_linear.h']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "tnquant_weights.h": _fixed_header(ops),
        "tnquant_weights_int.h": _int_header(ops),
        "tt_linear.h": TT_KERNEL,
    }
    tts = [op for op in ops if op.kind == "tt"]
    if tts:
        body = [
            "#ifndef TNQUANT_TT_LAYERS_H_",
            "#define TNQUANT_TT_LAYERS_H_",
            "",
            '#include "tnquant_weights.h"',
            '#include "tt_linear.h"',
            "",
        ]
        body += [_tt_function(op) for op in tts]
        body += ["#endif", ""]
        files["tnquant_tt_layers.h"] = "\n".join(body)
    paths = []
    for name, text in files.items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths
