"""The checks of the saved files themselves: ``model.json``'s top level and the header.

:func:`read_regular` reads a regular file of bounded size;
:func:`read_header` reads and validates a safetensors header on its own (its
length against the file size, every tensor's byte range against its dtype
and shape, the ranges tiling the data exactly) into :class:`TensorInfo` s;
:func:`check_listing` requires the listing in ``model.json`` to equal that
header, and :func:`check_meta` type-checks ``model.json``'s top-level
fields. A failure raises :class:`~tnquant.io.fields.IntegrityError` naming
the file and the entry or field. The checks of the rebuilt modules are in
:mod:`tnquant.io.checks`, which re-exports these.

Examples
--------
>>> meta = {"format": "tnquant", "version": 1, "model_class": "Net", "modules": [], "tied": [],
...         "tensors": {"file": "t.safetensors", "sha256": "xyz", "bytes": 8, "entries": {}}}
>>> check_meta(meta, "model.json", "t.safetensors")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
tnquant.io.fields.IntegrityError: model.json: 'tensors.sha256' must be 64 hex digits, got ...
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tnquant.io.fields import IntegrityError, check_modules
from tnquant.io.files import dtype_name
from tnquant.registry.fields import MAX_DIM, MAX_NDIM
from tnquant.registry.fields import is_int as _is_int
from tnquant.registry.fields import show as _show

__all__ = [
    "TensorInfo",
    "SAFETENSORS_DTYPES",
    "MAX_JSON_BYTES",
    "MAX_HEADER_BYTES",
    "read_regular",
    "read_header",
    "check_listing",
    "check_meta",
]

#: ``model.json`` larger than this is refused before it is read.
MAX_JSON_BYTES = 64 << 20
#: the safetensors header limit (the one the ``safetensors`` library applies).
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype codes -> torch dtypes (the ones tnquant can read back).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
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
        raise IntegrityError(
            f"{path} is {st.st_size} bytes, more than the {limit} this loader reads"
        )
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
        raise IntegrityError(
            f"{path}: header entry {_show(key)} must have exactly 'dtype', "
            f"'shape' and 'data_offsets', got {_show(raw)}"
        )
    dtype = SAFETENSORS_DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    if dtype is None:
        raise IntegrityError(
            f"{path}: tensor {_show(key)} has dtype {_show(raw['dtype'])}; "
            f"expected one of {sorted(SAFETENSORS_DTYPES)}"
        )
    shape, offsets = raw["shape"], raw["data_offsets"]
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_NDIM
        and all(_is_int(s, 0, MAX_DIM) for s in shape)
    ):
        raise IntegrityError(
            f"{path}: tensor {_show(key)} has shape {_show(shape)}; expected a "
            f"list of at most {MAX_NDIM} ints in 0..2**40"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o, 0, 1 << 62) for o in offsets)
    ):
        raise IntegrityError(
            f"{path}: tensor {_show(key)} has data_offsets {_show(offsets)}; expected [start, end]"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise IntegrityError(
            f"{path}: tensor {_show(key)} ({dtype_name(dtype)} {tuple(shape)}) "
            f"takes {nbytes} bytes, its data_offsets {offsets} give "
            f"{offsets[1] - offsets[0]}"
        )
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
            raise IntegrityError(
                f"{path}: header length {length} does not fit the file "
                f"({size} bytes; at most {MAX_HEADER_BYTES})"
            )
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
            raise IntegrityError(
                f"{path}: tensor {_show(key)} starts at byte {info.start} of "
                f"the data, expected {end} (gap or overlap)"
            )
        end = info.end
    if end != size - 8 - length:
        raise IntegrityError(
            f"{path}: the tensors take {end} bytes, the file holds "
            f"{size - 8 - length} after the header"
        )
    return infos


def check_listing(
    header: dict[str, TensorInfo], listing: dict[str, Any], tensor_path: Path, json_name: str
) -> None:
    """The ``tensors.entries`` of ``model.json`` must equal the header, key by key."""
    for key in listing:
        if key not in header:
            raise IntegrityError(f"{tensor_path} lacks tensor {_show(key)} listed in {json_name}")
    for key, info in header.items():
        want = listing.get(key)
        if want is None:
            raise IntegrityError(
                f"{tensor_path} holds tensor {_show(key)}, which {json_name} does not list"
            )
        if want != {"dtype": dtype_name(info.dtype), "shape": list(info.shape)}:
            raise IntegrityError(
                f"{tensor_path}: tensor {_show(key)} is "
                f"{dtype_name(info.dtype)} {info.shape}, {json_name} says "
                f"{_show(want)}"
            )


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
        raise _fail(
            json_name, f"'tensors' must be an object with {sorted(_TENSORS)}, got {_show(info)}"
        )
    if info["file"] != tensors_file:
        raise _fail(
            json_name,
            f"'tensors.file' must be {tensors_file!r} (a file in the saved "
            f"directory), got {_show(info['file'])}",
        )
    if not isinstance(info["sha256"], str) or not _SHA.fullmatch(info["sha256"]):
        raise _fail(
            json_name, f"'tensors.sha256' must be 64 hex digits, got {_show(info['sha256'])}"
        )
    if not _is_int(info["bytes"], 8, 1 << 62):
        raise _fail(json_name, f"'tensors.bytes' must be an int >= 8, got {_show(info['bytes'])}")
    entries = info["entries"]
    if not isinstance(entries, dict):
        raise _fail(json_name, f"'tensors.entries' must be an object, got {_show(entries)}")
    for key, value in entries.items():
        if not (isinstance(value, dict) and set(value) == {"dtype", "shape"}):
            raise _fail(
                json_name,
                f"'tensors.entries' {_show(key)} must be {{'dtype', 'shape'}}, got {_show(value)}",
            )
    modules = meta["modules"]
    if not isinstance(modules, list):
        raise _fail(json_name, f"'modules' must be a list, got {_show(modules)}")
    check_modules(modules, json_name)
    if not isinstance(meta["tied"], list):
        raise _fail(json_name, f"'tied' must be a list, got {_show(meta['tied'])}")
