"""Typed, bounded reads of the untrusted fields of ``manifest.json``, one op entry at a time.

Every reader takes the file (for the message), the field's path in the JSON
(``'ops[2].weight_types[0]'``) and the value, and returns it typed or raises
:class:`~tnquant.io.IntegrityError` naming both. :func:`_op_fields` reads one
op entry into an :class:`~tnquant.export.graph.Op` (without arrays) and
checks its shapes against its kind; :func:`_check_derived` re-derives the
types :func:`~tnquant.export.graph.build_graph` derived. Used by
:mod:`tnquant.export.manifest`.

Examples
--------
>>> from pathlib import Path
>>> str(_type(Path("manifest.json"), "ops[0].input_type", "ap_fixed<8,3>"))
'ap_fixed<8,3>'
>>> try:
...     _int(Path("manifest.json"), "ops[0].in_features", True, 1, 10)
... except IntegrityError as err:
...     print(err)
manifest.json: ops[0].in_features must be an int in 1..10, got True
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from tnquant.export.codes import lossless_accum
from tnquant.export.elementwise import ALPHA_FRAC, alpha_type, leaky_result
from tnquant.export.graph import Op
from tnquant.export.ir import AFFINE, CONVS, ELEMENTWISE, MERGES, POOLS, SPATIAL
from tnquant.export.manifest_graph import check_affine as _check_affine
from tnquant.export.manifest_graph import fail as _fail
from tnquant.export.manifest_graph import graph_keys, merge_contraction, read_graph
from tnquant.export.manifest_spatial import read_spatial
from tnquant.export.table_ops import TABLES, derived_result
from tnquant.io import IntegrityError
from tnquant.specs import FixedPoint

MAX_OPS = 1024
MAX_FEATURES = 1 << 20
MAX_STATE = 1 << 26  # elements of one TT intermediate per input row
_MAX_INTEGER = 1024  # |I| of an ap_fixed
_MAX_TT_CORES = 32
_KINDS = ("dense", "relu", "tt", "clip", "leaky_relu", *TABLES, *SPATIAL, *MERGES, *AFFINE)
#: weights per kind (a TT op: one or more cores) and the dimensions of each
_N_WEIGHTS = {"dense": 1, "relu": 0, "clip": 1, "leaky_relu": 1, **dict.fromkeys(TABLES, 0)}
_N_WEIGHTS.update({**dict.fromkeys(CONVS, 1), **dict.fromkeys(POOLS, 0)})
_N_WEIGHTS.update({**dict.fromkeys(MERGES, 0), "batchnorm": 1})
_NDIM = {"batchnorm": 1, "dense": 2, "tt": 4, "clip": 1, "leaky_relu": 1, **dict.fromkeys(CONVS, 4)}
#: kinds without an accumulator (and without a bias)
_NO_ACCUM = (*ELEMENTWISE, *POOLS, *MERGES)
_OP = {
    "name",
    "kind",
    "layer",
    "in_features",
    "out_features",
    "input_type",
    "result_type",
    "weights",
    "weight_shapes",
    "weight_types",
    "scale_exponents",
    "bias",
    "bias_type",
    "accum_types",
    "step_types",
    "derived",
    "contraction",
}
_NAME = re.compile(r"[ -.0-\[\]-~]{1,256}")  # printable ASCII without '/' and '\'
#: op and layer names: the same, or empty (the ops of a single exported module)
_OP_NAME = re.compile(r"[ -.0-\[\]-~]{0,256}")


def _steps(op: Op) -> int:
    return 1 if op.kind != "tt" else len(op.weight_types)


def _contraction(op: Op) -> str:
    if op.kind in MERGES:
        return merge_contraction(op)
    if op.kind in AFFINE:
        return (
            "y[i] = result(x[i] * w0[i] + b[i]), the product and the sum exact (hls4ml normalize)"
        )
    if op.kind == "relu":
        return "y = max(x, 0)"
    if op.kind == "conv2d":
        return (
            "y[o, h, w] = result(accum(b[o]) + sum accum(x[c, h', w'] * W[o, c, kh, kw])), "
            "patch in (kh, kw, c) order (hls4ml conv_2d_latency_cl), zero padding"
        )
    if op.kind == "depthwise2d":
        return (
            "y[c, h, w] = result(accum(b[c]) + sum accum(x[c, h', w'] * W[c, 0, kh, kw])), "
            "patch in (kh, kw) order (hls4ml depthwise_conv_2d_latency_cl), zero padding"
        )
    if op.kind == "conv1d":
        return (
            "y[o, l] = result(accum(b[o]) + sum accum(x[c, l'] * W[o, c, 0, k])), patch in "
            "(k, c) order (hls4ml conv_1d_latency_cl), zero padding; maps (C, 1, L)"
        )
    if op.kind == "maxpool1d":
        return "y[c, 0, l] = max of the window, the input type kept"
    if op.kind == "avgpool1d":
        return "y[c, 0, l] = sum of the window (the exact mean: log2(size) more fractional bits)"
    if op.kind == "maxpool2d":
        return "y[c, h, w] = max of the window, the input type kept"
    if op.kind == "avgpool2d":
        return "y[c, h, w] = sum of the window (the exact mean: log2(area) more fractional bits)"
    if op.kind in TABLES:
        return f"y = hls4ml {op.kind} lookup table (tnquant.export.table_ops), cast to result"
    if op.kind == "clip":
        return "y = result(min(max(x, w0[0]), w0[1])), bounds lo, hi of the input type"
    if op.kind == "leaky_relu":
        return (
            "y = result(x) if x > 0 else result(w0[0] * x), the product exact (hls4ml leaky_relu)"
        )
    if op.kind == "dense":
        return (
            "y[o] = result(accum(b[o]) + sum_i accum(x[i] * W[o, i])), i ascending, "
            "accum overflow after every add"
        )
    d = len(op.weight_types)
    return (
        f"TT right to left: cores {list(range(d - 1, -1, -1))}; step s contracts "
        f"(i_k, r_k) of state (B, i_0..i_k, r_k, o_k+1..) with core k "
        f"(r_k-1*o_k, i_k*r_k), as a dense step"
    )


def _int(path: Path, where: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(path, where, f"an int in {lo}..{hi}", v)
    return v


def _text(path: Path, where: str, v: Any, pattern: re.Pattern[str] = _NAME) -> str:
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise _fail(path, where, f"a string matching {pattern.pattern!r}", v)
    return v


def _list(path: Path, where: str, v: Any, n: int | None = None, most: int = MAX_OPS) -> list:
    if not isinstance(v, list) or (n is not None and len(v) != n) or len(v) > most:
        size = f"of {n} entries" if n is not None else f"of at most {most} entries"
        raise _fail(path, where, f"a list {size}", v)
    return v


def _dict(
    path: Path,
    where: str,
    v: Any,
    keys: set[str],
    optional: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(path, where, "a JSON object", v)
    missing, unknown = keys - set(v), set(v) - keys - optional
    if missing or unknown:
        what = f"missing {sorted(missing)}" if missing else f"unknown {sorted(unknown)}"
        raise IntegrityError(f"{path}: {where} has {what} keys")
    return v


def _type(path: Path, where: str, v: Any) -> FixedPoint:
    if not isinstance(v, str) or len(v) > 64:
        raise _fail(path, where, "an 'ap_fixed<W,I,...>' string", v)
    try:
        t = FixedPoint.from_string(v)
    except (TypeError, ValueError) as err:
        raise IntegrityError(f"{path}: {where}: {err}") from None
    if str(t) != v or abs(t.integer) > _MAX_INTEGER:
        raise _fail(path, where, f"a canonical ap_fixed string with |I| <= {_MAX_INTEGER}", v)
    return t


def _op_fields(path: Path, k: int, d: Any, names: set[str]) -> tuple[Op, list[tuple[int, ...]]]:
    """Op ``k``'s fields, typed and bounded (no arrays yet), and its weight shapes."""
    w = f"ops[{k}]"
    d = _dict(path, w, d, _OP, _spatial_key(path, w, d) | graph_keys(path, w, d))
    name = _text(path, f"{w}.name", d["name"], _OP_NAME)
    if name in names:
        raise IntegrityError(f"{path}: {w}.name {name!r} names two ops")
    names.add(name)
    kind = d["kind"]
    if kind not in _KINDS:
        raise _fail(path, f"{w}.kind", f"one of {list(_KINDS)}", kind)
    feats = [_int(path, f"{w}.{f}", d[f], 1, MAX_FEATURES) for f in ("in_features", "out_features")]
    n_w = _N_WEIGHTS.get(kind, -1)
    cores = _list(path, f"{w}.weights", d["weights"], None if n_w < 0 else n_w, _MAX_TT_CORES)
    if kind == "tt" and not cores:
        raise _fail(path, f"{w}.weights", "a non-empty list for a TT op", cores)
    n = len(cores)
    if cores != [f"{name}.w{j}" for j in range(n)]:
        raise _fail(path, f"{w}.weights", repr([f"{name}.w{j}" for j in range(n)]), cores)
    shapes = [
        tuple(
            _int(path, f"{w}.weight_shapes[{j}][{i}]", s, 1, MAX_FEATURES)
            for i, s in enumerate(_list(path, f"{w}.weight_shapes[{j}]", sh, _NDIM[kind]))
        )
        for j, sh in enumerate(_list(path, f"{w}.weight_shapes", d["weight_shapes"], n))
    ]
    wtypes = [
        _type(path, f"{w}.weight_types[{j}]", t)
        for j, t in enumerate(_list(path, f"{w}.weight_types", d["weight_types"], n))
    ]
    scales = _list(path, f"{w}.scale_exponents", d["scale_exponents"], None, n)
    if scales and (len(scales) != n or kind in ELEMENTWISE):
        want = f"[] or {n} lists" if kind not in ELEMENTWISE else f"[] for a {kind} op"
        raise _fail(path, f"{w}.scale_exponents", want, scales)
    for j, exps in enumerate(scales):
        e = [
            _int(path, f"{w}.scale_exponents[{j}]", x, -4 * _MAX_INTEGER, 4 * _MAX_INTEGER)
            for x in _list(path, f"{w}.scale_exponents[{j}]", exps, None, 4096)
        ]
        if not e or e != sorted(set(e)) or -e[0] != wtypes[j].frac:
            raise _fail(
                path,
                f"{w}.scale_exponents[{j}]",
                f"distinct ascending ints, the "
                f"first -{wtypes[j].frac} (the binary point of {wtypes[j]})",
                exps,
            )
    has_bias = d["bias"] is not None
    if (
        has_bias != (d["bias_type"] is not None)
        or (has_bias and kind in _NO_ACCUM)
        or (kind in AFFINE and not has_bias)
    ):
        raise _fail(
            path,
            f"{w}.bias/bias_type",
            f"both null or (not for an elementwise op: {', '.join(ELEMENTWISE)}) both set",
            [d["bias"], d["bias_type"]],
        )
    if has_bias and d["bias"] != f"{name}.bias":
        raise _fail(path, f"{w}.bias", repr(f"{name}.bias"), d["bias"])
    steps = 1 if kind != "tt" else n
    accums = [
        _type(path, f"{w}.accum_types[{j}]", t)
        for j, t in enumerate(
            _list(
                path,
                f"{w}.accum_types",
                d["accum_types"],
                0 if kind in (*_NO_ACCUM, *AFFINE) else steps,
            )
        )
    ]
    results = [
        _type(path, f"{w}.step_types[{j}]", t)
        for j, t in enumerate(_list(path, f"{w}.step_types", d["step_types"], steps))
    ]
    der = _dict(path, f"{w}.derived", d["derived"], {"accum", "result", "bias"})
    flags = {
        key: _list(path, f"{w}.derived.{key}", der[key], len(v))
        for key, v in (("accum", accums), ("result", results))
    }
    for key, v in [
        *((f"{key}[{j}]", b) for key, fl in flags.items() for j, b in enumerate(fl)),
        ("bias", der["bias"]),
    ]:
        if not isinstance(v, bool):
            raise _fail(path, f"{w}.derived.{key}", "true or false", v)
    op = Op(
        name=name,
        kind=kind,
        layer=_text(path, f"{w}.layer", d["layer"], _OP_NAME),
        in_features=feats[0],
        out_features=feats[1],
        input_type=_type(path, f"{w}.input_type", d["input_type"]),
        result_type=_type(path, f"{w}.result_type", d["result_type"]),
        weight_types=wtypes,
        bias_type=_type(path, f"{w}.bias_type", d["bias_type"]) if has_bias else None,
        accum_types=accums,
        step_types=results,
        scales=[list(s) for s in scales],
        accum_derived=list(flags["accum"]),
        result_derived=list(flags["result"]),
        bias_derived=der["bias"],
    )
    read_graph(path, w, d, op, _type)
    if results[-1] != op.result_type:
        raise _fail(
            path, f"{w}.step_types[-1]", f"the result_type {op.result_type}", str(results[-1])
        )
    if der["bias"] and not has_bias:
        raise _fail(path, f"{w}.derived.bias", "false without a bias", True)
    if d["contraction"] != _contraction(op):
        raise _fail(path, f"{w}.contraction", repr(_contraction(op)), d["contraction"])
    _check_shapes(path, w, op, shapes, d.get("spatial"))
    return op, shapes


