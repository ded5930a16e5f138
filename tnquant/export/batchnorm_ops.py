"""A BatchNorm that is not folded: hls4ml's ``BatchNormalization``, ``y = result(x * s + b)``.

:func:`tnquant.ptq.fold_batchnorm` folds a BatchNorm into the layer before it
(no op at all); one that cannot be folded (after a ReLU, at the model input,
after a pool) exports as a ``'batchnorm'`` op, as hls4ml's ``normalize``:
the product ``x * scale`` exact, the shift added exactly (``ap_fixed``
arithmetic widens), one cast to the result type.

Types
-----
``scale = weight / sqrt(running_var + eps)`` per channel, on one type: each
value on its fewest fractional bits (at most 16: off that grid it is
rounded to nearest even), aligned, as a PReLU's slopes
(:func:`tnquant.export.elementwise.alpha_codes`). ``shift = bias -
running_mean * scale`` on the product's binary point (rounded to nearest
even), as a dense layer's bias, unless ``bias=`` gives its type. The
derived result holds ``x * s + b`` exactly: the product's
``ap_fixed<Wx+Ws, Ix+Is>`` and one integer bit above the wider of it and the
shift; ``result=`` (the module's name) overrides it. On a ``(C, H, W)`` map
(``nn.BatchNorm2d``) the channel's values repeat over ``H * W`` in the
channels-first flat order.

:func:`set_batchnorm` sets the module to compute exactly that in torch:
``weight = s``, ``bias = b``, ``running_mean = 0``, ``running_var = 1 -
2^-20`` and ``eps = 2^-20`` (so ``sqrt(var + eps)`` is exactly 1, in float32
and float64 alike; hls4ml derives the same scale from them).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import FixedPoint
>>> bn = nn.BatchNorm1d(2, eps=BN_EPS).eval()
>>> with torch.no_grad():
...     _ = bn.weight.copy_(torch.tensor([0.5, 2.0])); _ = bn.running_mean.fill_(1.0)
...     _ = bn.running_var.fill_(1 - BN_EPS)
>>> op = batchnorm_ops("bn", bn, {"type": FixedPoint(8, 3), "shape": None}, _NONE, [])[0]
>>> op.weights[0].tolist(), op.bias.tolist(), str(op.weight_types[0]), str(op.result_type)
([1, 4], [-32, -128], 'ap_fixed<4,3>', 'ap_fixed<13,7>')
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from tnquant.export.codes import too_wide
from tnquant.export.contract import _count
from tnquant.export.elementwise import alpha_codes, alpha_type
from tnquant.export.ir import Op, TypeOverride, label, lookup_override
from tnquant.quant.fixed_point import cast_mantissa, to_mantissa
from tnquant.specs import FixedPoint

__all__ = [
    "batchnorm_ops",
    "run_batchnorm",
    "set_batchnorm",
    "batchnorm_module",
    "derived_result",
    "BN_EPS",
]

#: the eps :func:`set_batchnorm` gives a snapped BatchNorm (``1 - eps`` is its running_var)
BN_EPS = 2.0**-20
_NONE: dict[str, TypeOverride] = {"result": None, "bias": None, "accum": None}


def _derived(t: FixedPoint, s_t: FixedPoint, b_t: FixedPoint) -> tuple[int, int]:
    """``(W, I)`` of the lossless ``x * s + b`` (see the module docs)."""
    u = 0 if t.signed else 1
    integer = max(t.integer + s_t.integer + u, b_t.integer) + 1
    return integer + max(t.frac + s_t.frac, b_t.frac), integer


def derived_result(op: Op) -> FixedPoint | None:
    """The result type a ``'batchnorm'`` op derives from its types (``None``: past 64 bits).

    Examples
    --------
    >>> t = FixedPoint(8, 3)
    >>> op = Op("bn", "batchnorm", "bn", 2, 2, t, t, weight_types=[FixedPoint(4, 3)],
    ...         bias_type=FixedPoint(10, 4))
    >>> str(derived_result(op))
    'ap_fixed<13,7>'
    """
    assert op.bias_type is not None
    width, integer = _derived(op.input_type, op.weight_types[0], op.bias_type)
    return FixedPoint(width, integer) if width <= 64 else None


def batchnorm_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The ``'batchnorm'`` op of an ``nn.BatchNorm1d``/``nn.BatchNorm2d`` (see the module docs)."""
    bn = cast(nn.BatchNorm1d, module)
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{label(name)}: {type(bn).__name__}(track_running_stats=False) normalizes with "
            f"batch statistics; the export needs running statistics"
        )
    t, shape = state["type"], state.get("shape")
    channels = int(bn.num_features)
    n = math.prod(shape) if shape else (done[-1].out_features if done else channels)
    per = n // channels if n % channels == 0 else 0
    if not per or (shape and shape[0] != channels) or (not shape and n != channels):
        what = f"a map {tuple(shape)}" if shape else f"{n} features"
        raise ValueError(f"{label(name)}: {type(bn).__name__}({channels}) reads {what}")
    if bn.weight is None or bn.bias is None:
        raise ValueError(
            f"{label(name)}: {type(bn).__name__}(affine=False) has no weight and bias to hold "
            f"the exported scale and shift; use affine=True (weight 1, bias 0)"
        )
    w, b = bn.weight.detach().double(), bn.bias.detach().double()
    scale = w / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shift = b - bn.running_mean.detach().double() * scale
    s_m, s_t = alpha_codes(scale.tolist(), f"{label(name)}.scale")
    frac = t.frac + s_t.frac
    given_b = lookup_override(overrides.get("bias"), [name], "bias")
    b_spec = given_b or FixedPoint(64, 64 - frac, rounding="RND_CONV", overflow="SAT")
    b_m = to_mantissa(shift, b_spec).numpy().astype(np.int64)
    b_t = given_b or alpha_type(int(np.abs(b_m).max(initial=0)), frac)  # the narrowest holding it
    given = lookup_override(overrides.get("result"), [name], "result")
    width, integer = _derived(t, s_t, b_t)
    if given is None and width > 64:
        raise too_wide(name, "result", width, f"its input {t} times its scale {s_t}",
                       f"narrow what it reads, or give result={{'{name}': ...}}")  # fmt: skip
    result = given or FixedPoint(width, integer)
    state["explicit"] = given is not None
    state["type"], state["prev"] = result, name
    return [
        Op(
            name, "batchnorm", name, n, n, t, result,
            weights=[np.repeat(s_m, per)], weight_types=[s_t],
            bias=np.repeat(b_m, per), bias_type=b_t, bias_derived=given_b is None,
            step_types=[result], result_derived=[given is None],
            params={"map": tuple(shape)} if shape else {},
        )
    ]  # fmt: skip


