"""The op builders of the fixed-point export, one per export route.

A registry entry's ``export`` names a route; :data:`ROUTES` maps it to
whether the layer takes an ``'input'`` type and to the builder of its
:class:`~tnquant.export.ir.Op` s:

================  ==============================  =====================================
route             modules                         ops
================  ==============================  =====================================
``'dense'``       ``QuantLinear``                 one ``dense``
``'lowrank'``     ``LowRankLinear``               two ``dense`` (``V``, then ``U`` + bias)
``'tucker'``      ``TuckerLinear`` (order 1)      three ``dense``
``'tt'``          ``TTLinear``                    one ``tt``, contracted core by core
``'relu'``        ``nn.ReLU``                     ``relu``
``'clip'``        ``nn.ReLU6``, ``nn.Hardtanh``   ``clip`` (bounds on the input grid)
``'leaky_relu'``  ``nn.LeakyReLU``                ``leaky_relu`` (alpha on at most 16
                                                  fractional bits)
``'flatten'``     ``nn.Flatten(1, -1)``           none (checked: a no-op on the chain)
``'sigmoid'``     ``nn.Sigmoid``, ``nn.Tanh``,    ``sigmoid``/``tanh``/``softmax``:
``'tanh'``,       ``nn.Softmax(-1)``              hls4ml's lookup tables
``'softmax'``                                     (:mod:`tnquant.export.table_ops`)
``'prelu'``       ``nn.PReLU``                    ``leaky_relu`` with one alpha per
                                                  feature (or one)
``'batchnorm'``   ``nn.BatchNorm1d/2d``           ``batchnorm`` (not folded: see
                                                  :mod:`tnquant.export.batchnorm_ops`)
``'float'``       ``nn.Linear``                   refused: quantize it first
================  ==============================  =====================================

``nn.Identity`` and ``nn.Dropout`` have the route ``'skip'``, which
:func:`~tnquant.export.graph.build_graph` passes by without a builder. The
elementwise builders and their arithmetic are in
:mod:`tnquant.export.elementwise`. Each builder reads and updates the walk's
state (the type reaching the layer) kept by
:func:`tnquant.export.graph.build_graph`; the type rules are described in
:mod:`tnquant.export.graph`.

Examples
--------
>>> sorted(ROUTES)  # doctest: +NORMALIZE_WHITESPACE
['batchnorm', 'clip', 'dense', 'flatten', 'float', 'leaky_relu', 'lowrank', 'prelu', 'relu',
 'sigmoid', 'softmax', 'tanh', 'tt', 'tucker']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from tnquant.export.acts import act_type
from tnquant.export.batchnorm_ops import batchnorm_ops
from tnquant.export.codes import MAX_WIDTH, auto_accum, fixed_codes, narrower, too_wide
from tnquant.export.elementwise import clip_ops, flatten_ops, leaky_ops, prelu_ops, relu_ops
from tnquant.export.ir import Op, TypeOverride, label, lookup_override
from tnquant.export.table_ops import table_ops
from tnquant.layers.base import FactorizedLayer
from tnquant.layers.tt import TTLinear
from tnquant.layers.tucker import TuckerLinear
from tnquant.quant.fixed_point import to_mantissa
from tnquant.specs import FixedPoint

__all__ = ["ROUTES", "Route", "act_spec"]


def act_spec(module: nn.Module, site: str, name: str) -> FixedPoint | None:
    """The type fixed by ``module``'s activation quantizer at ``site``, if it has one.

    Examples
    --------
    >>> act_spec(nn.Linear(2, 2), "input", "0") is None
    True
    """
    acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    if acts is None or site not in acts:
        return None
    return act_type(acts[site], f"{name}.{site}")


#: the dense steps of a chain route, in contraction order: (core index, transposed)
_CHAIN_ORDER = {
    "lowrank": [(1, False), (0, False)],  # [U (out, r), V (r, in)]
    "tucker": [(2, True), (1, False), (0, False)],  # [U_out, G (r_out, r_in), U_in (in, r_in)]
}


def _steps(name: str, module: nn.Module, route: str) -> list[tuple[Tensor, Any, str, bool]]:
    """Dense steps ``(weight (out, in), quantizer, where, transposed)`` of a chain layer."""
    if route == "dense":
        return [
            (
                cast(Tensor, module.weight),
                module._modules.get("weight_quantizer"),
                f"{name}.weight",
                False,
            )
        ]
    layer = cast(FactorizedLayer, module)
    qs = cast("nn.ModuleList | None", layer._modules.get("core_quantizers"))
    quantizers = list(qs) if qs is not None else [None] * len(layer.cores)
    cores = list(layer.cores)
    return [(cores[k], quantizers[k], f"{name}.cores.{k}", t) for k, t in _CHAIN_ORDER[route]]


def _bias(
    param: Tensor, frac: int, given: FixedPoint | None, op: str, prev: str | None
) -> tuple[np.ndarray, FixedPoint]:
    """Bias mantissas and type: ``given``, else the products' ``frac`` bits, RND_CONV/SAT."""
    b = param.detach().to(torch.float64).cpu()
    spec = given
    if spec is None:
        top = float(b.abs().max()) if b.numel() else 0.0
        integer = max(1, math.floor(math.log2(top)) + 2) if top > 0 else 1
        if integer + frac > MAX_WIDTH:
            reads = (
                f"result={{'{prev}': FixedPoint(...)}} on the op before"
                if prev is not None
                else "a narrower input_spec"
            )
            raise too_wide(
                op,
                "bias",
                integer + frac,
                f"{integer} integer bits on the products' {frac} fractional bits",
                f"give it with bias={{'{op}': {narrower(integer)}}}; the products then "
                f"still need their {frac} fractional bits: narrow what the op reads with "
                f"{reads}",
            )
        spec = FixedPoint(integer + frac, integer, rounding="RND_CONV", overflow="SAT")
    return to_mantissa(b, spec).numpy(), FixedPoint(spec.width, spec.integer, spec.signed)