def _spatial_key(path: Path, w: str, d: Any) -> set[str]:
    """The optional keys of an op entry: ``spatial``, which a spatial op must have."""
    spatial = isinstance(d, dict) and d.get("kind") in SPATIAL
    if isinstance(d, dict) and spatial != ("spatial" in d):
        need = "needs" if spatial else "has no use for"
        raise IntegrityError(f"{path}: {w} ({d.get('kind')!r}) {need} a 'spatial' key")
    return {"spatial"} if spatial else set()


def _check_elementwise(path: Path, w: str, op: Op, shapes: list[tuple[int, ...]]) -> None:
    """An elementwise op keeps its size; a clip's bounds and a (P)ReLU's alphas fit it."""
    if op.in_features != op.out_features:
        raise _fail(
            path,
            f"{w}.out_features",
            f"in_features {op.in_features} (an elementwise {op.kind} op)",
            op.out_features,
        )
    want = {"clip": (2,), "leaky_relu": (1,)}.get(op.kind)
    if op.kind == "leaky_relu" and shapes[0] == (op.in_features,):
        want = shapes[0]  # a PReLU: one alpha per feature
    if want is not None and shapes[0] != want:
        what = "[lo, hi]" if op.kind == "clip" else "[alpha]"
        raise _fail(path, f"{w}.weight_shapes[0]", f"{list(want)} ({what})", list(shapes[0]))
    if op.kind == "clip" and op.weight_types[0] != op.input_type:
        raise _fail(
            path,
            f"{w}.weight_types[0]",
            f"the input type {op.input_type} (a clip's bounds are mantissas of it)",
            str(op.weight_types[0]),
        )


