"""``save`` / ``load``: a lossless, pickle-free round trip of compressed models.

Format (version 1): ``save(model, path)`` writes the directory ``path/``:

- ``tensors.safetensors``: every entry of ``model.state_dict()`` (parameters
  and persistent buffers: cores, biases, scales, zero points, observer
  ranges, quantizer modes, packed integer codes), under its state-dict key;
- ``model.json``: ``format`` (``"tnquant"``), ``version``, the tensor file's
  name, byte size and ``sha256``, the ``dtype``/``shape`` of every tensor,
  and ``modules``: one entry per tnquant module standing in the model
  (factorized layers, quantized dense layers, quantizers, frozen tensors),
  with every name it is reachable under, what dense module it replaces,
  and a recursive description: class, constructor configuration (specs via
  :func:`~tnquant.specs.spec_to_dict`, sizes, conv hyper-parameters, bias
  presence, ``decomposition_info``, ``implementation``), and its attached
  children (``core_quantizers``, ``act_quantizers``, ``weight_quantizer``,
  ...). The JSON is written canonically (sorted keys, fixed indentation)
  and its ``checksum`` field is the ``sha256`` of that canonical text
  without the field.

``load(path, model=base)`` checks everything first (both checksums, the
canonical form of the JSON, the format version, the tensors against the
listing, the architecture: each replaced module is the dense layer the saved
one stands for, with the same sizes, and the rebuilt model's state-dict keys
and shapes equal the saved ones) and only then replaces the named modules of
``base`` (a freshly constructed model of the original architecture) by
rebuilt tnquant modules and loads the state (strict). A truncated or altered
file raises :class:`IntegrityError` (a ``ValueError``) naming the file, and
the model is left untouched. ``load(path)`` without a model works when the
saved model is itself one tnquant module; otherwise it asks for the base
model.

Rebuilt modules go to the device of the module they replace and keep the
saved dtypes; the other tensors are copied into the base model's own (pass
it in the dtype it was saved in for a bit-exact round trip).

Examples
--------
>>> import tempfile, torch
>>> from torch import nn
>>> from tnquant import LowRank, factorize
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> _ = factorize(model, {"0": LowRank(rank=2)}, progress=False)
>>> with tempfile.TemporaryDirectory() as d:
...     save(model, d)
...     fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
...     loaded = load(d, model=fresh)
>>> x = torch.randn(3, 16)
>>> type(loaded[0]).__name__, torch.equal(loaded(x), model(x))
('LowRankLinear', True)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tnquant.io_modules import (
    BuildContext,
    build_node,
    check_replaced,
    describe_entries,
)

__all__ = ["save", "load", "IntegrityError", "FORMAT", "VERSION", "TENSORS_FILE", "JSON_FILE"]

FORMAT = "tnquant"
#: The format version this module writes and reads.
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
JSON_FILE = "model.json"
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A saved file is truncated, altered or not a tnquant save (the message names it)."""


# --------------------------------------------------------------------------- #
# canonical JSON and checksums
# --------------------------------------------------------------------------- #