def typed_op(
    kind: str,
    name: str,
    op_name: str,
    module: nn.Module,
    site: str,
    codes: tuple[np.ndarray, FixedPoint, list[int]],
    notes: list[str],
    n_products: int,
    in_features: int,
    out_features: int,
    bias_param: Tensor | None,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    **extra: Any,
) -> Op:
    """One contraction step (``dense``, ``conv2d``) with the dense type rules; ``state`` moves on.

    The bias (``bias=`` or the products' fractional bits), the accumulator
    (``accum=`` or lossless over ``n_products`` products), the result
    (``result=``, the ``site`` activation quantizer, else the accumulator),
    looked up by ``op_name`` then the layer ``name``. ``extra`` goes to the
    :class:`Op` (a conv's shapes and params).
    """
    m, wtype, exps = codes
    in_type = state["type"]
    keys = [op_name, name]
    bias = bias_type = given_bias = None
    if bias_param is not None:
        given_bias = lookup_override(overrides["bias"], keys, "bias")
        bias, bias_type = _bias(
            bias_param, in_type.frac + wtype.frac, given_bias, op_name, state["prev"]
        )
    accum = given_accum = lookup_override(overrides["accum"], keys, "accum")
    if accum is None:
        accum = auto_accum(op_name, in_type, wtype, n_products, bias_type, state["prev"])
    result = lookup_override(overrides["result"], keys, "result")
    if result is None:
        result = act_spec(module, site, name)
    state["explicit"] = result is not None
    if result is None:
        result = FixedPoint(accum.width, accum.integer, accum.signed)
    op = Op(
        name=op_name,
        kind=kind,
        layer=name,
        in_features=in_features,
        out_features=out_features,
        input_type=in_type,
        result_type=result,
        weights=[m],
        weight_types=[wtype],
        bias=bias,
        bias_type=bias_type,
        accum_types=[accum],
        step_types=[result],
        scales=[exps],
        accum_derived=[given_accum is None],
        result_derived=[not state["explicit"]],
        bias_derived=bias is not None and given_bias is None,
        notes=notes,
        **extra,
    )
    state["type"], state["prev"] = result, op_name
    return op


def _chain_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    route: str,
) -> list[Op]:
    steps = _steps(name, module, route)
    n = len(steps)
    bias_param = cast("Tensor | None", module._parameters.get("bias"))
    ops = []
    for k, (t, q, where, transposed) in enumerate(steps):
        if isinstance(q, nn.Identity):
            q = None
        op_name = name if n == 1 else f"{name}.{k}"
        notes: list[str] = []
        m, wtype, exps = fixed_codes(q, t, where, op=op_name, notes=notes)
        if transposed:
            m = m.T.copy()
        site = "output" if k == n - 1 else f"inter_{k}"
        bias = bias_param if k == n - 1 else None
        step = typed_op(
            "dense",
            name,
            op_name,
            module,
            site,
            (m, wtype, exps),
            notes,
            m.shape[1],
            m.shape[1],
            m.shape[0],
            bias,
            state,
            overrides,
        )
        ops.append(step)
    return ops


