"""ONNX export as a QDQ graph: integer codes + ``DequantizeLinear``, factorized chains kept.

:func:`onnx` writes a quantized model (fake-quant or converted) to an ONNX
file that onnxruntime runs:

- every quantized weight or core is an **integer initialiser** (int4/uint4
  packed two a byte, int8, uint8, int16, uint16, int32, float8) feeding a
  ``DequantizeLinear``: per tensor, per channel (``axis``) or per group
  (``block_size``, opset 21); the float weights are never written;
- every calibrated activation quantizer is a ``QuantizeLinear`` /
  ``DequantizeLinear`` pair (with a ``Clip`` first when its code range is
  narrower than the int8/uint8/int16/uint16 type);
- factorized layers stay factorized: the graph contracts the input with the
  (dequantized) cores one by one (``MatMul`` / ``Conv`` / ``Reshape`` /
  ``Transpose``), with a QDQ pair at each quantized intermediate; the dense
  weight is never formed, in the file or at run time.

How: the model is copied, every tnquant layer (the registry's quantized and
factorized kinds) replaced by a stand-in that holds its codes
(:mod:`tnquant.export.onnx_layers`, :mod:`tnquant.export.onnx_tensors`), and
the copy exported with ``torch.onnx.export(dynamo=True)``, whose translation
table turns three small ops into the QDQ nodes
(:mod:`tnquant.export.onnx_ops`). Everything else of the model (attention,
LayerNorm, residual adds of a transformers model) goes through torch's own
exporter.

Exactness: the codes, scales and zero points are those of the model
(``DequantizeLinear`` gives the dequantized weights bitwise, and
``QuantizeLinear`` the activation codes of the same float input, rounding
half to even like tnquant). With onnxruntime's graph optimizations off
(:func:`session`, ``exact=True``) the outputs differ from tnquant's forward
only by the float summation order of the matmuls and convolutions
(onnxruntime's kernels; tnquant's own contraction order or weight
rebuilding for factorized layers): measured at most ``4e-7`` of the output's
largest magnitude on the test models, and 0 on the dense MLPs. Behind an
activation quantizer such a difference can move a value across a rounding
boundary (one code step there); the tests allow a few elements per thousand.
The file of a converted model runs to its fake-quant original's outputs
(the same codes: ``convert`` stores ``Quantizer.quantize_codes``, which the
export also uses for fake-quant weights), and tnquant's converted forward
equals the fake-quant one bitwise.

With onnxruntime's default optimizations the graph is rewritten, which is
not always exact. Measured with onnxruntime 1.32 on an AVX2 CPU: the test
models (MLP with uint8 activations, LowRank/TT/Tucker with int4 cores,
Tucker/CP/quantized convolutions, a converted model of every weight kind)
within ``4e-7`` of max ``|y|``, a tiny BERT within ``1.1e-5`` (its fused
attention, LayerNorm and GELU kernels); but a tensorized ``TuckerLinear``
with int8 cores ``5e-3`` (``DequantizeLinear`` + ``MatMul`` fused into
``MatMulNBits``, which quantizes its input), and an MLP with *symmetric* int8
activation quantizers one code step at 2.5% of its outputs. Symmetric weights
are written without a zero point: with one, onnxruntime fuses ``QGemm``
kernels, which on AVX2 saturate (18 output steps on that MLP).

Refused (``ValueError`` naming the tensor and the reason): weights whose
codes need more than 32 bits; non-float32 models; activation quantizers that
are not calibrated, not per tensor, that round other than half to even, or
are ``Binary``/``Ternary``; stochastic rounding in a fake-quant weight
(convert first); quantizers still observing; ``TTEmbedding`` and any other
registered layer kind without a stand-in.

Examples
--------
>>> import tempfile, torch
>>> from torch import nn
>>> from tnquant import QuantSpec, quantize
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
>>> _ = quantize(model, weights=QuantSpec(bits=4, granularity=("group", 32), axis=1),
...              progress=False)
>>> out = onnx(model, tempfile.mkdtemp() + "/mlp.onnx", torch.randn(2, 64))  # doctest: +SKIP
>>> sorted({w["onnx_type"] for w in out.weights})  # doctest: +SKIP
['int4']
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.core.modules import replace_module
from tnquant.export.onnx_layers import STANDINS
from tnquant.export.onnx_tensors import OnnxAct, OnnxWeight
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import lookup

__all__ = ["onnx", "OnnxExport", "session", "standin_model", "MIN_OPSET"]

#: DequantizeLinear's block_size and the int4/uint4 types need opset 21
MIN_OPSET = 21

_REFUSED = {
    "TTEmbedding": "its look-up contracts one row of every core per index; "
    "no ONNX route is written for it (keep it float or use QuantEmbedding)"
}


@dataclass
class OnnxExport:
    """What :func:`onnx` wrote.

    Attributes
    ----------
    path
        The ``.onnx`` file.
    weights
        One row per weight or core: ``name``, ``onnx_type`` (``'int4'``,
        ``'int8'``, ..., ``'float'``), ``layout`` (``'tensor'``,
        ``'channel'``, ``'block'``), ``spec``, ``shape``, ``bytes``.
    activations
        One row per activation quantizer: ``name``, ``onnx_type``, ``spec``.
    file_bytes
        The file's size.
    float_bytes
        What the weights and cores would take in float32 (a float export of
        the same, factorized, model).
    """

    path: Path
    weights: list[dict[str, Any]] = field(default_factory=list)
    activations: list[dict[str, Any]] = field(default_factory=list)
    file_bytes: int = 0
    float_bytes: int = 0


def _refuse(name: str, module: nn.Module) -> ValueError:
    cls = type(module).__name__
    why = _REFUSED.get(cls, "no ONNX route is written for this layer kind")
    return ValueError(f"{name or 'the model'} ({cls}): {why}")


def standin_model(model: nn.Module, *, int4: bool = True) -> nn.Module:
    """A copy of ``model`` with every tnquant layer replaced by its ONNX stand-in.

    The stand-ins hold the codes, scales and zero points (never the float
    weights of quantized tensors); their forward is what the ONNX graph
    computes. ``model`` is left as it was.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec, quantize
    >>> from tnquant.export.onnx_ops import register
    >>> register()
    >>> model = nn.Sequential(nn.Linear(8, 4))
    >>> _ = quantize(model, weights=QuantSpec(bits=8), progress=False)
    >>> s = standin_model(model)
    >>> type(s[0]).__name__, s[0].weights[0].codes.dtype
    ('_Linear', torch.int8)
    """
    src = copy.deepcopy(model).eval()
    targets: list[tuple[str, nn.Module]] = []
    for name, module in src.named_modules():
        if any(name.startswith(t + ".") or not t for t, _ in targets):
            continue
        kind = lookup(module)
        if kind is None or kind.role not in ("factorized", "quantized"):
            continue
        if type(module) not in STANDINS:
            raise _refuse(name, module)
        targets.append((name, module))
    root: nn.Module = src
    for name, module in targets:
        new = STANDINS[type(module)](module, name, int4)
        if name:
            replace_module(src, name, new)
        else:
            root = new
    for name, module in root.named_modules():
        if isinstance(module, (Quantizer, FrozenTensor)):
            raise ValueError(
                f"{name}: a {type(module).__name__} outside the layers tnquant exports "
                f"(quantized and factorized kinds); the ONNX export has no place for it"
            )
    return root


def _rows(root: nn.Module) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    weights, acts, retype = [], [], {}
    for fqn, m in root.named_modules():
        if isinstance(m, OnnxWeight):
            shape = tuple((m.value if m.kind == "float" else m.codes).shape)
            weights.append(
                {
                    "name": m.tensor_name,
                    "onnx_type": m.onnx_type,
                    "layout": m.layout,
                    "spec": m.spec,
                    "shape": shape,
                    "bytes": m.n_bytes(),
                }
            )
        elif isinstance(m, OnnxAct):
            acts.append({"name": m.tensor_name, "onnx_type": m.onnx_type, "spec": m.spec})
        else:
            continue
        if m.onnx_type in ("int4", "uint4", "uint16"):
            for buf in ("codes", "codes_neg", "zero_point"):
                if buf in m._buffers:
                    retype[f"{fqn}.{buf}"] = m.onnx_type
    return weights, acts, retype


def _inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple/list of positional inputs or a dict of "
        f"keyword inputs, got {type(example_inputs).__name__}"
    )


def onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    opset: int = MIN_OPSET,
    int4: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_shapes: Any = None,
    check: bool = True,
) -> OnnxExport:
    """Write ``model`` as an ONNX QDQ graph (see the module docs for what is written).

    Parameters
    ----------
    model
        A float32 model with tnquant layers: fake-quant (quantizers attached
        by :func:`tnquant.quantize`, activation ranges calibrated) or
        converted (:func:`tnquant.convert`). Float layers are exported as they are.
    path
        The ``.onnx`` file to write (its folder is created).
    example_inputs
        What the model is traced with: a tensor, a tuple of positional inputs,
        or a dict of keyword inputs (``{'input_ids': ids}``).
    opset
        The ONNX opset, at least :data:`MIN_OPSET` (21).
    int4
        Store codes of at most 4 bits as int4/uint4 (packed); ``False``
        widens them to int8/uint8 for runtimes without 4-bit types.
    input_names, output_names, dynamic_shapes
        Passed to ``torch.onnx.export``.
    check
        Run ``onnx.checker.check_model`` on the file.

    Returns
    -------
    OnnxExport
        The path, one row per weight and activation quantizer (ONNX type,
        layout, bytes), the file's size and the float32 size of the weights.

    Raises
    ------
    ValueError
        For a tensor or layer ONNX cannot represent exactly (the message
        names it and says why), or ``opset < 21``.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec, quantize
    >>> model = nn.Sequential(nn.Linear(8, 4))
    >>> _ = quantize(model, weights=QuantSpec(bits=8), progress=False)
    >>> onnx(model, tempfile.mkdtemp() + "/m.onnx", torch.randn(2, 8), opset=20)
    Traceback (most recent call last):
    ...
    ValueError: opset must be >= 21 (DequantizeLinear's block_size, int4), got 20
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(
            f"opset must be >= {MIN_OPSET} (DequantizeLinear's block_size, int4), got {opset!r}"
        )
    args, kwargs = _inputs(example_inputs)
    import onnx as onnx_lib

    from tnquant.export.onnx_ops import register, retype, translations

    register()
    root = standin_model(model, int4=int4)
    weights, acts, targets = _rows(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            root,
            args,
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset,
            optimize=False,
            custom_translation_table=translations(),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    proto = cast(Any, program).model_proto
    for node in proto.graph.node:  # stack traces and fx names: most of a small file
        del node.metadata_props[:]
    del proto.graph.value_info[:]  # intermediate shapes (onnxruntime infers them)
    _drop_default_attributes(proto)
    missing = retype(proto, targets)
    if missing:
        raise RuntimeError(
            f"the exported graph lost the initialisers {missing[:4]}; please report this"
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_lib.save_model(proto, str(out))
    if check:
        onnx_lib.checker.check_model(str(out))
    float_bytes = sum(4 * _numel(w["shape"]) for w in weights)
    return OnnxExport(out, weights, acts, out.stat().st_size, float_bytes)


def session(path: str | Path, *, exact: bool = True, providers: list[str] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` of an exported file.

    ``exact=True`` turns onnxruntime's graph optimizations off, so that every
    ``DequantizeLinear``/``QuantizeLinear`` runs as written and the outputs equal
    tnquant's up to float summation order (see the module docs). With
    ``exact=False`` onnxruntime fuses QDQ groups into its integer kernels
    (``QGemm``, ``QLinearConv``, ``MatMulNBits``, dynamic quantization of
    activations): faster, but not exact.

    Examples
    --------
    >>> sess = session("model.onnx")  # doctest: +SKIP
    >>> sess.run(None, {sess.get_inputs()[0].name: x.numpy()})  # doctest: +SKIP
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def _drop_default_attributes(proto: Any) -> None:
    """Remove ``output_dtype=0`` and ``block_size=0`` from the Q/DQ nodes (their defaults).

    onnxruntime's QDQ propagation copies an explicit ``output_dtype`` onto the
    ``QuantizeLinear`` it inserts past a ``Reshape``, even after it changed the
    zero point's type, and then refuses its own graph.
    """
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        keep = [
            a for a in node.attribute if not (a.name in ("output_dtype", "block_size") and a.i == 0)
        ]
        del node.attribute[:]
        node.attribute.extend(keep)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
