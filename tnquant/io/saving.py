"""``save``: write a model's tensors and its tnquant modules to a directory.

The format is described in :mod:`tnquant.io`; each tnquant module is
described by its registry entry's handler (:mod:`tnquant.io.nodes`).

Examples
--------
>>> import tempfile, os, torch
>>> from tnquant.layers import LowRankLinear
>>> with tempfile.TemporaryDirectory() as d:
...     save(LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)]), d)
...     sorted(os.listdir(d))
['model.json', 'tensors.safetensors']
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from tnquant.io.files import (
    FORMAT,
    JSON_FILE,
    TENSORS_FILE,
    VERSION,
    canonical,
    dtype_name,
    sha256_file,
)
from tnquant.io.nodes import describe_entries
from tnquant.io.ties import alias_keys

__all__ = ["save"]


def _tensors_for_file(
    model: nn.Module, aliases: AbstractSet[str] = frozenset()
) -> dict[str, Tensor]:
    """The state dict on CPU, contiguous, with no two entries sharing storage.

    ``aliases`` (the later keys of the tied groups) are left out: a tied
    tensor is stored once, under its group's first key.
    """
    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in aliases:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(
                f"state_dict entry {key!r} is a {type(value).__name__}; only tensors can be saved"
            )
        t = value.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ident in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ident)
        out[key] = t
    return out


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that name one and the same parameter or buffer object."""
    keys = set(model.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for key, value in named:
        if key in keys:
            groups.setdefault(id(value), []).append(key)
    return [g for g in groups.values() if len(g) > 1]


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
        save never passes the checks). A tied tensor (one parameter or
        buffer under several keys: an LM head tied to its embedding, the
        frozen tensor they share once converted) is stored once, under the
        first key of its ``tied`` group, and tied again by ``load``.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``, or holds a tnquant module this
        format cannot describe.

    Examples
    --------
    >>> import tempfile, json, os, torch
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
    tied = _tied_groups(model)
    tensors = _tensors_for_file(model, alias_keys(tied))
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensor_path = directory / TENSORS_FILE
    tmp = directory / (TENSORS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    digest, size = sha256_file(tmp)
    os.replace(tmp, tensor_path)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__qualname__,
        "tensors": {
            "file": TENSORS_FILE,
            "sha256": digest,
            "bytes": size,
            "entries": {
                k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                for k, t in tensors.items()
            },
        },
        "modules": entries,
        "tied": tied,
    }
    meta["checksum"] = hashlib.sha256(canonical(meta)).hexdigest()
    tmp_json = directory / (JSON_FILE + ".tmp")
    tmp_json.write_bytes(canonical(meta))
    os.replace(tmp_json, directory / JSON_FILE)