def _tt_op(
    name: str, module: TTLinear, state: dict[str, Any], overrides: dict[str, TypeOverride]
) -> Op:
    acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    d = len(module.cores)
    if (
        acts is not None
        and any(k.startswith("inter_") for k in acts)
        and d > 1
        and tuple(module.chain_order) != tuple(range(d - 1, -1, -1))
    ):
        raise ValueError(
            f"{name}: the export contracts TT cores right to left (core {d - 1} "
            f"first) but the layer's chain_order is {module.chain_order}, so its "
            f"inter_* quantizers name other intermediates; remove them"
        )
    qs = cast("nn.ModuleList | None", module._modules.get("core_quantizers"))
    quantizers = list(qs) if qs is not None else [None] * d
    mants, types, scales = [], [], []
    notes: list[str] = []
    for k, (c, q) in enumerate(zip(module.cores, quantizers, strict=True)):
        q = None if isinstance(q, nn.Identity) else q
        m, t, e = fixed_codes(q, c, f"{name}.cores.{k}", op=f"{name}.{d - 1 - k}", notes=notes)
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
            given_bias = lookup_override(overrides["bias"], [step, name], "bias")
            bias, bias_type = _bias(bias_param, cur.frac + types[k].frac, given_bias, step, prev)
        accum = lookup_override(overrides["accum"], [step, name], "accum")
        derived.append(accum is None)
        if accum is None:
            accum = auto_accum(step, cur, types[k], n, bias_type if last else None, prev)
        result = lookup_override(overrides["result"], [step, name], "result")
        if result is None:
            site = "output" if last else f"inter_{s}"
            result = act_spec(module, site, name)
        state["explicit"] = result is not None
        rderived.append(result is None)
        if result is None:
            result = FixedPoint(accum.width, accum.integer, accum.signed)
        accums.append(accum)
        results.append(result)
        cur, prev = result, step
    state["type"], state["prev"] = cur, name
    return Op(
        name=name,
        kind="tt",
        layer=name,
        in_features=module.in_features,
        out_features=module.out_features,
        input_type=in_type,
        result_type=cur,
        weights=mants,
        weight_types=types,
        bias=bias,
        bias_type=bias_type,
        accum_types=accums,
        step_types=results,
        scales=scales,
        accum_derived=derived,
        result_derived=rderived,
        bias_derived=bias is not None and given_bias is None,
        notes=notes,
    )


Route = Callable[[str, nn.Module, dict[str, Any], dict[str, TypeOverride], list[Op]], list[Op]]


def _chain_route(route: str) -> Route:
    def ops(
        name: str,
        module: nn.Module,
        state: dict[str, Any],
        overrides: dict[str, TypeOverride],
        done: list[Op],
    ) -> list[Op]:
        if route == "tucker" and len(cast(TuckerLinear, module).cores) != 3:
            raise ValueError(
                f"{name}: only order-1 TuckerLinear exports; got a tensorized "
                f"Tucker of order {cast(TuckerLinear, module).order}"
            )
        return _chain_ops(name, module, state, overrides, route)

    return ops


def _tt_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    return [_tt_op(name, cast(TTLinear, module), state, overrides)]


def _float_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    raise ValueError(
        f"{label(name)} is a float nn.Linear; quantize its weight with "
        f"FixedPoint or QuantSpec(scale='pow2') first"
    )


#: export route name (a registry entry's ``export``) -> (takes an 'input' type, its ops)
ROUTES: dict[str, tuple[bool, Route]] = {
    "dense": (True, _chain_route("dense")),
    "lowrank": (True, _chain_route("lowrank")),
    "tucker": (True, _chain_route("tucker")),
    "tt": (True, _tt_ops),
    "relu": (False, relu_ops),
    "clip": (False, clip_ops),
    "leaky_relu": (False, leaky_ops),
    "prelu": (False, prelu_ops),
    "batchnorm": (False, batchnorm_ops),
    "sigmoid": (False, table_ops),
    "tanh": (False, table_ops),
    "softmax": (False, table_ops),
    "flatten": (False, flatten_ops),
    "float": (False, _float_ops),
}
