"""The elementwise ops of the fixed-point export, and the layers that add no op.

=================  ==============================  ==============================================
route              modules                         op
=================  ==============================  ==============================================
``'relu'``         ``nn.ReLU``                     ``relu``: ``y = x if x > 0 else 0``
``'clip'``         ``nn.ReLU6``, ``nn.Hardtanh``   ``clip``: ``y = min(max(x, lo), hi)``
``'leaky_relu'``   ``nn.LeakyReLU``                ``leaky_relu``: ``y = x if x > 0 else alpha*x``
``'flatten'``      ``nn.Flatten`` (``start_dim``   none: on the ``(batch, features)`` chain it
                   1, ``end_dim`` -1)              changes nothing
``'skip'``         ``nn.Identity``, ``nn.Dropout``  none (a ``Dropout`` in eval is the identity)
=================  ==============================  ==============================================

The no-op layers add nothing to the IR, so the manifest, the emulator, the
hls4ml chain (:func:`~tnquant.export.hls.torch_chain`, whose layer names
line up one to one with the ops) and the C++ project never see them.

Every elementwise op casts its value to its result type (``res_T``), as
hls4ml's activations assign to ``res[i]``; the type is the input type for
``relu`` and ``clip``, and for all three the type a following layer's
``'input'`` activation quantizer sets, where the torch model casts (see
:mod:`tnquant.export.graph`).

clip
    ``lo`` and ``hi`` (``min_val``, ``max_val``) are stored as mantissas of
    the input type, so the comparisons are exact integer ones. A bound must
    lie on that type's grid (a multiple of ``2^-F``): one off it is refused
    (the torch model would clamp to a value no fixed-point type reaching the
    op holds); a bound beyond the type's range is replaced by the range's
    end, which gives the same result for every value the type holds (ReLU6
    on a type that cannot reach 6 is a ReLU). hls4ml 1.3.0's PyTorch front
    end takes neither ``ReLU6`` nor ``Hardtanh``: the op goes to the C++
    project (:mod:`tnquant.export.cproject`) and QONNX (a ``Clip`` node).
leaky_relu
    hls4ml's ``nnet::leaky_relu``: ``res = x > 0 ? x : alpha * x``, ``alpha``
    of type ``param_t`` and the product exact before the cast to ``res_T``.
    ``alpha`` is ``negative_slope`` on the fewest fractional bits ``F`` in
    ``0..16`` that hold it exactly (0.125: ``F = 3``); a slope that no ``F``
    up to 16 holds (0.01) becomes the nearest multiple of ``2^-16`` (ties to
    even; 0.01 -> 655/65536), with trailing zero bits dropped. Its type is
    ``ap_fixed<I+F, I>``, ``I = max(1, bitlen(|m|) + 1 - F)`` for the
    mantissa ``m`` (0.125: ``ap_fixed<4,1>``; 0.01: ``ap_fixed<17,1>``), set
    as hls4ml's ``param`` precision. The derived result type holds every
    result exactly: ``ap_fixed<Wx+Wa+u, Ix+Ia+u>`` (``u = 1`` for an
    unsigned input, else 0) -- the product's type, which holds ``x`` too as
    ``Ia >= 1``; ``result={'<layer>': ...}`` or a following ``'input'``
    quantizer narrows it. :func:`set_slopes` sets the module's
    ``negative_slope`` to the exported ``alpha`` (``fixed_point`` does it with
    the biases), so that the torch model computes what the emulator does.

Examples
--------
>>> slope_code(0.125), slope_code(0.01)
((1, FixedPoint(width=4, integer=1, signed=True, rounding='TRN', overflow='WRAP')), \
(655, FixedPoint(width=17, integer=1, signed=True, rounding='TRN', overflow='WRAP')))
>>> str(leaky_result(FixedPoint(10, 3), FixedPoint(4, 1)))
'ap_fixed<14,4>'
>>> clip_bounds("1", "ReLU6", 0.0, 6.0, FixedPoint(8, 4))   # 6.0 on 4 fractional bits
(0, 96)
>>> clip_bounds("1", "ReLU6", 0.0, 6.0, FixedPoint(8, 3))   # 6 is past ap_fixed<8,3>'s 3.97
(0, 127)
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from tnquant.export.codes import narrower, too_wide
from tnquant.export.ir import Op, TypeOverride, label, lookup_override
from tnquant.specs import FixedPoint

__all__ = [
    "ALPHA_FRAC",
    "ALPHA_LIMIT",
    "slope_code",
    "alpha_type",
    "leaky_result",
    "clip_bounds",
    "relu_ops",
    "clip_ops",
    "leaky_ops",
    "prelu_ops",
    "alpha_codes",
    "slope_state",
    "restore_slope",
    "flatten_ops",
    "leaky_modules",
    "set_slopes",
]

#: the most fractional bits a LeakyReLU's alpha gets (a slope off that grid is rounded)
ALPHA_FRAC = 16
#: negative_slope must be smaller than this in magnitude (alpha's type then stays within 32 bits)
ALPHA_LIMIT = 2**15


def alpha_type(m: int, frac: int) -> FixedPoint:
    """The type of the alpha mantissa ``m`` on ``frac`` fractional bits (see the module docs).

    Examples
    --------
    >>> str(alpha_type(1, 3)), str(alpha_type(-5, 1)), str(alpha_type(0, 0))
    ('ap_fixed<4,1>', 'ap_fixed<4,3>', 'ap_fixed<1,1>')
    """
    integer = max(1, abs(int(m)).bit_length() + 1 - frac)
    return FixedPoint(integer + frac, integer)


def slope_code(slope: float, where: str = "negative_slope") -> tuple[int, FixedPoint]:
    """``(mantissa, type)`` of a LeakyReLU's ``alpha`` (the rule of the module docs).

    Examples
    --------
    >>> slope_code(-0.5)[0], str(slope_code(3.0)[1])
    (-1, 'ap_fixed<3,3>')
    >>> slope_code(float("nan"), "2.negative_slope")
    Traceback (most recent call last):
    ...
    ValueError: 2.negative_slope must be a finite float with |negative_slope| < 2**15, got nan
    """
    s = float(slope)
    if not math.isfinite(s) or abs(s) >= ALPHA_LIMIT:
        raise ValueError(
            f"{where} must be a finite float with |negative_slope| < 2**15, got {slope!r}"
        )
    frac = next((f for f in range(ALPHA_FRAC + 1) if math.ldexp(s, f).is_integer()), None)
    if frac is None:
        frac, m = ALPHA_FRAC, round(math.ldexp(s, ALPHA_FRAC))  # ties to even
    else:
        m = int(math.ldexp(s, frac))
    while frac > 0 and m % 2 == 0:
        m, frac = m // 2, frac - 1
    return m, alpha_type(m, frac)


def leaky_result(in_type: FixedPoint, a_type: FixedPoint) -> FixedPoint:
    """The derived (lossless) result type of a ``leaky_relu`` op.

    Examples
    --------
    >>> str(leaky_result(FixedPoint(8, 2, signed=False), FixedPoint(17, 1)))
    'ap_fixed<26,4>'
    """
    u = 0 if in_type.signed else 1
    return FixedPoint(in_type.width + a_type.width + u, in_type.integer + a_type.integer + u)


def _leaky_type(name: str, in_type: FixedPoint, a_type: FixedPoint) -> FixedPoint:
    """:func:`leaky_result`, or a ``ValueError`` naming the op and the override past 64 bits."""
    u = 0 if in_type.signed else 1
    width = in_type.width + a_type.width + u
    if width > 64:
        raise too_wide(
            name, "result", width, f"its input {in_type} times alpha {a_type}",
            f"narrow it with result={{'{name}': {narrower(in_type.integer + a_type.integer)}}} "
            f"(or an 'output' quantizer of the layer before it, or a slope of fewer bits)",
        )  # fmt: skip
    return leaky_result(in_type, a_type)


def clip_bounds(name: str, cls: str, lo: float, hi: float, in_type: FixedPoint) -> tuple[int, int]:
    """``(lo, hi)`` as mantissas of ``in_type`` (clamped to its range; see the module docs).

    Examples
    --------
    >>> clip_bounds("3", "Hardtanh", -1.0, 0.3, FixedPoint(10, 4))
    Traceback (most recent call last):
    ...
    ValueError: 3: Hardtanh max_val=0.3 is not on the grid of its input type ap_fixed<10,4> \
