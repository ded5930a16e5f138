"""Reading int64 arrays from an ``.npz`` nobody vouches for, with no unchecked allocation.

:func:`read_npz` takes the names and shapes the arrays must have (from a
manifest already checked) and the file's SHA-256. Before a byte of array
data is read it checks: the file is no larger than those arrays need (so
its zip directory is bounded too), its SHA-256, the members are exactly
``'<name>.npy'`` (no other, none twice: an entry named ``'../../x'`` is
refused, and nothing is ever extracted to disk), each is stored (not
compressed, as ``np.savez`` writes: a compression ratio of 1, so no member
expands), its ``.npy`` header (parsed by ``numpy.lib.format`` without
pickle, at most 4096 bytes) declares int64 in C order of the expected
shape, and the member holds exactly that header plus the data. Each array
then costs its own size in memory, once the bytes are there on disk. Any
failure is an :class:`~tnquant.io.IntegrityError` naming the file and the
member.

Examples
--------
>>> import hashlib, tempfile
>>> import numpy as np
>>> path = tempfile.mkdtemp() + "/a.npz"
>>> np.savez(path, x=np.arange(3))
>>> digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
>>> read_npz(path, {"x": (3,)}, digest)["x"].tolist()
[0, 1, 2]
>>> try:
...     read_npz(path, {"x": (4,)}, digest)
... except IntegrityError as err:
...     print(str(err).split("/")[-1])
a.npz['x.npy']: its .npy header declares int64 of shape (3,); expected int64 of shape (4,)
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from tnquant.io import IntegrityError

__all__ = ["read_npz"]

_NPY_HEADER = 4096  # bytes of one .npy header at most
_CHUNK = 1 << 20


def _npy_header(fp: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(fp)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fp, max_header_size=_NPY_HEADER)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(fp, max_header_size=_NPY_HEADER)
    raise ValueError(f"{where}: .npy version {version} is not 1.0 or 2.0")


def _read_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, shape: tuple[int, ...], where: str, size: int
) -> np.ndarray:
    nbytes = 8 * math.prod(shape)
    if info.header_offset + 30 + len(info.filename) + info.compress_size > size:
        raise IntegrityError(
            f"{where} claims {info.compress_size} bytes at offset "
            f"{info.header_offset}, past the end of the {size}-byte file"
        )
    if (
        info.flag_bits & 0x1
        or info.compress_type != zipfile.ZIP_STORED
        or info.compress_size != info.file_size
    ):
        raise IntegrityError(
            f"{where} must be stored uncompressed (as np.savez writes it), "
            f"got compression {info.compress_type}, {info.compress_size} "
            f"bytes for {info.file_size}"
        )
    if not nbytes < info.file_size <= nbytes + _NPY_HEADER:
        raise IntegrityError(
            f"{where} holds {info.file_size} bytes; an int64 array of shape "
            f"{shape} takes {nbytes} plus its header"
        )
    with zf.open(info) as fp:
        try:
            got, fortran, dtype = _npy_header(fp, where)
        except (ValueError, TypeError, SyntaxError) as err:
            raise IntegrityError(f"{where}: not a valid .npy header ({str(err)[:100]})") from None
        if (
            dtype.kind != "i"
            or dtype.itemsize != 8
            or dtype.hasobject
            or fortran
            or tuple(got) != shape
        ):
            raise IntegrityError(
                f"{where}: its .npy header declares {dtype} of shape "
                f"{tuple(got)}{' (Fortran order)' if fortran else ''}; "
                f"expected int64 of shape {shape}"
            )
        if info.file_size != fp.tell() + nbytes:
            raise IntegrityError(
                f"{where} holds {info.file_size} bytes, not its "
                f"{fp.tell()}-byte header plus {nbytes} bytes of data"
            )
        data = fp.read(nbytes)
        if len(data) != nbytes or fp.read(1):
            raise IntegrityError(f"{where} is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.int64)


def read_npz(
    path: str | os.PathLike[str], shapes: dict[str, tuple[int, ...]], digest: str
) -> dict[str, np.ndarray]:
    """The int64 arrays ``shapes`` names from the ``.npz`` at ``path`` (module docs: the checks).

    Parameters
    ----------
    path
        The ``.npz`` file.
    shapes
        Every array it must hold, by name (without ``.npy``), and its shape.
    digest
        The SHA-256 (hex) the whole file must have.

    Returns
    -------
    dict of str to numpy.ndarray
        Native int64 arrays, by name.

    Raises
    ------
    FileNotFoundError
        When ``path`` is not a file.
    IntegrityError
        For anything else.

    Examples
    --------
    >>> read_npz("/nonexistent.npz", {}, "")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /nonexistent.npz not found
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    limit = 1024 + sum(8 * math.prod(s) + _NPY_HEADER + 2 * len(k) + 256 for k, s in shapes.items())
    members = {f"{k}.npy": k for k in shapes}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise IntegrityError(
                f"{path} holds {size} bytes; the arrays expected in it need at most {limit}"
            )
        h = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if h.hexdigest() != digest:
            raise IntegrityError(
                f"{path}: its SHA-256 does not match the expected checksum (corrupted or replaced)"
            )
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                names = [i.filename for i in infos]
                if len(names) != len(members) or set(names) != set(members):
                    extra = sorted(set(names) - set(members))[:3]
                    missing = sorted(set(members) - set(names))[:3]
                    raise IntegrityError(
                        f"{path} must hold exactly the {len(members)} members '<array>.npy' "
                        f"of the expected arrays, got {len(names)}; unexpected: {extra}, "
                        f"missing: {missing}"
                    )
                return {
                    members[i.filename]: _read_member(
                        zf, i, shapes[members[i.filename]], f"{path}[{i.filename!r}]", size
                    )
                    for i in infos
                }
        except IntegrityError:
            raise
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            OSError,
            EOFError,
            ValueError,
            OverflowError,
            NotImplementedError,
            KeyError,
        ) as err:
            raise IntegrityError(
                f"{path} is not a valid npz archive ({type(err).__name__}: {str(err)[:100]})"
            ) from None
