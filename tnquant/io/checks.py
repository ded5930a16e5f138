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

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.io.fields import IntegrityError, check_modules
from tnquant.io.files import dtype_name
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.observers import Observer
from tnquant.quant.qparams import block_size, qparam_shape
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import activation_sites, weight_pairs
from tnquant.registry.fields import MAX_DIM, MAX_NDIM
from tnquant.registry.fields import is_int as _is_int
from tnquant.registry.fields import show as _show

__all__ = ["IntegrityError", "TensorInfo", "SAFETENSORS_DTYPES", "MAX_JSON_BYTES",
           "MAX_HEADER_BYTES", "read_regular", "read_header", "check_listing", "check_meta",
           "finish_layer", "check_replaces", "check_replaced",
           "check_planned", "check_base_state", "check_states"]

#: ``model.json`` larger than this is refused before it is read.
MAX_JSON_BYTES = 64 << 20
#: the safetensors header limit (the one the ``safetensors`` library applies).
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype codes -> torch dtypes (the ones tnquant can read back).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SHA = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- #
# files and the safetensors header
# --------------------------------------------------------------------------- #


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "a").write_bytes(b"{}")
    ...     read_regular(Path(d) / "a", 10)
    b'{}'
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"{path} is not a regular file")
    if st.st_size > limit:
        raise IntegrityError(f"{path} is {st.st_size} bytes, more than the {limit} this loader "
                             "reads")
    with open(path, "rb") as f:
        data = f.read(st.st_size + 1)  # read(n) allocates n bytes up front
    if len(data) != st.st_size:
        raise IntegrityError(f"{path} changed size while it was read")
    return data