(multiples of 2^-6); the clip compares mantissas of that type: give a bound on it (the \
nearest is 0.296875), or more fractional bits to the op before (result=)
    """
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(
            f"{label(name)}: {cls} needs min_val <= max_val (not NaN), got "
            f"min_val={lo!r}, max_val={hi!r}"
        )
    out = []
    for what, v in (("min_val", lo), ("max_val", hi)):
        scaled = math.ldexp(v, in_type.frac)
        if scaled <= in_type.qmin:
            out.append(in_type.qmin)
        elif scaled >= in_type.qmax:
            out.append(in_type.qmax)
        elif not scaled.is_integer():
            nearest = math.ldexp(round(scaled), -in_type.frac)
            raise ValueError(
                f"{label(name)}: {cls} {what}={v!r} is not on the grid of its input type "
                f"{in_type} (multiples of 2^-{in_type.frac}); the clip compares mantissas "
                f"of that type: give a bound on it (the nearest is {nearest!r}), or more "
                f"fractional bits to the op before (result=)"
            )
        else:
            out.append(int(scaled))
    return out[0], out[1]


def _size(done: list[Op]) -> int:
    """The features an elementwise op sees (0 before any layer: refused by build_graph)."""
    return done[-1].out_features if done else 0


def relu_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The ``relu`` op of an ``nn.ReLU`` (same type in and out)."""
    t, n = state["type"], _size(done)
    return [Op(name, "relu", name, n, n, t, t, step_types=[t], result_derived=[True])]


