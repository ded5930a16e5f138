"""hls4ml route: the fixed-point IR as a plain PyTorch chain plus an hls4ml config.

Chains of dense maps (``QuantLinear``, ``LowRankLinear``, order-1
``TuckerLinear``), ReLUs and LeakyReLUs become an ``nn.Sequential`` of
``nn.Linear`` (one per contraction step; the bias on the last step of each
layer only), ``nn.ReLU`` and ``nn.LeakyReLU`` (``negative_slope`` = the
exported ``alpha``, whose decimal literal hls4ml writes exactly), in float64
with weights equal to the exported mantissas times ``2**-frac`` (exact);
one module per op, so hls4ml's layer names line up with the ops (layers
with no op, ``Flatten``/``Identity``/``Dropout``, are not in the chain). A
LeakyReLU's ``param`` precision is set to alpha's type, so hls4ml computes
``alpha * x`` as the emulator does. ``clip`` ops (``ReLU6``, ``Hardtanh``)
have no hls4ml route: hls4ml 1.3.0's PyTorch front end takes neither
(its ``activation_layers``), so :func:`to_hls4ml` refuses them, naming the
op; the C++ project (:mod:`tnquant.export.cproject`) and QONNX
(:mod:`tnquant.export.qonnx`) take them. hls4ml's PyTorch front end names its layers
after the torch.fx nodes of that chain (``'_0'``, ``'_1'``, ...), found with
``hls4ml.utils.config_from_pytorch_model(..., granularity='name')``; every
layer then gets the exported ``weight``/``bias``/``accum``/``result``
precisions. ``ChannelsLastConversion`` stays ``'full'`` (hls4ml 1.3.0 gives
wrong results on plain Linear chains with ``'off'``).

The knobs hls4ml users set (:class:`HlsOptions`, the keywords of
:func:`to_hls4ml`): ``io_type`` (``'io_parallel'`` or ``'io_stream'``),
``backend`` and ``part`` for the whole model; ``reuse_factor`` and
``strategy`` (``'Latency'``, ``'Resource'``) for the whole model or per
layer (a mapping of op-name or layer-name globs, first match wins, ``'*'``
for the rest). Defaults: ``io_parallel``, ``Vivado``, ``Latency``,
``ReuseFactor`` 1. Every combination stays bit-exact with the emulator
because every product is cast to the accumulator type before it is added
(rounding per product, independent of the order) and an accumulator either
cannot overflow (derived, lossless) or wraps (modular addition, any order
gives the same sum). The one order-dependent case, a user-narrowed
*saturating* accumulator under ``'Resource'`` or a reuse factor above 1
(which sum the products in another order than ``nnet_dense_latency.h``),
is refused with the op's name.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> from tnquant.export.graph import build_graph
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
>>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
>>> chain = torch_chain(build_graph(model, FixedPoint(8, 3)))
>>> chain
Sequential(
  (0): Linear(in_features=4, out_features=3, bias=True)
  (1): ReLU()
)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from tnquant.export.batchnorm_ops import batchnorm_module
from tnquant.export.graph import Op, TypeOverride, build_graph
from tnquant.export.hls_conv import (
    default_type,
    input_shape,
    layer_ops,
    spatial_module,
    spatial_precision,
)
from tnquant.export.hls_graph import graph_layers, torch_graph
from tnquant.export.ir import AFFINE, CONVS, MERGES, POOLS, SPATIAL
from tnquant.export.table_ops import TABLES, hls4ml_keys
from tnquant.specs import FixedPoint

__all__ = [
    "HlsOptions",
    "torch_chain",
    "hls4ml_config",
    "to_hls4ml",
    "hls4ml_supported",
    "HLS4ML_KINDS",
]

#: a zero bias (a Linear without one) still gets a type in hls4ml
_ZERO_BIAS = "ap_fixed<2,1>"


IO_TYPES = ("io_parallel", "io_stream")
STRATEGIES = ("Latency", "Resource")
#: hls4ml backends whose C simulation builds with g++ from the same templates
BACKENDS = ("Vivado", "Vitis")

PerLayer = Union[Any, Mapping[str, Any]]


def _per_layer(value: PerLayer, what: str, check: Any) -> tuple[tuple[str, Any], ...]:
    """``value`` as ``((glob, value), ...)``; a single value is ``(('*', value),)``."""
    items = list(value.items()) if isinstance(value, Mapping) else [("*", value)]
    for key, v in items:
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be op or layer name globs (str), got {key!r}")
        problem = check(v)
        if problem:
            where = what if not isinstance(value, Mapping) else f"{what}[{key!r}]"
            raise ValueError(f"{where} must be {problem}, got {v!r}")
    return tuple(items)


def _reuse_problem(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096
    return None if ok else "an int in 1..4096"


def _strategy_problem(v: Any) -> str | None:
    return None if v in STRATEGIES else f"one of {list(STRATEGIES)}"


@dataclass(frozen=True)
class HlsOptions:
    """The hls4ml knobs of an export, checked up front.

    Parameters
    ----------
    io_type
        ``'io_parallel'`` (default) or ``'io_stream'``.
    reuse_factor
        hls4ml's ``ReuseFactor``: an int (1, default: fully parallel) or a
        mapping of op-name / layer-name globs to ints (first match wins;
        unmatched layers get 1).
    strategy
        ``'Latency'`` (default) or ``'Resource'``, or a mapping of globs.
    backend
        ``'Vivado'`` (default) or ``'Vitis'``.
    part
        The FPGA part; ``None`` keeps hls4ml's default.

    Examples
    --------
    >>> opts = HlsOptions(reuse_factor={"2*": 4}, strategy="Resource")
    >>> opts.layer("2.0", "2"), opts.layer("0.0", "0")
    ((4, 'Resource'), (1, 'Resource'))
    >>> HlsOptions(io_type="stream")
    Traceback (most recent call last):
    ...
    ValueError: io_type must be one of ['io_parallel', 'io_stream'], got 'stream'
    """

    io_type: str = "io_parallel"
    reuse_factor: PerLayer = 1
    strategy: PerLayer = "Latency"
    backend: str = "Vivado"
    part: str | None = None

    def __post_init__(self) -> None:
        if self.io_type not in IO_TYPES:
            raise ValueError(f"io_type must be one of {list(IO_TYPES)}, got {self.io_type!r}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {list(BACKENDS)} (the backends whose C "
                f"simulation tnquant checks bit for bit), got {self.backend!r}"
            )
        if self.part is not None and (not isinstance(self.part, str) or not self.part):
            raise ValueError(f"part must be a non-empty str or None, got {self.part!r}")
        _per_layer(self.reuse_factor, "reuse_factor", _reuse_problem)
        _per_layer(self.strategy, "strategy", _strategy_problem)

    def layer(self, op_name: str, layer_name: str) -> tuple[int, str]:
        """``(ReuseFactor, Strategy)`` of one op (matched by op or layer name)."""
        out: list[Any] = []
        for value, default, what, check in (
            (self.reuse_factor, 1, "reuse_factor", _reuse_problem),
            (self.strategy, "Latency", "strategy", _strategy_problem),
        ):
            chosen = default
            for key, v in _per_layer(value, what, check):
                if fnmatch.fnmatchcase(op_name, key) or fnmatch.fnmatchcase(layer_name, key):
                    chosen = v
                    break
            out.append(chosen)
        return int(out[0]), str(out[1])


def _check_order(op: Op, reuse: int, strategy: str, io_type: str = "io_parallel") -> None:
    """Refuse a saturating user accumulator where hls4ml sums in another order."""
    streamed_conv = io_type == "io_stream" and op.kind in CONVS
    if reuse == 1 and strategy == "Latency" and not streamed_conv:
        return
    why = (
        "io_stream's convolution (nnet_conv2d_stream.h) sums"
        if streamed_conv
        else f"ReuseFactor {reuse} / Strategy {strategy!r} sum"
    )
    for k, (acc, derived) in enumerate(zip(op.accum_types, op.accum_derived, strict=False)):
        if not derived and acc.overflow != "WRAP":
            raise ValueError(
                f"op {op.name!r}: accum type {acc} (given with accum=) saturates, and "
                f"{why} the products in another order than the emulator "
                f"(nnet_dense_latency.h), so a saturated sum would differ; leave accum= "
                f"unset for this op (the derived accumulator is lossless), give it "
                f"overflow='WRAP', or use reuse_factor=1, strategy='Latency' and "
                f"io_parallel for it (step {k})"
            )


#: the op kinds hls4ml's PyTorch front end takes
HLS4ML_KINDS = ("dense", "relu", "leaky_relu", *TABLES, *SPATIAL, *MERGES, *AFFINE)


def hls4ml_supported(ops: list[Op]) -> bool:
    """Whether every op takes the hls4ml route (dense, relu and leaky_relu only).

    Examples
    --------
    >>> hls4ml_supported([])
    True
    """
    return all(op.kind in HLS4ML_KINDS and not op.params.get("map") for op in ops)


def _no_route(op: Op) -> ValueError:
    if op.kind == "clip":
        return ValueError(
            f"op {op.name!r} (clip: an nn.ReLU6 or nn.Hardtanh) has no hls4ml route: "
            f"hls4ml 1.3.0's PyTorch front end takes neither ReLU6 nor Hardtanh; the C++ "
            f"project (tnquant.export.cproject.write_project) and QONNX "
            f"(tnquant.export.qonnx.qonnx) take it"
        )
    return ValueError(
        f"op {op.name!r} ({op.kind}) has no hls4ml route; TT layers export "
        f"as C headers and tt_linear.h (see tnquant.export)"
    )


def _softmax() -> nn.Module:
    return nn.Softmax(dim=-1)


def _value(m: np.ndarray, t: FixedPoint) -> torch.Tensor:
    if t.width > 53:
        raise ValueError(
            f"{t} is wider than float64's 53-bit mantissa; hls4ml reads weights "
            f"as floats, so it cannot take them exactly"
        )
    return torch.from_numpy(np.ldexp(m.astype(np.float64), -t.frac))


def torch_chain(ops: list[Op]) -> nn.Module:
    """The float64 ``nn.Sequential`` of ``nn.Linear``/``nn.ReLU``/... hls4ml converts (a graph:
    :func:`tnquant.export.hls_graph.torch_graph`).

    Raises ``ValueError`` for a TT op (it takes the C-header route) and a
    clip op (the C++ project and QONNX take it).

    Examples
    --------
    >>> from tnquant.export.graph import Op
    >>> t = FixedPoint(4, 2)
    >>> torch_chain([Op("r", "relu", "r", 3, 3, t, t)])
    Sequential(
      (0): ReLU()
    )
    """
    if any(op.inputs for op in ops):  # a graph (tnquant.export.hls_graph)
        return torch_graph(ops, op_module)
    return nn.Sequential(*(nn.Flatten() if op is None else op_module(op) for op in layer_ops(ops)))


def op_module(op: Op) -> nn.Module:
    """The float64 torch module hls4ml converts for one op (``ValueError``: none)."""
    if op.kind in SPATIAL:
        return spatial_module(op, _value)
    if op.kind == "relu":
        return nn.ReLU()
    if op.kind == "leaky_relu" and op.params.get("map"):
        raise ValueError(
            f"op {op.name!r}: a PReLU with one alpha per channel of a feature map has no "
            f"hls4ml route yet (hls4ml's PReLU takes one alpha per element, in its "
            f"channels-last order); the emulator and a PReLU on flat features take it"
        )
    if op.kind == "leaky_relu" and op.weights[0].size > 1:  # a PReLU, one alpha per feature
        prelu = nn.PReLU(op.weights[0].size).double()
        with torch.no_grad():
            prelu.weight.copy_(_value(op.weights[0], op.weight_types[0]))
        return prelu
    if op.kind == "leaky_relu":
        alpha = float(np.ldexp(float(op.weights[0][0]), -op.weight_types[0].frac))
        return nn.LeakyReLU(negative_slope=alpha)
    if op.kind in TABLES:
        return {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}.get(op.kind, _softmax)()
    if op.kind in AFFINE:
        return batchnorm_module(op, _value)
    if op.kind != "dense":
        raise _no_route(op)
    lin = nn.Linear(op.in_features, op.out_features, bias=op.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(_value(op.weights[0], op.weight_types[0]))
        if op.bias is not None and op.bias_type is not None:
            lin.bias.copy_(_value(op.bias, op.bias_type))
    return lin


def hls4ml_config(
    ops: list[Op], chain: nn.Module | None = None, options: HlsOptions | None = None
) -> dict[str, Any]:
    """hls4ml's own configuration dict for the chain, every precision filled in.

    ``{'Model': {'Precision': ..., 'ReuseFactor': 1, 'Strategy': 'Latency',
    'ChannelsLastConversion': 'full', ...}, 'LayerName': {name: {'Precision':
    {...}, 'ReuseFactor': ..., 'Strategy': ...}}}`` as
    ``hls4ml.utils.config_from_pytorch_model`` writes it
    (``granularity='name'``), with ``options``' per-layer knobs
    (:class:`HlsOptions`; default: ``ReuseFactor`` 1, ``'Latency'``).

    Examples
    --------
    >>> from tnquant.export.graph import Op
    >>> t = FixedPoint(4, 2)
    >>> cfg = hls4ml_config([Op("r", "relu", "r", 3, 3, t, t)])   # doctest: +SKIP
    >>> cfg["LayerName"]["_0"]["Precision"]["result"]             # doctest: +SKIP
    'ap_fixed<4,2>'
    """
    import hls4ml

    options = HlsOptions() if options is None else options
    chain = torch_chain(ops) if chain is None else chain
    cfg = hls4ml.utils.config_from_pytorch_model(
        chain,
        input_shape=input_shape(ops),
        granularity="name",
        backend=options.backend,
        default_precision=str(
            default_type(ops) if any(op.kind in SPATIAL for op in ops) else ops[0].input_type
        ),
        channels_last_conversion="full",
    )
    names = list(cfg["LayerName"])
    layers = graph_layers(ops) if any(op.inputs for op in ops) else layer_ops(ops)
    if len(names) != len(layers) + 1:
        raise RuntimeError(
            f"hls4ml named {len(names)} layers {names} for {len(ops)} ops + the "
            f"input; cannot match them"
        )
    cfg["Model"].update({"ReuseFactor": 1, "Strategy": "Latency", "ChannelsLastConversion": "full"})
    # hls4ml's own checks of the model-level keys; every layer gets its own below
    cfg["LayerName"][names[0]]["Precision"] = {"result": str(ops[0].input_type)}
    for k, (name, op) in enumerate(zip(names[1:], layers, strict=True)):
        layer = cfg["LayerName"][name]
        if op is None:  # the Flatten (hls4ml's Reshape): a copy of what the op after it reads
            nxt = layers[k + 1]
            layer["Precision"] = {"result": str(nxt.input_type if nxt else ops[0].input_type)}
            continue
        if op.kind in POOLS:
            layer["Precision"] = spatial_precision(op, _ZERO_BIAS)
            continue
        if op.kind == "relu":
            layer["Precision"]["result"] = str(op.result_type)
            continue
        if op.kind in MERGES:  # hls4ml's Merge / Concatenate: one cast to res_T
            layer["Precision"] = {"result": str(op.result_type)}
            continue
        if op.kind in AFFINE:  # hls4ml's BatchNormalization: scale_t, bias_t, res_T
            layer["Precision"] = {
                "scale": str(op.weight_types[0]),
                "bias": str(op.bias_type),
                "result": str(op.result_type),
            }
            continue
        if op.kind == "leaky_relu":  # param_t: alpha's own type, not hls4ml's guess
            layer["Precision"].update(result=str(op.result_type), param=str(op.weight_types[0]))
            continue
        if op.kind in TABLES:  # the tables the emulator builds (tnquant.export.table_ops)
            keys = hls4ml_keys(op)
            accum = keys.pop("accum", None)
            layer["Precision"] = {"result": str(op.result_type)}
            if accum is not None:
                layer["Precision"]["accum"] = accum
            layer.update(keys)
            continue
        layer["Precision"] = {
            "weight": str(op.weight_types[0]),
            "bias": str(op.bias_type) if op.bias_type is not None else _ZERO_BIAS,
            "accum": str(op.accum_types[0]),
            "result": str(op.result_type),
        }
        reuse, strategy = options.layer(op.name, op.layer)
        _check_order(op, reuse, strategy, options.io_type)
        layer["ReuseFactor"], layer["Strategy"] = reuse, strategy
    cfg.pop("PytorchModel", None)
    return cfg


def to_hls4ml(
    model: nn.Module,
    out_dir: str | Path,
    input_spec: FixedPoint | None = None,
    *,
    accum: TypeOverride = None,
    result: TypeOverride = None,
    bias: TypeOverride = None,
    project_name: str = "tnquant_model",
    io_type: str = "io_parallel",
    reuse_factor: PerLayer = 1,
    strategy: PerLayer = "Latency",
    backend: str = "Vivado",
    part: str | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> Any:
    """The model as an hls4ml ``ModelGraph`` (not compiled) with the exported types.

    Parameters
    ----------
    model, input_spec, accum, result, bias, input_shape
        As :func:`tnquant.export.fixed_point`.
    out_dir
        hls4ml's project directory.
    project_name
        hls4ml's project name.
    io_type, reuse_factor, strategy, backend, part
        hls4ml's knobs (:class:`HlsOptions`, checked before anything is
        built): ``io_type`` ``'io_parallel'`` / ``'io_stream'``;
        ``reuse_factor`` and ``strategy`` (``'Latency'`` / ``'Resource'``)
        for the whole model or per layer as ``{glob: value}`` over op names
        (``'0.1'``: step 1 of layer ``'0'``) or layer names; ``backend``
        ``'Vivado'`` / ``'Vitis'``; ``part=None`` keeps hls4ml's default.

    Returns
    -------
    hls4ml.model.ModelGraph
        ``.compile()`` then ``.predict(x)`` gives, bit for bit, what
        :meth:`IntegerModel.predict` gives, for every combination of the
        knobs (a saturating user accumulator under ``'Resource'`` or a reuse
        factor above 1 is refused: see the module docs).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, quantize
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
    >>> hls_model = to_hls4ml(model, "/tmp/tnq_hls", FixedPoint(8, 3),
    ...                       io_type="io_stream", reuse_factor=2)   # doctest: +SKIP
    >>> hls_model.compile()                                          # doctest: +SKIP
    >>> to_hls4ml(model, "/tmp/tnq_hls", FixedPoint(8, 3), strategy="latency")
    Traceback (most recent call last):
    ...
    ValueError: strategy must be one of ['Latency', 'Resource'], got 'latency'
    """
    options = HlsOptions(io_type, reuse_factor, strategy, backend, part)
    ops = build_graph(
        model, input_spec, accum=accum, result=result, bias=bias, input_shape=input_shape
    )
    return graph_to_hls4ml(ops, out_dir, project_name=project_name, options=options)


def graph_to_hls4ml(
    ops: list[Op],
    out_dir: str | Path,
    *,
    project_name: str = "tnquant_model",
    options: HlsOptions | None = None,
) -> Any:
    """:func:`to_hls4ml` from an already built IR.

    Examples
    --------
    >>> graph_to_hls4ml([], "/tmp/x")
    Traceback (most recent call last):
    ...
    ValueError: no ops to convert
    """
    if not ops:
        raise ValueError("no ops to convert")
    for op in ops:
        if op.kind not in HLS4ML_KINDS:
            raise _no_route(op)
    import hls4ml

    options = HlsOptions() if options is None else options
    chain = torch_chain(ops)
    cfg = hls4ml_config(ops, chain, options)
    kwargs: dict[str, Any] = {"part": options.part} if options.part is not None else {}
    return hls4ml.converters.convert_from_pytorch_model(
        chain,
        input_shape=input_shape(ops),
        hls_config=cfg,
        output_dir=str(out_dir),
        project_name=project_name,
        backend=options.backend,
        io_type=options.io_type,
        **kwargs,
    )
