"""Low-rank Linear layer: ``W = U @ V``, two thin matmuls.

Examples
--------
>>> import torch
>>> from tnquant.layers import LowRankLinear
>>> layer = LowRankLinear([torch.randn(32, 4), torch.randn(4, 16)], bias=torch.zeros(32))
>>> layer(torch.randn(2, 16)).shape
torch.Size([2, 32])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from tnquant.layers.base import check_bias, check_cores, check_match
from tnquant.layers.linear import FactorizedLinearBase
from tnquant.specs import LowRank

__all__ = ["LowRankLinear"]


class LowRankLinear(FactorizedLinearBase):
    """A Linear layer with a rank-``r`` weight ``W = U @ V``.

    Parameters
    ----------
    cores
        ``[U (out, r), V (r, in)]``.
    in_features, out_features
        Optional; checked against the cores (``V.shape[1]``, ``U.shape[0]``).
    bias
        Dense bias of shape ``(out,)`` or ``None``.
    spec
        The spec it stands for; ``LowRank(rank=r)`` when omitted.
    decomposition_info
        ``ranks``, ``rel_error``, ``capped`` of the decomposition, if any.

    Notes
    -----
    The sequential chain is ``x -> x V^T -> (x V^T) U^T + b``; its one
    intermediate ``'inter_0'`` is ``x V^T`` of shape ``(B, r)`` (``B`` the
    flattened leading dims). The reconstructed path builds ``U @ V`` and
    calls ``F.linear``; ``'auto'`` picks it only when it is cheaper, which
    for a low rank it never is.

    Examples
    --------
    >>> import torch
    >>> u, v = torch.randn(6, 2), torch.randn(2, 5)
    >>> layer = LowRankLinear([u, v])
    >>> x = torch.randn(3, 5)
    >>> torch.allclose(layer(x), x @ (u @ v).T, atol=1e-5)
    True
    >>> layer.ranks, layer.n_params
    ((2,), 22)
    """

    format = "lowrank"
    spec_type = LowRank

    def __init__(
        self,
        cores: Sequence[Tensor],
        *,
        in_features: int | None = None,
        out_features: int | None = None,
        bias: Tensor | None = None,
        spec: LowRank | None = None,
        decomposition_info: dict[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        (out, r), (r2, n_in) = check_cores(cores, [2, 2], owner)
        check_match(owner, "V.shape[0] (the rank of U (out, r))", r, r2)
        if in_features is not None:
            check_match(owner, "in_features (V.shape[1])", n_in, in_features)
        if out_features is not None:
            check_match(owner, "out_features (U.shape[0])", out, out_features)
        super().__init__(
            cores,
            bias=check_bias(bias, out),
            spec=spec if spec is not None else LowRank(rank=r),
            decomposition_info=decomposition_info,
            ranks=(r,),
        )
        self._setup_linear(
            in_features=n_in,
            out_features=out,
            in_shape=(n_in,),
            out_shape=(out,),
            x_term="Za",
            core_terms=["or", "ra"],
            out_term="Zo",
            w_term="oa",
            chains=[[2, 1]],
        )
