"""What :func:`tnquant.load` checks before it builds a module or reads a tensor.

A saved directory may come from a stranger, and its checksums are plain
``sha256`` sums anyone can recompute, so nothing here trusts them: every
field of ``model.json`` is type-checked (:func:`check_meta`, and
:func:`tnquant.io.fields.check_node` with the registry's schemas), the
safetensors header is read and validated on its own (:func:`read_header`:
its length against the file size, every tensor's byte range against its
dtype and shape, the ranges tiling the data exactly), and the listing in
``model.json`` must equal that header (:func:`check_listing`). A failure
raises :class:`IntegrityError` naming the file and the entry or field.

The file-level checks (``model.json``'s top level, the header) live in
:mod:`tnquant.io.file_checks` and are re-exported here; this module checks
the rebuilt modules against the header and the base model.

Examples
--------
>>> meta = {"format": "tnquant", "version": 1, "model_class": "Net", "modules": [], "tied": [],
...         "tensors": {"file": "../../etc/passwd", "sha256": "0" * 64, "bytes": 8,
...                     "entries": {}}}
>>> check_meta(meta, "model.json", "tensors.safetensors")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
tnquant.io.fields.IntegrityError: model.json: 'tensors.file' must be ... got '../../etc/passwd'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.io.fields import IntegrityError
from tnquant.io.file_checks import (
    MAX_HEADER_BYTES,
    MAX_JSON_BYTES,
    SAFETENSORS_DTYPES,
    TensorInfo,
    check_listing,
    check_meta,
    read_header,
    read_regular,
)
from tnquant.io.files import dtype_name
from tnquant.quant.codebook import codebook_shape
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.observers import Observer
from tnquant.quant.qparams import block_size, qparam_shape
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import activation_sites, weight_pairs
from tnquant.registry.fields import MAX_NDIM
from tnquant.registry.fields import show as _show

__all__ = [
    "IntegrityError",
    "TensorInfo",
    "SAFETENSORS_DTYPES",
    "MAX_JSON_BYTES",
    "MAX_HEADER_BYTES",
    "read_regular",
    "read_header",
    "check_listing",
    "check_meta",
    "finish_layer",
    "check_replaces",
    "check_replaced",
    "check_planned",
    "check_base_state",
    "check_states",
]

# --------------------------------------------------------------------------- #
# rebuilt modules against the header and the base model
# --------------------------------------------------------------------------- #


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def finish_layer(
    module: nn.Module, name: str, tensors: Mapping[str, Tensor], device: torch.device
) -> None:
    """Check a rebuilt layer's children; give converted weights their empty placeholder.

    ``convert`` drops a quantized float tensor, leaving an empty
    ``nn.Parameter`` (no grad) next to a ``FrozenTensor`` of the tensor's
    shape and dtype; the builder made it full-sized. Every ``FrozenTensor``
    must stand for the tensor it sits next to, a layer has one core
    quantizer per core, and its ``act_quantizers`` keys are its sites.
    """
    quantizers = cast("nn.ModuleList | None", module._modules.get("core_quantizers"))
    cores = getattr(module, "cores", ())
    if quantizers is not None and len(quantizers) != len(cores):
        raise ValueError(
            f"{name!r}: core_quantizers holds {len(quantizers)} modules for {len(cores)} cores"
        )
    acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    sites = activation_sites(module)
    if acts is not None and not set(acts).issubset(sites):
        raise ValueError(
            f"{name!r}: act_quantizers keys {sorted(acts)} are not all among the "
            f"layer's sites {list(sites)}"
        )
    prefix = _prefix(name)
    for pname, tensor, quantizer in weight_pairs(module):
        if isinstance(quantizer, FrozenTensor) and (
            quantizer.shape != tuple(tensor.shape) or quantizer.dtype != tensor.dtype
        ):
            raise ValueError(
                f"{prefix}{pname} is {tensor.dtype} {tuple(tensor.shape)}, its "
                f"FrozenTensor says {quantizer.dtype} {quantizer.shape}"
            )
        saved = tensors.get(prefix + pname)
        if saved is None or saved.numel() or not tensor.numel():
            continue
        if not isinstance(quantizer, FrozenTensor):
            raise ValueError(
                f"{prefix}{pname} is saved empty (converted) but no FrozenTensor holds its codes"
            )
        owner_name, _, attr = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        empty = nn.Parameter(
            torch.empty(saved.shape, dtype=saved.dtype, device=device), requires_grad=False
        )
        if isinstance(owner, nn.ParameterList):
            owner[int(attr)] = empty
        else:
            setattr(owner, attr, empty)


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, (tuple, list)) and isinstance(want, (tuple, list)):
        return tuple(got) == tuple(want)
    return bool(got == want)


def check_replaces(entry: dict[str, Any], handler: Any, where: str) -> None:
    """The entry's ``replaces`` must be what its class replaces (``IntegrityError``)."""
    want = None if handler.replaces is None else handler.replaces.__name__
    if entry["replaces"] != want:
        cls = entry["node"]["class"]
        raise IntegrityError(
            f"{where} says a {cls} replaces {entry['replaces']!r}; a {cls} replaces {want!r}"
        )