def clip_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The ``clip`` op of an ``nn.ReLU6`` or ``nn.Hardtanh`` (same type in and out)."""
    t, n = state["type"], _size(done)
    h = cast(nn.Hardtanh, module)
    lo, hi = clip_bounds(name, type(module).__name__, float(h.min_val), float(h.max_val), t)
    bounds = np.array([lo, hi], dtype=np.int64)
    return [
        Op(
            name, "clip", name, n, n, t, t, weights=[bounds], weight_types=[t],
            step_types=[t], result_derived=[True],
        )
    ]  # fmt: skip


def leaky_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The ``leaky_relu`` op of an ``nn.LeakyReLU`` (its result type derived or given)."""
    t, n = state["type"], _size(done)
    slope = float(cast(nn.LeakyReLU, module).negative_slope)
    m, a_t = slope_code(slope, f"{label(name)}.negative_slope")
    given = lookup_override(overrides["result"], [name], "result")
    result = _leaky_type(name, t, a_t) if given is None else given
    value = math.ldexp(m, -a_t.frac)
    notes = []
    if value != slope:
        notes.append(
            f"{label(name)}: negative_slope {slope!r} is exported as {value!r} "
            f"({m} * 2^-{a_t.frac}, the nearest with {ALPHA_FRAC} fractional bits)"
        )
    state["explicit"] = given is not None
    state["type"], state["prev"] = result, name
    alpha = np.array([m], dtype=np.int64)
    return [
        Op(
            name, "leaky_relu", name, n, n, t, result, weights=[alpha], weight_types=[a_t],
            step_types=[result], result_derived=[given is None], notes=notes,
        )
    ]  # fmt: skip


def flatten_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """No op for an ``nn.Flatten(1, -1)``; any other ``Flatten`` is refused."""
    f = cast(nn.Flatten, module)
    if (f.start_dim, f.end_dim) != (1, -1):
        raise ValueError(
            f"{label(name)}: Flatten(start_dim={f.start_dim}, end_dim={f.end_dim}) is not a "
            f"no-op on the export's (batch, features) chain; only Flatten(start_dim=1, "
            f"end_dim=-1) (torch's default) is taken"
        )
    return []


def alpha_codes(slopes: list[float], where: str) -> tuple[np.ndarray, FixedPoint]:
    """The mantissas of PReLU slopes on one type: each :func:`slope_code`, aligned to the most
    fractional bits among them (exact left shifts).

    Examples
    --------
    >>> m, t = alpha_codes([0.25, -0.5, 0.125], "p.weight")
    >>> m.tolist(), str(t)
    ([2, -4, 1], 'ap_fixed<4,1>')
    """
    codes = [slope_code(v, f"{where}[{k}]") for k, v in enumerate(slopes)]
    frac = max(t.frac for _, t in codes)
    mant = np.array([m << (frac - t.frac) for m, t in codes], dtype=np.int64)
    return mant, alpha_type(int(np.abs(mant).max()), frac)


