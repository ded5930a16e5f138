"""The result of a decomposition: :class:`Decomposition`, and the handlers' :class:`Part`.

Examples
--------
>>> import torch
>>> dec = Decomposition("lowrank", [torch.ones(3, 1), torch.ones(1, 2)], (1,), None, None,
...                     0.0, None, 5)
>>> dec.n_params
5
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Decomposition", "Part", "FORMATS"]

FORMATS = ("tt", "tucker", "lowrank", "cp")


@dataclass(frozen=True)
class Decomposition:
    """Cores of a factorized weight, with the ranks used and the error reached.

    Attributes
    ----------
    format
        ``'tt'``, ``'tucker'``, ``'lowrank'`` or ``'cp'``.
    cores
        The cores, in the dtype and on the device of the input weight. Layouts:

        - ``'tt'``: ``cores[k]`` is ``(r_{k-1}, out_k, in_k, r_k)``, ``r_0 = r_d
          = 1``; their product is the weight zero-padded to
          ``(prod(out_shape), prod(in_shape))``, row-major over the
          multi-indices ``(o_1..o_d)`` and ``(i_1..i_d)``. An Embedding
          ``(num, dim)`` has ``out = num`` and ``in = dim``.
        - ``'lowrank'``: ``[U (out, r), V (r, in)]``, ``W ~ U @ V``, the
          singular values split evenly. On a Conv2d kernel ``(O, I, kh, kw)``
          the matrix is ``(O, I*kh*kw)``: ``V.reshape(r, I, kh, kw)`` is a
          conv to ``r`` channels and ``U`` a 1x1 conv.
        - ``'tucker'`` on a Linear, ``order=1``: ``[U_out (out, r_out), G
          (r_out, r_in), U_in (in, r_in)]``, ``W ~ U_out @ G @ U_in.T``.
        - ``'tucker'`` on a Linear, ``order=d > 1``: ``[G (r_1..r_2d), U_1
          (o_1, r_1), ..., U_d (o_d, r_d), U_{d+1} (i_1, r_{d+1}), ..., U_2d
          (i_d, r_2d)]``, TensorLy's ``(core, factors)`` of the padded weight
          reshaped to ``(o_1..o_d, i_1..i_d)``.
        - ``'tucker'`` on a Conv2d: ``[U_out (O, r_out), G (r_out, r_in, kh,
          kw), U_in (I, r_in)]``, ``kernel ~ G x_0 U_out x_1 U_in``.
        - ``'cp'`` on a Conv2d: ``[A_out (O, R), A_in (I, R), A_h (kh, R),
          A_w (kw, R)]``, ``kernel[o,i,h,w] ~ sum_r A_out[o,r] A_in[i,r]
          A_h[h,r] A_w[w,r]``; the CP weights are absorbed, every rank-one
          term having columns of equal norm.
    ranks
        The ranks used, in the spec's tuple convention: the ``d - 1`` inner
        bonds for TT, ``(r,)`` for low rank, one per factor for Tucker
        (output modes first), ``(R,)`` for CP.
    out_shape, in_shape
        The tensorized shapes (TT, tensorized Tucker), else ``None``.
    rel_error
        ``||W - What||_F / ||W||_F`` of the returned cores, on the unpadded
        weight (0 for a zero weight).
    capped
        A note when the requested ranks were lowered to what the shape
        allows (or a ratio was out of reach), else ``None``.
    n_params
        Total entries of the cores.
    out_rel_error
        With a Gram matrix ``G = X^T X``: ``sqrt(tr(D G D^T) / tr(W G W^T))``,
        ``D = W - What``, the relative output error on the calibration
        inputs; else ``None``.
    shape
        The shape of the decomposed (unpadded) weight.
    """

    format: str
    cores: list[Tensor]
    ranks: tuple[int, ...]
    out_shape: tuple[int, ...] | None
    in_shape: tuple[int, ...] | None
    rel_error: float
    capped: str | None
    n_params: int
    out_rel_error: float | None = None
    shape: tuple[int, ...] | None = None


@dataclass
class Part:
    """What a format handler returns: cores in the working dtype, ranks, note, shapes."""

    format: str
    cores: list[Tensor]
    ranks: tuple[int, ...]
    note: str | None = None
    out_shape: tuple[int, ...] | None = None
    in_shape: tuple[int, ...] | None = None
