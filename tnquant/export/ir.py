"""The fixed-point IR: :class:`Op`, the type overrides, and the width check.

:func:`tnquant.export.graph.build_graph` turns a model into a list of
:class:`Op` s (the kinds and how their types are derived: see
:mod:`tnquant.export.graph`); :func:`check_widths` refuses one whose types
pass what the int64 emulator holds. The manifest, emulator, reports and
C headers read this IR.

Examples
--------
>>> t = FixedPoint(8, 3)
>>> op = Op("0", "relu", "0", 4, 4, t, t, step_types=[t])
>>> op.kind, str(op.result_type)
('relu', 'ap_fixed<8,3>')
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from tnquant.export.codes import MAX_WIDTH, narrower, too_wide
from tnquant.specs import FixedPoint

__all__ = [
    "Op",
    "TypeOverride",
    "ELEMENTWISE",
    "SPATIAL",
    "POOLS",
    "CONVS",
    "ONE_D",
    "MERGES",
    "AFFINE",
    "KEEPS_MAP",
    "INPUT",
    "check_widths",
    "check_graph",
    "sources",
    "lookup_override",
    "label",
]

TypeOverride = Union[FixedPoint, Mapping[str, FixedPoint], None]
#: op kinds that map every element on its own (``in_features == out_features``, no accumulator)
ELEMENTWISE = ("relu", "clip", "leaky_relu", "sigmoid", "tanh", "softmax")
#: op kinds on ``(C, H, W)`` feature maps (flat, channels first, between ops); the 1-D kinds
#: read ``(C, L)`` maps, carried as ``(C, 1, L)`` with ``(1, k)`` windows
SPATIAL = (
    "conv2d", "depthwise2d", "maxpool2d", "avgpool2d", "conv1d", "maxpool1d", "avgpool1d",
)  # fmt: skip
#: the spatial kinds without weights or accumulator (their result type follows the input's)
POOLS = ("maxpool2d", "avgpool2d", "maxpool1d", "avgpool1d")
#: the spatial kinds with weights (an accumulator, a bias)
CONVS = ("conv2d", "depthwise2d", "conv1d")
#: the spatial kinds on ``(C, L)`` maps (hls4ml's ``Conv1D``/``Pooling1D``)
ONE_D = ("conv1d", "maxpool1d", "avgpool1d")
#: op kinds that read two tensors (``Op.inputs``): a residual add, a concatenation
MERGES = ("add", "concat")
#: op kinds with a weight and a bias per feature, no accumulator: an unfolded BatchNorm
AFFINE = ("batchnorm",)
#: the kinds after which a (C, H, W) map is still a map
KEEPS_MAP = (*ELEMENTWISE, *SPATIAL, *AFFINE, "add")
#: the name :attr:`Op.inputs` gives the model input
INPUT = "@input"


def label(name: str) -> str:
    """A module's qualified name for messages: ``name``, or ``'(the model)'`` for the root.

    Examples
    --------
    >>> label("2.1"), label("")
    ('2.1', '(the model)')
    """
    return name if name else "(the model)"


def lookup_override(override: TypeOverride, names: list[str], what: str) -> FixedPoint | None:
    """The type ``override`` (``accum=``, ``result=`` or ``bias=``) gives the first of ``names``.

    Examples
    --------
    >>> t = FixedPoint(8, 3)
    >>> lookup_override({"1.*": t}, ["1.0", "1"], "result") == t
    True
    >>> lookup_override({"2": t}, ["1"], "result") is None
    True
    """
    if override is None:
        return None
    if isinstance(override, FixedPoint):
        return override
    if not isinstance(override, Mapping):
        raise TypeError(
            f"{what} must be a FixedPoint or a mapping of op-name globs to "
            f"FixedPoint, got {type(override).__name__}"
        )
    for name in names:
        for key, spec in override.items():
            if fnmatch.fnmatchcase(name, key):
                if not isinstance(spec, FixedPoint):
                    raise TypeError(
                        f"{what}[{key!r}] must be a FixedPoint, got {type(spec).__name__}"
                    )
                return spec
    return None


@dataclass
class Op:
    """One op of the fixed-point IR (see the module docs for the kinds).

    ``weights`` hold int64 mantissas: ``[W (out, in)]`` for ``'dense'``, the
    TT cores ``(r_{k-1}, o_k, i_k, r_k)`` in model order for ``'tt'``,
    ``[[lo, hi]]`` (of the input type) for ``'clip'``, ``[[alpha]]`` (of its
    own type) for ``'leaky_relu'``, none for ``'relu'``.
    ``accum_types`` and ``step_types`` have one entry per contraction step
    (``'tt'``: step ``s`` contracts core ``d-1-s``); ``step_types[-1]`` is
    ``result_type``. ``accum_derived``/``result_derived`` (one per step) and
    ``bias_derived`` say which types :func:`build_graph` derived itself
    rather than took from ``accum=``/``result=``/``bias=`` or an activation
    quantizer (empty: none); the loader re-derives those and compares.
    ``notes`` are lines for the export report (e.g. per-channel scales at the
    quantizer's floor); they are not written to the manifest.
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
    notes: list[str] = field(default_factory=list)
    #: ``(C, H, W)`` read and written by a ``conv2d``/``maxpool2d``/``avgpool2d`` op (else empty)
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    #: a spatial op's ``kernel``, ``stride``, ``padding``, ``dilation`` (each ``(h, w)``)
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: the ops whose results this op reads (:data:`INPUT`: the model input); empty: the op
    #: before it in the list (the model input for the first op), as in a chain
    inputs: tuple[str, ...] = ()
    #: a merge op's input types, one per entry of ``inputs`` (``input_type`` is the first)
    merge_types: list[FixedPoint] = field(default_factory=list)


def sources(ops: list[Op]) -> list[list[int]]:
    """For every op, the indices of the ops it reads (``-1``: the model input).

    Raises ``ValueError`` when an op reads an op that is not before it.

    Examples
    --------
    >>> t = FixedPoint(8, 3)
    >>> a = Op("a", "relu", "a", 4, 4, t, t)
    >>> b = Op("b", "relu", "b", 4, 4, t, t)
    >>> c = Op("c", "add", "c", 4, 4, t, t, inputs=("a", INPUT))
    >>> sources([a, b, c])
    [[-1], [0], [0, -1]]
    """
    index: dict[str, int] = {}
    out = []
    for k, op in enumerate(ops):
        if not op.inputs:
            out.append([k - 1])
        else:
            missing = [n for n in op.inputs if n != INPUT and n not in index]
            if missing:
                raise ValueError(
                    f"op {op.name!r} reads {missing[0]!r}, which is not an op before it"
                )
            out.append([index[n] if n != INPUT else -1 for n in op.inputs])
        index[op.name] = k
    return out


def check_graph(ops: list[Op]) -> None:
    """Refuse ops whose input type or size is not the result of the op they read.

    A merge op checks each of its inputs against :attr:`Op.merge_types`.

    Examples
    --------
    >>> t, u = FixedPoint(8, 3), FixedPoint(6, 2)
    >>> check_graph([Op("a", "relu", "a", 4, 4, t, t), Op("b", "relu", "b", 4, 4, u, u)])
    Traceback (most recent call last):
    ...
    ValueError: op 'b' reads ap_fixed<6,2> x 4, but op 'a' gives ap_fixed<8,3> x 4
    """
    for k, (op, src) in enumerate(zip(ops, sources(ops), strict=True)):
        if op.name == INPUT:
            raise ValueError(f"op {op.name!r}: {INPUT!r} names the model input, not an op")
        if op.kind == "concat" and op.out_features != sum(
            ops[j].out_features if j >= 0 else ops[0].in_features for j in src
        ):
            raise ValueError(
                f"op {op.name!r} (concat) gives {op.out_features} features, not the sum of "
                f"what it reads"
            )
        if not k and not op.inputs:
            continue
        want = op.merge_types if op.kind in MERGES else [op.input_type]
        if len(want) != len(src):
            raise ValueError(
                f"op {op.name!r} ({op.kind}) reads {len(src)} tensors, but has "
                f"{len(want)} input types"
            )
        sizes = [op.in_features] * len(src) if op.kind != "concat" else [None] * len(src)
        for t, n, j in zip(want, sizes, src, strict=True):
            if j < 0:
                if t != ops[0].input_type and ops[0].inputs == ():
                    raise ValueError(
                        f"op {op.name!r} reads the model input as {t}, but the input is "
                        f"{ops[0].input_type}"
                    )
                continue
            got = ops[j]
            if t != got.result_type or (n is not None and n != got.out_features):
                raise ValueError(
                    f"op {op.name!r} reads {t} x {n if n is not None else got.out_features}, "
                    f"but op {got.name!r} gives {got.result_type} x {got.out_features}"
                )


def _steps(op: Op) -> list[str]:
    """The names ``accum=``/``result=`` globs match for each step of ``op``."""
    if op.kind != "tt":
        return [op.name]
    return [f"{op.name}.{s}" for s in range(max(1, len(op.step_types)))]


def _reads(ops: list[Op], k: int, s: int) -> str:
    """The override that narrows what step ``s`` of ``ops[k]`` reads."""
    op = ops[k]
    if op.kind == "tt" and s > 0:
        return f"result={{'{op.name}.{s - 1}': {narrower(op.step_types[s - 1].integer)}}}"
    src = sources(ops)
    j = src[k][0]
    while j >= 0 and ops[j].kind in ("relu", "clip") and src[j][0] >= 0:
        j = src[j][0]  # a ReLU or clip keeps the type it reads: narrow the op before it
    if j < 0:
        return "a narrower input_spec (or the first layer's 'input' quantizer)"
    return f"result={{'{_steps(ops[j])[-1]}': {narrower(op.input_type.integer)}}}"


def _typed(op: Op, k: int, ops: list[Op]) -> list[tuple[str, str, FixedPoint, str]]:
    """``(step, tensor, type, fix)`` for every type of ``op`` (the input only for the first op)."""
    steps = _steps(op)
    out = []
    if k == 0:
        out.append((op.name, "input", op.input_type, f"narrow it with {_reads(ops, 0, 0)}"))
    for j, w in enumerate(op.weight_types):
        what = "weights" if len(op.weight_types) == 1 else f"core {j} weights"
        fix = "quantize them with a FixedPoint or QuantSpec of fewer bits"
        if op.kind == "leaky_relu":
            what, fix = "alpha", "use a negative_slope of smaller magnitude"
        if op.kind == "clip":
            continue  # the bounds are of the input type, checked as the op before's result
        out.append((op.name, what, w, fix))
    if op.bias_type is not None:
        fix = f"narrow it with bias={{'{steps[-1]}': {narrower(op.bias_type.integer)}}}"
        out.append((steps[-1], "bias", op.bias_type, fix))
    for s, a in enumerate(op.accum_types):
        fix = f"narrow it with accum={{'{steps[s]}': {narrower(a.integer, 'WRAP')}}}"
        out.append((steps[s], "accumulator", a, fix))
    for s, r in enumerate(op.step_types):
        fix = (
            f"narrow it with result={{'{steps[s]}': {narrower(r.integer)}}} (or the "
            f"activation quantizer that sets it)"
        )
        out.append((steps[s], "result", r, fix))
    return out


def check_widths(ops: list[Op]) -> None:
    """Refuse a type, or a product of a step's input and weights, past 62 bits.

    Raises
    ------
    ValueError
        Naming the op (the TT step), the tensor (input, weights, bias,
        accumulator or result) and the override that narrows it.

    Examples
    --------
    >>> t = FixedPoint(40, 8)
    >>> check_widths([Op("0", "dense", "0", 1, 1, t, t, weight_types=[t])])
    Traceback (most recent call last):
    ...
    ValueError: op '0': its products need 80 bits (its input ap_fixed<40,8> times its weights \
ap_fixed<40,8>), wider than 62 bits (the int64 emulator's limit); narrow the input with a \
narrower input_spec (or the first layer's 'input' quantizer), or quantize the weights with \
fewer bits
    >>> u = FixedPoint(63, 10)
    >>> check_widths([Op("0", "relu", "0", 1, 1, FixedPoint(8, 3), u, step_types=[u])])
    Traceback (most recent call last):
    ...
    ValueError: op '0': its result needs 63 bits (ap_fixed<63,10>), wider than 62 bits (the \
int64 emulator's limit); narrow it with result={'0': FixedPoint(24, 10, rounding='RND', \
overflow='SAT')} (or the activation quantizer that sets it)
    """
    for k, op in enumerate(ops):
        for step, tensor, t, fix in _typed(op, k, ops):
            if t.width > MAX_WIDTH:
                raise too_wide(step, tensor, t.width, str(t), fix)
        if op.kind == "clip":
            continue  # compares, never multiplies
        d = len(op.weight_types)  # a TT step s takes step s-1's result and core d-1-s
        ins = [op.input_type] if op.kind != "tt" else [op.input_type, *op.step_types[: d - 1]]
        for s, (x, w) in enumerate(
            zip(ins, op.weight_types[::-1] if op.kind == "tt" else op.weight_types, strict=False)
        ):
            if x.width + w.width > MAX_WIDTH:
                leaky = op.kind == "leaky_relu"
                raise too_wide(
                    _steps(op)[s],
                    "products",
                    x.width + w.width,
                    f"its input {x} times its {'alpha' if leaky else 'weights'} {w}",
                    f"narrow the input with {_reads(ops, k, s)}, or "
                    + ("use a negative_slope of fewer bits" if leaky else "quantize the "
                       "weights with fewer bits"),
                )  # fmt: skip
