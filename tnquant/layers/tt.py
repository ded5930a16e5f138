"""Tensor-train (TT-matrix / MPO) Linear layer (Novikov et al. 2015).

Examples
--------
>>> import torch
>>> from tnquant.layers import TTLinear
>>> cores = [torch.randn(1, 4, 4, 3), torch.randn(3, 4, 4, 1)]
>>> TTLinear(cores, in_features=14, out_features=16)(torch.randn(2, 14)).shape
torch.Size([2, 16])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from tnquant.layers.base import check_bias, check_match
from tnquant.layers.contract import chain_path, path_cost, symbols
from tnquant.layers.linear import FactorizedLinearBase
from tnquant.specs import TT

__all__ = ["TTLinear"]


def _tt_shapes(cores: Any, owner: str) -> list[tuple[int, ...]]:
    if isinstance(cores, Tensor) or not isinstance(cores, (list, tuple, nn.ParameterList)):
        raise TypeError(f"{owner} cores must be a list of tensors, got {type(cores).__name__}")
    if len(cores) == 0:
        raise ValueError(f"{owner} needs at least one core, got none")
    shapes = []
    for k, core in enumerate(cores):
        if not isinstance(core, Tensor):
            raise TypeError(f"{owner} cores[{k}] must be a tensor, got {type(core).__name__}")
        if core.ndim != 4:
            raise ValueError(
                f"{owner} cores[{k}] must be 4-d (r_{k}, out_{k + 1}, in_{k + 1}, "
                f"r_{k + 1}), got shape {tuple(core.shape)}"
            )
        shapes.append(tuple(core.shape))
    check_match(owner, "cores[0].shape[0] (boundary rank r_0)", 1, shapes[0][0])
    check_match(owner, "cores[-1].shape[3] (boundary rank r_d)", 1, shapes[-1][3])
    for k in range(1, len(shapes)):
        check_match(
            owner,
            f"cores[{k}].shape[0] (bond rank = cores[{k - 1}].shape[3])",
            shapes[k - 1][3],
            shapes[k][0],
        )
    return shapes


class TTLinear(FactorizedLinearBase):
    """A Linear layer whose weight is a TT-matrix (matrix product operator).

    The weight, zero-padded to ``(prod(out_shape), prod(in_shape))`` and
    reshaped (row-major) to ``(o_1..o_d, i_1..i_d)``, is the contraction of
    ``d`` cores ``G_k`` of shape ``(r_{k-1}, o_k, i_k, r_k)``, ``r_0 = r_d = 1``:
    ``W[o, i] = G_1[:, o_1, i_1, :] @ ... @ G_d[:, o_d, i_d, :]``.

    Parameters
    ----------
    cores
        The ``d`` TT cores.
    in_features, out_features
        The dense layer's sizes, at most ``prod(in_shape)`` and
        ``prod(out_shape)`` (the products when omitted). Inputs are padded
        with zeros and outputs sliced, which never changes the results.
    bias
        Dense bias ``(out_features,)`` or ``None``.
    spec
        The spec it stands for; ``TT(rank=(r_1..r_{d-1}), in_shape,
        out_shape)`` when omitted.
    decomposition_info
        ``ranks``, ``rel_error``, ``capped`` of the decomposition, if any.

    Attributes
    ----------
    chain_order : tuple of int
        The order (0-based core indices) in which the sequential chain
        contracts the input with the cores: ``(d-1, ..., 0)`` or
        ``(0, ..., d-1)``, whichever costs fewer FLOPs (right to left on a
        tie).

    Notes
    -----
    ``'factorized'`` runs the cheapest order found by opt_einsum or either
    chain; at small batches that often contracts some cores together first.
    ``'auto'`` also weighs rebuilding the weight, which for moderate ranks
    can be the cheapest of all. Intermediates ``'inter_0'`` ..
    ``'inter_{d-2}'`` are the chain's partial results after contracting the
    input with the first ``k + 1`` cores of ``chain_order``; batch first,
    other dims in the order the chain leaves them (quantize them per tensor).

    Examples
    --------
    >>> import torch
    >>> cores = [torch.randn(1, 2, 3, 2), torch.randn(2, 4, 5, 1)]
    >>> layer = TTLinear(cores)
    >>> w = torch.einsum("aoib,bpjc->opij", *cores).reshape(8, 15)
    >>> x = torch.randn(4, 15)
    >>> torch.allclose(layer(x), x @ w.T, atol=1e-4)
    True
    >>> layer.in_shape, layer.out_shape, layer.ranks
    ((3, 5), (2, 4), (2,))
    """

    format = "tt"
    spec_type = TT

    def __init__(
        self,
        cores: Sequence[Tensor],
        *,
        in_features: int | None = None,
        out_features: int | None = None,
        bias: Tensor | None = None,
        spec: TT | None = None,
        decomposition_info: dict[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        shapes = _tt_shapes(cores, owner)
        d = len(shapes)
        out_shape = tuple(s[1] for s in shapes)
        in_shape = tuple(s[2] for s in shapes)
        inner = tuple(s[3] for s in shapes[:-1])
        out_features = math.prod(out_shape) if out_features is None else out_features
        in_features = math.prod(in_shape) if in_features is None else in_features
        if spec is None:
            spec = TT(rank=inner if inner else "full", in_shape=in_shape, out_shape=out_shape)
        super().__init__(
            cores,
            bias=check_bias(bias, out_features),
            spec=spec,
            decomposition_info=decomposition_info,
            ranks=inner,
        )
        sym = symbols(3 * d + 2)
        batch, ins, outs, rks = sym[0], sym[1 : d + 1], sym[d + 1 : 2 * d + 1], sym[2 * d + 1 :]
        core_terms = [rks[k] + outs[k] + ins[k] + rks[k + 1] for k in range(d)]
        x_term, out_term = batch + "".join(ins), batch + "".join(outs)
        x_eq = f"{x_term},{','.join(core_terms)}->{out_term}"
        right, left = list(range(d, 0, -1)), list(range(1, d + 1))
        x_shapes = [(1, *in_shape), *shapes]
        costs = [path_cost(x_eq, x_shapes, chain_path(d + 1, c)) for c in (right, left)]
        chains = [right, left] if costs[0] <= costs[1] else [left, right]
        self.chain_order = tuple(k - 1 for k in chains[0])
        self._setup_linear(
            in_features=in_features,
            out_features=out_features,
            in_shape=in_shape,
            out_shape=out_shape,
            x_term=x_term,
            core_terms=core_terms,
            out_term=out_term,
            w_term="".join(outs) + "".join(ins),
            chains=chains,
        )
