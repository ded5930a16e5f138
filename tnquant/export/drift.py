"""How far the exported fixed-point network drifts from the torch model.

With lossless accumulators the :class:`~tnquant.export.IntegerModel` equals
the fake-quant torch model bit for bit (biases on the products' grid). When
a user narrows an accumulator or a result (``accum=``/``result=``), the
emulator follows hls4ml, and :func:`drift` measures the cost on sample
inputs, per exported layer:

``max_abs``
    ``max |emulator - torch|`` over the samples and features of the layer's
    output (errors of earlier layers included: this is what reaches it).
``max_rel``
    ``max_abs / max |torch|`` for that output (0 when both are 0).
``max_abs_lsb``
    ``max_abs`` in units of the layer's result type (``2**-frac``).
``accum_overflow``, ``result_overflow``
    Fraction of the casts to the accumulator type (bias, every product,
    every running sum) and to the result type that fell outside the type
    once rounded: saturated or wrapped, as ``overflow_modes`` says (the
    modes of the layer's accumulator types when any accumulation overflowed,
    plus those of its result types when a result cast did; ``''`` if none).

The torch reference is a float64 copy of the model (so that it is exact
where the emulator is lossless), run on the same quantized inputs
(``IntegerModel.quantize_input``), with forward hooks on the exported
layers (:func:`tnquant.core.capture.capture_outputs`).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> from tnquant.export.emulator import IntegerModel
>>> from tnquant.export.graph import build_graph
>>> model = nn.Sequential(nn.Linear(4, 2, bias=False))
>>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
>>> em = IntegerModel(build_graph(model, FixedPoint(8, 3)))
>>> drift(model, em, torch.randn(16, 4))[0]["max_abs"]
0.0
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from tnquant.core.capture import capture_outputs
from tnquant.export.emulator import IntegerModel

__all__ = ["drift"]


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _reference_outputs(model: nn.Module, layers: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The last output of each of ``layers`` of a float64 copy of ``model`` on ``x``."""
    ref = copy.deepcopy(model).to(torch.float64)
    device = next((p.device for p in ref.parameters()), torch.device("cpu"))
    modules = {name: ref.get_submodule(name) for name in layers}
    seen = capture_outputs(ref, modules, [torch.from_numpy(x).to(device)])
    return {name: outs[-1].to(torch.float64).cpu().numpy() for name, outs in seen.items() if outs}


def drift(model: nn.Module, integer_model: IntegerModel, inputs: Any) -> list[dict[str, Any]]:
    """Per-layer error and overflow rates of the emulator against the torch model.

    Parameters
    ----------
    model
        The quantized torch model that was exported (not changed: a float64
        copy runs).
    integer_model
        Its :class:`~tnquant.export.IntegerModel` (from
        :func:`~tnquant.export.fixed_point`).
    inputs
        Float samples ``(batch, in_features)`` (tensor or array); they are
        quantized to the input type first, for both.

    Returns
    -------
    list of dict
        One per exported layer, in order: ``layer``, ``max_abs``,
        ``max_rel``, ``max_abs_lsb``, ``accum_overflow``, ``result_overflow``,
        ``overflow_modes``, ``samples`` (see the module docs).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, quantize
    >>> from tnquant.export.emulator import IntegerModel
    >>> from tnquant.export.graph import build_graph
    >>> model = nn.Sequential(nn.Linear(4, 2, bias=False))
    >>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
    >>> em = IntegerModel(build_graph(model, FixedPoint(8, 3), accum=FixedPoint(6, 1)))
    >>> row = drift(model, em, torch.full((4, 4), 3.0))[0]
    >>> row["accum_overflow"] > 0, row["overflow_modes"]
    (True, 'WRAP')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(integer_model, IntegerModel):
        raise TypeError(
            f"integer_model must be an IntegerModel, got {type(integer_model).__name__}"
        )
    x = _as_numpy(inputs)
    if x.ndim != 2 or x.shape[1] != integer_model.in_features or x.shape[0] == 0:
        raise ValueError(
            f"inputs must have shape (batch >= 1, {integer_model.in_features}), got {x.shape}"
        )
    m = integer_model.quantize_input(x)
    xq = np.ldexp(m.astype(np.float64), -integer_model.ops[0].input_type.frac)
    trace = integer_model.trace(m)
    ops = integer_model.ops
    layers = list(dict.fromkeys(op.layer for op in ops))
    ref = _reference_outputs(model, layers, xq)
    rows = []
    for name in layers:
        idx = [k for k, op in enumerate(ops) if op.layer == name]
        last = ops[idx[-1]]
        got = np.ldexp(trace[idx[-1]][0].astype(np.float64), -last.result_type.frac)
        want = ref[name].reshape(got.shape)
        err = float(np.abs(got - want).max())
        top = float(np.abs(want).max())
        counts = {
            k: sum(trace[i][1].get(k, 0) for i in idx)
            for k in ("accum", "accum_overflow", "result", "result_overflow")
        }
        modes = sorted(
            {t.overflow for i in idx for t in ops[i].accum_types if counts["accum_overflow"]}
            | {t.overflow for i in idx for t in ops[i].step_types if counts["result_overflow"]}
        )
        rows.append(
            {
                "layer": name,
                "kind": last.kind,
                "samples": int(x.shape[0]),
                "max_abs": err,
                "max_rel": err / top if top > 0 else (0.0 if err == 0 else float("inf")),
                "max_abs_lsb": err / last.result_type.scale,
                "accum_overflow": counts["accum_overflow"] / counts["accum"]
                if counts["accum"]
                else 0.0,
                "result_overflow": counts["result_overflow"] / counts["result"]
                if counts["result"]
                else 0.0,
                "overflow_modes": "/".join(modes),
            }
        )
    return rows