def _check_shapes(
    path: Path, w: str, op: Op, shapes: list[tuple[int, ...]], spatial: Any = None
) -> None:
    if op.kind in (*SPATIAL, *MERGES, *AFFINE):  # read_graph checked a merge
        if op.kind in SPATIAL:
            read_spatial(path, w, op, shapes, spatial)
        elif op.kind in AFFINE:
            _check_affine(path, w, op, shapes)
        return
    if op.kind in ELEMENTWISE:
        _check_elementwise(path, w, op, shapes)
        return
    if op.kind == "dense":
        if shapes[0] != (op.out_features, op.in_features):
            raise _fail(
                path,
                f"{w}.weight_shapes[0]",
                f"[out_features, in_features] = {[op.out_features, op.in_features]}",
                list(shapes[0]),
            )
        return
    ranks = [1] + [s[3] for s in shapes[:-1]] + [1]
    for j, s in enumerate(shapes):
        if (s[0], s[3]) != (ranks[j], ranks[j + 1]):
            raise _fail(
                path,
                f"{w}.weight_shapes[{j}]",
                f"a core (r, o, i, r') with r = "
                f"{ranks[j]} and r' = {ranks[j + 1]} (ranks chain, 1 at both ends)",
                list(s),
            )
    ins, outs = [s[2] for s in shapes], [s[1] for s in shapes]
    if (
        not op.in_features <= math.prod(ins) <= 4 * MAX_FEATURES
        or not op.out_features <= math.prod(outs) <= 4 * MAX_FEATURES
    ):
        raise _fail(
            path,
            f"{w}.weight_shapes",
            f"cores whose i and o multiply to at least "
            f"in/out_features ({op.in_features}, {op.out_features})",
            [list(s) for s in shapes],
        )
    for k, s in enumerate(shapes):  # state (P, I_k R_k, Q) -> (P, R_k-1 O_k, Q) per input row
        p, q = math.prod(ins[:k]), math.prod(outs[k + 1 :])
        if p * q * max(s[0] * s[1], s[2] * s[3]) > MAX_STATE:
            raise _fail(
                path,
                f"{w}.weight_shapes[{k}]",
                f"a core whose intermediates stay within {MAX_STATE} elements per row",
                list(s),
            )


