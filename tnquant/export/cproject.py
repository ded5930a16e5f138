"""A complete HLS C++ project of the exported network, with a C testbench.

:func:`write_project` turns an :class:`~tnquant.export.emulator.IntegerModel`
(what :func:`tnquant.export.fixed_point` returns) into a project that g++
compiles and an HLS tool (Vitis HLS, Vivado HLS) synthesises, every layer
kind included, TT layers too (which hls4ml cannot take)::

    <out_dir>/
      firmware/tnquant_weights.h     types and weights (tnquant.export.cheaders)
      firmware/tt_linear.h           the contraction kernel (hls4ml's dense arithmetic)
      firmware/tnquant_tt_layers.h   one function per TT layer (with TT layers)
      firmware/tnquant_layers.h      one function per dense and elementwise op
      firmware/tnquant_top.h, .cpp   tnquant_top(x, y): the whole network, HLS pragmas
      firmware/ap_types/             Xilinx's ap_fixed headers (copied from hls4ml)
      tb/tnquant_tb.cpp              reads tb_data/tb_input_features.dat, writes
                                     tb_data/csim_results.log
      tb_data/                       the emulator's vectors, with ``inputs``
      build.sh                       the g++ command

A dense op is :func:`tnquant::tt_step_bias` with ``P = Q = 1`` (one
contraction step: products cast to ``accum_t``, the accumulator started
from the bias, added in ascending order, cast to the result type); a ReLU is
``y = x > 0 ? x : 0`` cast to its result type, as hls4ml's; a clip compares
with its bounds ``<op>_w0[0]``, ``<op>_w0[1]`` (of the input type) and
casts; a LeakyReLU is hls4ml's ``x > 0 ? x : alpha * x`` with ``alpha =
<op>_w0[0]`` of its own type (the product exact), cast. The testbench
reads the inputs as decimal doubles (``repr``: exact) into ``input_t``,
whose ``double`` constructor is what :meth:`IntegerModel.quantize_input`
follows, and prints the outputs as exact doubles, so :func:`run_project`'s
result equals :meth:`IntegerModel.predict` bit for bit.

Examples
--------
>>> import tempfile, pathlib, torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> from tnquant.export import fixed_point
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
>>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
>>> em = fixed_point(model, tempfile.mkdtemp(), FixedPoint(8, 3), hls4ml=False)
>>> out = write_project(em, pathlib.Path(tempfile.mkdtemp()) / "proj")
>>> sorted(p.name for p in (out / "firmware").glob("tnquant_*.*"))  # doctest: +NORMALIZE_WHITESPACE
['tnquant_layers.h', 'tnquant_top.cpp', 'tnquant_top.h', 'tnquant_weights.h',
 'tnquant_weights_int.h']
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from tnquant.export.cheaders import c_name, c_type, write_headers
from tnquant.export.ir import ELEMENTWISE, SPATIAL, Op
from tnquant.export.table_ops import TABLES

__all__ = ["write_project", "run_project", "ap_types_dir"]

_TB = r"""// C testbench of a tnquant export: one sample per line in, one per line out.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "../firmware/tnquant_top.h"

int main(int argc, char **argv) {
    const char *in_path = argc > 1 ? argv[1] : "tb_data/tb_input_features.dat";
    const char *out_path = argc > 2 ? argv[2] : "tb_data/csim_results.log";
    std::ifstream fin(in_path);
    if (!fin.is_open()) {
        std::cerr << "cannot open " << in_path << std::endl;
        return 1;
    }
    FILE *fout = std::fopen(out_path, "w");
    std::string line;
    int n = 0;
    while (std::getline(fin, line)) {
        std::istringstream row(line);
        input_t x[TNQUANT_N_IN];
        output_t y[TNQUANT_N_OUT];
        for (int i = 0; i < TNQUANT_N_IN; i++) {
            double v;
            row >> v;
            x[i] = (input_t)v;
        }
        tnquant_top(x, y);
        for (int i = 0; i < TNQUANT_N_OUT; i++)
            std::fprintf(fout, i ? " %.17g" : "%.17g", y[i].to_double());
        std::fprintf(fout, "\n");
        n++;
    }
    std::fclose(fout);
    std::printf("%d samples\n", n);
    return 0;
}
"""


def ap_types_dir() -> Path | None:
    """The ``ap_types`` headers hls4ml ships (``None`` without hls4ml).

    Examples
    --------
    >>> ap_types_dir() is None or (ap_types_dir() / "ap_fixed.h").is_file()
    True
    """
    try:
        import hls4ml
    except ImportError:
        return None
    path = Path(hls4ml.__file__).parent / "templates" / "vivado" / "ap_types"
    return path if (path / "ap_fixed.h").is_file() else None


def _per_feature(op: Op) -> bool:
    """A PReLU's ``leaky_relu``: one alpha per feature."""
    return op.kind == "leaky_relu" and op.weights[0].size > 1


def _out_t(op: Op) -> str:
    return f"{c_name(op.name)}_out_t"


