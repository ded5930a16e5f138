"""QONNX: the fixed-point network as ``Quant`` nodes around float MatMuls.

:func:`qonnx` writes the IR of :func:`tnquant.export.graph.build_graph` (the
same ops, types and integer codes as :func:`tnquant.export.fixed_point`) in
the QONNX dialect that Brevitas writes and hls4ml and FINN read: every
``ap_fixed<W,I,Q,O>`` cast becomes a ``Quant`` node (domain
``qonnx.custom_op.general``) with ``scale = 2^-F`` (``F = W - I``), zero
point 0, ``bitwidth = W``, ``signed``, ``narrow`` and ``rounding_mode``;
weights and cores are float initialisers (their exact values) behind a
``Quant`` node of their type; a dense op is ``MatMul`` (+ ``Add`` of the
bias) then the ``Quant`` of its result; a TT op is its chain of
``Reshape``/``MatMul`` steps, core by core, as the emulator contracts it
(:mod:`tnquant.export.emulator`); ReLU is ``Relu``; a clip (``ReLU6``,
``Hardtanh``) is ``Clip`` with its bounds as scalar initialisers; a
LeakyReLU is ``LeakyRelu`` with the exported ``alpha`` (then the ``Quant``
of its result type; its products ``alpha * x`` must fit float32 too);
elementwise ops that keep their input type add no ``Quant``. Tensors are
float32, as QONNX's ``Quant`` executes, so every type (accumulators
included) must fit float32's 24-bit mantissa: a wider one is refused with
the ``result=`` that narrows it.

What corresponds
----------------
QONNX's ``Quant`` clips, then rounds; ``ap_fixed`` rounds, then saturates:
the same integers for integer bounds. Rounding: ``TRN`` -> ``FLOOR``,
``TRN_ZERO`` -> ``DOWN``, ``RND_CONV`` -> ``ROUND`` (ties to even),
``RND_INF`` -> ``HALF_UP``, ``RND_ZERO`` -> ``HALF_DOWN``; ``RND`` (ties to
+inf) is an ``Add`` of half an LSB then ``FLOOR``, ``RND_MIN_INF`` a ``Sub``
then ``CEIL``. Overflow: ``SAT`` -> ``narrow=0``, ``SAT_SYM`` -> ``narrow=1``
(signed). ``Quant`` cannot wrap or zero on overflow, and a MatMul cannot
round or saturate every product as hls4ml's accumulator does, so the export
refuses, naming the op and the tensor:

- a ``WRAP`` or ``SAT_ZERO`` type that can overflow (any type you gave; the
  derived ones cannot overflow and are written as saturating);
- an accumulator you narrowed below the lossless one (``accum=``).

Everything else matches :meth:`IntegerModel.predict` bit for bit under
``qonnx.core.onnx_exec.execute_onnx`` (see ``tests/export/test_qonnx.py``).

Examples
--------
>>> import tempfile, pathlib, torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
>>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
>>> path = qonnx(model, pathlib.Path(tempfile.mkdtemp()) / "m.onnx",
...              FixedPoint(8, 3, overflow="SAT"))
>>> path.suffix
'.onnx'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tnquant.export.codes import lossless_accum
from tnquant.export.graph import Op, TypeOverride, build_graph
from tnquant.export.ir import SPATIAL
from tnquant.specs import FixedPoint

__all__ = ["qonnx", "QONNX_DOMAIN", "ROUNDING"]

QONNX_DOMAIN = "qonnx.custom_op.general"
#: ap_fixed rounding -> (QONNX rounding_mode, offset in LSBs added before it)
ROUNDING = {
    "TRN": ("FLOOR", 0.0),
    "TRN_ZERO": ("DOWN", 0.0),
    "RND_CONV": ("ROUND", 0.0),
    "RND_INF": ("HALF_UP", 0.0),
    "RND_ZERO": ("HALF_DOWN", 0.0),
    "RND": ("FLOOR", 0.5),
    "RND_MIN_INF": ("CEIL", -0.5),
}
_OPSET = 13
_MAX_EXACT = 24  # float32's mantissa: QONNX's Quant executes in float32


class _Graph:
    """The nodes and initialisers being written (names unique by counter), with every
    tensor's static shape (QONNX's tools need them, and infer float32 without them)."""

    def __init__(self, batch: int, features: int) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.shapes: dict[str, tuple[int, ...]] = {"global_in": (batch, features)}
        self.values: dict[str, np.ndarray] = {}
        self.fix = "give a narrower input_spec"  # how to narrow what the next op reads
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, value: Any) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        arr = np.asarray(value)
        arr = arr.astype(np.int64 if arr.dtype.kind in "iu" else np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.shapes[name], self.values[name] = arr.shape, arr
        return name

    def _shape(self, op: str, inputs: list[str]) -> tuple[int, ...]:
        a = self.shapes[inputs[0]]
        if op in ("Quant", "Relu", "Clip", "LeakyRelu"):
            return a
        if op == "Add":
            return tuple(np.broadcast_shapes(a, self.shapes[inputs[1]]))
        if op == "MatMul":
            b = self.shapes[inputs[1]]
            return (*np.broadcast_shapes(a[:-2], b[:-2]), a[-2], b[-1])
        if op == "Reshape":
            target = [int(v) for v in self.values[inputs[1]]]
            known = math.prod(v for v in target if v != -1)
            return tuple(math.prod(a) // known if v == -1 else v for v in target)
        if op == "Pad":
            pads = self.values[inputs[1]]
            return tuple(int(d + pads[k] + pads[k + len(a)]) for k, d in enumerate(a))
        if op == "Slice":
            return (a[0], int(self.values[inputs[2]][0]) - int(self.values[inputs[1]][0]))
        raise AssertionError(op)

    def node(self, op: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(stem)
        domain = QONNX_DOMAIN if op == "Quant" else ""
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        self.shapes[out] = self._shape(op, inputs)
        return out

    def rename(self, old: str, new: str) -> None:
        """Name the tensor ``old`` ``new`` (the graph output: no Identity, which cleanups drop)."""
        for node in self.nodes:
            for io in (node.input, node.output):
                for k, name in enumerate(io):
                    if name == old:
                        io[k] = new
        self.shapes[new] = self.shapes[old]

    def value_info(self) -> list[Any]:
        from onnx import TensorProto, helper

        made = [n.output[0] for n in self.nodes]
        return [helper.make_tensor_value_info(t, TensorProto.FLOAT, self.shapes[t]) for t in made]

    def quant(self, x: str, t: FixedPoint, stem: str, *, derived: bool, what: str) -> str:
        """``x`` cast to ``t`` (a ``Quant`` node, after an offset for ``RND``/``RND_MIN_INF``)."""
        if t.width > _MAX_EXACT:
            raise ValueError(
                f"{what}: {t} needs {t.width} bits, more than float32's {_MAX_EXACT}-bit "
                f"mantissa (QONNX's Quant executes in float32, so every value and sum must "
                f"fit it to stay exact); {self.fix}"
            )
        if not derived and t.overflow in ("WRAP", "SAT_ZERO"):
            raise ValueError(
                f"{what}: {t} has overflow={t.overflow!r}, which QONNX's Quant cannot "
                f"express (it saturates); give this type overflow='SAT' or 'SAT_SYM'"
            )
        mode, offset = ROUNDING[t.rounding]
        scale = math.ldexp(1.0, -t.frac)
        if offset:
            x = self.node("Add", [x, self.const(f"{stem}_half", offset * scale)], f"{stem}_rnd")
        narrow = int(t.signed and t.overflow == "SAT_SYM" and not derived)
        return self.node(
            "Quant",
            [x, self.const(f"{stem}_scale", scale), self.const(f"{stem}_zp", 0.0),
             self.const(f"{stem}_bits", float(t.width))],
            stem,
            signed=int(t.signed),
            narrow=narrow,
            rounding_mode=mode,
        )  # fmt: skip

    def weight(self, m: np.ndarray, t: FixedPoint, stem: str) -> str:
        """Integer codes ``m`` of type ``t`` as their float values behind a ``Quant``."""
        values = np.ldexp(m.astype(np.float64), -t.frac)
        return self.quant(self.const(stem, values), t, f"{stem}_q", derived=True, what=stem)


def _derived(flags: list[bool], k: int) -> bool:
    """Whether step ``k``'s type was derived by ``build_graph`` (empty flags: none was)."""
    return bool(flags[k]) if k < len(flags) else False


