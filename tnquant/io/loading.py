"""``load``: check a save directory whole, then rebuild and attach its modules.

Every check of :mod:`tnquant.io` runs before anything is built, allocated,
read or replaced (see the module docs there); the classes come from the
registry's closed table (:mod:`tnquant.io.nodes`).

Examples
--------
>>> import tempfile, torch
>>> from tnquant.io import save
>>> from tnquant.layers import LowRankLinear
>>> layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
>>> with tempfile.TemporaryDirectory() as d:
...     save(layer, d)
...     type(load(d)).__name__
'LowRankLinear'
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from tnquant.core.modules import replace_module
from tnquant.io.checks import (
    MAX_JSON_BYTES,
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
from tnquant.io.fields import IntegrityError, check_node, check_tied_kinds, check_tied_values
from tnquant.io.files import FORMAT, JSON_FILE, TENSORS_FILE, VERSION, canonical, sha256_file
from tnquant.io.hf_base import build_hf_base, hf_size_bound
from tnquant.io.nodes import HANDLERS, BuildContext, build_node
from tnquant.io.ties import check_alias_places, expand_tied, with_aliases

__all__ = ["load"]


def _slot(owner: nn.Module, attr: str, value: Tensor) -> None:
    if isinstance(owner, nn.ParameterList):
        owner[int(attr)] = value
    elif isinstance(value, nn.Parameter):
        setattr(owner, attr, value)
    else:
        owner.register_buffer(attr, value)


def _stored(owner: nn.Module, attr: str) -> Any:
    """The registered tensor ``attr`` (a converted layer's ``weight`` reads dequantized)."""
    for table in (owner._parameters, owner._buffers):
        if attr in table:
            return table[attr]
    return getattr(owner, attr)


def _retie(model: nn.Module, groups: list[list[str]]) -> list[tuple[nn.Module, str, Tensor]]:
    """Make every key of a group point at its first key's tensor (as when saved).

    Returns what it replaced, ``(owner, attr, old)``, to undo it.
    """
    undo = []
    for group in groups:
        owner_name, _, attr = group[0].rpartition(".")
        first = _stored(model.get_submodule(owner_name), attr)
        for key in group[1:]:
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            old = _stored(owner, attr)
            if old is not first:
                undo.append((owner, attr, old))
                _slot(owner, attr, first)
    return undo


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
        raise IntegrityError(
            f"{json_path} is corrupt: expected a JSON object with a 'checksum' field"
        )
    if raw != canonical(meta):
        raise IntegrityError(
            f"{json_path} was altered: its bytes are not the canonical form that save() writes"
        )
    claimed = meta.pop("checksum")
    actual = hashlib.sha256(canonical(meta)).hexdigest()
    if claimed != actual:
        raise IntegrityError(
            f"{json_path} was altered: checksum {claimed} does not match its content ({actual})"
        )
    if meta.get("format") != FORMAT:
        raise ValueError(f"{json_path}: format must be {FORMAT!r}, got {meta.get('format')!r}")
    version = meta.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(
            f"{json_path}: unsupported format version {version!r}; "
            f"this tnquant reads version {VERSION}"
        )
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
        raise IntegrityError(
            f"{tensor_path} is truncated or altered: {size} bytes, expected {info['bytes']}"
        )
    header = read_header(tensor_path, size)
    check_listing(header, info["entries"], tensor_path, JSON_FILE)
    # tied keys stored once: the aliases get their first key's entry (tnquant.io.ties)
    return tensor_path, expand_tied(meta["tied"], header, str(directory / JSON_FILE))


def _check_base(
    model: nn.Module, entry: dict[str, Any], names: list[str], known: dict[str, nn.Module]
) -> nn.Module:
    """Check what ``model`` holds at each of ``names``; return the first such module."""
    for name in names:
        if name not in known:
            parent = name.rpartition(".")[0]
            missing = name if parent in known else parent
            raise ValueError(
                f"the model has no module {missing!r} (the saved model has a "
                f"{entry['node']['class']} at {name!r})"
            )
        check_replaced(entry, name, known[name], HANDLERS[entry["node"]["class"]])
    return known[names[0]]


def _device_of(module: nn.Module | None) -> torch.device:
    if module is not None:
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


_BUILD_ERRORS = (
    KeyError,
    TypeError,
    IndexError,
    ValueError,
    AttributeError,
    RuntimeError,
    OverflowError,
    AssertionError,
    NotImplementedError,
)


def _plan(
    model: nn.Module | None,
    entries: list[dict[str, Any]],
    header: dict[str, TensorInfo],
    json_path: Path,
) -> list[tuple[list[str], nn.Module, torch.device]]:
    """Check every entry and build its module on the meta device (not attached yet)."""
    for i, entry in enumerate(entries):
        check_node(entry["node"], f"modules[{i}] {entry['names'][0]!r}", str(json_path), HANDLERS)
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
            raise IntegrityError(
                f"{where} cannot be rebuilt: {type(err).__name__}: {err}"
            ) from None
        check_planned(built, names, header, where)
        planned.append((names, built, _device_of(base)))
    return planned


def _read_data(tensor_path: Path, header: dict[str, TensorInfo], digest: str) -> dict[str, Tensor]:
    """The tensors, once the file's sha256 matches (read again: the header must still hold)."""
    actual, _ = sha256_file(tensor_path)
    if actual != digest:
        raise IntegrityError(
            f"{tensor_path} was altered: sha256 {actual} does not match "
            f"{digest} recorded in {JSON_FILE}"
        )
    try:
        tensors = with_aliases(load_file(str(tensor_path), device="cpu"), header)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise IntegrityError(f"{tensor_path} could not be read: {err}") from None
    if set(tensors) != set(header) or any(
        (t.dtype, tuple(t.shape)) != (header[k].dtype, header[k].shape) for k, t in tensors.items()
    ):
        raise IntegrityError(f"{tensor_path} changed while it was read")
    return tensors


def _fill(
    planned: list[tuple[list[str], nn.Module, torch.device]],
    tensors: dict[str, Tensor],
    json_path: Path,
) -> list[tuple[list[str], nn.Module]]:
    """Allocate each rebuilt module where it goes and load its own state (not attached yet)."""
    filled = []
    for names, module, device in planned:
        prefix = f"{names[0]}." if names[0] else ""
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module = module.to_empty(device=device)  # sizes checked against the file
        try:
            with torch.no_grad():
                module.load_state_dict(own, strict=True)
        except _BUILD_ERRORS as err:
            raise IntegrityError(
                f"{json_path}: the saved state of {names[0]!r} does not load: "
                f"{type(err).__name__}: {err}"
            ) from None
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
        (a ``TTLinear``, say), or when ``path`` also holds the Hugging Face
        ``config.json`` (written by :func:`tnquant.hf.save_pretrained`): the
        base is then rebuilt from it by
        :func:`tnquant.io.hf_base.build_hf_base` (no code of the folder is
        run; the class must be one of transformers' own; the model is sized
        on the meta device first, at most
        :func:`~tnquant.io.hf_base.hf_size_bound` of the saved tensors).

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
    >>> from tnquant.io import save
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
    tensor_path, header = _read_header(directory, meta)
    if model is None and not (len(entries) == 1 and entries[0]["names"] == [""]):
        if not (directory / "config.json").is_file():
            raise ValueError(
                f"{directory} holds a full model, not a single tnquant module, and no "
                "config.json; pass a freshly constructed model of the original "
                "architecture: load(path, model=YourModel())"
            )
        # a Hugging Face folder: its base comes from config.json, checked and sized first
        model = build_hf_base(directory, max_bytes=hf_size_bound(meta["tensors"]["bytes"]))
    planned = _plan(model, entries, header, json_path)
    check_alias_places(model, [(n, m) for n, m, _ in planned], header, str(json_path))
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
                    replace_module(cast(nn.Module, root), name, module)
                else:
                    root = module
        undo = _retie(cast(nn.Module, root), meta["tied"])
        with torch.no_grad():
            cast(nn.Module, root).load_state_dict(tensors, strict=True)
    except BaseException:
        for owner, attr, old in reversed(undo):
            _slot(owner, attr, old)
        for name, old_module in reversed(swapped):
            replace_module(cast(nn.Module, model), name, old_module)
        raise
    return cast(nn.Module, root)
