"""Model -> a small IR of fixed-point ops (:class:`Op`), with every type derived.

The IR is a list of ops run in order, each reading the previous op's result:

``'dense'``
    ``y = cast_result(bias + sum_i cast_accum(x_i * W[o, i]))``, as hls4ml's
    ``dense_latency`` kernel (see :mod:`tnquant.export.emulator`).
``'relu'``
    ``y = x if x > 0 else 0``, same type in and out.
``'tt'``
    A TT-matrix layer contracted core by core, right to left (core ``d-1``
    first); every step is a dot product per output element, as ``'dense'``.

Types
-----
Weights and cores: the integer codes of their quantizer (a ``FixedPoint``
spec, or any symmetric spec whose scales are powers of two: the binary point
absorbs ``2^k``; per-channel exponents are aligned to the largest number of
fractional bits by exact left shifts, and the type is as wide as the aligned
mantissas reach, at least the codes' own width; see :mod:`tnquant.export.codes`).
Accumulators ("auto", lossless, as hls4ml's ``infer_precision``): a
``W1.F1 x W2.F2`` product is
``ap_fixed<W1+W2, (W1+W2)-(F1+F2)>``; a sum of ``n`` of them adds
``ceil(log2 n)`` integer bits; a bias (aligned to the product's fractional
bits) adds one more bit above the larger of the two. Results default to the
accumulator type, so lossless widths add up along a chain; past 62 bits (the
int64 emulator's limit) the export stops with a ``ValueError`` naming the op,
the width and a ``result=`` for the op before it.
``accum=``/``result=``/``bias=`` override any of them
(their rounding and overflow modes are honoured). An activation quantizer
fixes a type (see :mod:`tnquant.export.acts`: ``FixedPoint`` or a frozen
power-of-two ``QuantSpec``): ``'output'``/``'inter_k'`` set that step's
result type; ``'input'`` sets the model input type (first layer, no
``input_spec``) or the result type of the op before the layer (a ReLU then
casts after ``max(x, 0)``), where the torch model casts.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> model = nn.Sequential(nn.Linear(4, 3))
>>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
>>> ops = build_graph(model, FixedPoint(8, 3))
>>> [(op.name, op.kind, str(op.accum_types[0])) for op in ops]
[('0', 'dense', 'ap_fixed<17,8>')]
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union, cast

import numpy as np
import torch
from torch import Tensor, nn

from tnquant.export.acts import act_type
from tnquant.export.codes import MAX_WIDTH, auto_accum, fixed_codes, lossless_accum
from tnquant.layers.base import FactorizedLayer
from tnquant.layers.tt import TTLinear
from tnquant.layers.tucker import TuckerLinear
from tnquant.quant.fixed_point import to_mantissa
from tnquant.registry import export_route
from tnquant.specs import FixedPoint

__all__ = ["Op", "TypeOverride", "build_graph", "check_widths", "lossless_accum", "fixed_codes",
           "MAX_WIDTH"]

TypeOverride = Union[FixedPoint, Mapping[str, FixedPoint], None]


@dataclass
class Op:
    """One op of the fixed-point IR (see the module docs for the kinds).

    ``weights`` hold int64 mantissas: ``[W (out, in)]`` for ``'dense'``, the
    TT cores ``(r_{k-1}, o_k, i_k, r_k)`` in model order for ``'tt'``.
    ``accum_types`` and ``step_types`` have one entry per contraction step
    (``'tt'``: step ``s`` contracts core ``d-1-s``); ``step_types[-1]`` is
    ``result_type``. ``accum_derived``/``result_derived`` (one per step) and
    ``bias_derived`` say which types :func:`build_graph` derived itself
    rather than took from ``accum=``/``result=``/``bias=`` or an activation
    quantizer (empty: none); the loader re-derives those and compares.
    """

    name: str
    kind: str
    layer: str
    in_features: int
    out_features: int
    input_type: FixedPoint
    result_type: FixedPoint
    weights: list[np.ndarray] = field(default_factory=list)
    weight_types: list[FixedPoint] = field(default_factory=list)
    bias: np.ndarray | None = None
    bias_type: FixedPoint | None = None
    accum_types: list[FixedPoint] = field(default_factory=list)
    step_types: list[FixedPoint] = field(default_factory=list)
    scales: list[list[int]] = field(default_factory=list)
    accum_derived: list[bool] = field(default_factory=list)
    result_derived: list[bool] = field(default_factory=list)
    bias_derived: bool = False



# --------------------------------------------------------------------------- #
# walking the model
# --------------------------------------------------------------------------- #


def _lookup(override: TypeOverride, names: list[str], what: str) -> FixedPoint | None:
    if override is None:
        return None
    if isinstance(override, FixedPoint):
        return override
    if not isinstance(override, Mapping):
        raise TypeError(f"{what} must be a FixedPoint or a mapping of op-name globs to "
                        f"FixedPoint, got {type(override).__name__}")
    for name in names:
        for key, spec in override.items():
            if fnmatch.fnmatchcase(name, key):
                if not isinstance(spec, FixedPoint):
                    raise TypeError(f"{what}[{key!r}] must be a FixedPoint, got "
                                    f"{type(spec).__name__}")
                return spec
    return None


def _act_spec(module: nn.Module, site: str, name: str) -> FixedPoint | None:
    acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    if acts is None or site not in acts:
        return None
    return act_type(acts[site], f"{name}.{site}")


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        out = []
        for name, child in model.named_children():
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, model)]


#: the dense steps of a chain route, in contraction order: (core index, transposed)
_CHAIN_ORDER = {
    "lowrank": [(1, False), (0, False)],  # [U (out, r), V (r, in)]
    "tucker": [(2, True), (1, False), (0, False)],  # [U_out, G (r_out, r_in), U_in (in, r_in)]
}


def _steps(name: str, module: nn.Module, route: str) -> list[tuple[Tensor, Any, str, bool]]:
    """Dense steps ``(weight (out, in), quantizer, where, transposed)`` of a chain layer."""
    if route == "dense":
        return [(cast(Tensor, module.weight), module._modules.get("weight_quantizer"),
                 f"{name}.weight", False)]
    layer = cast(FactorizedLayer, module)
    qs = cast("nn.ModuleList | None", layer._modules.get("core_quantizers"))
    quantizers = list(qs) if qs is not None else [None] * len(layer.cores)
    cores = list(layer.cores)
    return [(cores[k], quantizers[k], f"{name}.cores.{k}", t) for k, t in _CHAIN_ORDER[route]]


def _bias(param: Tensor, frac: int, given: FixedPoint | None,
          op: str) -> tuple[np.ndarray, FixedPoint]:
    """Bias mantissas and type: ``given``, else the products' ``frac`` bits, RND_CONV/SAT."""
    b = param.detach().to(torch.float64).cpu()
    spec = given
    if spec is None:
        top = float(b.abs().max()) if b.numel() else 0.0
        integer = max(1, math.floor(math.log2(top)) + 2) if top > 0 else 1
        if integer + frac > MAX_WIDTH:
            raise ValueError(f"op {op!r}: its bias on the products' {frac} fractional bits "
                             f"needs {integer + frac} bits, wider than {MAX_WIDTH}; give it "
                             f"with bias={{'{op}': FixedPoint(24, {integer}, rounding='RND', "
                             f"overflow='SAT')}}")
        spec = FixedPoint(integer + frac, integer, rounding="RND_CONV", overflow="SAT")
    return to_mantissa(b, spec).numpy(), FixedPoint(spec.width, spec.integer, spec.signed)


