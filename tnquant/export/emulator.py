"""``IntegerModel``: a numpy int64 emulator of the exported fixed-point network.

Every contraction step follows hls4ml's ``nnet::dense_latency`` kernel
(``templates/vivado/nnet_utils/nnet_dense_latency.h``, hls4ml 1.3.0), in
this order, on integer mantissas only:

1. each product ``x_j * w_j`` is exact (``a * w`` in ``nnet_mult.h``
   ``product::mult`` returns the full-width ``ap_fixed`` product) and is
   cast to ``accum_t`` (``mult[index] = ...``: ``accum_t``'s rounding and
   overflow);
2. the accumulator starts from the bias cast to ``accum_t``
   (``acc[iacc] = (accum_t)biases[iacc]``; zero without bias);
3. products are added one at a time in input order ``j = 0 .. n-1``
   (``acc[jj] += mult[index]``; ``ap_fixed::operator+=`` assigns the exact
   sum back to ``accum_t``, so its overflow mode applies after every add);
4. the sum is cast to the result type (``res[ires] = (res_T)acc[ires]``).

ReLU is ``res = data > 0 ? data : 0`` (``nnet_activation.h``; the
assignment casts to ``res_T`` when that differs from the input type); a
clip is ``min(max(x, lo), hi)`` on mantissas of the input type, cast the
same way; a LeakyReLU is ``nnet::leaky_relu``'s ``res = data > 0 ? data :
alpha * data``, the product exact (``Fx + Fa`` fractional bits), each
branch cast to ``res_T`` (see :mod:`tnquant.export.elementwise`). A TT layer
runs the same step once per core, right to left (see
:mod:`tnquant.export.graph`).

Examples
--------
>>> import numpy as np, torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> from tnquant.export.graph import build_graph
>>> model = nn.Sequential(nn.Linear(3, 2, bias=False))
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(torch.tensor([[0.5, -0.25, 1.0], [1.0, 1.0, 1.0]]))
>>> _ = quantize(model, weights=FixedPoint(4, 2), progress=False)
>>> em = IntegerModel(build_graph(model, FixedPoint(4, 2)))
>>> em.predict(np.array([[1.0, 1.0, -0.5]])).tolist()
[[-0.25, 1.5]]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tnquant.export.batchnorm_ops import run_batchnorm
from tnquant.export.contract import _count, contract_step
from tnquant.export.conv_ops import run_spatial
from tnquant.export.graph import Op
from tnquant.export.ir import MERGES, SPATIAL, sources
from tnquant.export.manifest import (
    CORES,
    FORMAT_VERSION,
    MANIFEST,
    build_manifest,
    read_export,
    write_export,
)
from tnquant.export.merge_ops import run_merge
from tnquant.export.report import ExportReport, build_report
from tnquant.export.table_ops import TABLES, run_table
from tnquant.quant.fixed_point import cast_mantissa, to_mantissa
from tnquant.specs import FixedPoint  # noqa: F401  (the doctests use it)

__all__ = ["IntegerModel", "contract_step", "MANIFEST", "CORES", "FORMAT_VERSION"]

_CHUNK = 1 << 22  # elements per product block


def _tt_run(op: Op, x: np.ndarray, stats: dict[str, int] | None = None) -> np.ndarray:
    cores = op.weights
    in_shape = [c.shape[2] for c in cores]
    out_pad = math.prod(c.shape[1] for c in cores)
    b = x.shape[0]
    pad = math.prod(in_shape) - x.shape[1]
    if pad:
        x = np.concatenate([x, np.zeros((b, pad), dtype=np.int64)], axis=1)
    state = x.reshape(b, -1)
    cur, q, d = op.input_type, 1, len(cores)
    for s in range(d):
        k = d - 1 - s
        r0, o, i, r1 = cores[k].shape
        p = math.prod(in_shape[:k])
        xs = state.reshape(b, p, i * r1, q)
        w = cores[k].reshape(r0 * o, i * r1)
        bias = bt = None
        if s == d - 1 and op.bias is not None:
            bias = np.zeros(out_pad, dtype=np.int64)
            bias[: op.bias.shape[0]] = op.bias
            bias, bt = bias.reshape(o, q), op.bias_type
        state = contract_step(
            xs, w, cur, op.weight_types[k], op.accum_types[s], op.step_types[s], bias, bt, stats
        )
        cur, q = op.step_types[s], o * q
    return state.reshape(b, out_pad)[:, : op.out_features]


def _dense_run(op: Op, x: np.ndarray, stats: dict[str, int] | None = None) -> np.ndarray:
    w = op.weights[0]
    bias = None if op.bias is None else op.bias[:, None]
    rows = max(1, _CHUNK // max(1, w.size))
    outs = [
        contract_step(
            x[s : s + rows, :, None],
            w,
            op.input_type,
            op.weight_types[0],
            op.accum_types[0],
            op.result_type,
            bias,
            op.bias_type,
            stats,
        )[..., 0]
        for s in range(0, x.shape[0], rows)
    ]
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, w.shape[0]), np.int64)


def _leaky_run(op: Op, x: np.ndarray, stats: dict[str, int] | None = None) -> np.ndarray:
    """hls4ml's ``leaky_relu``: ``x > 0 ? x : alpha * x`` (exact product), cast to ``res_T``."""
    x_t, a_t, r_t = op.input_type, op.weight_types[0], op.result_type
    pos, prod = x > 0, x * op.weights[0].astype(np.int64)  # one alpha, or one per feature
    if stats is not None:
        _count(stats, "result", x[pos], x_t.frac, r_t)
        _count(stats, "result", prod[~pos], x_t.frac + a_t.frac, r_t)
    kept = cast_mantissa(x, x_t.frac, r_t)
    return np.where(pos, kept, cast_mantissa(prod, x_t.frac + a_t.frac, r_t)).astype(np.int64)


