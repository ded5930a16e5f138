"""The names, canonical JSON and checksums of a save directory (shared by save and load).

Examples
--------
>>> canonical({"b": 1, "a": [1, 2]})
b'{\\n "a": [\\n  1,\\n  2\\n ],\\n "b": 1\\n}\\n'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "TENSORS_FILE",
    "JSON_FILE",
    "canonical",
    "sha256_file",
    "dtype_name",
]

FORMAT = "tnquant"
#: The format version this module writes and reads.
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
JSON_FILE = "model.json"
_CHUNK = 1 << 20


def canonical(obj: dict[str, Any]) -> bytes:
    """The one text ``save`` writes for ``obj``: sorted keys, indent 1, ASCII, a final newline."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def sha256_file(path: Path) -> tuple[str, int]:
    """``(sha256 hex digest, size in bytes)`` of ``path``, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def dtype_name(dtype: torch.dtype) -> str:
    """``'float32'`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")
