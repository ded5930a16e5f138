"""Fixed-point export: integer cores, manifest, hls4ml config, C headers, emulator.

:func:`fixed_point` turns a quantized model into fixed point: every core,
bias, input, contraction result and output gets an ``ap_fixed<W,I,Q,O>``
type (see :mod:`tnquant.export.graph` for how widths are derived and
overridden), writes the files below, and returns the bit-exact
:class:`IntegerModel`.

:func:`onnx` writes a quantized model as an ONNX QDQ graph instead (integer
codes + ``DequantizeLinear``, factorized layers kept as their chains; see
:mod:`tnquant.export.onnx`).

The same fixed-point network also goes out as: an hls4ml project
(:func:`to_hls4ml`, with hls4ml's knobs, :class:`HlsOptions`); a QONNX file
(:func:`qonnx`: ``Quant`` nodes around ``MatMul`` chains, TT layers
included, read by QONNX's executor and hls4ml's QONNX front end); and a
complete HLS C++ project with a C testbench (:func:`write_project` /
:func:`run_project`, :mod:`tnquant.export.cproject`), every layer kind
included, TT too. Each is bit-exact with :class:`IntegerModel`. The report
(:class:`ExportReport`) counts multiplies by operand widths, zero and
power-of-two weights apart, memory bits, BOPs and HGQ-style EBOPs
(:mod:`tnquant.export.resources`).

Routes per layer type
---------------------
==========================  ====================================================
``QuantLinear``             one ``dense`` op; hls4ml ``Dense``
``LowRankLinear``           two ``dense`` ops (``V`` then ``U`` + bias); two
                            hls4ml ``Dense`` layers (bias on the second)
``TuckerLinear`` (order 1)  three ``dense`` ops (``U_in^T``, ``G``, ``U_out``
                            + bias); three hls4ml ``Dense`` layers
``nn.ReLU``                 ``relu`` op; hls4ml ``Activation('relu')`` (it
                            casts to its result type when the next layer's
                            ``'input'`` quantizer sets one)
``nn.ReLU6``/``Hardtanh``   ``clip`` op, bounds on the input type's grid; no
                            hls4ml route (hls4ml 1.3.0's PyTorch front end
                            takes neither): the C++ project, QONNX ``Clip``
``nn.LeakyReLU``            ``leaky_relu`` op, alpha on at most 16 fractional
                            bits (the slope snapped in place); hls4ml
                            ``LeakyReLU`` (``param`` = alpha's type), QONNX
                            ``LeakyRelu``
``nn.Flatten`` (1, -1)      no op (a no-op on the ``(batch, features)`` chain)
``Sigmoid``/``Tanh``        ``sigmoid``/``tanh``/``softmax`` ops: hls4ml's
``Softmax`` (dim -1)        lookup tables, bit-exact with its C simulation
                            (:mod:`tnquant.export.table_ops`); hls4ml
                            ``Activation``/``Softmax``; no QONNX form
``Identity``/``Dropout``    no op (``Dropout`` in eval is the identity)
``TTLinear``                one ``tt`` op: the emulator and C headers +
                            ``tt_linear.h`` (HLS C++ on plain loops); no
                            hls4ml route (its PyTorch front end rejects the
                            reshapes and einsums a TT contraction needs)
activation quantizers       not an op: a ``FixedPoint`` or frozen per-tensor
                            ``QuantSpec(scale='pow2')`` on ``'input'``,
                            ``'inter_k'`` or ``'output'`` sets the type there
                            (:mod:`tnquant.export.acts`)
==========================  ====================================================

Refused, with a ``ValueError`` naming the layer:

- CP on a Linear: tnquant has no such layer (``factorize`` skips it): a CP
  decomposition of a matrix *is* a rank-``R`` low-rank one, so use
  ``LowRank(rank=R)``, which exports as above.
- ``TuckerLinear`` of order > 1 (tensorized): its mode products need the
  reshapes hls4ml rejects, and no C kernel is written for it yet (the TT
  kernel's route would fit).
- Grouped (not depthwise) or non-zero-padded convolutions. A plain
  ``QuantConv2d`` (``groups=1``) or a depthwise one (``groups == C == O``),
  a ``TuckerConv2d`` (three ``conv2d`` ops: ``1x1``, the core, ``1x1``), a
  ``CPConv2d`` (``1x1``, depthwise ``kh x 1`` and ``1 x kw``, ``1x1``),
  ``nn.MaxPool2d``, ``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d(1)`` (no
  padding, power-of-two area) export as ``conv2d``/``depthwise2d``/
  ``maxpool2d``/``avgpool2d`` ops with ``input_shape=(C, H, W)``
  (:mod:`tnquant.export.conv_routes`); ``QuantConv1d``, ``TuckerConv1d``,
  ``nn.MaxPool1d``, ``nn.AvgPool1d`` and ``nn.AdaptiveAvgPool1d(1)`` as
  ``conv1d``/``maxpool1d``/``avgpool1d`` ops with ``input_shape=(C, L)``
  (:mod:`tnquant.export.conv1d_routes`); to the emulator and hls4ml
  (``Conv2D``/``DepthwiseConv2D``/``Conv1D``/``Pooling``); not yet to the
  C++ project or QONNX.
- Embeddings (``TTEmbedding``, ``QuantEmbedding``): table look-ups, not
  dense maps; no emulator route yet.
- Anything else, and float or non-power-of-two scales (the message says
  which tensor and how to quantize it).

Biases: the export stores each on its type's grid (the products' binary
point, rounded to nearest even, or ``bias=``), and :func:`fixed_point` first
sets the model's biases to those stored values (:func:`snap_biases`, in
place; ``snap_biases=False`` leaves the model alone), so that the torch
fake-quant model, run in float64, equals the emulator bit for bit.

Files in ``out_dir``: ``cores.npz`` (int64 mantissas of every weight, core
and bias, keyed ``'<op>.w<k>'`` / ``'<op>.bias'``), ``manifest.json``
(ops, contraction order, shapes, types, scale exponents, versions,
SHA-256 checksums), ``tnquant_weights.h`` / ``tnquant_weights_int.h`` /
``tt_linear.h`` (and ``tnquant_tt_layers.h`` with TT layers; see
:mod:`tnquant.export.cheaders`), and ``hls4ml_config.json`` (hls4ml's own
configuration format) when every layer takes the hls4ml route, and
``report.json`` / ``report.md`` (:class:`ExportReport`: per-step weight,
bias, accumulator and result widths, multiplies per inference and memory
bits, factorized vs the dense layer each replaces; notes, such as the
channels whose scale is at the quantizer's ``2^-24`` floor; with
``sample=`` the drift of narrowed types, see :func:`drift`). A run removes the files of this
list that it does not write again (``OWNED``), so a directory never mixes two
exports, and writes ``manifest.json`` last. :meth:`IntegerModel.load` reads
the directory back trusting none of it (:mod:`tnquant.export.manifest`).

Examples
--------
>>> import tempfile, numpy as np, torch
>>> from torch import nn
>>> from tnquant import FixedPoint, QuantSpec, quantize
>>> from tnquant.layers import LowRankLinear
>>> model = nn.Sequential(LowRankLinear([torch.randn(6, 2), torch.randn(2, 8)]), nn.ReLU(),
...                       nn.Linear(6, 3))
>>> _ = quantize(model, weights=QuantSpec(bits=6, scale="pow2"), progress=False)
>>> em = fixed_point(model, tempfile.mkdtemp(), FixedPoint(12, 4), hls4ml=False)
>>> em.input_type
'ap_fixed<12,4>'
>>> em.predict(np.zeros((2, 8))).shape
(2, 3)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnquant.export.cheaders import write_headers
from tnquant.export.cproject import run_project, write_project
from tnquant.export.drift import drift
from tnquant.export.elementwise import leaky_modules, restore_slope, slope_state
from tnquant.export.emulator import IntegerModel
from tnquant.export.graph import Op, TypeOverride, bias_params, build_graph, set_biases, snap_biases
from tnquant.export.hls import HlsOptions, hls4ml_config, hls4ml_supported, to_hls4ml
from tnquant.export.manifest import CORES, HLS4ML_CONFIG, MANIFEST, route_of
from tnquant.export.onnx import OnnxExport, onnx
from tnquant.export.qonnx import qonnx
from tnquant.export.report import REPORT_JSON, REPORT_MD, ExportReport, build_report
from tnquant.specs import FixedPoint

__all__ = [
    "fixed_point",
    "to_hls4ml",
    "HlsOptions",
    "qonnx",
    "write_project",
    "run_project",
    "onnx",
    "OnnxExport",
    "IntegerModel",
    "Op",
    "build_graph",
    "snap_biases",
    "HLS4ML_CONFIG",
    "ExportReport",
    "build_report",
    "drift",
    "OWNED",
]

#: every file :func:`fixed_point` may write in ``out_dir``, removed in this order
OWNED = (
    MANIFEST,
    CORES,
    HLS4ML_CONFIG,
    REPORT_JSON,
    REPORT_MD,
    "tnquant_weights.h",
    "tnquant_weights_int.h",
    "tt_linear.h",
    "tnquant_tt_layers.h",
    MANIFEST + ".tmp",
    CORES + ".tmp",
)


def _clear(out: Path) -> None:
    """Remove the files of an earlier export (links themselves, never what they point to)."""
    for name in OWNED:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            raise ValueError(
                f"{path} is a directory; fixed_point writes a file of that name "
                f"there: remove it or export elsewhere"
            )
    for name in OWNED:
        (out / name).unlink(missing_ok=True)


def fixed_point(
    model: nn.Module,
    out_dir: str | Path,
    input_spec: FixedPoint | None = None,
    *,
    accum: TypeOverride = None,
    result: TypeOverride = None,
    bias: TypeOverride = None,
    hls4ml: bool | HlsOptions = True,
    sample: Any = None,
    snap_biases: bool = True,
    input_shape: tuple[int, ...] | None = None,
) -> IntegerModel:
    """Export a quantized model to fixed point; return its integer emulator.

    Parameters
    ----------
    model
        A quantized model (see :func:`tnquant.export.graph.build_graph` for
        the layers taken): every weight and core under a ``FixedPoint`` or a
        power-of-two ``QuantSpec(scale='pow2', symmetric=True)`` quantizer,
        per tensor or per channel; fake-quant or converted.
    out_dir
        Where the files go (created if needed).
    input_spec
        The input's ``FixedPoint`` type (its rounding/overflow modes apply
        when floats are converted).
    accum, result, bias
        Type overrides: one ``FixedPoint`` for every op, or a mapping from
        globs on op names (``'<layer>'``, ``'<layer>.<k>'`` for step ``k`` of
        a factorized layer) to ``FixedPoint``. Left out, accumulators are
        lossless (they cannot overflow), results equal them, and biases get
        the products' fractional bits (rounded to nearest even, saturated).
    hls4ml
        Write ``hls4ml_config.json`` (needs hls4ml installed; skipped for
        models with TT layers); an :class:`HlsOptions` sets hls4ml's knobs
        in it (``ReuseFactor``, ``Strategy`` per layer), as :func:`to_hls4ml`
        takes them.
    sample
        Float inputs ``(batch, in_features)``; when given, the report
        includes the per-layer drift of the emulator from the torch model on
        them (:func:`drift`: max abs/relative error, fraction of saturated or
        wrapped accumulations), which is how far narrowed ``accum=``/
        ``result=`` types move the output.
    snap_biases
        Set the model's biases to the values the export stores (see
        :func:`snap_biases`), **in place**, before the emulator is built and
        the drift measured: the torch fake-quant model then equals the
        emulator exactly (in float64, on inputs quantized to the input type,
        by the model's own ``'input'`` quantizer or by
        :meth:`IntegerModel.quantize_input`). Running the export again
        changes nothing more. ``False`` leaves the model untouched; its
        biases then differ from the stored ones by up to half a step.
    input_shape
        ``(C, H, W)`` of one sample, needed for a model that starts with a
        ``QuantConv2d`` or a pooling layer (the input then is ``(batch,
        C*H*W)``, flat in torch's channels-first order; see
        :mod:`tnquant.export.conv_routes`).

    Returns
    -------
    IntegerModel
        ``.report()`` gives the bit budget again (written to ``report.json``
        and ``report.md``, with the drift when ``sample`` was given).

    Raises
    ------
    ValueError
        For a tensor whose scale is not a power of two (named in the
        message), an unsupported layer, or a type wider than 62 bits (the
        message names the op, the tensor -- input, weights, bias,
        accumulator or result -- and the ``result=``/``accum=``/``bias=``
        that narrows it). ``out_dir`` and the model are left as they were
        then.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, QuantSpec, quantize
    >>> model = nn.Sequential(nn.Linear(4, 2))
    >>> _ = quantize(model, weights=QuantSpec(bits=8), progress=False)
    >>> fixed_point(model, tempfile.mkdtemp(), FixedPoint(8, 3))
    Traceback (most recent call last):
    ...
    ValueError: 0.weight has scale ..., not a power of two; quantize 0.weight with \