def run_batchnorm(op: Op, x: np.ndarray, stats: dict[str, int] | None = None) -> np.ndarray:
    """hls4ml's ``normalize`` on mantissas: ``x * scale + shift`` exact, cast to the result.

    Examples
    --------
    >>> t = FixedPoint(4, 2)
    >>> op = Op("bn", "batchnorm", "bn", 2, 2, t, FixedPoint(8, 4), weights=[np.array([2, 1])],
    ...         weight_types=[FixedPoint(3, 2)], bias=np.array([1, -1]), bias_type=FixedPoint(4, 1))
    >>> run_batchnorm(op, np.array([[3, 2]])).tolist()   # 0.75*1+0.125, 0.5*0.5-0.125
    [[14, 2]]
    """
    assert op.bias is not None and op.bias_type is not None
    x_t, s_t, b_t = op.input_type, op.weight_types[0], op.bias_type
    fp = x_t.frac + s_t.frac
    frac = max(fp, b_t.frac)
    prod = (x * op.weights[0].astype(np.int64)) << (frac - fp)
    total = prod + (op.bias.astype(np.int64) << (frac - b_t.frac))
    if stats is not None:
        _count(stats, "result", total, frac, op.result_type)
    return cast_mantissa(total, frac, op.result_type).astype(np.int64)


def batchnorm_module(op: Op, value: Any) -> nn.Module:
    """The float64 BatchNorm hls4ml converts for ``op`` (``value(mantissas, type)`` -> floats).

    Per channel of a map (``BatchNorm2d``) or per feature (``BatchNorm1d``);
    hls4ml derives ``scale = weight / sqrt(var + eps)`` = ``weight`` exactly
    (see :func:`set_batchnorm`).
    """
    assert op.bias is not None and op.bias_type is not None
    shape = op.params.get("map")
    channels = shape[0] if shape else op.in_features
    per = op.in_features // channels
    cls = nn.BatchNorm2d if shape else nn.BatchNorm1d
    bn = cls(channels, eps=BN_EPS).double().eval()
    with torch.no_grad():
        bn.weight.copy_(value(op.weights[0][::per], op.weight_types[0]))
        bn.bias.copy_(value(op.bias[::per], op.bias_type))
        cast(torch.Tensor, bn.running_mean).zero_()
        cast(torch.Tensor, bn.running_var).fill_(1.0 - BN_EPS)
    return bn


def set_batchnorm(module: nn.Module, op: Op) -> float:
    """Make ``module`` compute ``op`` exactly (see the module docs); the largest scale change."""
    bn = cast(nn.BatchNorm1d, module)
    assert bn.running_mean is not None and bn.running_var is not None and op.bias_type is not None
    per = max(1, op.in_features // bn.num_features)
    scale = np.ldexp(op.weights[0][::per].astype(np.float64), -op.weight_types[0].frac)
    shift = np.ldexp(op.bias[::per].astype(np.float64), -op.bias_type.frac)  # type: ignore[index]
    with torch.no_grad():
        old = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        new = torch.from_numpy(scale)
        if bn.weight is not None:
            bn.weight.copy_(new.to(bn.weight.dtype))
        if bn.bias is not None:
            bn.bias.copy_(torch.from_numpy(shift).to(bn.bias.dtype))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - BN_EPS)
    bn.eps = BN_EPS
    return float((new - old).abs().max())