def prelu_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The ``leaky_relu`` op of an ``nn.PReLU``: one alpha, or one per feature (per channel
    of a ``(C, H, W)`` map, repeated over ``H * W`` in the channels-first flat order)."""
    t, n = state["type"], _size(done)
    weight = cast(nn.PReLU, module).weight.detach().double().flatten().tolist()
    shape = state.get("shape")
    if len(weight) > 1:
        per = math.prod(shape[1:]) if shape else 1
        want = shape[0] if shape else n
        if len(weight) != want:
            raise ValueError(
                f"{label(name)}: PReLU has {len(weight)} slopes, but "
                f"{'a map of ' + str(want) + ' channels' if shape else str(n) + ' features'} "
                f"reach it; num_parameters must be 1 or the channel count"
            )
        weight = [v for v in weight for _ in range(per)]
    mant, a_t = alpha_codes(weight, f"{label(name)}.weight")
    given = lookup_override(overrides["result"], [name], "result")
    result = _leaky_type(name, t, a_t) if given is None else given
    moved = sum(math.ldexp(int(m), -a_t.frac) != v for m, v in zip(mant, weight, strict=True))
    notes = [f"{label(name)}: {moved} PReLU slope(s) rounded to {a_t}"] if moved else []
    state["explicit"] = given is not None
    state["type"], state["prev"] = result, name
    on_map = {"map": tuple(shape)} if shape and len(mant) > 1 else {}
    return [
        Op(
            name, "leaky_relu", name, n, n, t, result, weights=[mant], weight_types=[a_t],
            step_types=[result], result_derived=[given is None], notes=notes, params=on_map,
        )
    ]  # fmt: skip


def leaky_modules(model: nn.Module, ops: list[Op]) -> list[tuple[Op, nn.Module]]:
    """``(op, its nn.LeakyReLU in model)`` for every ``leaky_relu`` op (as ``bias_params``).

    Examples
    --------
    >>> from tnquant.export.ir import Op
    >>> from tnquant.specs import FixedPoint
    >>> t = FixedPoint(8, 3)
    >>> op = Op("1", "leaky_relu", "1", 2, 2, t, t)
    >>> [(o.name, m) for o, m in leaky_modules(nn.Sequential(nn.ReLU(), nn.LeakyReLU()), [op])]
    [('1', LeakyReLU(negative_slope=0.01))]
    """
    kinds = ("leaky_relu", "batchnorm")  # a BatchNorm's scale is snapped too (set_biases)
    return [(op, model.get_submodule(op.layer)) for op in ops if op.kind in kinds]


def set_slopes(model: nn.Module, ops: list[Op]) -> dict[str, float]:
    """Set every LeakyReLU's ``negative_slope`` to its exported ``alpha``, in place; the changes.

    Examples
    --------
    >>> from tnquant import FixedPoint, quantize
    >>> from tnquant.export.graph import build_graph
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.LeakyReLU(0.01))
    >>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
    >>> moved = set_slopes(model, build_graph(model, FixedPoint(8, 3)))
    >>> model[1].negative_slope, moved["1"] < 2**-17     # 655/65536, within half an LSB
    (0.0099945068359375, True)
    """
    moved: dict[str, float] = {}
    for op, module in leaky_modules(model, ops):
        if op.kind != "leaky_relu":
            continue
        values = np.ldexp(op.weights[0].astype(np.float64), -op.weight_types[0].frac)
        if isinstance(module, nn.PReLU):  # one value per channel (the map's repeats agree)
            w = module.weight
            per = max(1, len(values) // w.numel())
            new = torch.from_numpy(values[::per].copy()).to(w.dtype).reshape(w.shape)
            moved[op.layer] = float((new.double() - w.detach().double()).abs().max())
            with torch.no_grad():
                w.copy_(new)
            continue
        leaky = cast(nn.LeakyReLU, module)
        before = float(leaky.negative_slope)
        leaky.negative_slope = float(values[0])
        moved[op.layer] = abs(float(values[0]) - before)
    return moved


def slope_state(module: nn.Module) -> Any:
    """What :func:`set_slopes` changes in ``module`` (to restore it after a failed export)."""
    if isinstance(module, nn.PReLU):
        return module.weight.detach().clone()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, module.eps
    return module.negative_slope


def restore_slope(module: nn.Module, state: Any) -> None:
    """Undo :func:`set_slopes` on ``module`` with what :func:`slope_state` returned."""
    if isinstance(module, nn.PReLU):
        with torch.no_grad():
            module.weight.copy_(state)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.load_state_dict(state[0])
        module.eps = state[1]
    else:
        module.negative_slope = state