QuantSpec(scale='pow2', symmetric=True) or a FixedPoint spec
    """
    types: dict[str, Any] = {"accum": accum, "result": result, "bias": bias}
    ops = build_graph(model, input_spec, input_shape=input_shape, **types)
    saved = [(p, p.detach().clone()) for _, p in bias_params(model, ops)] if snap_biases else []
    slopes = [(m, slope_state(m)) for _, m in leaky_modules(model, ops)] if snap_biases else []
    try:
        if snap_biases and any(set_biases(model, ops).values()):  # biases and slopes
            ops = build_graph(model, input_spec, input_shape=input_shape, **types)
        em = IntegerModel(ops)
        options = hls4ml if isinstance(hls4ml, HlsOptions) else None
        cfg = hls4ml_config(ops, None, options) if hls4ml and hls4ml_supported(ops) else None
        report = em.report(None if sample is None else drift(model, em, sample))
    except BaseException:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
        for m, slope in slopes:
            restore_slope(m, slope)
        raise
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    headers = write_headers(ops, out)
    extra: dict[str, Any] = {
        "headers": [p.name for p in headers],
        "routes": {op.name: route_of(op) for op in ops},
    }
    if cfg is not None:
        (out / HLS4ML_CONFIG).write_text(json.dumps(cfg, indent=1, default=str))
        extra["hls4ml_config"] = HLS4ML_CONFIG
    report.save(out)
    em.save(out, extra)
    return em