def _check_accum(g: _Graph, op: Op, k: int, in_t: FixedPoint, w_t: FixedPoint, n: int) -> None:
    """Refuse an accumulator QONNX cannot sum exactly: narrower than the lossless one
    (hls4ml casts every product to it), or wider than float32's mantissa."""
    acc = op.accum_types[k]
    if acc.width > _MAX_EXACT:
        raise ValueError(
            f"op {op.name!r} step {k}: its accumulator {acc} needs {acc.width} bits, more "
            f"than float32's {_MAX_EXACT}-bit mantissa (QONNX executes in float32, so the "
            f"MatMul's sums must fit it to stay exact); {g.fix}"
        )
    if _derived(op.accum_derived, k):
        return
    last = k == len(op.accum_types) - 1
    bias_t = op.bias_type if last and op.bias is not None else None
    need = lossless_accum(in_t, w_t, n, bias_t)
    if acc.frac < need.frac or acc.integer < need.integer:
        raise ValueError(
            f"op {op.name!r} step {k}: accum type {acc} (given with accum=) is narrower than "
            f"the lossless {need}; hls4ml rounds and saturates every product and sum in it, "
            f"which a QONNX MatMul cannot express; leave accum= unset for this op to write "
            f"QONNX"
        )


def _dense(g: _Graph, op: Op, x: str) -> str:
    w, w_t = op.weights[0], op.weight_types[0]
    _check_accum(g, op, 0, op.input_type, w_t, w.shape[1])
    wt = g.weight(w.T, w_t, f"{op.name}.w0")
    y = g.node("MatMul", [x, wt], f"{op.name}.matmul")
    if op.bias is not None and op.bias_type is not None:
        y = g.node("Add", [y, g.weight(op.bias, op.bias_type, f"{op.name}.bias")], f"{op.name}.add")
    derived = _derived(op.result_derived, 0)
    return g.quant(y, op.result_type, f"{op.name}.result", derived=derived, what=f"op {op.name!r}")