def _chain_ops(name: str, module: nn.Module, state: dict[str, Any],
               overrides: dict[str, TypeOverride], route: str) -> list[Op]:
    steps = _steps(name, module, route)
    n = len(steps)
    bias_param = cast("Tensor | None", module._parameters.get("bias"))
    ops = []
    for k, (t, q, where, transposed) in enumerate(steps):
        if isinstance(q, nn.Identity):
            q = None
        m, wtype, exps = fixed_codes(q, t, where)
        if transposed:
            m = m.T.copy()
        op_name = name if n == 1 else f"{name}.{k}"
        site = "output" if k == n - 1 else f"inter_{k}"
        in_type = state["type"]
        bias = bias_type = given_bias = None
        if k == n - 1 and bias_param is not None:
            given_bias = _lookup(overrides["bias"], [op_name, name], "bias")
            bias, bias_type = _bias(bias_param, in_type.frac + wtype.frac, given_bias, op_name)
        accum = given_accum = _lookup(overrides["accum"], [op_name, name], "accum")
        if accum is None:
            accum = auto_accum(op_name, in_type, wtype, m.shape[1], bias_type, state["prev"])
        result = _lookup(overrides["result"], [op_name, name], "result")
        if result is None:
            result = _act_spec(module, site, name)
        state["explicit"] = result is not None
        if result is None:
            result = FixedPoint(accum.width, accum.integer, accum.signed)
        ops.append(Op(name=op_name, kind="dense", layer=name, in_features=m.shape[1],
                      out_features=m.shape[0], input_type=in_type, result_type=result,
                      weights=[m], weight_types=[wtype], bias=bias, bias_type=bias_type,
                      accum_types=[accum], step_types=[result], scales=[exps],
                      accum_derived=[given_accum is None],
                      result_derived=[not state["explicit"]],
                      bias_derived=bias is not None and given_bias is None))
        state["type"], state["prev"] = result, op_name
    return ops


