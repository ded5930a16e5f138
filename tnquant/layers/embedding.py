"""TT embedding (TT-Rec, Yin et al. 2021): lookups that never build the table.

Examples
--------
>>> import torch
>>> from tnquant.layers import TTEmbedding
>>> cores = [torch.randn(1, 10, 4, 3), torch.randn(3, 10, 4, 1)]
>>> TTEmbedding(cores, num_embeddings=97, embedding_dim=16)(torch.tensor([[0, 96]])).shape
torch.Size([1, 2, 16])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.layers.base import FactorizedLayer, decomposition_fields
from tnquant.layers.contract import plan_einsum, symbols
from tnquant.layers.tt import _tt_shapes
from tnquant.specs import TT

__all__ = ["TTEmbedding"]


class TTEmbedding(FactorizedLayer):
    """An Embedding whose ``(num, dim)`` table is a TT-matrix, looked up row by row.

    The table, zero-padded to ``(prod(num_shape), prod(dim_shape))`` and
    reshaped (row-major) to ``(n_1..n_d, m_1..m_d)``, has TT cores ``G_k``
    of shape ``(r_{k-1}, n_k, m_k, r_k)`` (rows play the part of a Linear
    layer's outputs). A lookup splits each index into its digits
    ``(a_1..a_d)`` in ``(n_1..n_d)``, gathers the slices ``G_k[:, a_k]`` and
    multiplies them (batched matmuls over the indices): ``O(N * sum_k
    m_1..m_k r_{k-1} r_k)`` work for ``N`` indices, never the full table.

    Parameters
    ----------
    cores
        The ``d`` TT cores.
    num_embeddings, embedding_dim
        At most ``prod(num_shape)`` and ``prod(dim_shape)`` (the products
        when omitted); indices beyond ``num_embeddings`` raise ``IndexError``.
    padding_idx
        As ``nn.Embedding``: positions holding it get no gradient. The row's
        *value* is whatever the factorized table gives there (it is shared
        with every other row through the cores, so it cannot be pinned to
        zero; a decomposition of a zero row gives a near-zero row).
    spec
        The spec it stands for; ``TT(rank=..., in_shape=dim_shape,
        out_shape=num_shape)`` when omitted.
    decomposition_info
        ``ranks``, ``rel_error``, ``capped`` of the decomposition, if any.

    Notes
    -----
    The chain multiplies the gathered slices from ``chain_order[0]`` on
    (left to right or right to left, whichever is cheaper);
    ``'inter_0' .. 'inter_{d-3}'`` are the partial products after each
    step but the last, of shape ``(N, ..., r)``. ``'input'`` quantizers do
    not apply (inputs are indices); ``'output'`` does. ``implementation``
    accepts only ``'auto'`` and ``'factorized'`` (the same gather path).

    Examples
    --------
    >>> import torch
    >>> cores = [torch.randn(1, 3, 2, 2), torch.randn(2, 4, 3, 1)]
    >>> layer = TTEmbedding(cores)
    >>> table = torch.einsum("aoib,bpjc->opij", *cores).reshape(12, 6)
    >>> idx = torch.tensor([[1, 5], [11, 0]])
    >>> torch.allclose(layer(idx), table[idx], atol=1e-5)
    True
    """

    format = "tt"
    implementations = ("auto", "factorized")
    spec_type = TT
    # as nn.Embedding's (from_dense refuses the others)
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    sparse: bool = False

    def __init__(
        self,
        cores: Sequence[Tensor],
        *,
        num_embeddings: int | None = None,
        embedding_dim: int | None = None,
        padding_idx: int | None = None,
        spec: TT | None = None,
        decomposition_info: dict[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        shapes = _tt_shapes(cores, owner)
        d = len(shapes)
        num_shape = tuple(s[1] for s in shapes)
        dim_shape = tuple(s[2] for s in shapes)
        inner = tuple(s[3] for s in shapes[:-1])
        num = math.prod(num_shape) if num_embeddings is None else num_embeddings
        dim = math.prod(dim_shape) if embedding_dim is None else embedding_dim
        for name, value, shape in (
            ("num_embeddings", num, num_shape),
            ("embedding_dim", dim, dim_shape),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if value > math.prod(shape):
                raise ValueError(
                    f"{name} must be <= {math.prod(shape)} (the product of the "
                    f"cores' sizes {shape}), got {value}"
                )
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
            if not -num <= padding_idx < num:
                raise ValueError(f"padding_idx must be in [{-num}, {num - 1}], got {padding_idx}")
            padding_idx %= num
        if spec is None:
            spec = TT(rank=inner if inner else "full", in_shape=dim_shape, out_shape=num_shape)
        super().__init__(
            cores, bias=None, spec=spec, decomposition_info=decomposition_info, ranks=inner
        )
        self.num_embeddings, self.embedding_dim = num, dim
        self.num_shape, self.dim_shape = num_shape, dim_shape
        self.padding_idx = padding_idx
        self._strides = tuple(math.prod(num_shape[k + 1 :]) for k in range(d))
        # left-to-right costs sum_k M_{<k} r_{k-1} m_k r_k, right-to-left mirrored
        m, r = dim_shape, (1, *inner, 1)
        left = sum(math.prod(m[:k]) * r[k] * m[k] * r[k + 1] for k in range(1, d))
        right = sum(math.prod(m[k + 1 :]) * r[k] * m[k] * r[k + 1] for k in range(d - 1))
        self.chain_order = tuple(range(d)) if left <= right else tuple(range(d - 1, -1, -1))
        sym = symbols(3 * d + 1)
        rows, cols, rks = sym[:d], sym[d : 2 * d], sym[2 * d :]
        self._table_eq = (
            ",".join(rks[k] + rows[k] + cols[k] + rks[k + 1] for k in range(d))
            + "->"
            + "".join(rows)
            + "".join(cols)
        )

    @classmethod
    def from_dense(
        cls, module: nn.Embedding, spec: TT, *, gram: Tensor | None = None, name: str = "weight"
    ) -> TTEmbedding:
        """Factorize a pretrained ``nn.Embedding`` with a ``TT`` spec.

        ``spec.out_shape`` tensorizes the rows (``num_embeddings``),
        ``spec.in_shape`` the columns. ``max_norm``, ``scale_grad_by_freq``
        and ``sparse`` are refused; ``padding_idx`` is kept (see the class).
        ``gram`` must be ``None``; ``name`` names the table in error messages.

        Examples
        --------
        >>> from torch import nn
        >>> from tnquant import TT
        >>> emb = nn.Embedding(100, 16)
        >>> layer = TTEmbedding.from_dense(emb, TT(rank=4, order=2))
        >>> layer(torch.tensor([3, 7])).shape
        torch.Size([2, 16])
        """
        if gram is not None:
            raise ValueError("TTEmbedding.from_dense takes no gram (only Linear layers use one)")
        if not isinstance(module, nn.Embedding):
            raise TypeError(
                f"TTEmbedding.from_dense expects an nn.Embedding, got {type(module).__name__}"
            )
        if not isinstance(spec, TT):
            raise TypeError(f"TTEmbedding.from_dense expects a TT spec, got {type(spec).__name__}")
        for name, bad in (
            ("max_norm", module.max_norm is not None),
            ("scale_grad_by_freq", module.scale_grad_by_freq),
            ("sparse", module.sparse),
        ):
            if bad:
                raise ValueError(
                    f"TTEmbedding does not support {name}; got {name}={getattr(module, name)!r}"
                )
        from tnquant.decompose import decompose_embedding

        weight = module.weight.detach()
        dec = decompose_embedding(weight, spec, name=name)
        if dec.format != "tt":
            raise ValueError(f"TTEmbedding needs a 'tt' decomposition, got {dec.format!r}")
        cores = [c.detach().to(device=weight.device, dtype=weight.dtype) for c in dec.cores]
        return cls(
            cores,
            num_embeddings=module.num_embeddings,
            embedding_dim=module.embedding_dim,
            padding_idx=module.padding_idx,
            spec=spec,
            decomposition_info=decomposition_fields(dec),
        )

    def intermediate_names(self) -> tuple[str, ...]:
        return tuple(f"inter_{k}" for k in range(len(self.cores) - 2))

    @property
    def _dense_weight_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def forward(self, indices: Tensor) -> Tensor:
        if not isinstance(indices, Tensor):
            raise TypeError(
                f"TTEmbedding expects a tensor of indices, got {type(indices).__name__}"
            )
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"TTEmbedding expects integer indices, got dtype {indices.dtype}")
        hooks = self._inter_hooks() if self.act_quantizers is not None else None
        flat = indices.reshape(-1).long()
        if flat.numel():
            lo, hi = torch.aminmax(flat)
            if lo < 0 or hi >= self.num_embeddings:
                raise IndexError(
                    f"indices must be in [0, {self.num_embeddings - 1}], got "
                    f"values in [{int(lo)}, {int(hi)}]"
                )
        rows = self._lookup(flat, self.effective_cores(), hooks)
        if self.padding_idx is not None and rows.requires_grad:
            mask = (flat == self.padding_idx).unsqueeze(1)
            rows = torch.where(mask, rows.detach(), rows)
        out = rows.reshape(*indices.shape, self.embedding_dim)
        if self.act_quantizers is not None:
            out = self._act("output", out)
        return out

    def _lookup(self, flat: Tensor, cores: list[Tensor], hooks: list[Any] | None) -> Tensor:
        n = flat.shape[0]
        slices = []
        for core, stride, size in zip(cores, self._strides, self.num_shape, strict=True):
            r0, _, m, r1 = core.shape
            digit = torch.div(flat, stride, rounding_mode="floor").remainder_(size)
            table = core.permute(1, 0, 2, 3).reshape(size, r0 * m * r1)
            slices.append(F.embedding(digit, table).view(n, r0, m, r1))
        order = self.chain_order
        if order[0] == 0:  # left to right: t is (n, M, r)
            _, r0, cols, r1 = slices[0].shape
            t = slices[0].reshape(n, cols, r1)
            for step, k in enumerate(order[1:]):
                _, r0, m, r1 = slices[k].shape
                t = torch.bmm(t, slices[k].reshape(n, r0, m * r1))
                cols *= m
                t = t.view(n, cols, r1)
                if hooks is not None and step < len(hooks) and hooks[step] is not None:
                    t = hooks[step](t)
        else:  # right to left: t is (n, r, M)
            _, r0, cols, _ = slices[-1].shape
            t = slices[-1].reshape(n, r0, cols)
            for step, k in enumerate(order[1:]):
                _, r0, m, r1 = slices[k].shape
                t = torch.bmm(slices[k].reshape(n, r0 * m, r1), t)
                cols *= m
                t = t.view(n, r0, cols)
                if hooks is not None and step < len(hooks) and hooks[step] is not None:
                    t = hooks[step](t)
        rows = t.reshape(n, cols)
        if rows.shape[1] != self.embedding_dim:
            rows = rows[:, : self.embedding_dim]
        return rows

    def dense_weight(self) -> Tensor:
        """The full ``(num_embeddings, embedding_dim)`` table (materialised; for export/tests).

        Examples
        --------
        >>> import torch
        >>> TTEmbedding([torch.randn(1, 3, 2, 1)]).dense_weight().shape
        torch.Size([3, 2])
        """
        prog = self._plans.get("weight")
        if prog is None:
            prog = self._plans["weight"] = plan_einsum(self._table_eq, self._core_shapes())
        table = prog(self.effective_cores()).reshape(math.prod(self.num_shape), -1)
        return table[: self.num_embeddings, : self.embedding_dim]

    def to_dense(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding the rebuilt table (and the same ``padding_idx``).

        Examples
        --------
        >>> import torch
        >>> TTEmbedding([torch.randn(1, 3, 2, 1)], padding_idx=0).to_dense()
        Embedding(3, 2, padding_idx=0)
        """
        ref = self.cores[0]
        dense = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
        return dense

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, num_shape={self.num_shape}, "
            f"dim_shape={self.dim_shape}, padding_idx={self.padding_idx}, "
            f"{self._info_repr()}"
        )
