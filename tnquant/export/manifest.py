"""The export directory: ``manifest.json`` + ``cores.npz``, written and read back safely.

Format (version 2): ``cores.npz`` holds the int64 mantissas of every weight,
TT core and bias (``'<op>.w<k>'``, ``'<op>.bias'``), as ``np.savez`` writes
them (stored, not compressed). ``manifest.json`` is canonical JSON (sorted
keys, indentation 1, ASCII): the ops with their sizes, ``ap_fixed`` types,
weight shapes, scale exponents and which types :func:`build_graph` derived
itself (``derived``), the SHA-256 of every array and of ``cores.npz``, and
its own ``checksum`` (the SHA-256 of the canonical text without that field,
as :mod:`tnquant.io` does). Version 1 (no self-checksum) is refused: export
again.

The checksums are unkeyed, so they detect corruption only: whoever hands
over a directory can recompute them. :func:`read_export` therefore trusts no
field and checks everything before it allocates: ``manifest.json`` is a file
of at most ``MAX_MANIFEST_BYTES``; every field has its type and a sane bound
(``MAX_OPS``, ``MAX_FEATURES``, ``MAX_ELEMENTS`` in all, ``MAX_STATE`` per
TT intermediate, widths within the emulator's 62 bits); weight shapes fit
the op kind (dense ``(out, in)``; TT cores ``(r, o, i, r')`` that chain,
ranks 1 at both ends; a clip's ``w0`` is its ``(2,)`` bounds ``[lo, hi]`` of
the input type, a leaky_relu's its ``(1,)`` ``[alpha]``); ops chain (types
and sizes); the derived accumulator, result and bias types equal what
:func:`~tnquant.export.codes.lossless_accum` gives again; arrays and
checksums name each other one to one. Then ``cores.npz``: no larger than
those shapes need, its SHA-256, its members exactly the listed names, stored
(compression ratio 1, so nothing expands), each ``.npy`` header (read
without pickle) int64 in C order of the manifest's shape, and each member
exactly that header plus the data, before a byte of data is read. Last,
every array's SHA-256 and its mantissas within its type, a clip's
``lo <= hi`` and a leaky_relu's alpha type the one its mantissa derives
(:mod:`tnquant.export.elementwise`). Any failure is an
:class:`~tnquant.io.IntegrityError` (a ``ValueError``) naming the file and
the field; nothing is written.

Examples
--------
>>> import tempfile
>>> from tnquant.export.graph import Op
>>> from tnquant.specs import FixedPoint
>>> t = FixedPoint(4, 2)
>>> d = write_export([Op("r", "relu", "r", 2, 2, t, t, step_types=[t])], tempfile.mkdtemp())
>>> [op.kind for op in read_export(d)]
['relu']
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from tnquant._version import __version__
from tnquant.export.graph import Op, check_widths
from tnquant.export.ir import (
    AFFINE,
    ELEMENTWISE,
    INPUT,
    KEEPS_MAP,
    MERGES,
    POOLS,
    SPATIAL,
    check_graph,
)
from tnquant.export.manifest_fields import (
    MAX_FEATURES,
    MAX_OPS,
    MAX_STATE,
    _check_derived,
    _check_params,
    _contraction,
    _dict,
    _fail,
    _list,
    _op_fields,
    _steps,
    _text,
)
from tnquant.export.manifest_graph import graph_dict
from tnquant.export.manifest_graph import show as _show
from tnquant.export.manifest_spatial import spatial_dict
from tnquant.export.safe_npz import read_npz
from tnquant.io import IntegrityError

__all__ = [
    "route_of",
    "write_export",
    "read_export",
    "build_manifest",
    "canonical",
    "MANIFEST",
    "CORES",
    "HLS4ML_CONFIG",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_MANIFEST_BYTES",
    "MAX_OPS",
    "MAX_FEATURES",
    "MAX_ELEMENTS",
    "MAX_STATE",
]

MANIFEST = "manifest.json"
CORES = "cores.npz"
HLS4ML_CONFIG = "hls4ml_config.json"
FORMAT = "tnquant-fixed-point"
FORMAT_VERSION = 2
MAX_MANIFEST_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 28  # all arrays together (2 GiB of int64)
_TOP = {
    "format",
    "version",
    "tnquant_version",
    "input_type",
    "output_type",
    "in_features",
    "out_features",
    "ops",
    "checksums",
    "checksum",
}
_EXTRA = {"headers", "routes", "hls4ml_config"}
_HEADER = re.compile(r"[A-Za-z0-9_.\-]{1,64}\.h")
_HEX = re.compile(r"[0-9a-f]{64}")


def route_of(op: Op) -> str:
    """Where an op goes past the emulator: ``'hls4ml'``, or ``'c-headers'`` (TT, clip).

    Examples
    --------
    >>> from tnquant.specs import FixedPoint
    >>> t = FixedPoint(8, 3)
    >>> route_of(Op("0", "clip", "0", 4, 4, t, t)), route_of(Op("1", "relu", "1", 4, 4, t, t))
    ('c-headers', 'hls4ml')
    """
    return "c-headers" if op.kind in ("tt", "clip") else "hls4ml"


def canonical(obj: dict[str, Any]) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, indentation 1, ASCII, final newline).

    Examples
    --------
    >>> canonical({"b": 1, "a": [2]})
    b'{\\n "a": [\\n  2\\n ],\\n "b": 1\\n}\\n'
    """
    return (
        json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"
    ).encode("ascii")