def _tt_op(name: str, module: TTLinear, state: dict[str, Any],
           overrides: dict[str, TypeOverride]) -> Op:
    acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    d = len(module.cores)
    if acts is not None and any(k.startswith("inter_") for k in acts) and d > 1 and \
            tuple(module.chain_order) != tuple(range(d - 1, -1, -1)):
        raise ValueError(f"{name}: the export contracts TT cores right to left (core {d - 1} "
                         f"first) but the layer's chain_order is {module.chain_order}, so its "
                         f"inter_* quantizers name other intermediates; remove them")
    qs = cast("nn.ModuleList | None", module._modules.get("core_quantizers"))
    quantizers = list(qs) if qs is not None else [None] * d
    mants, types, scales = [], [], []
    for k, (c, q) in enumerate(zip(module.cores, quantizers, strict=True)):
        m, t, e = fixed_codes(None if isinstance(q, nn.Identity) else q, c,
                              f"{name}.cores.{k}")
        mants.append(m)
        types.append(t)
        scales.append(e)
    in_type = state["type"]
    cur = in_type
    bias_param = cast("Tensor | None", module._parameters.get("bias"))
    bias = bias_type = given_bias = None
    accums, results, derived, rderived = [], [], [], []
    prev = state["prev"]
    for s in range(d):
        k = d - 1 - s
        step = f"{name}.{s}"
        n = mants[k].shape[2] * mants[k].shape[3]
        last = s == d - 1
        if last and bias_param is not None:
            given_bias = _lookup(overrides["bias"], [step, name], "bias")
            bias, bias_type = _bias(bias_param, cur.frac + types[k].frac, given_bias, step)
        accum = _lookup(overrides["accum"], [step, name], "accum")
        derived.append(accum is None)
        if accum is None:
            accum = auto_accum(step, cur, types[k], n, bias_type if last else None, prev)
        result = _lookup(overrides["result"], [step, name], "result")
        if result is None:
            site = "output" if last else f"inter_{s}"
            result = _act_spec(module, site, name)
        state["explicit"] = result is not None
        rderived.append(result is None)
        if result is None:
            result = FixedPoint(accum.width, accum.integer, accum.signed)
        accums.append(accum)
        results.append(result)
        cur, prev = result, step
    state["type"], state["prev"] = cur, name
    return Op(name=name, kind="tt", layer=name, in_features=module.in_features,
              out_features=module.out_features, input_type=in_type, result_type=cur,
              weights=mants, weight_types=types, bias=bias, bias_type=bias_type,
              accum_types=accums, step_types=results, scales=scales, accum_derived=derived,
              result_derived=rderived, bias_derived=bias is not None and given_bias is None)