def _canonical(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensors_for_file(model: nn.Module) -> dict[str, Tensor]:
    """The state dict on CPU, contiguous, with no two entries sharing storage."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}; only tensors "
                            "can be saved")
        t = value.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ident in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ident)
        out[key] = t
    return out


def _tied_groups(model: nn.Module, tensors: dict[str, Tensor]) -> list[list[str]]:
    """State-dict keys that name one and the same parameter or buffer object."""
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    for key, value in named:
        if key in tensors:
            groups.setdefault(id(value), []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make every key of a group point at its first key's tensor (as when saved)."""
    for group in groups:
        owner_name, _, attr = group[0].rpartition(".")
        first = getattr(model.get_submodule(owner_name), attr)
        for key in group[1:]:
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            if getattr(owner, attr) is first:
                continue
            if isinstance(owner, nn.ParameterList):
                owner[int(attr)] = first
            elif isinstance(first, nn.Parameter):
                setattr(owner, attr, first)
            else:
                owner.register_buffer(attr, first)


# --------------------------------------------------------------------------- #
# save
# --------------------------------------------------------------------------- #


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save ``model`` (tensors and tnquant architecture changes) to the directory ``path``.

    Parameters
    ----------
    model
        Any model: factorized, quantized (fake-quant or calibrated),
        converted, or plain.
    path
        A directory, created when missing; ``tensors.safetensors`` and
        ``model.json`` in it are replaced (the JSON last, so an interrupted
        save never passes the checks).

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``, or holds a tnquant module this
        format cannot describe.

    Examples
    --------
    >>> import tempfile, json, os
    >>> from tnquant import TT
    >>> from tnquant.layers import TTLinear
    >>> layer = TTLinear.from_dense(torch.nn.Linear(16, 8), TT(rank=2, order=2))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save(layer, d)
    ...     meta = json.load(open(os.path.join(d, "model.json")))
    >>> meta["version"], meta["modules"][0]["node"]["class"]
    (1, 'TTLinear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    entries = describe_entries(model)
    tensors = _tensors_for_file(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensor_path = directory / TENSORS_FILE
    tmp = directory / (TENSORS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    digest, size = _sha256_file(tmp)
    os.replace(tmp, tensor_path)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__qualname__,
        "tensors": {
            "file": TENSORS_FILE,
            "sha256": digest,
            "bytes": size,
            "entries": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
                        for k, t in tensors.items()},
        },
        "modules": entries,
        "tied": _tied_groups(model, tensors),
    }
    meta["checksum"] = hashlib.sha256(_canonical(meta)).hexdigest()
    tmp_json = directory / (JSON_FILE + ".tmp")
    tmp_json.write_bytes(_canonical(meta))
    os.replace(tmp_json, directory / JSON_FILE)


# --------------------------------------------------------------------------- #
# load: checks
# --------------------------------------------------------------------------- #


def _read_meta(directory: Path) -> dict[str, Any]:
    json_path = directory / JSON_FILE
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path} not found: not a tnquant save directory")
    raw = json_path.read_bytes()
    try:
        meta = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{json_path} is corrupt (not valid JSON: {err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("checksum"), str):
        raise IntegrityError(f"{json_path} is corrupt: expected a JSON object with a 'checksum' "
                             "field")
    if raw != _canonical(meta):
        raise IntegrityError(f"{json_path} was altered: its bytes are not the canonical form "
                             "that save() writes")
    claimed = meta.pop("checksum")
    actual = hashlib.sha256(_canonical(meta)).hexdigest()
    if claimed != actual:
        raise IntegrityError(f"{json_path} was altered: checksum {claimed} does not match its "
                             f"content ({actual})")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{json_path}: format must be {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{json_path}: unsupported format version {meta.get('version')!r}; "
                         f"this tnquant reads version {VERSION}")
    return meta


def _read_tensors(directory: Path, meta: dict[str, Any]) -> dict[str, Tensor]:
    info = meta["tensors"]
    tensor_path = directory / str(info["file"])
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{tensor_path} not found (listed in {directory / JSON_FILE})")
    digest, size = _sha256_file(tensor_path)
    if size != info["bytes"]:
        raise IntegrityError(f"{tensor_path} is truncated or altered: {size} bytes, expected "
                             f"{info['bytes']}")
    if digest != info["sha256"]:
        raise IntegrityError(f"{tensor_path} was altered: sha256 {digest} does not match "
                             f"{info['sha256']} recorded in {JSON_FILE}")
    try:
        tensors = load_file(str(tensor_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:  # same bytes as saved: unlikely
        raise IntegrityError(f"{tensor_path} could not be read: {err}") from None
    entries = info["entries"]
    if set(tensors) != set(entries):
        raise IntegrityError(f"{tensor_path} holds other tensors than {JSON_FILE} lists")
    if any(k not in tensors for group in meta.get("tied", []) for k in group):
        raise IntegrityError(f"{directory / JSON_FILE} ties tensors the tensor file lacks")
    for key, t in tensors.items():
        if _dtype_name(t.dtype) != entries[key]["dtype"] or list(t.shape) != entries[key]["shape"]:
            raise IntegrityError(f"{tensor_path}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, "
                                 f"{JSON_FILE} says {entries[key]}")
    return tensors


def _summary(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _check_state(model: nn.Module | None, planned: list[tuple[list[str], nn.Module]],
                 tensors: dict[str, Tensor]) -> None:
    """Compare the keys/shapes the rebuilt model will have with the saved tensors."""
    expected: dict[str, tuple[tuple[int, ...], bool]] = {}
    replaced = [name for names, _ in planned for name in names]
    if model is not None:
        for key, value in model.state_dict().items():
            if not any(n == "" or key.startswith(n + ".") for n in replaced):
                expected[key] = (tuple(value.shape), False)
    for names, module in planned:
        for name in names:
            prefix = f"{name}." if name else ""
            for key, value in module.state_dict().items():
                expected[prefix + key] = (tuple(value.shape), value.numel() == 0)
    missing = [k for k in tensors if k not in expected]
    unexpected = [k for k in expected if k not in tensors]
    problems = []
    if missing:
        problems.append(f"saved tensors with no place in the model: {_summary(missing)}")
    if unexpected:
        problems.append(f"model tensors missing from the save: {_summary(unexpected)}")
    wrong = [f"{k} (model {expected[k][0]}, saved {tuple(tensors[k].shape)})"
             for k in tensors if k in expected and not expected[k][1]
             and expected[k][0] != tuple(tensors[k].shape)]
    if wrong:
        problems.append(f"shape mismatches: {'; '.join(wrong[:5])}")
    if problems:
        raise ValueError("the model does not match the saved architecture: "
                         + " | ".join(problems))


# --------------------------------------------------------------------------- #
# load
# --------------------------------------------------------------------------- #


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def _device_of(module: nn.Module | None) -> torch.device:
    if module is not None:
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


def _lookup(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_base(model: nn.Module, entry: dict[str, Any], names: list[str]) -> nn.Module | None:
    """Check what ``model`` holds at each of ``names``; return the first such module."""
    base = None
    for name in names:
        current = _lookup(model, name)
        parent = name.rpartition(".")[0]
        if current is None and _lookup(model, parent) is None:
            raise ValueError(f"the model has no module {parent!r} (the saved model has a "
                             f"{entry['node']['class']} at {name!r})")
        check_replaced(entry, name, current)
        base = base if base is not None else current
    return base


def _plan(model: nn.Module | None, entries: list[dict[str, Any]], tensors: dict[str, Tensor],
          path: Path) -> list[tuple[list[str], nn.Module]]:
    """Build every saved tnquant module (not attached yet), checking the base model."""
    planned = []
    for entry in entries:
        names = list(entry["names"])
        base = _check_base(model, entry, names) if model is not None else None
        ctx = BuildContext(tensors=tensors, device=_device_of(base))
        try:
            built = build_node(entry["node"], names[0], ctx)
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{path / JSON_FILE} describes a module at {names[0]!r} that "
                             f"cannot be rebuilt: {type(err).__name__}: {err}") from None
        planned.append((names, built))
    return planned


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a model saved by :func:`save` (checked first; see the module docs).

    Parameters
    ----------
    path
        The directory :func:`save` wrote.
    model
        A freshly constructed model of the original architecture (before
        ``factorize``/``quantize``), e.g. ``Net()`` or the Hugging Face
        model; its named modules are replaced in place and its state
        loaded. May be omitted when the saved model is one tnquant module
        (a ``TTLinear``, say).

    Returns
    -------
    nn.Module
        ``model`` (changed in place), or the rebuilt module.

    Raises
    ------
    IntegrityError
        A file is truncated, altered or unreadable (the message names it).
    ValueError
        Unknown format version, or ``model`` does not match the saved
        architecture (missing module, other layer type or sizes, state keys
        or shapes); ``model`` is then left unchanged.
    FileNotFoundError
        ``path`` lacks ``model.json`` or the tensor file.

    Examples
    --------
    >>> import tempfile
    >>> from tnquant import Tucker
    >>> from tnquant.layers import TuckerConv2d
    >>> layer = TuckerConv2d.from_dense(torch.nn.Conv2d(4, 8, 3), Tucker(rank=(4, 2)))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save(layer, d)
    ...     same = load(d)
    >>> x = torch.randn(1, 4, 5, 5)
    >>> torch.equal(same(x), layer(x))
    True
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    directory = Path(path)
    meta = _read_meta(directory)
    tensors = _read_tensors(directory, meta)
    entries = meta["modules"]
    if model is None and not (len(entries) == 1 and entries[0]["names"] == [""]):
        raise ValueError(f"{directory} holds a full model, not a single tnquant module; pass a "
                         "freshly constructed model of the original architecture: "
                         "load(path, model=YourModel())")
    planned = _plan(model, entries, tensors, directory)
    _check_state(model, planned, tensors)
    root = model
    for names, module in planned:
        for name in names:
            if name:
                _set_module(root, name, module)  # type: ignore[arg-type]
            else:
                root = module
    if root is None:
        raise ValueError(f"{directory} holds no module to load")
    _retie(root, meta.get("tied", []))
    with torch.no_grad():
        root.load_state_dict(tensors, strict=True)
    return root
