"""The checks of :mod:`tnquant.cli`, all made before any work starts.

Three kinds of input are checked here:

- recipe values: the checkers ``(value, key path) -> value`` that
  :mod:`tnquant.cli.recipe` builds its schema from (a bad value raises a
  ``ValueError`` that starts with ``recipe key '<path>'``), defined in
  :mod:`tnquant.cli.recipe_values` and importable from here;
- the files of a directory that ``tnquant compress`` wrote, read back by
  ``report`` and ``export`` as data only: ``report.json`` and
  ``source.json`` (size-capped JSON, every field that is read checked),
  the recorded export inputs (``.npy``, header and size checked, never
  unpickled) and the module names that become file names;
- output directories (``--out``, ``--fixed-point``).

A failed check raises :class:`UsageError` (a ``ValueError``) naming the file
or flag and the field; the CLI exits with code 2 and that one line.

Examples
--------
>>> check_report({"tnquant_report": 1})
Traceback (most recent call last):
...
tnquant.cli.checks.UsageError: report.json: field 'model' is missing; expected a string
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tnquant.cli.recipe_values import _CLASS_RE
from tnquant.cli.recipe_values import Check as Check
from tnquant.cli.recipe_values import _bool as _bool
from tnquant.cli.recipe_values import _choice as _choice
from tnquant.cli.recipe_values import _class_path as _class_path
from tnquant.cli.recipe_values import _fail as _fail
from tnquant.cli.recipe_values import _fields as _fields
from tnquant.cli.recipe_values import _fixed as _fixed
from tnquant.cli.recipe_values import _float as _float
from tnquant.cli.recipe_values import _globs as _globs
from tnquant.cli.recipe_values import _input_type as _input_type
from tnquant.cli.recipe_values import _int as _int
from tnquant.cli.recipe_values import _optional as _optional
from tnquant.cli.recipe_values import _table as _table
from tnquant.cli.recipe_values import _unknown as _unknown
from tnquant.cli.recipe_values import _warmup as _warmup
from tnquant.io import hf_base

__all__ = [
    "UsageError",
    "read_json",
    "check_report",
    "check_source",
    "check_name",
    "dir_file",
    "read_rows",
    "read_export_inputs",
    "import_class",
    "check_hf_dir",
    "check_out_dir",
    "check_stage_report",
    "MAX_JSON_BYTES",
    "SOURCE_KINDS",
]

#: The largest ``report.json``/``source.json``/``config.json`` read (bytes).
MAX_JSON_BYTES = 16 << 20
#: What ``source.json`` may say the base model is.
SOURCE_KINDS = ("minilm", "digits-cnn", "hf", "checkpoint")


class UsageError(ValueError):
    """A bad argument, path, recipe or input file: the CLI exits 2 with one line on stderr."""


# --------------------------------------------------------------------------- #
# files of a compressed directory, read as data
# --------------------------------------------------------------------------- #


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in the regular file ``path`` (at most ``limit`` bytes).

    Raises
    ------
    UsageError
        ``path`` is missing, not a regular file, too large, not JSON or not
        a JSON object (the message names it).

    Examples
    --------
    >>> import tempfile, os
    >>> p = Path(tempfile.mkdtemp()) / "a.json"
    >>> _ = p.write_text('{"a": 1}')
    >>> read_json(p)
    {'a': 1}
    """
    if not path.is_file():
        raise UsageError(f"{path} is missing (or not a regular file)")
    if path.stat().st_size > limit:
        raise UsageError(f"{path} is {path.stat().st_size} bytes; at most {limit} are read")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    try:
        obj = json.loads(data[:limit].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_ranks(v: Any) -> bool:
    return v is None or _is_int(v) or (isinstance(v, (list, tuple)) and all(map(_is_int, v)))


_STR = (lambda v: isinstance(v, str), "a string")
_INT = (_is_int, "an integer")
_NUM = (_is_num, "a number")
_OBJ = (lambda v: isinstance(v, dict), "a JSON object")
_LIST = (lambda v: isinstance(v, list), "a list")
_TOP = {
    "model": _STR,
    "recipe": _STR,
    "seed": _INT,
    "eval_data": _STR,
    "layers": _LIST,
    "totals": _OBJ,
    "compare": _OBJ,
    "stages": _OBJ,
    "export_layers": _LIST,
}
_LAYER = {
    "name": _STR,
    "format": _STR,
    "ranks": (_is_ranks, "null, an integer or a list of them"),
    "bits": _STR,
    "params_before": _INT,
    "params_after": _INT,
    "bits_before": _INT,
    "size_bits": _INT,
    "error": (lambda v: v is None or _is_num(v), "null or a number"),
}
_TOTALS = {
    "params_before": _INT,
    "params_after": _INT,
    "bits_before": _INT,
    "size_bits": _INT,
    "layers_compression": _NUM,
    "model_bits_before": _INT,
    "model_bits_after": _INT,
    "model_compression": _NUM,
}
_COMPARE = {
    "metric": (
        lambda v: v in ("cosine", "accuracy", "perplexity"),
        "'cosine', 'accuracy' or 'perplexity'",
    ),
    "samples": _INT,
    "rows": _LIST,
}


def _check_fields(
    obj: Any, schema: Mapping[str, tuple[Callable[[Any], bool], str]], where: str, file: str
) -> None:
    if not isinstance(obj, dict):
        raise UsageError(f"{file}: field '{where}' must be a JSON object, got {_short(obj)}")
    for key, (ok, expected) in schema.items():
        path = f"{where}.{key}" if where else key
        if key not in obj:
            raise UsageError(f"{file}: field '{path}' is missing; expected {expected}")
        if not ok(obj[key]):
            raise UsageError(f"{file}: field '{path}' must be {expected}, got {_short(obj[key])}")


def check_name(name: Any, where: str) -> str:
    """A module name that becomes a file name: dotted parts, no path separators.

    Refused: non-strings, ``''``, ``'.'``, ``'..'``, empty dotted parts,
    ``/``, ``\\``, ``:`` and NUL, and names over 200 characters.

    Examples
    --------
    >>> check_name("encoder.layer.0.output.dense", "export_layers[0]")
    'encoder.layer.0.output.dense'
    >>> check_name("../evil", "report.json field 'export_layers[0]'")
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: report.json field 'export_layers[0]' must be a module name ...
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= 200
        and all(name.split("."))
        and not any(c in name for c in "/\\:\x00")
    )
    if not ok:
        raise UsageError(
            f"{where} must be a module name (dotted parts, no '..', '/', '\\', ':'),"
            f" got {_short(name)}"
        )
    return name


def check_report(report: Any, file: str = "report.json") -> dict[str, Any]:
    """Check the fields ``tnquant report`` and ``export`` read from ``report.json``.

    Examples
    --------
    >>> check_report({"tnquant_report": 2})
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: report.json: field 'tnquant_report' must be 1, got int 2
    """
    if not isinstance(report, dict):
        raise UsageError(f"{file} must hold a JSON object, got {_short(report)}")
    if report.get("tnquant_report") != 1:
        raise UsageError(
            f"{file}: field 'tnquant_report' must be 1, got {_short(report.get('tnquant_report'))}"
        )
    _check_fields(report, _TOP, "", file)
    for i, row in enumerate(report["layers"]):
        _check_fields(row, _LAYER, f"layers[{i}]", file)
    _check_fields(report["totals"], _TOTALS, "totals", file)
    cmp = report["compare"]
    _check_fields(cmp, _COMPARE, "compare", file)
    row_schema = {"model": _STR, "size_bits": _INT, cmp["metric"]: _NUM, "eval_s": _NUM}
    if len(cmp["rows"]) != 2:
        raise UsageError(
            f"{file}: field 'compare.rows' must hold 2 rows (original, compressed),"
            f" got {len(cmp['rows'])}"
        )
    for i, row in enumerate(cmp["rows"]):
        _check_fields(row, row_schema, f"compare.rows[{i}]", file)
    for key, value in report["stages"].items():
        if not _is_num(value):
            raise UsageError(f"{file}: field 'stages.{key}' must be a number, got {_short(value)}")
    names = [
        check_name(n, f"{file} field 'export_layers[{i}]'")
        for i, n in enumerate(report["export_layers"])
    ]
    if len(set(names)) != len(names):
        raise UsageError(f"{file}: field 'export_layers' names a module twice: {names}")
    return report


def check_source(source: dict[str, Any], file: str = "source.json") -> dict[str, Any]:
    """Check ``source.json``: ``model`` (a string), ``kind`` (one of :data:`SOURCE_KINDS`).

    Examples
    --------
    >>> check_source({"model": "digits-cnn", "kind": "digits-cnn", "text": False})["kind"]
    'digits-cnn'
    >>> check_source({"model": "x", "kind": "pickle"})
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: source.json: field 'kind' must be one of ...
    """
    _check_fields(
        source,
        {"model": _STR, "kind": (lambda v: v in SOURCE_KINDS, f"one of {list(SOURCE_KINDS)}")},
        "",
        file,
    )
    kind, model = source["kind"], source["model"]
    if kind in ("minilm", "digits-cnn") and model != kind:
        raise UsageError(
            f"{file}: field 'model' must be {kind!r} for kind {kind!r}, got {_short(model)}"
        )
    return source


def dir_file(directory: Path, *parts: str) -> Path:
    """``directory/parts...``, refused when it resolves outside ``directory`` (a symlink).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> dir_file(d, "export_inputs", "body.npy") == d / "export_inputs" / "body.npy"
    True
    """
    path = directory.joinpath(*parts)
    if not path.resolve().is_relative_to(directory.resolve()):
        raise UsageError(f"{path} resolves outside {directory} ({path.resolve()})")
    return path


def read_rows(path: Path, rows: int, width: int | None = None) -> np.ndarray:
    """Up to ``rows`` rows of the 2-D float ``.npy`` file ``path``, as float32.

    The file is memory-mapped (no pickle; nothing is read beyond what the
    header promises and the file holds), then checked: two dimensions, a
    float dtype, ``width`` columns when given, at least one row, finite.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x.npy"
    >>> np.save(p, np.ones((5, 3)))
    >>> read_rows(p, 2, width=3).shape
    (2, 3)
    """
    if not path.is_file():
        raise UsageError(f"{path} is missing (or not a regular file)")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path} is not a readable .npy array: {e}") from None
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype.kind != "f":
        raise UsageError(
            f"{path} must hold a 2-D float array, got "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    if len(x) == 0:
        raise UsageError(f"{path} holds no input rows (shape {x.shape})")
    if width is not None and x.shape[1] != width:
        raise UsageError(f"{path} must hold rows of {width} inputs, got shape {x.shape}")
    out = np.array(x[:rows], dtype=np.float32)
    if not np.isfinite(out).all():
        raise UsageError(f"{path} holds non-finite inputs (nan or inf)")
    return out


def _in_features(module: Any) -> int | None:
    while type(module).__name__ == "Sequential" and len(module):
        module = module[0]
    width = getattr(module, "in_features", None)
    return width if isinstance(width, int) else None


def read_export_inputs(
    directory: Path, model: Any, names: list[str], rows: int
) -> dict[str, tuple[Any, np.ndarray]]:
    """``{name: (module, inputs)}`` of the export layers: modules of ``model``, checked inputs.

    Examples
    --------
    >>> read_export_inputs(Path("d"), __import__("torch").nn.ReLU(), ["fc"], 4)
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: d/report.json: field 'export_layers' names 'fc', which ...
    """
    modules, out = dict(model.named_modules()), {}
    for name in names:
        if name not in modules:
            raise UsageError(
                f"{directory / 'report.json'}: field 'export_layers' names {name!r},"
                " which is no module of the loaded model"
            )
        path = dir_file(directory, "export_inputs", f"{name}.npy")
        out[name] = (modules[name], read_rows(path, rows, _in_features(modules[name])))
    return out


# --------------------------------------------------------------------------- #
# code: only what the user names
# --------------------------------------------------------------------------- #


def import_class(path: str, what: str) -> Any:
    """The class (or factory) ``'pkg.module:Name'``, imported; ``what`` names its source.

    Examples
    --------
    >>> import_class("torch.nn:Linear", "--model-class").__name__
    'Linear'
    """
    if not isinstance(path, str) or not _CLASS_RE.match(path):
        raise UsageError(f"{what} must be a class path 'pkg.module:Class', got {path!r}")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"{what}: cannot import {path!r}: {e}") from None
    if not callable(obj):
        raise UsageError(f"{what}: {path!r} is a {type(obj).__name__}, not a class")
    return obj


def check_hf_dir(path: Path) -> None:
    """Refuse a Hugging Face directory whose ``config.json`` is missing or asks for its own code.

    tnquant never sets ``trust_remote_code``: a config (or tokenizer config)
    with ``auto_map`` (or ``trust_remote_code``) names Python files of the
    directory, which are never run (:func:`tnquant.io.hf_base.check_hf_dir`).

    Examples
    --------
    >>> import json, tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "m.M"}}))
    >>> check_hf_dir(d)
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: .../config.json has 'auto_map': ...
    """
    try:
        hf_base.check_hf_dir(path)  # the one check, shared with tnquant.load
    except ValueError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------- #
# output directories
# --------------------------------------------------------------------------- #


def check_out_dir(arg: str, flag: str, force: bool) -> Path:
    """The output directory ``arg`` of ``flag``: not a file, under no file, empty unless ``force``.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> check_out_dir(str(d / "new"), "--out", force=False) == d / "new"
    True
    >>> _ = (d / "f").write_text("x")
    >>> check_out_dir(str(d / "f"), "--out", force=True)
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: --out ... is a file, not a directory
    """
    path = Path(arg)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {arg!r} is a file, not a directory")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {arg!r}: {parent} is a file, not a directory")
            break
    if path.is_dir() and not force and any(path.iterdir()):
        raise UsageError(f"output directory {path} is not empty (use --force to overwrite)")
    return path


# --------------------------------------------------------------------------- #
# recipe requests that reached no layer
# --------------------------------------------------------------------------- #


def check_stage_report(stage: str, model: Any, report: Any, seconds: float) -> None:
    """Refuse a stage whose report lists a recipe pattern that reached no layer (exit 2).

    Called by ``tnquant compress`` after every stage of the pipeline (its
    ``after=`` hook): a ``skipped`` row of kind ``'pattern'`` means a recipe
    glob matched no layer (a typo) or its format applies to none of the
    layers it matched (``format = "cp"`` on Linear layers).

    Examples
    --------
    >>> from tnquant.report import Report
    >>> report = Report("factorize")
    >>> report.skip("factorize['fc_typo']", "pattern", "matched nothing")
    >>> check_stage_report("factorize", None, report, 0.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: recipe [factorize]: factorize['fc_typo'] matched nothing ...
    """
    rows = [s for s in getattr(report, "skipped", ()) if s.get("kind") == "pattern"]
    if not rows:
        return
    row = rows[0]
    more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
    hint = (
        " (check the pattern against the model's module names)"
        if row["reason"] == "matched nothing"
        else ""
    )
    raise UsageError(f"recipe [{stage}]: {row['name']} {row['reason']}{hint}{more}")