def check_widths(ops: list[Op]) -> None:
    """Refuse (``ValueError``) a type, or a product of a step's input and weights, past 62 bits.

    Examples
    --------
    >>> t = FixedPoint(40, 8)
    >>> check_widths([Op("0", "dense", "0", 1, 1, t, t, weight_types=[t])])
    Traceback (most recent call last):
    ...
    ValueError: op '0': products of ap_fixed<40,8> and ap_fixed<40,8> exceed 62 bits; narrow \
the previous result with result=
    """
    for op in ops:
        bias = [] if op.bias_type is None else [op.bias_type]
        for t in [op.input_type, *op.weight_types, *bias, *op.accum_types, *op.step_types]:
            if t.width > MAX_WIDTH:
                raise ValueError(f"op {op.name!r} needs type {t} wider than {MAX_WIDTH} bits "
                                 f"(the int64 emulator's limit); narrow it with result= or "
                                 f"accum= (e.g. result={{'{op.name}': FixedPoint(24, 8, "
                                 f"rounding='RND', overflow='SAT')}})")
        d = len(op.weight_types)  # a TT step s takes step s-1's result and core d-1-s
        ins = [op.input_type] if op.kind != "tt" else [op.input_type, *op.step_types[:d - 1]]
        for x, w in zip(ins, op.weight_types[::-1] if op.kind == "tt" else op.weight_types,
                        strict=False):
            if x.width + w.width > MAX_WIDTH:
                raise ValueError(f"op {op.name!r}: products of {x} and {w} exceed "
                                 f"{MAX_WIDTH} bits; narrow the previous result with result=")


def _take_input_type(name: str, given: FixedPoint, state: dict[str, Any],
                     done: list[Op]) -> None:
    """Make ``given`` (a layer's ``'input'`` quantizer type) the type reaching that layer.

    The torch model casts there, so the op before takes ``given`` as its
    result type: a ReLU then casts after ``max(x, 0)`` (as hls4ml's ReLU
    assigns to its ``res_T``); a dense/TT op casts its accumulator once.
    """
    if state["type"] is None:
        state["type"] = given
        state["explicit"] = True
        return
    if state["type"] == given:
        return
    prev = done[-1] if done else None
    if prev is None or (prev.kind != "relu" and state["explicit"]):
        what = "input_spec" if prev is None else f"the result type of op {prev.name!r}"
        raise ValueError(
            f"{name}.input quantizer {given} differs from {what} ({state['type']}), which is "
            f"set too; the export casts once per op: drop one of them, or make them equal")
    prev.result_type = given
    prev.step_types[-1:] = [given]
    prev.result_derived[-1:] = [False]
    state["type"] = given
    state["explicit"] = True


Route = Callable[[str, nn.Module, dict[str, Any], dict[str, TypeOverride], list[Op]], list[Op]]


def _relu_ops(name: str, module: nn.Module, state: dict[str, Any],
              overrides: dict[str, TypeOverride], done: list[Op]) -> list[Op]:
    t = state["type"]
    prev = done[-1].out_features if done else 0
    return [Op(name=name, kind="relu", layer=name, in_features=prev, out_features=prev,
               input_type=t, result_type=t, step_types=[t], result_derived=[True])]


def _chain_route(route: str) -> Route:
    def ops(name: str, module: nn.Module, state: dict[str, Any],
            overrides: dict[str, TypeOverride], done: list[Op]) -> list[Op]:
        if route == "tucker" and len(cast(TuckerLinear, module).cores) != 3:
            raise ValueError(f"{name}: only order-1 TuckerLinear exports; got a tensorized "
                             f"Tucker of order {cast(TuckerLinear, module).order}")
        return _chain_ops(name, module, state, overrides, route)
    return ops


def _tt_ops(name: str, module: nn.Module, state: dict[str, Any],
            overrides: dict[str, TypeOverride], done: list[Op]) -> list[Op]:
    return [_tt_op(name, cast(TTLinear, module), state, overrides)]