def _run_op(op: Op, arr: np.ndarray, stats: dict[str, int] | None = None) -> np.ndarray:
    if op.kind in ("relu", "clip"):
        if op.kind == "relu":
            arr = np.maximum(arr, 0)
        else:
            arr = np.clip(arr, int(op.weights[0][0]), int(op.weights[0][1]))
        if op.result_type != op.input_type:  # hls4ml: res = data > 0 ? data : 0, cast to res_T
            if stats is not None:
                _count(stats, "result", arr, op.input_type.frac, op.result_type)
            arr = cast_mantissa(arr, op.input_type.frac, op.result_type)
        return arr
    if op.kind == "leaky_relu":
        return _leaky_run(op, arr, stats)
    if op.kind == "batchnorm":  # hls4ml's normalize (tnquant.export.batchnorm_ops)
        return run_batchnorm(op, arr, stats)
    if op.kind in TABLES:  # hls4ml's lookup tables (tnquant.export.table_ops)
        return run_table(op, arr)
    if op.kind == "dense":
        return _dense_run(op, arr, stats)
    if op.kind in SPATIAL:  # hls4ml's conv_2d_latency_cl and pooling (tnquant.export.conv_ops)
        return run_spatial(op, arr, stats)
    if op.kind == "tt":
        return _tt_run(op, arr, stats)
    raise ValueError(f"op {op.name!r}: the emulator has no op kind {op.kind!r}")


