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

``load(path, model=base)`` treats the directory as untrusted: it imports no
code (classes come from the closed table :data:`tnquant.io_modules.HANDLERS`),
unpickles nothing, and checks everything before it allocates a tensor,
reads tensor data or touches ``base`` (a freshly constructed model of the
original architecture):

1. ``model.json``: at most 64 MiB, canonical, its checksum, format and
   version, then every field's type (:mod:`tnquant.io_fields`); the tensor
   file must be ``tensors.safetensors`` in the directory itself;
2. the safetensors header, read on its own (length against the file size,
   each tensor's byte range against its dtype and shape), equal to the
   listing in ``model.json``, and the ``tied`` groups;
3. the architecture: each entry's class replaces what the class table says
   (never what the file says) and stands where ``base`` has that dense layer
   with the same sizes (a class that replaces nothing, such as ``Identity``,
   only where ``base`` has one); each module is rebuilt on the meta device,
   every tensor compared with the header, and so are ``base``'s own;
4. only then the ``sha256``, the data (tied tensors must be equal), each
   rebuilt module's state (before it is attached), the swap into ``base``
   and a strict ``load_state_dict`` (undone if it raises).

A refusal raises :class:`IntegrityError` (a ``ValueError``) naming the file
and the entry or field, or ``ValueError`` for a base model of another
architecture; ``base`` is left untouched. ``load(path)`` without a model
works when the saved model is one tnquant module. The checksums are plain
``sha256``: they detect corruption, not forgery; a forged but
self-consistent directory loads as the model it describes. The docs page
"Saving and loading" says what is and is not promised, also for
``IntegerModel.load`` and the ``report``/``export`` commands, which treat
their directories the same way. Rebuilt modules go to the device of the
module they replace and keep the saved dtypes; the other tensors are copied
into the base model's own (pass it in the saved dtype for a bit-exact trip).

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
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tnquant.io_checks import (
    MAX_JSON_BYTES,
    IntegrityError,
    TensorInfo,
    check_base_state,
    check_listing,
    check_meta,
    check_planned,
    check_replaced,
    check_replaces,
    check_states,
    read_header,
    read_regular,
)
from tnquant.io_fields import check_node, check_tied, check_tied_kinds, check_tied_values
from tnquant.io_modules import HANDLERS, BuildContext, build_node, describe_entries

__all__ = ["save", "load", "IntegrityError", "FORMAT", "VERSION", "TENSORS_FILE", "JSON_FILE"]

FORMAT = "tnquant"
#: The format version this module writes and reads.
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
JSON_FILE = "model.json"
_CHUNK = 1 << 20


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


def _slot(owner: nn.Module, attr: str, value: Tensor) -> None:
    if isinstance(owner, nn.ParameterList):
        owner[int(attr)] = value
    elif isinstance(value, nn.Parameter):
        setattr(owner, attr, value)
    else:
        owner.register_buffer(attr, value)


def _retie(model: nn.Module, groups: list[list[str]]) -> list[tuple[nn.Module, str, Tensor]]:
    """Make every key of a group point at its first key's tensor (as when saved).

    Returns what it replaced, ``(owner, attr, old)``, to undo it.
    """
    undo = []
    for group in groups:
        owner_name, _, attr = group[0].rpartition(".")
        first = getattr(model.get_submodule(owner_name), attr)
        for key in group[1:]:
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            old = getattr(owner, attr)
            if old is not first:
                undo.append((owner, attr, old))
                _slot(owner, attr, first)
    return undo


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
# load: checks (nothing is built, allocated or read before they pass)
# --------------------------------------------------------------------------- #


def _read_meta(directory: Path) -> dict[str, Any]:
    json_path = directory / JSON_FILE
    if not json_path.exists():
        raise FileNotFoundError(f"{json_path} not found: not a tnquant save directory")
    raw = read_regular(json_path, MAX_JSON_BYTES)
    try:
        meta = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
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
    version = meta.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(f"{json_path}: unsupported format version {version!r}; "
                         f"this tnquant reads version {VERSION}")
    check_meta(meta, str(json_path), TENSORS_FILE)
    return meta


def _read_header(directory: Path, meta: dict[str, Any]) -> tuple[Path, dict[str, TensorInfo]]:
    """The tensor file's checked header (its size first; no tensor data is read)."""
    info = meta["tensors"]
    tensor_path = directory / TENSORS_FILE
    if not tensor_path.exists():
        raise FileNotFoundError(f"{tensor_path} not found (listed in {directory / JSON_FILE})")
    if not tensor_path.is_file():
        raise IntegrityError(f"{tensor_path} is not a regular file")
    size = tensor_path.stat().st_size
    if size != info["bytes"]:
        raise IntegrityError(f"{tensor_path} is truncated or altered: {size} bytes, expected "
                             f"{info['bytes']}")
    header = read_header(tensor_path, size)
    check_listing(header, info["entries"], tensor_path, JSON_FILE)
    check_tied(meta["tied"], header, str(directory / JSON_FILE))
    return tensor_path, header


def _check_base(model: nn.Module, entry: dict[str, Any], names: list[str],
                known: dict[str, nn.Module]) -> nn.Module:
    """Check what ``model`` holds at each of ``names``; return the first such module."""
    for name in names:
        if name not in known:
            parent = name.rpartition(".")[0]
            missing = name if parent in known else parent
            raise ValueError(f"the model has no module {missing!r} (the saved model has a "
                             f"{entry['node']['class']} at {name!r})")
        check_replaced(entry, name, known[name], HANDLERS[entry["node"]["class"]])
    return known[names[0]]


def _device_of(module: nn.Module | None) -> torch.device:
    if module is not None:
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


_BUILD_ERRORS = (KeyError, TypeError, IndexError, ValueError, AttributeError, RuntimeError,
                 OverflowError, AssertionError, NotImplementedError)


def _plan(model: nn.Module | None, entries: list[dict[str, Any]],
          header: dict[str, TensorInfo], json_path: Path
          ) -> list[tuple[list[str], nn.Module, torch.device]]:
    """Check every entry and build its module on the meta device (not attached yet)."""
    for i, entry in enumerate(entries):
        check_node(entry["node"], f"modules[{i}] {entry['names'][0]!r}", str(json_path),
                   HANDLERS)
    known = dict(model.named_modules(remove_duplicate=False)) if model is not None else {}
    ctx = BuildContext(tensors={k: info.meta() for k, info in header.items()})
    planned = []
    for i, entry in enumerate(entries):
        names = list(entry["names"])
        where = f"{json_path}: modules[{i}] ({entry['node']['class']} at {names[0]!r})"
        check_replaces(entry, HANDLERS[entry["node"]["class"]], where)
        base = _check_base(model, entry, names, known) if model is not None else None
        try:
            built = build_node(entry["node"], names[0], ctx)
        except IntegrityError:
            raise
        except _BUILD_ERRORS as err:
            raise IntegrityError(f"{where} cannot be rebuilt: {type(err).__name__}: "
                                 f"{err}") from None
        check_planned(built, names, header, where)
        planned.append((names, built, _device_of(base)))
    return planned


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


def _read_data(tensor_path: Path, header: dict[str, TensorInfo], digest: str
               ) -> dict[str, Tensor]:
    """The tensors, once the file's sha256 matches (read again: the header must still hold)."""
    actual, _ = _sha256_file(tensor_path)
    if actual != digest:
        raise IntegrityError(f"{tensor_path} was altered: sha256 {actual} does not match "
                             f"{digest} recorded in {JSON_FILE}")
    try:
        tensors = load_file(str(tensor_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise IntegrityError(f"{tensor_path} could not be read: {err}") from None
    if set(tensors) != set(header) or any(
            (t.dtype, tuple(t.shape)) != (header[k].dtype, header[k].shape)
            for k, t in tensors.items()):
        raise IntegrityError(f"{tensor_path} changed while it was read")
    return tensors


def _fill(planned: list[tuple[list[str], nn.Module, torch.device]],
          tensors: dict[str, Tensor], json_path: Path) -> list[tuple[list[str], nn.Module]]:
    """Allocate each rebuilt module where it goes and load its own state (not attached yet)."""
    filled = []
    for names, module, device in planned:
        prefix = f"{names[0]}." if names[0] else ""
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module = module.to_empty(device=device)  # sizes checked against the file
        try:
            with torch.no_grad():
                module.load_state_dict(own, strict=True)
        except _BUILD_ERRORS as err:
            raise IntegrityError(f"{json_path}: the saved state of {names[0]!r} does not load: "
                                 f"{type(err).__name__}: {err}") from None
        check_states(module, f"{json_path}: {names[0]!r}")
        filled.append((names, module))
    return filled


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
        A file is truncated, altered, unreadable or describes something
        inconsistent (the message names the file and the entry or field).
    ValueError
        Unknown format version, or ``model`` does not match the saved
        architecture (missing module, other layer type or sizes, state keys
        or shapes).
    FileNotFoundError
        ``path`` lacks ``model.json`` or the tensor file.

    Notes
    -----
    Every check runs before the first module of ``model`` is replaced, so a
    refused directory leaves it as it was (same module objects, same
    tensors and values). The rebuilt modules receive their state before
    they are attached; should the final strict ``load_state_dict`` of the
    checked keys and shapes still raise, the original modules and tensor
    ties are put back.

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
    json_path = directory / JSON_FILE
    meta = _read_meta(directory)
    entries = meta["modules"]
    if model is None and not (len(entries) == 1 and entries[0]["names"] == [""]):
        raise ValueError(f"{directory} holds a full model, not a single tnquant module; pass a "
                         "freshly constructed model of the original architecture: "
                         "load(path, model=YourModel())")
    tensor_path, header = _read_header(directory, meta)
    planned = _plan(model, entries, header, json_path)
    check_base_state(model, [name for names, _, _ in planned for name in names], header)
    check_tied_kinds(model, [(n, m) for n, m, _ in planned], meta["tied"], str(json_path))
    tensors = _read_data(tensor_path, header, meta["tensors"]["sha256"])
    check_tied_values(meta["tied"], tensors, str(json_path))
    filled = _fill(planned, tensors, json_path)
    # every check passed: attach, retie, load; undo all of it if that still fails
    root, swapped, undo = model, [], []
    try:
        for names, module in filled:
            for name in names:
                if name:
                    swapped.append((name, cast(nn.Module, root).get_submodule(name)))
                    _set_module(cast(nn.Module, root), name, module)
                else:
                    root = module
        undo = _retie(cast(nn.Module, root), meta["tied"])
        with torch.no_grad():
            cast(nn.Module, root).load_state_dict(tensors, strict=True)
    except BaseException:
        for owner, attr, old in reversed(undo):
            _slot(owner, attr, old)
        for name, old_module in reversed(swapped):
            _set_module(cast(nn.Module, model), name, old_module)
        raise
    return cast(nn.Module, root)