@dataclass(frozen=True)
class TensorInfo:
    """One safetensors header entry: dtype, shape and byte range in the data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    def meta(self) -> Tensor:
        """A meta-device tensor of this dtype and shape (allocates nothing)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def _entry(key: str, raw: Any, path: Path) -> TensorInfo:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise IntegrityError(f"{path}: header entry {_show(key)} must have exactly 'dtype', "
                             f"'shape' and 'data_offsets', got {_show(raw)}")
    dtype = SAFETENSORS_DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    if dtype is None:
        raise IntegrityError(f"{path}: tensor {_show(key)} has dtype {_show(raw['dtype'])}; "
                             f"expected one of {sorted(SAFETENSORS_DTYPES)}")
    shape, offsets = raw["shape"], raw["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(_is_int(s, 0, MAX_DIM) for s in shape)):
        raise IntegrityError(f"{path}: tensor {_show(key)} has shape {_show(shape)}; expected a "
                             f"list of at most {MAX_NDIM} ints in 0..2**40")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(_is_int(o, 0, 1 << 62) for o in offsets)):
        raise IntegrityError(f"{path}: tensor {_show(key)} has data_offsets {_show(offsets)}; "
                             "expected [start, end]")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise IntegrityError(f"{path}: tensor {_show(key)} ({dtype_name(dtype)} {tuple(shape)}) "
                             f"takes {nbytes} bytes, its data_offsets {offsets} give "
                             f"{offsets[1] - offsets[0]}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: Path, size: int) -> dict[str, TensorInfo]:
    """Read and check the header of the safetensors file ``path`` of ``size`` bytes.

    No tensor data is read. The header length must fit the file, and the
    tensors' byte ranges must tile the data after it exactly.

    Examples
    --------
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_file({"w": torch.zeros(2, 3)}, f"{d}/t")
    ...     info = read_header(Path(d) / "t", os.path.getsize(f"{d}/t"))
    >>> info["w"].shape, info["w"].dtype
    ((2, 3), torch.float32)
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise IntegrityError(f"{path} is truncated: {len(prefix)} bytes, no header length")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES) or length < 2:
            raise IntegrityError(f"{path}: header length {length} does not fit the file "
                                 f"({size} bytes; at most {MAX_HEADER_BYTES})")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise IntegrityError(f"{path}: the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: the header must be a JSON object")
    extra = header.pop("__metadata__", {})
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise IntegrityError(f"{path}: header __metadata__ must map strings to strings")
    infos = {key: _entry(key, value, path) for key, value in header.items()}
    end = 0
    for key, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != end:
            raise IntegrityError(f"{path}: tensor {_show(key)} starts at byte {info.start} of "
                                 f"the data, expected {end} (gap or overlap)")
        end = info.end
    if end != size - 8 - length:
        raise IntegrityError(f"{path}: the tensors take {end} bytes, the file holds "
                             f"{size - 8 - length} after the header")
    return infos


def check_listing(header: dict[str, TensorInfo], listing: dict[str, Any], tensor_path: Path,
                  json_name: str) -> None:
    """The ``tensors.entries`` of ``model.json`` must equal the header, key by key."""
    for key in listing:
        if key not in header:
            raise IntegrityError(f"{tensor_path} lacks tensor {_show(key)} listed in {json_name}")
    for key, info in header.items():
        want = listing.get(key)
        if want is None:
            raise IntegrityError(f"{tensor_path} holds tensor {_show(key)}, which {json_name} "
                                 "does not list")
        if want != {"dtype": dtype_name(info.dtype), "shape": list(info.shape)}:
            raise IntegrityError(f"{tensor_path}: tensor {_show(key)} is "
                                 f"{dtype_name(info.dtype)} {info.shape}, {json_name} says "
                                 f"{_show(want)}")


# --------------------------------------------------------------------------- #
# model.json: the top level (entries and nodes: tnquant.io.fields)
# --------------------------------------------------------------------------- #

_TOP = {"format", "version", "model_class", "tensors", "modules", "tied"}
_TENSORS = {"file", "sha256", "bytes", "entries"}


def _fail(json_name: str, what: str) -> IntegrityError:
    return IntegrityError(f"{json_name}: {what}")


def check_meta(meta: dict[str, Any], json_name: str, tensors_file: str) -> None:
    """The top-level fields of ``model.json`` (after ``format``/``version``)."""
    if set(meta) != _TOP:
        raise _fail(json_name, f"expected the fields {sorted(_TOP)}, got {sorted(meta)}")
    if not isinstance(meta["model_class"], str):
        raise _fail(json_name, f"'model_class' must be a string, got {_show(meta['model_class'])}")
    info = meta["tensors"]
    if not isinstance(info, dict) or set(info) != _TENSORS:
        raise _fail(json_name, f"'tensors' must be an object with {sorted(_TENSORS)}, got "
                    f"{_show(info)}")
    if info["file"] != tensors_file:
        raise _fail(json_name, f"'tensors.file' must be {tensors_file!r} (a file in the saved "
                    f"directory), got {_show(info['file'])}")
    if not isinstance(info["sha256"], str) or not _SHA.fullmatch(info["sha256"]):
        raise _fail(json_name, f"'tensors.sha256' must be 64 hex digits, got "
                    f"{_show(info['sha256'])}")
    if not _is_int(info["bytes"], 8, 1 << 62):
        raise _fail(json_name, f"'tensors.bytes' must be an int >= 8, got {_show(info['bytes'])}")
    entries = info["entries"]
    if not isinstance(entries, dict):
        raise _fail(json_name, f"'tensors.entries' must be an object, got {_show(entries)}")
    for key, value in entries.items():
        if not (isinstance(value, dict) and set(value) == {"dtype", "shape"}):
            raise _fail(json_name, f"'tensors.entries' {_show(key)} must be "
                        f"{{'dtype', 'shape'}}, got {_show(value)}")
    modules = meta["modules"]
    if not isinstance(modules, list):
        raise _fail(json_name, f"'modules' must be a list, got {_show(modules)}")
    check_modules(modules, json_name)
    if not isinstance(meta["tied"], list):
        raise _fail(json_name, f"'tied' must be a list, got {_show(meta['tied'])}")


# --------------------------------------------------------------------------- #
# rebuilt modules against the header and the base model
# --------------------------------------------------------------------------- #


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def finish_layer(module: nn.Module, name: str, tensors: Mapping[str, Tensor],
                 device: torch.device) -> None:
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
        raise ValueError(f"{name!r}: core_quantizers holds {len(quantizers)} modules for "
                         f"{len(cores)} cores")
    acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    sites = activation_sites(module)
    if acts is not None and not set(acts).issubset(sites):
        raise ValueError(f"{name!r}: act_quantizers keys {sorted(acts)} are not all among the "
                         f"layer's sites {list(sites)}")
    prefix = _prefix(name)
    for pname, tensor, quantizer in weight_pairs(module):
        if isinstance(quantizer, FrozenTensor) and (
                quantizer.shape != tuple(tensor.shape) or quantizer.dtype != tensor.dtype):
            raise ValueError(f"{prefix}{pname} is {tensor.dtype} {tuple(tensor.shape)}, its "
                             f"FrozenTensor says {quantizer.dtype} {quantizer.shape}")
        saved = tensors.get(prefix + pname)
        if saved is None or saved.numel() or not tensor.numel():
            continue
        if not isinstance(quantizer, FrozenTensor):
            raise ValueError(f"{prefix}{pname} is saved empty (converted) but no FrozenTensor "
                             "holds its codes")
        owner_name, _, attr = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        empty = nn.Parameter(torch.empty(saved.shape, dtype=saved.dtype, device=device),
                             requires_grad=False)
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
        raise IntegrityError(f"{where} says a {cls} replaces {entry['replaces']!r}; a {cls} "
                             f"replaces {want!r}")


def check_replaced(entry: dict[str, Any], name: str, current: nn.Module | None,
                   handler: Any) -> None:
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
        raise ValueError(f"module {name!r} of the model is {held}; the saved {cls} replaces no "
                         f"layer, so it can only stand where the model has a {cls}")
    if current is None:
        raise ValueError(f"the model has no module {name!r}; the saved model has a {cls} there "
                         f"(replacing a {handler.replaces.__name__})")
    if not isinstance(current, handler.replaces):
        raise ValueError(f"module {name!r} of the model is a {type(current).__name__}, expected "
                         f"a {handler.replaces.__name__} (the saved model replaced it by a "
                         f"{cls})")
    for attr, want_value in handler.expect(node["config"]).items():
        got = getattr(current, attr, None)
        if not _same(got, want_value):
            raise ValueError(f"module {name!r} of the model has {attr}={got!r}, the saved {cls} "
                             f"expects {want_value!r}")


def _compatible(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


def check_planned(module: nn.Module, names: list[str], header: Mapping[str, TensorInfo],
                  where: str) -> None:
    """A rebuilt (meta) module's tensors against the header, under each of its names.

    Every state-dict tensor must be in the header with its shape and dtype
    (floats may differ: they are cast; an empty quantizer or observer slot
    is resized on load to the saved shape and dtype), every header tensor under
    the module's names must be one of them, and tensors outside the state
    dict must be empty: allocating the module then takes no more than the
    tensor file holds.
    """
    state = module.state_dict()
    slots = {f"{_prefix(n)}{k}" for n, sub in module.named_modules()
             if isinstance(sub, (Quantizer, Observer)) for k in sub.state_dict()}
    for name in names:
        prefix = _prefix(name)
        for key, value in state.items():
            info = header.get(prefix + key)
            if info is None:
                raise IntegrityError(f"{where}: the rebuilt module has tensor {prefix + key!r}, "
                                     "which the tensor file lacks")
            if value.numel() == 0 and key in slots:
                continue  # resized on load; check_states compares it with tensor_shape
            if (tuple(value.shape) != info.shape
                    or not _compatible(value.dtype, info.dtype)):
                raise IntegrityError(f"{where}: tensor {prefix + key!r} is "
                                     f"{dtype_name(info.dtype)} {info.shape} in the tensor "
                                     "file, the description gives "
                                     f"{dtype_name(value.dtype)} {tuple(value.shape)}")
        for key in header:
            if key.startswith(prefix) and key[len(prefix):] not in state:
                raise IntegrityError(f"{where}: the tensor file holds {key!r}, which the "
                                     f"described module at {name!r} has no place for")
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for key, value in named:
        if key not in state and value.numel():
            raise IntegrityError(f"{where}: the rebuilt module has a tensor {key!r} of "
                                 f"{value.numel()} elements outside the tensor file")


def _summary(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _under(key: str, names: list[str]) -> bool:
    return any(n == "" or key.startswith(n + ".") for n in names)


def check_base_state(model: nn.Module | None, replaced: list[str],
                     header: Mapping[str, TensorInfo]) -> None:
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
    wrong = [f"{k} (model {shape}, saved {header[k].shape})"
             for k, shape in sorted(expected.items()) if k in header and header[k].shape != shape]
    if wrong:
        problems.append(f"shape mismatches: {'; '.join(wrong[:5])}")
    if problems:
        raise ValueError("the model does not match the saved architecture: "
                         + " | ".join(problems))


def _check_state_shape(shape_t: Tensor, tensors: list[Tensor], spec: Any, where: str) -> None:
    if shape_t.numel() == 0 and not any(t.numel() for t in tensors):
        return  # nothing stored (dynamic quantizer, observer without data)
    if shape_t.dtype != torch.int64 or shape_t.dim() != 1 or len(shape_t) > MAX_NDIM or bool(
            (shape_t < 0).any()):
        raise IntegrityError(f"{where}: tensor_shape must list at most {MAX_NDIM} sizes >= 0, "
                             f"got {_show(shape_t.tolist())}")
    shape = tuple(int(s) for s in shape_t.tolist())
    try:
        want = qparam_shape(shape, shape if getattr(spec, "dtype", None) else block_size(
            shape, spec.granularity, spec.axis))
    except ValueError as err:
        raise IntegrityError(f"{where}: tensor_shape {shape} does not fit the spec: "
                             f"{err}") from None
    for t in tensors:
        if tuple(t.shape) != want:
            raise IntegrityError(f"{where}: a stored range or qparam has shape "
                                 f"{tuple(t.shape)}; tensor_shape {shape} gives {want}")


def check_states(module: nn.Module, where: str) -> None:
    """Loaded quantizer and observer states: each describes one tensor of ``tensor_shape``.

    Their slots take any saved shape on load; here every scale, zero point
    and observed range must have the qparam shape of the stored tensor shape.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, Quantizer):
            tensors = [getattr(sub, n) for n in sub._slots]
        elif isinstance(sub, Observer):
            tensors = [sub.min_val, sub.max_val]
        else:
            continue
        _check_state_shape(sub.tensor_shape, tensors, sub.spec, f"{where}: {name!r}")
