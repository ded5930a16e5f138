"""Dense reconstructions of decomposition cores and their relative errors.

:func:`dense_of` rebuilds the dense weight of any format; :func:`rel_blocks`
measures ``||w - what|| / ||w||`` a block of rows at a time (a TT: one
first-core index each), so a large embedding table is checked without a
converted copy of it or its whole reconstruction.

Examples
--------
>>> import torch
>>> w = torch.randn(4, 3, dtype=torch.float64)
>>> rel(w, w)
0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tnquant.decompose import als
from tnquant.decompose.cp import cp_to_full
from tnquant.decompose.result import Part
from tnquant.decompose.tt import tt_to_matrix
from tnquant.decompose.tucker import tensorized_to_matrix, tucker_to_full

__all__ = ["dense_of", "rel", "rel_blocks", "out_rel", "ROWS"]

#: rows per block where a large table is read a block at a time (checks, errors)
ROWS = 4096


def dense_of(fmt: str, cores: Sequence[Tensor], in_shape: Any, shape: Sequence[int]) -> Tensor:
    if fmt == "tt":
        full = tt_to_matrix(cores)
    elif fmt == "lowrank":
        return (cores[0] @ cores[1]).reshape(shape)
    elif fmt == "cp":
        return cp_to_full(cores)
    elif in_shape is not None:  # tensorized Tucker
        full = tensorized_to_matrix(cores)
    elif cores[1].ndim == 2:  # Tucker-2 of a matrix
        return cores[0] @ cores[1] @ cores[2].mT
    else:  # Tucker-2 of a conv kernel
        return tucker_to_full(cores[1], [cores[0], cores[2]], (0, 1))
    return full[: shape[0], : shape[1]]


def out_rel(w: Tensor, what: Tensor, gram: Tensor) -> float:
    total = als.output_sq_error(w, torch.zeros_like(w), gram)
    return math.sqrt(als.output_sq_error(w, what, gram) / total) if total > 0 else 0.0


def rel(w: Tensor, what: Tensor) -> float:
    norm = float(w.norm())
    return float((w - what).norm()) / norm if norm > 0 else 0.0


def rel_blocks(part: Part, cores: list[Tensor], weight: Tensor, work: torch.dtype) -> float:
    """``||w - what|| / ||w||`` a block of rows at a time (a TT: one first-core index each).

    Neither a converted copy of ``weight`` nor the dense reconstruction of a
    TT is held whole, so a large embedding table is checked in its own memory.
    """
    if part.format != "tt" or part.out_shape is None:
        what = dense_of(part.format, cores, part.in_shape, weight.shape)
        return rel(weight.detach().to(work), what)
    per = math.prod(part.out_shape[1:])
    err = norm = 0.0
    rows, cols = weight.shape[0], weight.reshape(weight.shape[0], -1).shape[1]
    for a in range(part.out_shape[0]):
        r0, r1 = a * per, min((a + 1) * per, rows)
        if r0 >= rows:
            break
        block = weight[r0:r1].detach().reshape(r1 - r0, -1).to(work)
        hat = tt_to_matrix([cores[0][:, a : a + 1], *cores[1:]])[: r1 - r0, :cols]
        norm += float(block.square().sum())
        err += float((block - hat).square().sum())
    return math.sqrt(err / norm) if norm > 0 else 0.0
