"""``load_skeleton``: check a save folder whole and attach its modules, unfilled.

For a loader that fills the tensors itself (transformers' ``from_pretrained``
through :class:`tnquant.hf.quantizer.TnquantHfQuantizer`): the folder is
checked exactly as :func:`tnquant.load` checks it (``model.json``, the
safetensors header, the architecture against the base, the tensor file's
``sha256``), then every saved tnquant module is rebuilt on the meta device,
its tensors sized as the file stores them, and swapped into the (meta)
base model. :func:`check_loaded` then checks what the loader wrote and
ties the tensors that were one when saved (``model.json``'s ``tied``).

Examples
--------
>>> import tempfile, torch
>>> from torch import nn
>>> from tnquant import LowRank, factorize
>>> from tnquant.io import save
>>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
>>> _ = factorize(model, {"0": LowRank(rank=2)}, progress=False)
>>> with tempfile.TemporaryDirectory() as d:
...     save(model, d)
...     with torch.device("meta"):
...         base = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
...     skeleton = load_skeleton(d, base)
>>> skeleton.names, type(base[0]).__name__, base[0].cores[0].device.type
(['0'], 'LowRankLinear', 'meta')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from tnquant.core.modules import replace_module
from tnquant.io.checks import TensorInfo, check_base_state, check_states
from tnquant.io.fields import IntegrityError, check_tied_kinds, check_tied_values
from tnquant.io.files import JSON_FILE, sha256_file
from tnquant.io.loading import _plan, _read_header, _read_meta, _retie

__all__ = ["Skeleton", "load_skeleton", "check_loaded"]


class Skeleton(NamedTuple):
    """What :func:`load_skeleton` attached.

    ``names``: the swapped-in modules; ``tied``: the state-dict keys that
    were one tensor when saved; ``aliases``: the tied keys the tensor file
    does not hold (stored once, under their group's first key), each
    mapped to that key.
    """

    names: list[str]
    tied: list[list[str]]
    aliases: dict[str, str]


def _resize(module: nn.Module, prefix: str, header: Mapping[str, TensorInfo]) -> None:
    """Give every tensor of ``module`` the shape and dtype the file stores (on meta)."""
    for key, value in list(module.state_dict(keep_vars=True).items()):
        info = header[prefix + key]
        if tuple(value.shape) == info.shape and value.dtype == info.dtype:
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        new = torch.empty(info.shape, dtype=info.dtype, device="meta")
        if isinstance(value, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=value.requires_grad))
        else:
            owner.register_buffer(attr, new)


def load_skeleton(path: str | os.PathLike[str], model: nn.Module) -> Skeleton:
    """Check the folder ``path`` against ``model`` and swap in its rebuilt, unfilled modules.

    Parameters
    ----------
    path
        A folder :func:`tnquant.save` wrote.
    model
        The base model on the meta device (transformers builds it so);
        changed in place only when every check passed.

    Returns
    -------
    Skeleton
        ``names``: the names of the swapped-in modules (their tensors are
        on the meta device, sized and typed as the tensor file stores
        them); ``tied``: the state-dict keys that were one tensor when saved.

    Raises
    ------
    IntegrityError
        A file is truncated, altered or inconsistent.
    ValueError
        ``model`` does not match the saved architecture.

    Examples
    --------
    >>> load_skeleton("/nonexistent", nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    FileNotFoundError: /nonexistent/model.json not found: not a tnquant save directory
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    directory = Path(path)
    json_path = directory / JSON_FILE
    meta = _read_meta(directory)
    tensor_path, header = _read_header(directory, meta)
    planned = _plan(model, meta["modules"], header, json_path)
    names = [name for names, _, _ in planned for name in names]
    if "" in names:
        raise ValueError(f"{directory} holds a single tnquant module, not a model to fill")
    check_base_state(model, names, header)
    check_tied_kinds(model, [(n, m) for n, m, _ in planned], meta["tied"], str(json_path))
    actual, _ = sha256_file(tensor_path)
    if actual != meta["tensors"]["sha256"]:
        raise IntegrityError(
            f"{tensor_path} was altered: sha256 {actual} does not match "
            f"{meta['tensors']['sha256']} recorded in {JSON_FILE}"
        )
    for module_names, module, _ in planned:
        _resize(module, f"{module_names[0]}." if module_names[0] else "", header)
        for name in module_names:
            replace_module(model, name, module)
    aliases = dict(getattr(header, "aliases", {}))  # keys stored once (tnquant.io.ties)
    return Skeleton(names, [list(group) for group in meta["tied"]], aliases)


def check_loaded(model: nn.Module, skeleton: Skeleton, where: str) -> None:
    """After the loader filled them: nothing left on meta, states well formed, ties restored.

    Examples
    --------
    >>> check_loaded(nn.Sequential(nn.Linear(2, 2)), Skeleton(["0"], [], {}), "here")
    """
    state = model.state_dict()
    for key in {k for group in skeleton.tied for k in group}:
        if key not in state:
            raise IntegrityError(f"{where}: the tied tensor {key!r} is not in the model")
    # groups read whole from the file must hold equal values; aliases were never read
    whole = [g for g in skeleton.tied if not any(k in skeleton.aliases for k in g)]
    check_tied_values(whole, state, where)
    _retie(model, skeleton.tied)
    for name in skeleton.names:
        module = model.get_submodule(name)
        for key, value in module.state_dict().items():
            if value.is_meta:
                raise IntegrityError(f"{where}: {name}.{key} was not loaded")
        check_states(module, f"{where}: {name!r}")