def check_replaced(
    entry: dict[str, Any], name: str, current: nn.Module | None, handler: Any
) -> None:
    """Raise ``ValueError`` unless ``current`` is what the saved module replaced.

    What a class replaces comes from its ``handler`` (its registry entry's,
    :mod:`tnquant.registry.serialize`), never from the file: an entry whose
    ``replaces`` differs is an :class:`IntegrityError`. A class that
    replaces no layer (``Identity``, ``Quantizer``, ``FrozenTensor``) stands
    only where the model already has one.

    Examples
    --------
    >>> from tnquant.io.nodes import HANDLERS, describe_entries
    >>> from tnquant.layers import LowRankLinear
    >>> entry = describe_entries(nn.Sequential(LowRankLinear([torch.randn(4, 2),
    ...                                                       torch.randn(2, 3)])))[0]
    >>> handler = HANDLERS["LowRankLinear"]
    >>> check_replaced(entry, "0", nn.Linear(3, 4), handler)
    >>> check_replaced(entry, "0", nn.Linear(5, 4), handler)
    Traceback (most recent call last):
    ...
    ValueError: module '0' of the model has in_features=5, the saved LowRankLinear expects 3
    >>> fake = {"names": ["0"], "replaces": None,
    ...         "node": {"class": "Identity", "config": {}, "children": []}}
    >>> check_replaced(fake, "0", nn.Linear(3, 4), HANDLERS["Identity"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: module '0' of the model is a Linear; the saved Identity replaces no layer, ...
    """
    node = entry["node"]
    cls = node["class"]
    check_replaces(entry, handler, f"the entry at {name!r}")
    if current is not None and type(current) is handler.cls:
        return
    held = "nothing" if current is None else f"a {type(current).__name__}"
    if handler.replaces is None:
        raise ValueError(
            f"module {name!r} of the model is {held}; the saved {cls} replaces no "
            f"layer, so it can only stand where the model has a {cls}"
        )
    if current is None:
        raise ValueError(
            f"the model has no module {name!r}; the saved model has a {cls} there "
            f"(replacing a {handler.replaces.__name__})"
        )
    if not isinstance(current, handler.replaces):
        raise ValueError(
            f"module {name!r} of the model is a {type(current).__name__}, expected "
            f"a {handler.replaces.__name__} (the saved model replaced it by a "
            f"{cls})"
        )
    for attr, want_value in handler.expect(node["config"]).items():
        got = getattr(current, attr, None)
        if not _same(got, want_value):
            raise ValueError(
                f"module {name!r} of the model has {attr}={got!r}, the saved {cls} "
                f"expects {want_value!r}"
            )


