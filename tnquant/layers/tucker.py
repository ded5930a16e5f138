"""Tucker layers: Tucker-2 / tensorized Tucker Linear, Tucker-2 Conv2d (Kim et al. 2016).

Examples
--------
>>> import torch
>>> from tnquant.layers import TuckerLinear
>>> cores = [torch.randn(16, 4), torch.randn(4, 3), torch.randn(8, 3)]
>>> TuckerLinear(cores)(torch.randn(2, 8)).shape
torch.Size([2, 16])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.layers.base import check_bias, check_cores, check_match
from tnquant.layers.contract import Path, ssa_to_path, symbols
from tnquant.layers.conv import FactorizedConv2dBase
from tnquant.layers.linear import FactorizedLinearBase
from tnquant.specs import Tucker

__all__ = ["TuckerLinear", "TuckerConv2d"]


def _blocks(d: int) -> list[list[list[int]]]:
    """Every split of modes ``0..d-1`` into runs of adjacent modes."""
    if d == 0:
        return [[]]
    return [
        [list(range(k)), *[[m + k for m in b] for b in rest]]
        for k in range(1, d + 1)
        for rest in _blocks(d - k)
    ]


def _tucker_paths(d: int) -> list[Path]:
    """Candidate orders for the tensorized Tucker equation of order ``d``.

    Operands: ``0`` the input, ``1`` the core ``G``, ``2..d+1`` the output
    factors, ``d+2..2d+1`` the input factors. For every split of the input
    modes and of the output modes into runs of adjacent modes, the factors
    of a run are merged first (a Kronecker product, independent of the
    input), so that the input meets fewer, larger matrices, each on a block
    of contiguous dims (a view, no permute): input runs last to first, then
    ``G``, then output runs first to last. When one side is a single run,
    ``G`` may also be folded into it first (with both sides single runs: two
    matmuls with the input, like a low-rank layer of rank ``prod(ranks)/2``).
    """
    n = 2 * d + 2
    paths: list[Path] = []
    for in_runs in _blocks(d):
        for out_runs in _blocks(d):
            for fold in ("none", "in", "out"):
                if fold == "in" and len(in_runs) > 1 or fold == "out" and len(out_runs) > 1:
                    continue
                ssa: list[tuple[int, ...]] = []

                def merge(ids: list[int], ssa: list[tuple[int, ...]] = ssa) -> int:
                    node = ids[0]
                    for other in ids[1:]:
                        ssa.append((node, other))
                        node = n + len(ssa) - 1
                    return node

                ins = [merge([d + 2 + m for m in run]) for run in in_runs]
                outs = [merge([2 + m for m in run]) for run in out_runs]
                if fold == "in":
                    ins = [merge([ins[0], 1])]
                elif fold == "out":
                    outs = [merge([1, outs[0]])]
                node = 0
                for other in ins[::-1] + ([1] if fold == "none" else []) + outs:
                    ssa.append((node, other))
                    node = n + len(ssa) - 1
                paths.append(ssa_to_path(n, ssa))
    return paths


def _tucker_order(cores: Any, owner: str) -> int:
    """0 for the order-1 layout ``[U_out, G, U_in]``, else the tensorized order ``d``."""
    if isinstance(cores, Tensor) or not isinstance(cores, (list, tuple, nn.ParameterList)):
        raise TypeError(f"{owner} cores must be a list of tensors, got {type(cores).__name__}")
    if not cores:
        raise ValueError(f"{owner} needs cores, got an empty list")
    for k, core in enumerate(cores):
        if not isinstance(core, Tensor):
            raise TypeError(f"{owner} cores[{k}] must be a tensor, got {type(core).__name__}")
    if len(cores) == 3 and all(c.ndim == 2 for c in cores):
        return 0
    d2 = cores[0].ndim
    if d2 < 2 or d2 % 2 or len(cores) != d2 + 1:
        raise ValueError(
            f"{owner} takes [U_out (out, r_out), G (r_out, r_in), U_in (in, r_in)] or "
            f"[G (r_1..r_2d), U_1 .. U_2d]; got cores of shapes "
            f"{[tuple(c.shape) for c in cores]}"
        )
    return d2 // 2


class TuckerLinear(FactorizedLinearBase):
    """A Linear layer with a Tucker weight.

    Two layouts (``Tucker(order=...)``):

    - order 1 (Tucker-2): ``[U_out (out, r_out), G (r_out, r_in), U_in (in,
      r_in)]``, ``W = U_out @ G @ U_in^T``. Chain: ``x U_in`` (``'inter_0'``,
      ``(B, r_in)``), then ``G`` (``'inter_1'``, ``(B, r_out)``), then ``U_out``.
    - order ``d > 1`` (tensorized): ``[G (r_1..r_2d), U_1 (o_1, r_1) .. U_d,
      U_{d+1} (i_1, r_{d+1}) .. U_2d]``; the zero-padded weight reshaped to
      ``(o_1..o_d, i_1..i_d)`` is ``G x_1 U_1 ... x_2d U_2d``. Chain: the
      input factors ``U_{d+1} .. U_2d`` one by one, then ``G``, then ``U_1
      .. U_d``; ``'inter_0' .. 'inter_{2d-1}'`` are the results after each
      step but the last (batch first).

    Parameters
    ----------
    cores
        The factors, in one of the layouts above.
    in_features, out_features
        The dense sizes (at most ``prod(in_shape)``/``prod(out_shape)`` for the
        tensorized layout, which pads with zeros; equal to the factor sizes
        for order 1). Default: the factor sizes.
    bias
        Dense bias ``(out_features,)`` or ``None``.
    spec
        The spec it stands for; built from the core shapes when omitted.
    decomposition_info
        ``ranks``, ``rel_error``, ``capped`` of the decomposition, if any.

    Examples
    --------
    >>> import torch
    >>> u_out, g, u_in = torch.randn(6, 3), torch.randn(3, 2), torch.randn(5, 2)
    >>> layer = TuckerLinear([u_out, g, u_in])
    >>> x = torch.randn(4, 5)
    >>> torch.allclose(layer(x), x @ (u_out @ g @ u_in.T).T, atol=1e-5)
    True
    >>> layer.ranks, layer.intermediate_names()
    ((3, 2), ('inter_0', 'inter_1'))
    """

    format = "tucker"
    spec_type = Tucker

    def __init__(
        self,
        cores: Sequence[Tensor],
        *,
        in_features: int | None = None,
        out_features: int | None = None,
        bias: Tensor | None = None,
        spec: Tucker | None = None,
        decomposition_info: dict[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        d = _tucker_order(cores, owner)
        if d == 0:
            (out, r_out), (g0, g1), (n_in, r_in) = check_cores(cores, [2, 2, 2], owner)
            check_match(owner, "G.shape[0] (U_out.shape[1])", r_out, g0)
            check_match(owner, "G.shape[1] (U_in.shape[1])", r_in, g1)
            for name, given, size in (("in", in_features, n_in), ("out", out_features, out)):
                if given is not None:
                    check_match(owner, f"{name}_features (order-1 factor size)", size, given)
            ranks: tuple[int, ...] = (r_out, r_in)
            in_shape: tuple[int, ...] = (n_in,)
            out_shape: tuple[int, ...] = (out,)
            x_term, out_term, w_term = "Za", "Zo", "oa"
            core_terms, chains = ["op", "pq", "aq"], [[3, 2, 1]]
            # G folded into U_in or into U_out first: two matmuls with the input
            extra = [
                ssa_to_path(4, [(3, 2), (0, 4), (5, 1)]),
                ssa_to_path(4, [(1, 2), (0, 3), (5, 4)]),
            ]
            default_spec = Tucker(rank=ranks)
        else:
            shapes = check_cores(cores, [2 * d] + [2] * (2 * d), owner)
            ranks = shapes[0]
            for k in range(2 * d):
                check_match(
                    owner, f"cores[{k + 1}].shape[1] (G.shape[{k}])", ranks[k], shapes[k + 1][1]
                )
            out_shape = tuple(s[0] for s in shapes[1 : d + 1])
            in_shape = tuple(s[0] for s in shapes[d + 1 :])
            sym = symbols(4 * d + 1)
            batch, ins, outs, rks = sym[0], sym[1 : d + 1], sym[d + 1 : 2 * d + 1], sym[2 * d + 1 :]
            x_term, out_term = batch + "".join(ins), batch + "".join(outs)
            w_term = "".join(outs) + "".join(ins)
            core_terms = ["".join(rks)] + [o + r for o, r in zip(outs + ins, rks, strict=True)]
            chains = [list(range(d + 2, 2 * d + 2)) + list(range(1, d + 2))]
            extra = _tucker_paths(d)
            default_spec = Tucker(rank=ranks, in_shape=in_shape, out_shape=out_shape)
        out_features = math.prod(out_shape) if out_features is None else out_features
        in_features = math.prod(in_shape) if in_features is None else in_features
        super().__init__(
            cores,
            bias=check_bias(bias, out_features),
            spec=spec if spec is not None else default_spec,
            decomposition_info=decomposition_info,
            ranks=ranks,
        )
        self.order = max(d, 1)
        self._setup_linear(
            in_features=in_features,
            out_features=out_features,
            in_shape=in_shape,
            out_shape=out_shape,
            x_term=x_term,
            core_terms=core_terms,
            out_term=out_term,
            w_term=w_term,
            chains=chains,
            extra_paths=extra,
        )


class TuckerConv2d(FactorizedConv2dBase):
    """Tucker-2 convolution (Kim et al. 2016): 1x1 in, core conv, 1x1 out.

    The kernel is ``K[o, i, h, w] = sum_{p, q} U_out[o, p] G[p, q, h, w]
    U_in[i, q]``.

    Parameters
    ----------
    cores
        ``[U_out (O, r_out), G (r_out, r_in, kh, kw), U_in (I, r_in)]``.
    stride, padding, dilation, padding_mode
        As ``nn.Conv2d`` (``padding`` may be ``'same'``/``'valid'``).
    bias
        Dense bias ``(O,)`` or ``None``.
    spec
        The spec it stands for; ``Tucker(rank=(r_out, r_in))`` when omitted.
    decomposition_info
        ``ranks``, ``rel_error``, ``capped`` of the decomposition, if any.

    Notes
    -----
    The chain is ``x -> 1x1 conv by U_in^T`` (``'inter_0'``, ``(N, r_in, H,
    W)``) ``-> conv by G with the layer's stride/padding/dilation``
    (``'inter_1'``, ``(N, r_out, H_out, W_out)``) ``-> 1x1 conv by U_out``,
    plus the bias.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> u_out, g, u_in = torch.randn(6, 2), torch.randn(2, 3, 3, 3), torch.randn(4, 3)
    >>> layer = TuckerConv2d([u_out, g, u_in], stride=2, padding=1)
    >>> kernel = torch.einsum("op,pqhw,iq->oihw", u_out, g, u_in)
    >>> x = torch.randn(2, 4, 7, 7)
    >>> torch.allclose(layer(x), F.conv2d(x, kernel, stride=2, padding=1), atol=1e-4)
    True
    """

    format = "tucker"
    spec_type = Tucker
    #: as ``nn.Conv2d.groups`` (a factorized convolution is dense across channels)
    groups: int = 1
    _kernel_eq = "op,pqhw,iq->oihw"

    def __init__(
        self,
        cores: Sequence[Tensor],
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        padding_mode: str = "zeros",
        bias: Tensor | None = None,
        spec: Tucker | None = None,
        decomposition_info: dict[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        (out, r_out), (g0, g1, kh, kw), (n_in, r_in) = check_cores(cores, [2, 4, 2], owner)
        check_match(owner, "G.shape[0] (U_out.shape[1])", r_out, g0)
        check_match(owner, "G.shape[1] (U_in.shape[1])", r_in, g1)
        super().__init__(
            cores,
            bias=check_bias(bias, out),
            spec=spec if spec is not None else Tucker(rank=(r_out, r_in)),
            decomposition_info=decomposition_info,
            ranks=(r_out, r_in),
        )
        self._setup_conv(
            in_channels=n_in,
            out_channels=out,
            kernel_size=(kh, kw),
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=padding_mode,
        )

    def intermediate_names(self) -> tuple[str, ...]:
        return ("inter_0", "inter_1")

    def _factorized_flops(self, n: int, h: int, w: int) -> int:
        (out, r_out), (_, r_in, kh, kw), (n_in, _) = self._core_shapes()
        ho, wo = self._out_size(h, 0), self._out_size(w, 1)
        return 2 * n * (h * w * n_in * r_in + ho * wo * (r_out * r_in * kh * kw + r_out * out))

    def _factorized(self, x: Tensor, cores: list[Tensor], hooks: list[Any] | None) -> Tensor:
        u_out, g, u_in = cores
        t = F.conv2d(x, u_in.t().reshape(u_in.shape[1], u_in.shape[0], 1, 1))
        t = self._hook(hooks, 0, t)
        t = F.conv2d(self._pad(t), g, None, self.stride, self._conv_padding(), self.dilation)
        t = self._hook(hooks, 1, t)
        return F.conv2d(t, u_out.reshape(*u_out.shape, 1, 1), self.bias)