def _tt(g: _Graph, op: Op, x: str) -> str:
    cores = op.weights
    in_shape = [c.shape[2] for c in cores]
    out_pad = math.prod(c.shape[1] for c in cores)
    pad = math.prod(in_shape) - op.in_features
    if pad:
        x = g.node("Pad", [x, g.const(f"{op.name}.pads", [0, 0, 0, pad])], f"{op.name}.pad")
    cur, q, d = op.input_type, 1, len(cores)
    for s in range(d):
        k = d - 1 - s
        r0, o, i, r1 = cores[k].shape
        p = math.prod(in_shape[:k])
        _check_accum(g, op, s, cur, op.weight_types[k], i * r1)
        xs = g.node("Reshape", [x, g.const(f"{op.name}.shape{s}", [-1, p, i * r1, q])], "reshape")
        w = g.weight(cores[k].reshape(r0 * o, i * r1), op.weight_types[k], f"{op.name}.w{k}")
        x = g.node("MatMul", [w, xs], f"{op.name}.step{s}")
        if s == d - 1 and op.bias is not None and op.bias_type is not None:
            bias = np.zeros(out_pad, dtype=np.int64)
            bias[: op.bias.shape[0]] = op.bias
            b = g.weight(bias.reshape(o, q), op.bias_type, f"{op.name}.bias")
            x = g.node("Add", [x, b], f"{op.name}.add")
        derived = _derived(op.result_derived, s)
        x = g.quant(x, op.step_types[s], f"{op.name}.step{s}_q", derived=derived,
                    what=f"op {op.name!r} step {s}")  # fmt: skip
        cur, q = op.step_types[s], o * q
    flat = g.node("Reshape", [x, g.const(f"{op.name}.flat", [-1, out_pad])], "reshape")
    if out_pad == op.out_features:
        return flat
    starts, ends = g.const("starts", [0]), g.const("ends", [op.out_features])
    return g.node("Slice", [flat, starts, ends, g.const("axes", [1])], f"{op.name}.slice")


def _relu(g: _Graph, op: Op, x: str) -> str:
    y = g.node("Relu", [x], f"{op.name}.relu")
    if op.result_type == op.input_type:
        return y
    return g.quant(y, op.result_type, f"{op.name}.result", derived=False, what=f"op {op.name!r}")


def _clip(g: _Graph, op: Op, x: str) -> str:
    t = op.input_type
    lo, hi = (g.const(f"{op.name}.{b}", np.float32(np.ldexp(float(m), -t.frac)))
              for b, m in zip(("lo", "hi"), op.weights[0], strict=True))  # fmt: skip
    y = g.node("Clip", [x, lo, hi], f"{op.name}.clip")
    if op.result_type == op.input_type:
        return y
    return g.quant(y, op.result_type, f"{op.name}.result", derived=False, what=f"op {op.name!r}")