def _check_derived(path: Path, w: str, op: Op, shapes: list[tuple[int, ...]]) -> None:
    """The types build_graph derived must be what it derives from these inputs again."""
    if op.kind in ELEMENTWISE:
        want = op.input_type
        if op.kind in TABLES:
            want = derived_result(op.kind)
        if op.kind == "leaky_relu":
            want = leaky_result(op.input_type, op.weight_types[0])
        if op.result_derived[0] and op.result_type != want:
            what = {"leaky_relu": "the product type"}.get(op.kind, "the input type")
            what = "the table type" if op.kind in TABLES else what
            raise _fail(path, f"{w}.result_type", f"{what} {want} (derived)", str(op.result_type))
        return
    if op.kind in (*POOLS, *MERGES):
        return  # their result type is checked with the spatial field / by read_graph
    if op.kind in AFFINE:
        return  # _check_affine checked it with the shapes
    d = len(op.weight_types)
    cur = op.input_type
    for s in range(_steps(op)):
        k = d - 1 - s if op.kind == "tt" else 0
        wt, n = (
            op.weight_types[k],
            math.prod(shapes[k][1:]) if op.kind != "tt" else shapes[k][2] * shapes[k][3],
        )
        bt = op.bias_type if s == _steps(op) - 1 else None
        if (
            bt is not None
            and op.bias_derived
            and (bt.frac != cur.frac + wt.frac or bt != FixedPoint(bt.width, bt.integer))
        ):
            raise _fail(
                path,
                f"{w}.bias_type",
                f"ap_fixed<W,I> with the products' {cur.frac + wt.frac} fractional bits (derived)",
                str(bt),
            )
        if op.accum_derived[s]:
            try:
                want = lossless_accum(cur, wt, n, bt)
            except ValueError as err:
                raise IntegrityError(f"{path}: {w}.accum_types[{s}]: {err}") from None
            if op.accum_types[s] != want:
                raise _fail(
                    path,
                    f"{w}.accum_types[{s}]",
                    f"{want}, the lossless accumulator "
                    f"of {n} products of {cur} and {wt} (derived; a weight, input "
                    f"or bias type was edited?)",
                    str(op.accum_types[s]),
                )
        a = op.accum_types[s]
        if op.result_derived[s] and op.step_types[s] != FixedPoint(a.width, a.integer, a.signed):
            raise _fail(
                path,
                f"{w}.step_types[{s}]",
                f"the accumulator type without its modes (derived from {a})",
                str(op.step_types[s]),
            )
        cur = op.step_types[s]