def _float_ops(name: str, module: nn.Module, state: dict[str, Any],
               overrides: dict[str, TypeOverride], done: list[Op]) -> list[Op]:
    raise ValueError(f"{name} is a float nn.Linear; quantize its weight with "
                     f"FixedPoint or QuantSpec(scale='pow2') first")


#: export route name (a registry entry's ``export``) -> (takes an 'input' type, its ops)
ROUTES: dict[str, tuple[bool, Route]] = {
    "dense": (True, _chain_route("dense")),
    "lowrank": (True, _chain_route("lowrank")),
    "tucker": (True, _chain_route("tucker")),
    "tt": (True, _tt_ops),
    "relu": (False, _relu_ops),
    "float": (False, _float_ops),
}


def _module_ops(name: str, module: nn.Module, state: dict[str, Any],
                overrides: dict[str, TypeOverride], done: list[Op]) -> list[Op]:
    """The ops of one leaf module, by its registry entry's export route (updates ``state``)."""
    route = ROUTES.get(export_route(module) or "")
    if route is not None and route[0]:
        first_in = _act_spec(module, "input", name)
        if first_in is not None:
            _take_input_type(name, first_in, state, done)
    if state["type"] is None:
        raise ValueError("input_spec is needed (a FixedPoint for the model input), e.g. "
                         "input_spec=FixedPoint(16, 6)")
    if route is None:
        raise ValueError(f"{name}: {type(module).__name__} has no fixed-point export; "
                         f"supported: QuantLinear, LowRankLinear, TuckerLinear (order 1), "
                         f"TTLinear, nn.ReLU")
    return route[1](name, module, state, overrides, done)


def build_graph(model: nn.Module, input_spec: FixedPoint | None = None, *,
                accum: TypeOverride = None, result: TypeOverride = None,
                bias: TypeOverride = None) -> list[Op]:
    """Turn a quantized model into a list of fixed-point :class:`Op` s.

    Parameters
    ----------
    model
        An ``nn.Sequential`` (nested ones are flattened) or a single layer of
        ``QuantLinear``, ``LowRankLinear``, ``TuckerLinear`` (order 1),
        ``TTLinear`` and ``nn.ReLU`` (``nn.Identity``/``nn.Dropout`` are
        skipped). Every weight/core needs a ``FixedPoint`` or power-of-two
        quantizer (fake-quant or converted).
    input_spec
        The input type; may be left out when the first layer has a
        ``FixedPoint`` ``'input'`` activation quantizer.
    accum, result, bias
        A ``FixedPoint`` for every op, or a mapping from globs on op names
        (``'<layer>'`` for one-step layers, ``'<layer>.<k>'`` for step ``k``
        of a chain) to ``FixedPoint``; first match wins.

    Returns
    -------
    list of Op

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import FixedPoint, quantize
    >>> from tnquant.layers import LowRankLinear
    >>> model = nn.Sequential(LowRankLinear([torch.randn(4, 2), torch.randn(2, 5)]))
    >>> _ = quantize(model, cores=FixedPoint(8, 3), progress=False)
    >>> [op.name for op in build_graph(model, FixedPoint(8, 2))]
    ['0.0', '0.1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if input_spec is not None and not isinstance(input_spec, FixedPoint):
        raise TypeError(f"input_spec must be a FixedPoint, got {type(input_spec).__name__}")
    overrides = {"accum": accum, "result": result, "bias": bias}
    state: dict[str, Any] = {"type": input_spec, "explicit": input_spec is not None,
                             "prev": None}
    ops: list[Op] = []
    for name, module in _leaves(model):
        if export_route(module) != "skip":
            ops += _module_ops(name, module, state, overrides, ops)
    if not ops:
        raise ValueError("the model has no layer to export")
    for k, op in enumerate(ops):
        if op.kind == "relu":
            size = ops[k - 1].out_features if k else 0
            if size == 0:
                raise ValueError(f"{op.name}: a ReLU needs a layer before it")
            op.in_features = op.out_features = size
    check_widths(ops)
    return ops
