"""CP convolution (Lebedev et al. 2015): 1x1, vertical, horizontal, 1x1.

Examples
--------
>>> import torch
>>> from tnquant.layers import CPConv2d
>>> cores = [torch.randn(8, 4), torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)]
>>> CPConv2d(cores, padding="same")(torch.randn(2, 3, 6, 6)).shape
torch.Size([2, 8, 6, 6])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from tnquant.layers.base import check_bias, check_cores, check_match
from tnquant.layers.conv import FactorizedConv2dBase
from tnquant.specs import CP

__all__ = ["CPConv2d"]


class CPConv2d(FactorizedConv2dBase):
    """A Conv2d with a rank-``R`` CP kernel, run as four thin convolutions.

    ``K[o, i, h, w] = sum_r A_out[o, r] A_in[i, r] A_h[h, r] A_w[w, r]``.

    Parameters
    ----------
    cores
        ``[A_out (O, R), A_in (I, R), A_h (kh, R), A_w (kw, R)]`` (any CP
        weights already absorbed in the factors).
    stride, padding, dilation, padding_mode
        As ``nn.Conv2d`` (``padding`` may be ``'same'``/``'valid'``); the
        vertical conv takes the height part, the horizontal one the width.
    bias
        Dense bias ``(O,)`` or ``None``.
    spec
        The spec it stands for; ``CP(rank=R)`` when omitted.
    decomposition_info
        ``ranks``, ``rel_error``, ``capped`` of the decomposition, if any.

    Notes
    -----
    The chain: 1x1 conv by ``A_in^T`` (``'inter_0'``, ``(N, R, H, W)``),
    depthwise ``(kh, 1)`` conv by ``A_h`` (``'inter_1'``, ``(N, R, H_out,
    W)``), depthwise ``(1, kw)`` conv by ``A_w`` (``'inter_2'``, ``(N, R,
    H_out, W_out)``), 1x1 conv by ``A_out`` plus the bias.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> a_out, a_in, a_h, a_w = (torch.randn(n, 2) for n in (5, 3, 3, 2))
    >>> layer = CPConv2d([a_out, a_in, a_h, a_w], padding=(1, 0))
    >>> kernel = torch.einsum("or,ir,hr,wr->oihw", a_out, a_in, a_h, a_w)
    >>> x = torch.randn(1, 3, 6, 6)
    >>> torch.allclose(layer(x), F.conv2d(x, kernel, padding=(1, 0)), atol=1e-4)
    True
    """

    format = "cp"
    spec_type = CP
    #: as ``nn.Conv2d.groups`` (a factorized convolution is dense across channels)
    groups: int = 1
    _kernel_eq = "or,ir,hr,wr->oihw"

    def __init__(
        self,
        cores: Sequence[Tensor],
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        padding_mode: str = "zeros",
        bias: Tensor | None = None,
        spec: CP | None = None,
        decomposition_info: dict[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        shapes = check_cores(cores, [2, 2, 2, 2], owner)
        rank = shapes[0][1]
        for k, name in enumerate(("A_in", "A_h", "A_w"), start=1):
            check_match(owner, f"{name}.shape[1] (the CP rank, A_out.shape[1])", rank, shapes[k][1])
        out, n_in, kh, kw = (s[0] for s in shapes)
        super().__init__(
            cores,
            bias=check_bias(bias, out),
            spec=spec if spec is not None else CP(rank=rank),
            decomposition_info=decomposition_info,
            ranks=(rank,),
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
        return ("inter_0", "inter_1", "inter_2")

    def _factorized_flops(self, n: int, h: int, w: int) -> int:
        (out, rank), (n_in, _), (kh, _), (kw, _) = self._core_shapes()
        ho, wo = self._out_size(h, 0), self._out_size(w, 1)
        w_mid = w + sum(self._explicit_pad[:2]) if self.padding_mode != "zeros" else w
        return 2 * n * rank * (h * w * n_in + ho * w_mid * kh + ho * wo * (kw + out))

    def _factorized(self, x: Tensor, cores: list[Tensor], hooks: list[Any] | None) -> Tensor:
        a_out, a_in, a_h, a_w = cores
        rank = a_out.shape[1]
        t = F.conv2d(x, a_in.t().reshape(rank, a_in.shape[0], 1, 1))
        t = self._hook(hooks, 0, t)
        t = self._pad(t)
        t = F.conv2d(
            t,
            a_h.t().reshape(rank, 1, a_h.shape[0], 1),
            None,
            (self.stride[0], 1),
            self._conv_padding(0),
            (self.dilation[0], 1),
            groups=rank,
        )
        t = self._hook(hooks, 1, t)
        t = F.conv2d(
            t,
            a_w.t().reshape(rank, 1, 1, a_w.shape[0]),
            None,
            (1, self.stride[1]),
            self._conv_padding(1),
            (1, self.dilation[1]),
            groups=rank,
        )
        t = self._hook(hooks, 2, t)
        return F.conv2d(t, a_out.reshape(*a_out.shape, 1, 1), self.bias)