def _check_params(path: Path, cores: Path, k: int, op: Op) -> None:
    """A clip's bounds in order; a leaky_relu's alpha type the one its mantissa derives."""
    if op.kind == "clip":
        lo, hi = (int(v) for v in op.weights[0])
        if lo > hi:
            raise IntegrityError(
                f"{cores}: array '{op.name}.w0' (ops[{k}]) holds the clip bounds "
                f"[{lo}, {hi}]; lo must be <= hi"
            )
    if op.kind in ("leaky_relu", *AFFINE):  # one alpha, one per feature (PReLU), a BN scale
        ms, t = [int(v) for v in op.weights[0]], op.weight_types[0]
        m = max(ms, key=abs)
        lean, frac = m, t.frac
        while frac > 0 and all(v % (1 << (t.frac - frac + 1)) == 0 for v in ms):
            lean, frac = lean // 2, frac - 1
        if not 0 <= t.frac <= ALPHA_FRAC:
            raise _fail(
                path,
                f"ops[{k}].weight_types[0]",
                f"an alpha type with 0..{ALPHA_FRAC} fractional bits",
                str(t),
            )
        if t != alpha_type(lean, frac):
            raise _fail(
                path,
                f"ops[{k}].weight_types[0]",
                f"{alpha_type(lean, frac)} (the type of alpha '{op.name}.w0' = {m} * "
                f"2^-{t.frac} on its fewest fractional bits, derived)",
                str(t),
            )