def _sha(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _array_sha(a: np.ndarray) -> str:
    return _sha(np.ascontiguousarray(a, dtype=np.int64).data)


def _arrays(op: Op) -> dict[str, np.ndarray]:
    out = {f"{op.name}.w{k}": w for k, w in enumerate(op.weights)}
    if op.bias is not None:
        out[f"{op.name}.bias"] = op.bias
    return out


def _op_to_dict(op: Op) -> dict[str, Any]:
    n = _steps(op)
    return {
        "name": op.name,
        "kind": op.kind,
        "layer": op.layer,
        "in_features": int(op.in_features),
        "out_features": int(op.out_features),
        "input_type": str(op.input_type),
        "result_type": str(op.result_type),
        "weights": [f"{op.name}.w{k}" for k in range(len(op.weights))],
        "weight_shapes": [[int(s) for s in w.shape] for w in op.weights],
        "weight_types": [str(t) for t in op.weight_types],
        "scale_exponents": [[int(e) for e in s] for s in op.scales],
        "bias": None if op.bias is None else f"{op.name}.bias",
        "bias_type": None if op.bias_type is None else str(op.bias_type),
        "accum_types": [str(t) for t in op.accum_types],
        "step_types": [
            str(t) for t in (op.step_types if op.kind not in ELEMENTWISE else [op.result_type])
        ],
        "derived": {
            "accum": [
                bool(b)
                for b in op.accum_derived
                or [False] * (n if op.kind not in (*ELEMENTWISE, *POOLS, *MERGES, *AFFINE) else 0)
            ],
            "result": [bool(b) for b in op.result_derived or [False] * n],
            "bias": bool(op.bias_derived),
        },
        "contraction": _contraction(op),
        **({"spatial": spatial_dict(op)} if op.kind in SPATIAL else {}),
        **graph_dict(op),
    }


def build_manifest(ops: list[Op], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of ``ops`` (without the ``cores.npz`` checksum and the self-checksum).

    ``extra`` may set ``'headers'``, ``'routes'`` and ``'hls4ml_config'``
    (what :func:`tnquant.export.fixed_point` records); other keys are refused.

    Examples
    --------
    >>> from tnquant.export.graph import Op
    >>> from tnquant.specs import FixedPoint
    >>> t = FixedPoint(4, 2)
    >>> build_manifest([Op("r", "relu", "r", 2, 2, t, t)])["ops"][0]["step_types"]
    ['ap_fixed<4,2>']
    >>> build_manifest([Op("r", "relu", "r", 2, 2, t, t)], {"note": 1})
    Traceback (most recent call last):
    ...
    ValueError: extra keys must be among ['headers', 'hls4ml_config', 'routes'], got 'note'
    """
    if not ops:
        raise ValueError("an export needs at least one op, got none")
    for key in extra or {}:
        if key not in _EXTRA:
            raise ValueError(f"extra keys must be among {sorted(_EXTRA)}, got {key!r}")
    arrays = {k: v for op in ops for k, v in _arrays(op).items()}
    man: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tnquant_version": __version__,
        "input_type": str(ops[0].input_type),
        "output_type": str(ops[-1].result_type),
        "in_features": int(ops[0].in_features),
        "out_features": int(ops[-1].out_features),
        "ops": [_op_to_dict(op) for op in ops],
        "checksums": {k: _array_sha(v) for k, v in arrays.items()},
    }
    man.update(extra or {})
    return man


def write_export(ops: list[Op], out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``cores.npz`` and then ``manifest.json`` (each via a temporary file) to ``out_dir``.

    The manifest is checked as :func:`read_export` checks it before anything
    is written, so what this writes loads back; ``ValueError`` otherwise.

    Examples
    --------
    >>> import tempfile
    >>> from tnquant.export.graph import Op
    >>> from tnquant.specs import FixedPoint
    >>> t = FixedPoint(4, 2)
    >>> out = write_export([Op("r", "relu", "r", 3, 3, t, t)], tempfile.mkdtemp())
    >>> sorted(p.name for p in out.iterdir())
    ['cores.npz', 'manifest.json']
    """
    out = Path(out_dir)
    man = build_manifest(ops, extra)
    man["checksums"][CORES] = "0" * 64
    try:
        _check_manifest(man, Path(MANIFEST))
    except IntegrityError as err:
        raise ValueError(f"cannot export these ops: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        k: np.ascontiguousarray(v, dtype=np.int64) for op in ops for k, v in _arrays(op).items()
    }
    tmp = out / (CORES + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    man["checksums"][CORES] = _sha(tmp.read_bytes())
    os.replace(tmp, out / CORES)
    man["checksum"] = _sha(canonical(man))
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_bytes(canonical(man))
    os.replace(tmp, out / MANIFEST)
    return out


# --------------------------------------------------------------------------- #
# reading: manifest.json
# --------------------------------------------------------------------------- #


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {path.parent}")
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")

    def _no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a number")

    try:
        man = json.loads(raw.decode("ascii"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise IntegrityError(
            f"{path} is not valid ASCII JSON ({type(err).__name__}: {str(err)[:100]})"
        ) from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise IntegrityError(
            f"{path}: format must be {FORMAT!r}, got "
            f"{_show(man.get('format') if isinstance(man, dict) else man)}"
        )
    if man.get("version") != FORMAT_VERSION:
        raise IntegrityError(
            f"{path}: version must be {FORMAT_VERSION}, got "
            f"{_show(man.get('version'))}; directories of version 1 carry no "
            f"checksum of their own: export again with "
            f"tnquant.export.fixed_point"
        )
    claimed = man.get("checksum")
    try:
        same = raw == canonical(man)
        body = canonical({k: v for k, v in man.items() if k != "checksum"})
    except RecursionError:
        same = False
    if not same:
        raise IntegrityError(f"{path} is not in the canonical form the export writes")
    if not isinstance(claimed, str) or claimed != _sha(body):
        raise IntegrityError(f"{path}: checksum does not match its content (corrupted)")
    return man


def _check_manifest(man: dict[str, Any], path: Path) -> tuple[list[Op], dict[str, tuple]]:
    """Every field of a manifest; the ops (no arrays yet) and the shape of every array."""
    _dict(
        path, "the manifest", man, _TOP - ({"checksum"} if "checksum" not in man else set()), _EXTRA
    )
    _text(path, "tnquant_version", man["tnquant_version"])
    raw_ops = _list(path, "ops", man["ops"])
    if not raw_ops:
        raise _fail(path, "ops", "a non-empty list", raw_ops)
    ops: list[Op] = []
    shapes: dict[str, tuple[int, ...]] = {}
    names: set[str] = set()
    maps: dict[str, tuple[int, ...] | None] = {INPUT: None}  # the (C, H, W) map each op gives
    for k, d in enumerate(raw_ops):
        op, sh = _op_fields(path, k, d, names)
        w = f"ops[{k}]"
        reads = list(op.inputs) or [ops[-1].name if ops else INPUT]
        if any(n not in maps for n in reads):
            raise _fail(path, f"{w}.inputs", "names of ops before it (or '@input')", reads)
        if (
            k
            and not op.inputs
            and (op.input_type != ops[-1].result_type or op.in_features != ops[-1].out_features)
        ):
            raise _fail(
                path,
                f"{w}.input_type/in_features",
                f"the result of ops[{k - 1}] ({ops[-1].result_type}, {ops[-1].out_features})",
                [str(op.input_type), op.in_features],
            )
        _check_derived(path, w, op, sh)
        map_shape = maps[reads[0]]
        if op.in_shape and map_shape is not None and tuple(op.in_shape) != map_shape:
            raise _fail(
                path, f"{w}.spatial.in_shape",
                f"{list(map_shape)} (the feature map the spatial op before gives)",
                list(op.in_shape),
            )  # fmt: skip
        if op.out_shape:
            map_shape = tuple(op.out_shape)
        elif op.kind not in KEEPS_MAP:  # a dense op: the map is flat from here
            map_shape = None
        maps[op.name] = map_shape
        ops.append(op)
        shapes.update({f"{op.name}.w{j}": s for j, s in enumerate(sh)})
        if op.bias_type is not None:
            shapes[f"{op.name}.bias"] = (op.out_shape[0] if op.out_shape else op.out_features,)
    top = {
        "input_type": str(ops[0].input_type),
        "output_type": str(ops[-1].result_type),
        "in_features": ops[0].in_features,
        "out_features": ops[-1].out_features,
    }
    for key, want in top.items():
        if man[key] != want or type(man[key]) is not type(want):
            raise _fail(path, key, f"{want!r} (from the ops)", man[key])
    if sum(math.prod(s) for s in shapes.values()) > MAX_ELEMENTS:
        raise _fail(
            path,
            "weight_shapes",
            f"at most {MAX_ELEMENTS} elements in all",
            sum(math.prod(s) for s in shapes.values()),
        )
    try:
        check_graph(ops)
        check_widths(ops)
    except ValueError as err:
        raise IntegrityError(f"{path}: {err}") from None
    sums = _dict(path, "checksums", man["checksums"], {*shapes, CORES})
    for key, digest in sums.items():
        _text(path, f"checksums[{key!r}]", digest, _HEX)
    _check_extra(path, man, ops)
    return ops, shapes


def _check_extra(path: Path, man: dict[str, Any], ops: list[Op]) -> None:
    if "headers" in man:
        heads = [
            _text(path, "headers[]", h, _HEADER)
            for h in _list(path, "headers", man["headers"], None, 16)
        ]
        if len(set(heads)) != len(heads):
            raise _fail(path, "headers", "distinct file names", heads)
    if "routes" in man:
        want = {op.name: route_of(op) for op in ops}
        if man["routes"] != want:
            raise _fail(path, "routes", f"{want} (from the op kinds)", man["routes"])
    if "hls4ml_config" in man and man["hls4ml_config"] != HLS4ML_CONFIG:
        raise _fail(path, "hls4ml_config", repr(HLS4ML_CONFIG), man["hls4ml_config"])


def read_export(out_dir: str | Path) -> list[Op]:
    """The ops of an export directory, after every check of the module docs.

    Raises
    ------
    FileNotFoundError
        Without ``manifest.json`` or ``cores.npz``.
    IntegrityError
        (a ``ValueError``) for anything else, naming the file and the field.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = open(f"{d}/manifest.json", "w").write('{"format": "tnquant-fixed-point"}')
    >>> try:
    ...     read_export(d)
    ... except IntegrityError as err:
    ...     print(str(err).split("/")[-1])
    manifest.json: version must be 2, got None; directories of version 1 carry no checksum of \
their own: export again with tnquant.export.fixed_point
    """
    out = Path(out_dir)
    path = out / MANIFEST
    man = _read_json(path)
    ops, shapes = _check_manifest(man, path)
    arrays = read_npz(out / CORES, shapes, man["checksums"][CORES])
    for key, a in arrays.items():
        if _array_sha(a) != man["checksums"][key]:
            raise IntegrityError(
                f"{out / CORES}: array {key!r}: its SHA-256 does not match "
                f"checksums[{key!r}] of the manifest"
            )
    for k, op in enumerate(ops):
        op.weights = [arrays[f"{op.name}.w{j}"] for j in range(len(op.weight_types))]
        op.bias = arrays.get(f"{op.name}.bias")
        named = [
            (f"w{j}", w, t)
            for j, (w, t) in enumerate(zip(op.weights, op.weight_types, strict=True))
        ]
        if op.bias is not None and op.bias_type is not None:
            named.append(("bias", op.bias, op.bias_type))
        for what, a, t in named:
            if a.size and (int(a.min()) < t.qmin or int(a.max()) > t.qmax):
                raise IntegrityError(
                    f"{out / CORES}: array '{op.name}.{what}' (ops[{k}]) "
                    f"holds mantissas in [{a.min()}, {a.max()}], outside "
                    f"{t} ([{t.qmin}, {t.qmax}])"
                )
        _check_params(path, out / CORES, k, op)
    return ops