#: elementwise op kind -> (comment, loop body); the bounds and alpha are ``<op>_w0``
_ELEMENTWISE = {
    "relu": (
        "ReLU {name}: y = x > 0 ? x : 0",
        ["        y[i] = x[i] > 0 ? ({out})x[i] : ({out})0;"],
    ),
    "clip": (
        "clip {name}: y = min(max(x, lo), hi), lo and hi of the input type",
        [
            "        {c}_input_t v = x[i] < {c}_w0[0] ? ({c}_input_t){c}_w0[0] : x[i];",
            "        y[i] = ({out})(v > {c}_w0[1] ? ({c}_input_t){c}_w0[1] : v);",
        ],
    ),
    "leaky_relu": (
        "LeakyReLU {name}: y = x > 0 ? x : alpha * x (nnet::leaky_relu), the product exact",
        ["        y[i] = x[i] > 0 ? ({out})x[i] : ({out})({c}_w0[{a}] * x[i]);"],
    ),
}


def _layer(op: Op) -> str:
    c = c_name(op.name)
    sig = (
        f"inline void {c}(const {c}_input_t x[{op.in_features}], {_out_t(op)} y[{op.out_features}])"
    )
    if op.kind in ELEMENTWISE:
        head, body = _ELEMENTWISE[op.kind]
        return "\n".join(
            [
                f"// {head.format(name=repr(op.name))}, cast to {op.result_type}",
                sig + " {",
                "#pragma HLS INLINE",
                f"    for (int i = 0; i < {op.in_features}; i++) {{",
                "#pragma HLS UNROLL",
                *(
                    line.format(out=_out_t(op), c=c, a="i" if _per_feature(op) else "0")
                    for line in body
                ),
                "    }",
                "}",
                "",
            ]
        )
    targs = f"{c}_input_t, {c}_w0_t, "
    if op.bias is not None:
        targs += f"{c}_bias_t, "
    targs += f"{c}_accum0_t, {c}_res0_t, 1, {op.out_features}, {op.in_features}, 1"
    call = (
        f"tnquant::tt_step_bias<{targs}>(x, {c}_w0, {c}_bias, y);"
        if op.bias is not None
        else f"tnquant::tt_step<{targs}>(x, {c}_w0, y);"
    )
    return "\n".join(
        [
            f"// dense {op.name!r}: {op.in_features} -> {op.out_features}",
            sig + " {",
            "#pragma HLS INLINE",
            f"    {call}",
            "}",
            "",
        ]
    )


def _layers_header(ops: list[Op]) -> str:
    lines = [
        "#ifndef TNQUANT_LAYERS_H_",
        "#define TNQUANT_LAYERS_H_",
        "",
        '#include "tnquant_weights.h"',
        '#include "tt_linear.h"',
        "",
    ]
    for op in ops:
        c = c_name(op.name)
        if op.kind in ELEMENTWISE:
            lines.append(f"typedef {c_type(op.input_type)} {c}_input_t;")
        lines.append(f"typedef {c_type(op.result_type)} {_out_t(op)};")
    lines.append("")
    lines += [_layer(op) for op in ops if op.kind != "tt"]
    lines += ["#endif", ""]
    return "\n".join(lines)


def _top(ops: list[Op], has_tt: bool) -> tuple[str, str]:
    first, last = ops[0], ops[-1]
    header = "\n".join(
        [
            "#ifndef TNQUANT_TOP_H_",
            "#define TNQUANT_TOP_H_",
            "",
            '#include "ap_fixed.h"',
            '#include "tnquant_layers.h"',
            *(['#include "tnquant_tt_layers.h"'] if has_tt else []),
            "",
            f"#define TNQUANT_N_IN {first.in_features}",
            f"#define TNQUANT_N_OUT {last.out_features}",
            f"typedef {c_name(first.name)}_input_t input_t;",
            f"typedef {_out_t(last)} output_t;",
            "",
            "void tnquant_top(const input_t x[TNQUANT_N_IN], output_t y[TNQUANT_N_OUT]);",
            "",
            "#endif",
            "",
        ]
    )
    body = [
        '#include "tnquant_top.h"',
        "",
        "// The whole network: every op in order, fully partitioned, one pipeline.",
        "void tnquant_top(const input_t x[TNQUANT_N_IN], output_t y[TNQUANT_N_OUT]) {",
        "#pragma HLS ARRAY_PARTITION variable=x complete",
        "#pragma HLS ARRAY_PARTITION variable=y complete",
        "#pragma HLS PIPELINE II=1",
    ]
    prev = "x"
    for k, op in enumerate(ops):
        c = c_name(op.name)
        out = "y" if k == len(ops) - 1 else f"t{k}"
        if out != "y":
            out_t = f"{c}_res{len(op.step_types) - 1}_t" if op.kind == "tt" else _out_t(op)
            body += [
                f"    {out_t} {out}[{op.out_features}];",
                f"#pragma HLS ARRAY_PARTITION variable={out} complete",
            ]
        body.append(f"    {c}({prev}, {out});")
        prev = out
    body += ["}", ""]
    return header, "\n".join(body)