def _leaky(g: _Graph, op: Op, x: str) -> str:
    x_t, a_t = op.input_type, op.weight_types[0]
    if x_t.width + a_t.width > _MAX_EXACT:
        raise ValueError(
            f"op {op.name!r}: its products alpha * x need {x_t.width + a_t.width} bits (its "
            f"input {x_t} times alpha {a_t}), more than float32's {_MAX_EXACT}-bit mantissa "
            f"(QONNX's LeakyRelu executes in float32); {g.fix}"
        )
    if op.weights[0].size > 1:
        raise ValueError(
            f"op {op.name!r}: a PReLU (one alpha per feature) has no QONNX form yet; "
            f"to_hls4ml and the C++ project take it"
        )
    alpha = float(np.ldexp(float(op.weights[0][0]), -a_t.frac))  # exact in float32
    y = g.node("LeakyRelu", [x], f"{op.name}.leaky", alpha=alpha)
    derived = _derived(op.result_derived, 0)
    return g.quant(y, op.result_type, f"{op.name}.result", derived=derived, what=f"op {op.name!r}")


_WRITERS = {"dense": _dense, "tt": _tt, "relu": _relu, "clip": _clip, "leaky_relu": _leaky}


def qonnx(
    model: nn.Module,
    path: str | Path,
    input_spec: FixedPoint | None = None,
    *,
    accum: TypeOverride = None,
    result: TypeOverride = None,
    bias: TypeOverride = None,
    batch_size: int = 1,
    input_shape: tuple[int, ...] | None = None,
) -> Path:
    """Write the fixed-point ``model`` as a QONNX file; returns the path.

    Parameters
    ----------
    model, input_spec, accum, result, bias, input_shape
        As :func:`tnquant.export.fixed_point` (the same types are derived;
        convolutions and pooling are refused: no QONNX form for them yet).
    path
        The ``.onnx`` file to write (its folder is created).
    batch_size
        The batch dimension of the input and output (QONNX's tools,
        ``execute_onnx`` and hls4ml's reader, need static shapes; 1, as
        Brevitas writes, by default).

    Returns
    -------
    Path
        ``path``. ``qonnx.core.onnx_exec.execute_onnx`` on it gives, bit for
        bit, :meth:`IntegerModel.predict` (input ``'global_in'``, float32,
        ``(batch, in_features)``; output ``'global_out'``).

    Raises
    ------
    ValueError
        For a type QONNX cannot express (see the module docs), naming the
        op and the tensor, or whatever :func:`fixed_point` refuses.
    """
    import onnx
    from onnx import TensorProto, helper

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ops = build_graph(
        model, input_spec, accum=accum, result=result, bias=bias, input_shape=input_shape
    )
    if not ops:
        raise ValueError("the model has no ops to export")
    for op in ops:
        if op.inputs:
            raise ValueError(
                f"op {op.name!r} ({op.kind}) reads {list(op.inputs)}: graphs (residual adds, "
                f"concatenations) have no QONNX form yet; to_hls4ml takes them, bit-exact "
                f"with the emulator"
            )
        if op.kind == "batchnorm":
            raise ValueError(
                f"op {op.name!r} (an unfolded BatchNorm) has no QONNX form yet; fold it "
                f"(tnquant.ptq.fold_batchnorm) or export with to_hls4ml"
            )
        if op.kind in SPATIAL:
            raise ValueError(
                f"op {op.name!r} ({op.kind}) has no QONNX form yet (convolutions and pooling "
                f"go to the emulator and to_hls4ml)"
            )
    g = _Graph(batch_size, ops[0].in_features)
    x = g.quant("global_in", ops[0].input_type, "input_q", derived=False, what="the input")
    for op in ops:
        if op.kind not in _WRITERS:
            raise ValueError(
                f"op {op.name!r} ({op.kind}) has no QONNX form (QONNX has no lookup-table "
                f"activation); to_hls4ml takes it, bit-exact with the emulator"
            )
        x = _WRITERS[op.kind](g, op, x)
        if op.kind not in ("relu", "clip"):  # they keep the type they read
            i = max(1, op.result_type.integer)
            g.fix = (
                f"narrow what it reads with result={{'{op.name}': FixedPoint(16, {i}, "
                f"rounding='RND', overflow='SAT')}} (the op before)"
            )
    g.rename(x, "global_out")
    info = [v for v in g.value_info() if v.name != "global_out"]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes,
        "tnquant_qonnx",
        [helper.make_tensor_value_info("global_in", f32, [batch_size, ops[0].in_features])],
        [helper.make_tensor_value_info("global_out", f32, [batch_size, ops[-1].out_features])],
        g.inits,
        value_info=info,
    )
    proto = helper.make_model(
        graph,
        producer_name="tnquant",
        opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid(QONNX_DOMAIN, 1)],
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return out