class IntegerModel:
    """Bit-exact integer emulator of an exported network (numpy int64).

    Parameters
    ----------
    ops
        The IR from :func:`tnquant.export.graph.build_graph`.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, quantize
    >>> from tnquant.export.graph import build_graph
    >>> model = nn.Sequential(nn.Linear(2, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.fill_(0.5)
    >>> _ = quantize(model, weights=FixedPoint(4, 1), progress=False)
    >>> em = IntegerModel(build_graph(model, FixedPoint(6, 3)))
    >>> em.input_type, em.output_type
    ('ap_fixed<6,3>', 'ap_fixed<11,5>')
    >>> em.run(np.array([[8, 8]])).tolist()     # 1.0 + 1.0 times 0.5
    [[64]]
    """

    def __init__(self, ops: list[Op]) -> None:
        if not ops:
            raise ValueError("IntegerModel needs at least one op, got none")
        self.ops = list(ops)
        self._sources = sources(self.ops)

    @property
    def input_type(self) -> str:
        """The input's ``ap_fixed<...>`` type."""
        return str(self.ops[0].input_type)

    @property
    def output_type(self) -> str:
        """The output's ``ap_fixed<...>`` type."""
        return str(self.ops[-1].result_type)

    @property
    def in_features(self) -> int:
        return self.ops[0].in_features

    @property
    def out_features(self) -> int:
        return self.ops[-1].out_features

    def run(self, x: Any) -> np.ndarray:
        """Mantissas of the input type -> mantissas of the output type (int64).

        ``x`` is ``(batch, in_features)`` or ``(in_features,)`` integers; values
        outside the input type are refused.

        Examples
        --------
        >>> import numpy as np
        >>> from tnquant.export.graph import Op
        >>> t = FixedPoint(4, 4)
        >>> IntegerModel([Op("r", "relu", "r", 2, 2, t, t, step_types=[t])]).run([3, -2]).tolist()
        [3, 0]
        """
        single = np.asarray(x).ndim == 1
        arr = self._run_all(self._check_run_input(x))[-1][0]
        return arr[0] if single else arr

    def trace(self, x: Any) -> list[tuple[np.ndarray, dict[str, int]]]:
        """Run ``x`` (input mantissas) op by op; each op's output mantissas and overflow counts.

        The counts are those of :func:`contract_step` (``'accum'``,
        ``'accum_overflow'``, ``'result'``, ``'result_overflow'``), summed over
        the op's steps. The last output equals :meth:`run`'s.

        Examples
        --------
        >>> from tnquant.export.graph import Op
        >>> t, u = FixedPoint(4, 2), FixedPoint(2, 1, overflow="SAT")
        >>> [(out.tolist(), st) for out, st in IntegerModel([Op("r", "relu", "r", 2, 2, t, u)]
        ...                                                ).trace([[5, -2]])]
        [([[1, 0]], {'result': 2, 'result_overflow': 1})]
        """
        return self._run_all(self._check_run_input(x), counts=True)

    def _run_all(
        self, x: np.ndarray, counts: bool = False
    ) -> list[tuple[np.ndarray, dict[str, int]]]:
        """Every op's output (and counts), each op reading the ops :func:`sources` gives."""
        outs: list[tuple[np.ndarray, dict[str, int]]] = []
        for op, src in zip(self.ops, self._sources, strict=True):
            stats: dict[str, int] = {}
            ins = [outs[j][0] if j >= 0 else x for j in src]
            if op.kind in MERGES:
                arr = run_merge(op, ins, stats if counts else None)
            else:
                arr = _run_op(op, ins[0], stats if counts else None)
            outs.append((arr, stats))
        return outs

    def report(self, drift: list[dict[str, Any]] | None = None) -> ExportReport:
        """The bit budget and resource estimate (see :mod:`tnquant.export.report`).

        Examples
        --------
        >>> from tnquant.export.graph import Op
        >>> t = FixedPoint(4, 2)
        >>> IntegerModel([Op("r", "relu", "r", 2, 2, t, t)]).report().totals["multiplies"]
        0
        """
        return build_report(self.ops, drift)

    def _check_run_input(self, x: Any) -> np.ndarray:
        arr = np.asarray(x)
        if arr.dtype.kind not in "iu":
            raise TypeError(
                f"run() takes integer mantissas, got dtype {arr.dtype}; use predict() for floats"
            )
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[1] != self.in_features:
            raise ValueError(
                f"expected mantissas of shape (batch, {self.in_features}), got "
                f"{np.asarray(x).shape}"
            )
        t = self.ops[0].input_type
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < t.qmin or arr.max() > t.qmax):
            raise ValueError(
                f"input mantissas must lie in [{t.qmin}, {t.qmax}] ({t}), got "
                f"[{arr.min()}, {arr.max()}]"
            )
        return arr

    def quantize_input(self, x: Any) -> np.ndarray:
        """Float inputs -> input mantissas, as ``ap_fixed``'s ``double`` constructor.

        Examples
        --------
        >>> from tnquant.export.graph import Op
        >>> t = FixedPoint(4, 2)
        >>> IntegerModel([Op("r", "relu", "r", 1, 1, t, t)]).quantize_input([[0.3]]).tolist()
        [[1]]
        """
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
        return to_mantissa(xt, self.ops[0].input_type).numpy()

    def predict(self, x: Any) -> np.ndarray:
        """Floats in, floats (float64) out: quantize the input, :meth:`run`, scale back.

        Examples
        --------
        >>> from tnquant.export.graph import Op
        >>> t = FixedPoint(6, 3)
        >>> IntegerModel([Op("r", "relu", "r", 2, 2, t, t)]).predict([[0.3, -1.0]]).tolist()
        [[0.25, 0.0]]
        """
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        m = self.run(self.quantize_input(x))
        return np.ldexp(m.astype(np.float64), -self.ops[-1].result_type.frac)

    # ------------------------------------------------------------------ io
    def manifest(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON-safe description written to ``manifest.json`` (see :mod:`~.manifest`).

        It lacks the ``cores.npz`` checksum and the self-checksum, which
        :meth:`save` adds.

        Examples
        --------
        >>> from tnquant.export.graph import Op
        >>> t = FixedPoint(4, 2)
        >>> IntegerModel([Op("r", "relu", "r", 1, 1, t, t)]).manifest()["version"]
        2
        """
        return build_manifest(self.ops, extra)

    def save(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``cores.npz`` (int64 mantissas), then ``manifest.json``, to ``out_dir``.

        ``extra`` may add ``'headers'``, ``'routes'`` and ``'hls4ml_config'``
        (as :func:`tnquant.export.fixed_point` does); see
        :func:`tnquant.export.manifest.write_export`.

        Examples
        --------
        >>> import tempfile
        >>> from tnquant.export.graph import Op
        >>> t = FixedPoint(4, 2)
        >>> em = IntegerModel([Op("r", "relu", "r", 1, 1, t, t, step_types=[t])])
        >>> d = em.save(tempfile.mkdtemp())
        >>> IntegerModel.load(d).input_type
        'ap_fixed<4,2>'
        """
        return write_export(self.ops, out_dir, extra)

    @classmethod
    def load(cls, out_dir: str | Path) -> IntegerModel:
        """Rebuild the emulator from ``out_dir`` alone, trusting none of it.

        Every field of ``manifest.json`` and every member of ``cores.npz`` is
        checked before anything is allocated (see
        :mod:`tnquant.export.manifest`); the checksums are unkeyed, so they
        catch corruption, while the checks make a forged directory fail with
        an :class:`~tnquant.io.IntegrityError` (a ``ValueError``) naming the
        file and the field, rather than load wrong numbers.

        Examples
        --------
        >>> IntegerModel.load("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no manifest.json in /nonexistent
        """
        return cls(read_export(out_dir))

    def __repr__(self) -> str:
        kinds = ", ".join(f"{op.name}:{op.kind}" for op in self.ops)
        return f"IntegerModel({self.input_type} -> {self.output_type}; {kinds})"
