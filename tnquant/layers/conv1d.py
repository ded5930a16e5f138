"""``nn.Conv1d`` layers: the quantized ``QuantConv1d`` and the Tucker-2 ``TuckerConv1d``.

``QuantConv1d`` is to ``nn.Conv1d`` what ``QuantConv2d`` is to ``nn.Conv2d``
(the same parameters, a ``weight_quantizer``, ``act_quantizers``; grouped
and depthwise convolutions too, quantized per channel like any other).
``TuckerConv1d`` is the 1-D Tucker-2 convolution: a 1x1 conv onto ``r_in``
channels, the core conv ``(r_out, r_in, k)`` with the layer's stride,
padding and dilation, a 1x1 conv onto the output channels (``groups`` must
be 1, as for ``TuckerConv2d``).

Examples
--------
>>> import torch
>>> cores = [torch.randn(8, 2), torch.randn(2, 3, 5), torch.randn(4, 3)]
>>> TuckerConv1d(cores, padding=2)(torch.randn(1, 4, 16)).shape
torch.Size([1, 8, 16])
>>> QuantConv1d(4, 8, 3, groups=4)(torch.randn(1, 4, 16)).shape
torch.Size([1, 8, 14])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.layers.base import (
    FactorizedLayer,
    check_bias,
    check_cores,
    check_match,
    decomposition_fields,
)
from tnquant.layers.contract import Program, plan_einsum
from tnquant.layers.conv import PADDING_MODES, conv_extra_repr, rebuild_conv
from tnquant.layers.quantized import QuantConvBody, _check_source, _float_weight, conv_like
from tnquant.specs import Tucker

__all__ = ["QuantConv1d", "TuckerConv1d"]


class QuantConv1d(QuantConvBody, nn.Conv1d):
    """``nn.Conv1d`` with a weight quantizer and input/output quantizers.

    Parameters
    ----------
    *args, **kwargs
        As ``nn.Conv1d``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> dense = nn.Conv1d(3, 4, 3, padding=1)
    >>> layer = QuantConv1d.from_float(dense)
    >>> layer.weight is dense.weight, layer(torch.randn(2, 3, 7)).shape
    (True, torch.Size([2, 4, 7]))
    """

    @classmethod
    def from_float(cls, module: nn.Conv1d) -> QuantConv1d:
        """Wrap ``module``, sharing its ``weight`` and ``bias`` parameters (no quantizers yet).

        Examples
        --------
        >>> from torch import nn
        >>> QuantConv1d.from_float(nn.Conv1d(2, 4, 3, stride=2, groups=2)).groups
        2
        """
        _check_source(cls, module, nn.Conv1d)
        return cast(QuantConv1d, conv_like(cls, module, module.weight))

    def to_float(self) -> nn.Conv1d:
        """A plain ``nn.Conv1d``: the same parameters, or the dequantized kernel once converted.

        Examples
        --------
        >>> from torch import nn
        >>> QuantConv1d.from_float(nn.Conv1d(2, 4, 3)).to_float()
        Conv1d(2, 4, kernel_size=(3,), stride=(1,))
        """
        return cast(nn.Conv1d, conv_like(nn.Conv1d, self, _float_weight(self)))


def _single(value: Any, name: str, minimum: int) -> tuple[int]:
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (or a 1-tuple), got {value!r}")
    return (int(value),)


class TuckerConv1d(FactorizedLayer):
    """Tucker-2 ``nn.Conv1d``: 1x1 in, core conv, 1x1 out.

    The kernel is ``K[o, i, t] = sum_{p, q} U_out[o, p] G[p, q, t] U_in[i, q]``.

    Parameters
    ----------
    cores
        ``[U_out (O, r_out), G (r_out, r_in, k), U_in (I, r_in)]``.
    stride, padding, dilation, padding_mode
        As ``nn.Conv1d`` (``padding`` may be ``'same'``/``'valid'``).
    bias
        Dense bias ``(O,)`` or ``None``.
    spec
        The spec it stands for; ``Tucker(rank=(r_out, r_in))`` when omitted.
    decomposition_info
        ``ranks``, ``rel_error``, ``capped`` of the decomposition, if any.

    Notes
    -----
    The chain is ``x -> 1x1 conv by U_in^T`` (``'inter_0'``, ``(N, r_in,
    L)``) ``-> conv by G`` (``'inter_1'``, ``(N, r_out, L_out)``) ``-> 1x1
    conv by U_out``, plus the bias. ``'reconstructed'`` rebuilds the kernel
    and runs one ``F.conv1d``; ``'auto'`` picks whichever has fewer FLOPs.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> u_out, g, u_in = torch.randn(6, 2), torch.randn(2, 3, 3), torch.randn(4, 3)
    >>> layer = TuckerConv1d([u_out, g, u_in], stride=2, padding=1)
    >>> kernel = torch.einsum("op,pqt,iq->oit", u_out, g, u_in)
    >>> x = torch.randn(2, 4, 9)
    >>> torch.allclose(layer(x), F.conv1d(x, kernel, stride=2, padding=1), atol=1e-4)
    True
    """

    format = "tucker"
    spec_type = Tucker
    _kernel_eq = "op,pqt,iq->oit"
    #: as ``nn.Conv1d.groups`` (a factorized convolution is dense across channels)
    groups: int = 1

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
        (out, r_out), (g0, g1, k), (n_in, r_in) = check_cores(cores, [2, 3, 2], owner)
        check_match(owner, "G.shape[0] (U_out.shape[1])", r_out, g0)
        check_match(owner, "G.shape[1] (U_in.shape[1])", r_in, g1)
        super().__init__(
            cores,
            bias=check_bias(bias, out),
            spec=spec if spec is not None else Tucker(rank=(r_out, r_in)),
            decomposition_info=decomposition_info,
            ranks=(r_out, r_in),
        )
        self.in_channels, self.out_channels, self.kernel_size = n_in, out, (k,)
        self.stride = _single(stride, "stride", 1)
        self.dilation = _single(dilation, "dilation", 1)
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {list(PADDING_MODES)}, got {padding_mode!r}"
            )
        self.padding_mode = padding_mode
        total = self.dilation[0] * (k - 1)
        self._explicit_pad: tuple[int, int]
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1,):
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            self.padding: tuple[int] | str = padding
            self._explicit_pad = (total // 2, total - total // 2) if padding == "same" else (0, 0)
        else:
            pad = _single(padding, "padding", 0)
            self.padding = pad
            self._explicit_pad = (pad[0], pad[0])

    @classmethod
    def from_dense(
        cls, module: nn.Conv1d, spec: Tucker, *, gram: Tensor | None = None, name: str = "weight"
    ) -> TuckerConv1d:
        """Factorize a pretrained ``nn.Conv1d`` (``groups=1``) by Tucker-2 on its channels.

        Parameters
        ----------
        module
            The dense convolution; its kernel is decomposed by
            :func:`tnquant.decompose.decompose_conv` (ranks capped at the
            channel counts), its bias copied, its hyperparameters kept.
        spec
            A :class:`~tnquant.specs.Tucker` spec.
        gram
            Must be ``None`` (only Linear layers take one).
        name
            What to call the weight in error messages.

        Returns
        -------
        TuckerConv1d

        Examples
        --------
        >>> from torch import nn
        >>> from tnquant import Tucker
        >>> TuckerConv1d.from_dense(nn.Conv1d(16, 32, 3), Tucker(rank=(8, 4))).ranks
        (8, 4)
        """
        if gram is not None:
            raise ValueError(f"{cls.__name__}.from_dense takes no gram, got a tensor")
        if type(module) is not nn.Conv1d:
            raise TypeError(
                f"{cls.__name__}.from_dense expects an nn.Conv1d, got {type(module).__name__}"
            )
        if module.groups != 1:
            raise ValueError(
                f"{cls.__name__} factorizes only groups=1 convolutions, got groups={module.groups}"
            )
        if not isinstance(spec, Tucker):
            raise TypeError(
                f"{cls.__name__}.from_dense expects a Tucker spec, got {type(spec).__name__}"
            )
        from tnquant.decompose import decompose_conv

        weight = module.weight.detach()
        dec = decompose_conv(weight, spec, name=name)
        cores = [c.detach().to(device=weight.device, dtype=weight.dtype) for c in dec.cores]
        bias = None if module.bias is None else module.bias.detach().clone()
        return cls(
            cores,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            padding_mode=module.padding_mode,
            bias=bias,
            spec=spec,
            decomposition_info=decomposition_fields(dec),
        )

    def intermediate_names(self) -> tuple[str, ...]:
        return ("inter_0", "inter_1")

    @property
    def _dense_weight_numel(self) -> int:
        return self.out_channels * self.in_channels * self.kernel_size[0]

    def _kernel_program(self) -> Program:
        prog = self._plans.get("weight")
        if prog is None:
            prog = self._plans["weight"] = plan_einsum(self._kernel_eq, self._core_shapes())
        return prog

    def _pad(self, x: Tensor) -> Tensor:
        return (
            x if self.padding_mode == "zeros" else F.pad(x, self._explicit_pad, self.padding_mode)
        )

    def _conv_padding(self) -> Any:
        return self.padding if self.padding_mode == "zeros" else 0

    def flops(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """FLOPs of one forward for an input of ``input_shape`` (``(N, C, L)``).

        Returns ``{'factorized', 'reconstructed', 'dense', 'chosen'}``
        (multiply-adds count 2, bias adds not counted).

        Examples
        --------
        >>> import torch
        >>> cores = [torch.randn(4, 1), torch.randn(1, 1, 1), torch.randn(4, 1)]
        >>> TuckerConv1d(cores).flops((1, 4, 2))["dense"]
        64
        """
        n, length = max(input_shape[0], 1), input_shape[-1]
        k, d, s = self.kernel_size[0], self.dilation[0], self.stride[0]
        lo = (length + sum(self._explicit_pad) - d * (k - 1) - 1) // s + 1
        (out, r_out), (_, r_in, _), (n_in, _) = self._core_shapes()
        dense = 2 * n * lo * self._dense_weight_numel
        fact = 2 * n * (length * n_in * r_in + lo * (r_out * r_in * k + r_out * out))
        recon = self._kernel_program().cost + dense
        chosen = "reconstructed" if recon <= fact else "factorized"
        return {"factorized": fact, "reconstructed": recon, "dense": dense, "chosen": chosen}

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {self.in_channels}, L) "
                f"or ({self.in_channels}, L), got {tuple(x.shape)}"
            )
        unbatched = x.ndim == 2
        if unbatched:
            x = x.unsqueeze(0)
        hooks = None
        if self.act_quantizers is not None:
            x = self._act("input", x)
            hooks = self._inter_hooks()
        cores = self.effective_cores()
        kind = self._implementation
        if hooks is not None:
            kind = "factorized"
        elif kind == "auto":
            kind = self.flops(tuple(x.shape))["chosen"]
        if kind == "reconstructed":
            y = F.conv1d(
                self._pad(x),
                self._kernel_program()(cores),
                self.bias,
                self.stride,
                self._conv_padding(),
                self.dilation,
            )
        else:
            u_out, g, u_in = cores
            t = F.conv1d(x, u_in.t().unsqueeze(-1))
            if hooks is not None and hooks[0] is not None:
                t = hooks[0](t)
            t = F.conv1d(self._pad(t), g, None, self.stride, self._conv_padding(), self.dilation)
            if hooks is not None and hooks[1] is not None:
                t = hooks[1](t)
            y = F.conv1d(t, u_out.unsqueeze(-1), self.bias)
        if self.act_quantizers is not None:
            y = self._act("output", y)
        return y.squeeze(0) if unbatched else y

    def dense_weight(self) -> Tensor:
        """The ``(O, I, k)`` kernel rebuilt from the effective cores (differentiable).

        Examples
        --------
        >>> import torch
        >>> cores = [torch.randn(4, 2), torch.randn(2, 2, 3), torch.randn(5, 2)]
        >>> TuckerConv1d(cores).dense_weight().shape
        torch.Size([4, 5, 3])
        """
        return self._kernel_program()(self.effective_cores())

    def to_dense(self) -> nn.Conv1d:
        """An ``nn.Conv1d`` with the rebuilt kernel, the bias and every hyperparameter.

        Examples
        --------
        >>> import torch
        >>> cores = [torch.randn(4, 2), torch.randn(2, 2, 3), torch.randn(5, 2)]
        >>> TuckerConv1d(cores, padding="same").to_dense()
        Conv1d(5, 4, kernel_size=(3,), stride=(1,), padding=same, bias=False)
        """
        return cast(nn.Conv1d, rebuild_conv(self, nn.Conv1d))

    def extra_repr(self) -> str:
        return conv_extra_repr(self)