def _compatible(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


def check_planned(
    module: nn.Module, names: list[str], header: Mapping[str, TensorInfo], where: str
) -> None:
    """A rebuilt (meta) module's tensors against the header, under each of its names.

    Every state-dict tensor must be in the header with its shape and dtype
    (floats may differ: they are cast; an empty quantizer or observer slot
    is resized on load to the saved shape and dtype), every header tensor under
    the module's names must be one of them, and tensors outside the state
    dict must be empty: allocating the module then takes no more than the
    tensor file holds.
    """
    state = module.state_dict()
    slots = {
        f"{_prefix(n)}{k}"
        for n, sub in module.named_modules()
        if isinstance(sub, (Quantizer, Observer))
        for k in sub.state_dict()
    }
    for name in names:
        prefix = _prefix(name)
        for key, value in state.items():
            info = header.get(prefix + key)
            if info is None:
                raise IntegrityError(
                    f"{where}: the rebuilt module has tensor {prefix + key!r}, "
                    "which the tensor file lacks"
                )
            if value.numel() == 0 and key in slots:
                continue  # resized on load; check_states compares it with tensor_shape
            if tuple(value.shape) != info.shape or not _compatible(value.dtype, info.dtype):
                raise IntegrityError(
                    f"{where}: tensor {prefix + key!r} is "
                    f"{dtype_name(info.dtype)} {info.shape} in the tensor "
                    "file, the description gives "
                    f"{dtype_name(value.dtype)} {tuple(value.shape)}"
                )
        for key in header:
            if key.startswith(prefix) and key[len(prefix) :] not in state:
                raise IntegrityError(
                    f"{where}: the tensor file holds {key!r}, which the "
                    f"described module at {name!r} has no place for"
                )
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for key, value in named:
        if key not in state and value.numel():
            raise IntegrityError(
                f"{where}: the rebuilt module has a tensor {key!r} of "
                f"{value.numel()} elements outside the tensor file"
            )


def _summary(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _under(key: str, names: list[str]) -> bool:
    return any(n == "" or key.startswith(n + ".") for n in names)


def check_base_state(
    model: nn.Module | None, replaced: list[str], header: Mapping[str, TensorInfo]
) -> None:
    """The base model's own tensors (those not replaced) against the saved ones (``ValueError``)."""
    expected: dict[str, tuple[int, ...]] = {}
    if model is not None:
        for key, value in model.state_dict().items():
            if not _under(key, replaced):
                expected[key] = tuple(value.shape)
    missing = [k for k in header if k not in expected and not _under(k, replaced)]
    unexpected = [k for k in expected if k not in header]
    problems = []
    if missing:
        problems.append(f"saved tensors with no place in the model: {_summary(missing)}")
    if unexpected:
        problems.append(f"model tensors missing from the save: {_summary(unexpected)}")
    wrong = [
        f"{k} (model {shape}, saved {header[k].shape})"
        for k, shape in sorted(expected.items())
        if k in header and header[k].shape != shape
    ]
    if wrong:
        problems.append(f"shape mismatches: {'; '.join(wrong[:5])}")
    if problems:
        raise ValueError("the model does not match the saved architecture: " + " | ".join(problems))


def _check_codebook_state(q: Quantizer, where: str) -> None:
    """A loaded Codebook quantizer's table: the shape its spec and tensor_shape give."""
    if q.tensor_shape.numel() == 0 and not q.codebook.numel():
        return
    shape = tuple(int(s) for s in q.tensor_shape.tolist())  # checked by _check_state_shape
    try:
        want = codebook_shape(q.spec, shape)
    except ValueError as err:
        raise IntegrityError(
            f"{where}: tensor_shape {shape} does not fit the spec: {err}"
        ) from None
    if tuple(q.codebook.shape) != want:
        raise IntegrityError(
            f"{where}: the codebook has shape {tuple(q.codebook.shape)}; the spec and "
            f"tensor_shape {shape} give {want}"
        )
    if not bool(torch.isfinite(q.codebook).all()):
        raise IntegrityError(f"{where}: the codebook holds non-finite values")


def _check_state_shape(shape_t: Tensor, tensors: list[Tensor], spec: Any, where: str) -> None:
    if shape_t.numel() == 0 and not any(t.numel() for t in tensors):
        return  # nothing stored (dynamic quantizer, observer without data)
    if (
        shape_t.dtype != torch.int64
        or shape_t.dim() != 1
        or len(shape_t) > MAX_NDIM
        or bool((shape_t < 0).any())
    ):
        raise IntegrityError(
            f"{where}: tensor_shape must list at most {MAX_NDIM} sizes >= 0, "
            f"got {_show(shape_t.tolist())}"
        )
    shape = tuple(int(s) for s in shape_t.tolist())
    try:
        want = qparam_shape(
            shape,
            shape
            if getattr(spec, "dtype", None)
            else block_size(shape, spec.granularity, spec.axis),
        )
    except ValueError as err:
        raise IntegrityError(
            f"{where}: tensor_shape {shape} does not fit the spec: {err}"
        ) from None
    for t in tensors:
        if tuple(t.shape) != want:
            raise IntegrityError(
                f"{where}: a stored range or qparam has shape "
                f"{tuple(t.shape)}; tensor_shape {shape} gives {want}"
            )


def check_states(module: nn.Module, where: str) -> None:
    """Loaded quantizer and observer states: each describes one tensor of ``tensor_shape``.

    Their slots take any saved shape on load; here every scale, zero point
    and observed range must have the qparam shape of the stored tensor shape.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, Quantizer):
            tensors = [getattr(sub, n) for n in sub._slots if n != "codebook"]
        elif isinstance(sub, Observer):
            tensors = [sub.min_val, sub.max_val]
        else:
            continue
        _check_state_shape(sub.tensor_shape, tensors, sub.spec, f"{where}: {name!r}")
        if isinstance(sub, Quantizer) and "codebook" in sub._slots:
            _check_codebook_state(sub, f"{where}: {name!r}")