def _check_chain(ops: list[Op]) -> None:
    for a, b in zip(ops, ops[1:], strict=False):
        if a.result_type != b.input_type or a.out_features != b.in_features:
            raise ValueError(
                f"op {b.name!r} reads {b.input_type} x {b.in_features} but op {a.name!r} "
                f"gives {a.result_type} x {a.out_features}; not a chain the project can wire"
            )


def write_project(
    integer_model: Any, out_dir: str | Path, inputs: np.ndarray | None = None
) -> Path:
    """Write the project described in the module docs; returns ``out_dir``.

    Parameters
    ----------
    integer_model
        An :class:`~tnquant.export.emulator.IntegerModel`.
    out_dir
        The project folder (created; files of an earlier project are overwritten).
    inputs
        Optional float inputs ``(n, in_features)``: written to
        ``tb_data/tb_input_features.dat`` with the emulator's outputs in
        ``tb_data/tb_output_predictions.dat``.
    """
    ops: list[Op] = list(integer_model.ops)
    if not ops:
        raise ValueError("the integer model has no ops")
    for op in ops:
        if op.inputs:
            raise ValueError(
                f"op {op.name!r} ({op.kind}) reads {list(op.inputs)}: graphs (residual adds, "
                f"concatenations) are not in the C++ project yet; to_hls4ml takes them, "
                f"bit-exact with the emulator"
            )
    _check_chain(ops)
    for op in ops:
        if op.kind == "batchnorm":
            raise ValueError(
                f"op {op.name!r} (an unfolded BatchNorm) is not in the C++ project yet; fold "
                f"it (tnquant.ptq.fold_batchnorm) or export with to_hls4ml"
            )
        if op.kind in SPATIAL:
            raise ValueError(
                f"op {op.name!r} ({op.kind}) is not in the C++ project yet (convolutions and "
                f"pooling go to the emulator and to_hls4ml)"
            )
        if op.kind in TABLES:
            raise ValueError(
                f"op {op.name!r} ({op.kind}: a lookup table) is not in the C++ project yet; "
                f"export the network with to_hls4ml (hls4ml builds the same tables, bit-exact "
                f"with the emulator)"
            )
    out = Path(out_dir)
    fw, tb, data = out / "firmware", out / "tb", out / "tb_data"
    for d in (fw, tb, data):
        d.mkdir(parents=True, exist_ok=True)
    write_headers(ops, fw)
    (fw / "tnquant_layers.h").write_text(_layers_header(ops))
    header, body = _top(ops, any(op.kind == "tt" for op in ops))
    (fw / "tnquant_top.h").write_text(header)
    (fw / "tnquant_top.cpp").write_text(body)
    (tb / "tnquant_tb.cpp").write_text(_TB)
    ap = ap_types_dir()
    if ap is not None:
        shutil.copytree(ap, fw / "ap_types", dirs_exist_ok=True)
    (out / "build.sh").write_text(
        "#!/bin/sh\n# g++ C simulation of the tnquant project (C++14, ap_types headers)\n"
        'cd "$(dirname "$0")" && g++ -O1 -std=c++14 -Ifirmware -Ifirmware/ap_types '
        "tb/tnquant_tb.cpp firmware/tnquant_top.cpp -o tnquant_csim\n"
    )
    if inputs is not None:
        x = np.asarray(inputs, dtype=np.float64)
        _write_rows(data / "tb_input_features.dat", x)
        _write_rows(data / "tb_output_predictions.dat", integer_model.predict(x))
    return out


def _write_rows(path: Path, rows: np.ndarray) -> None:
    path.write_text("".join(" ".join(repr(float(v)) for v in row) + "\n" for row in rows))


def run_project(project: str | Path, inputs: np.ndarray, timeout: float = 600.0) -> np.ndarray:
    """Build the project with g++ and run its testbench on ``inputs``; the outputs.

    Raises ``RuntimeError`` without g++ or the ``ap_types`` headers, or when the
    build fails (with g++'s message).
    """
    out = Path(project)
    if shutil.which("g++") is None:
        raise RuntimeError("run_project needs g++ on PATH")
    if not (out / "firmware" / "ap_types" / "ap_fixed.h").is_file():
        raise RuntimeError(
            f"{out / 'firmware' / 'ap_types'} has no ap_fixed.h: install hls4ml (its "
            "ap_types are copied) or copy Xilinx's ap_types headers there"
        )
    built = subprocess.run(
        ["sh", str(out / "build.sh")], capture_output=True, text=True, timeout=timeout
    )
    if built.returncode != 0:
        raise RuntimeError(f"g++ failed on {out}:\n{built.stderr[-4000:]}")
    x = np.asarray(inputs, dtype=np.float64)
    _write_rows(out / "tb_data" / "tb_input_features.dat", x)
    ran = subprocess.run(
        ["./tnquant_csim"], cwd=out, capture_output=True, text=True, timeout=timeout
    )
    if ran.returncode != 0:
        raise RuntimeError(f"the testbench failed: {ran.stderr[-2000:]}")
    text = (out / "tb_data" / "csim_results.log").read_text().split("\n")
    return np.array([[float(v) for v in line.split()] for line in text if line.strip()])
