"""hls4ml route: the fixed-point IR as a plain PyTorch chain plus an hls4ml config.

Chains of dense maps (``QuantLinear``, ``LowRankLinear``, order-1
``TuckerLinear``) and ReLUs become an ``nn.Sequential`` of ``nn.Linear``
(one per contraction step; the bias on the last step of each layer only)
and ``nn.ReLU``, in float64 with weights equal to the exported mantissas
times ``2**-frac`` (exact). hls4ml's PyTorch front end names its layers
after the torch.fx nodes of that chain (``'_0'``, ``'_1'``, ...), found with
``hls4ml.utils.config_from_pytorch_model(..., granularity='name')``; every
layer then gets the exported ``weight``/``bias``/``accum``/``result``
precisions. ``ChannelsLastConversion`` stays ``'full'`` (hls4ml 1.3.0 gives
wrong results on plain Linear chains with ``'off'``), ``Strategy`` is
``'Latency'`` (``nnet_dense_latency.h``, which the emulator follows) and
``ReuseFactor`` 1.

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

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tnquant.export.graph import Op, TypeOverride, build_graph
from tnquant.specs import FixedPoint

__all__ = ["torch_chain", "hls4ml_config", "to_hls4ml", "hls4ml_supported"]

#: a zero bias (a Linear without one) still gets a type in hls4ml
_ZERO_BIAS = "ap_fixed<2,1>"


def hls4ml_supported(ops: list[Op]) -> bool:
    """Whether every op takes the hls4ml route (dense and relu only).

    Examples
    --------
    >>> hls4ml_supported([])
    True
    """
    return all(op.kind in ("dense", "relu") for op in ops)


def _value(m: np.ndarray, t: FixedPoint) -> torch.Tensor:
    if t.width > 53:
        raise ValueError(
            f"{t} is wider than float64's 53-bit mantissa; hls4ml reads weights "
            f"as floats, so it cannot take them exactly"
        )
    return torch.from_numpy(np.ldexp(m.astype(np.float64), -t.frac))


def torch_chain(ops: list[Op]) -> nn.Sequential:
    """The float64 ``nn.Sequential`` of ``nn.Linear``/``nn.ReLU`` hls4ml converts.

    Raises ``ValueError`` for a TT op (it takes the C-header route).

    Examples
    --------
    >>> from tnquant.export.graph import Op
    >>> t = FixedPoint(4, 2)
    >>> torch_chain([Op("r", "relu", "r", 3, 3, t, t)])
    Sequential(
      (0): ReLU()
    )
    """
    mods: list[nn.Module] = []
    for op in ops:
        if op.kind == "relu":
            mods.append(nn.ReLU())
            continue
        if op.kind != "dense":
            raise ValueError(
                f"op {op.name!r} ({op.kind}) has no hls4ml route; TT layers export "
                f"as C headers and tt_linear.h (see tnquant.export)"
            )
        lin = nn.Linear(
            op.in_features, op.out_features, bias=op.bias is not None, dtype=torch.float64
        )
        with torch.no_grad():
            lin.weight.copy_(_value(op.weights[0], op.weight_types[0]))
            if op.bias is not None and op.bias_type is not None:
                lin.bias.copy_(_value(op.bias, op.bias_type))
        mods.append(lin)
    return nn.Sequential(*mods)


def hls4ml_config(ops: list[Op], chain: nn.Module | None = None) -> dict[str, Any]:
    """hls4ml's own configuration dict for the chain, every precision filled in.

    ``{'Model': {'Precision': ..., 'ReuseFactor': 1, 'Strategy': 'Latency',
    'ChannelsLastConversion': 'full', ...}, 'LayerName': {name: {'Precision':
    {...}}}}`` as ``hls4ml.utils.config_from_pytorch_model`` writes it
    (``granularity='name'``).

    Examples
    --------
    >>> from tnquant.export.graph import Op
    >>> t = FixedPoint(4, 2)
    >>> cfg = hls4ml_config([Op("r", "relu", "r", 3, 3, t, t)])   # doctest: +SKIP
    >>> cfg["LayerName"]["_0"]["Precision"]["result"]             # doctest: +SKIP
    'ap_fixed<4,2>'
    """
    import hls4ml

    chain = torch_chain(ops) if chain is None else chain
    cfg = hls4ml.utils.config_from_pytorch_model(
        chain,
        input_shape=(ops[0].in_features,),
        granularity="name",
        backend="Vivado",
        default_precision=str(ops[0].input_type),
        channels_last_conversion="full",
    )
    names = list(cfg["LayerName"])
    if len(names) != len(ops) + 1:
        raise RuntimeError(
            f"hls4ml named {len(names)} layers {names} for {len(ops)} ops + the "
            f"input; cannot match them"
        )
    cfg["Model"].update({"ReuseFactor": 1, "Strategy": "Latency", "ChannelsLastConversion": "full"})
    cfg["LayerName"][names[0]]["Precision"] = {"result": str(ops[0].input_type)}
    for name, op in zip(names[1:], ops, strict=True):
        layer = cfg["LayerName"][name]
        if op.kind == "relu":
            layer["Precision"]["result"] = str(op.result_type)
            continue
        layer["Precision"] = {
            "weight": str(op.weight_types[0]),
            "bias": str(op.bias_type) if op.bias_type is not None else _ZERO_BIAS,
            "accum": str(op.accum_types[0]),
            "result": str(op.result_type),
        }
        layer["ReuseFactor"] = 1
        layer["Strategy"] = "Latency"
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
    part: str | None = None,
) -> Any:
    """The model as an hls4ml ``ModelGraph`` (not compiled) with the exported types.

    Parameters
    ----------
    model, input_spec, accum, result, bias
        As :func:`tnquant.export.fixed_point`.
    out_dir
        hls4ml's project directory.
    project_name, part
        Passed to hls4ml (``part=None`` keeps hls4ml's default FPGA part).

    Returns
    -------
    hls4ml.model.ModelGraph
        ``.compile()`` then ``.predict(x)`` gives, bit for bit, what
        :meth:`IntegerModel.predict` gives.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, quantize
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
    >>> hls_model = to_hls4ml(model, "/tmp/tnq_hls", FixedPoint(8, 3))   # doctest: +SKIP
    >>> hls_model.compile()                                              # doctest: +SKIP
    """
    ops = build_graph(model, input_spec, accum=accum, result=result, bias=bias)
    return graph_to_hls4ml(ops, out_dir, project_name=project_name, part=part)


def graph_to_hls4ml(
    ops: list[Op],
    out_dir: str | Path,
    *,
    project_name: str = "tnquant_model",
    part: str | None = None,
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
    import hls4ml

    chain = torch_chain(ops)
    cfg = hls4ml_config(ops, chain)
    kwargs: dict[str, Any] = {"part": part} if part is not None else {}
    return hls4ml.converters.convert_from_pytorch_model(
        chain,
        input_shape=(ops[0].in_features,),
        hls_config=cfg,
        output_dir=str(out_dir),
        project_name=project_name,
        backend="Vivado",
        io_type="io_parallel",
        **kwargs,
    )
