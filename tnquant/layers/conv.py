"""Shared machinery of the factorized Conv2d layers (Tucker-2 and CP).

Both keep the dense layer's ``stride``, ``padding`` (ints, pairs,
``'same'``/``'valid'``), ``dilation`` and ``padding_mode`` (``'zeros'``,
``'reflect'``, ``'replicate'``, ``'circular'``; a non-zero mode pads the
input explicitly, as ``nn.Conv2d`` does, which commutes with the 1x1
channel maps). ``groups`` must be 1.

``'factorized'`` runs the chain of small convolutions; ``'reconstructed'``
rebuilds the kernel and runs one ``F.conv2d``; ``'auto'`` picks the one with
fewer FLOPs for the input's batch and spatial size.

Inference cache (as for the Linear layers, see ``tnquant.layers.linear``):
without autograd, with no ``core_quantizers`` and ``inference_cache`` true,
the rebuilt kernel is kept while the cores' identities, version counters and
data pointers stay the same, and ``'auto'`` then counts the rebuild as free.

Examples
--------
>>> import torch
>>> from tnquant.layers import TuckerConv2d
>>> cores = [torch.randn(8, 2), torch.randn(2, 3, 3, 3), torch.randn(4, 3)]
>>> TuckerConv2d(cores, padding=1)(torch.randn(1, 4, 5, 5)).shape
torch.Size([1, 8, 5, 5])
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.layers.base import FactorizedLayer, decomposition_fields
from tnquant.layers.contract import Program, plan_einsum

__all__ = ["FactorizedConv2dBase", "PADDING_MODES"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def rebuild_conv(layer: Any, cls: type[nn.Conv1d] | type[nn.Conv2d]) -> nn.Conv1d | nn.Conv2d:
    """A ``cls`` (``nn.Conv1d``/``nn.Conv2d``) with ``layer``'s rebuilt kernel, bias and
    hyperparameters, on the cores' device and dtype (the factorized convs' ``to_dense``)."""
    ref = layer.cores[0]
    dense = cls(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        device=ref.device,
        dtype=ref.dtype,
    )
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        if layer.bias is not None and dense.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


def conv_extra_repr(layer: Any) -> str:
    """The factorized convs' ``extra_repr``: the conv hyperparameters, then ranks and cores."""
    return (
        f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, "
        f"stride={layer.stride}, padding={layer.padding}, dilation={layer.dilation}, "
        f"padding_mode={layer.padding_mode!r}, bias={layer.bias is not None}, "
        f"{layer._info_repr()}"
    )


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return (int(value[0]), int(value[1]))


class FactorizedConv2dBase(FactorizedLayer):
    """Base of :class:`TuckerConv2d` and :class:`CPConv2d` (not used directly).

    Examples
    --------
    >>> import torch
    >>> from tnquant.layers import CPConv2d
    >>> cores = [torch.randn(6, 2), torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)]
    >>> layer = CPConv2d(cores, stride=2)
    >>> layer.flops((1, 3, 9, 9))["chosen"]
    'factorized'
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    spec_type: type[Any] = type(None)
    _kernel_eq: str = ""
    #: keep the rebuilt kernel between calls without autograd (module doc)
    inference_cache: bool = True

    @classmethod
    def from_dense(
        cls, module: nn.Conv2d, spec: Any, *, gram: Tensor | None = None, name: str = "weight"
    ) -> FactorizedConv2dBase:
        """Factorize a pretrained ``nn.Conv2d`` into this layer's format.

        Parameters
        ----------
        module
            The dense convolution (``groups=1``); its kernel is decomposed by
            :func:`tnquant.decompose.decompose_conv`, its bias copied, its
            stride/padding/dilation/padding_mode kept.
        spec
            The factorization spec of this layer's format.
        gram
            Not used by convolutions; must be ``None`` (kept so every
            layer's ``from_dense`` has the same signature).
        name
            What to call the weight in error messages (the module's name in
            its model, say).

        Returns
        -------
        FactorizedConv2dBase
            The factorized layer on the module's device and dtype.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from tnquant import CP, Tucker
        >>> from tnquant.layers import CPConv2d, TuckerConv2d
        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> TuckerConv2d.from_dense(conv, Tucker(rank=(8, 4))).ranks
        (8, 4)
        >>> CPConv2d.from_dense(conv, CP(rank=6)).cores[2].shape
        torch.Size([3, 6])
        """
        if gram is not None:
            raise ValueError(
                f"{cls.__name__}.from_dense takes no gram (only Linear layers "
                "use one), got a tensor"
            )
        if not isinstance(module, nn.Conv2d):
            raise TypeError(
                f"{cls.__name__}.from_dense expects an nn.Conv2d, got {type(module).__name__}"
            )
        if module.groups != 1:
            raise ValueError(
                f"{cls.__name__} factorizes only groups=1 convolutions, got groups={module.groups}"
            )
        if not isinstance(spec, cls.spec_type):
            raise TypeError(
                f"{cls.__name__}.from_dense expects a {cls.spec_type.__name__} "
                f"spec, got {type(spec).__name__}"
            )
        from tnquant.decompose import decompose_conv

        weight = module.weight.detach()
        dec = decompose_conv(weight, spec, name=name)
        if dec.format != cls.format:
            raise ValueError(
                f"{cls.__name__} needs a {cls.format!r} decomposition, got {dec.format!r}"
            )
        cores = [c.detach().to(device=weight.device, dtype=weight.dtype) for c in dec.cores]
        bias = None if module.bias is None else module.bias.detach().clone()
        build: Any = cls  # subclasses take their own keywords
        return build(
            cores,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            padding_mode=module.padding_mode,
            bias=bias,
            spec=spec,
            decomposition_info=decomposition_fields(dec),
        )

    def _setup_conv(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: Any,
        padding: Any,
        dilation: Any,
        padding_mode: str,
    ) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {list(PADDING_MODES)}, got {padding_mode!r}"
            )
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}"
                )
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair(padding, "padding", 0)
        # explicit (left, right, top, bottom) padding, as nn.Conv2d computes it
        pads: list[int] = []
        for axis in (1, 0):
            k, d = kernel_size[axis], self.dilation[axis]
            if self.padding == "same":
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            elif self.padding == "valid":
                pads += [0, 0]
            else:
                pads += [cast("tuple[int, int]", self.padding)[axis]] * 2
        self._explicit_pad = tuple(pads)
        self._kernel_cache: tuple[list[Any], Tensor] | None = None

    @property
    def _dense_weight_numel(self) -> int:
        return self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    # ------------------------------------------------------------------ #
    # padding helpers
    # ------------------------------------------------------------------ #
    def _pad(self, x: Tensor) -> Tensor:
        """Explicit padding for a non-zero ``padding_mode`` (identity for 'zeros')."""
        if self.padding_mode == "zeros":
            return x
        return F.pad(x, self._explicit_pad, mode=self.padding_mode)

    def _conv_padding(self, axis: int | None = None) -> Any:
        """The ``padding`` argument of the spatial conv (per axis for separable convs)."""
        if self.padding_mode != "zeros":
            return 0
        if isinstance(self.padding, str) or axis is None:
            return self.padding
        return (self.padding[0], 0) if axis == 0 else (0, self.padding[1])

    def _out_size(self, size: int, axis: int) -> int:
        left, right = self._explicit_pad[2 * (1 - axis) : 2 * (1 - axis) + 2]
        k, d, s = self.kernel_size[axis], self.dilation[axis], self.stride[axis]
        return (size + left + right - d * (k - 1) - 1) // s + 1

    # ------------------------------------------------------------------ #
    # planning
    # ------------------------------------------------------------------ #
    def _kernel_program(self) -> Program:
        prog = self._plans.get("weight")
        if prog is None:
            prog = self._plans["weight"] = plan_einsum(self._kernel_eq, self._core_shapes())
        return prog

    def _factorized_flops(self, n: int, h: int, w: int) -> int:
        raise NotImplementedError

    def flops(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """FLOPs of one forward for an input of ``input_shape`` (``(N, C, H, W)``).

        Returns ``{'factorized', 'reconstructed', 'dense', 'chosen'}``, as
        for the Linear layers (multiply-adds count 2, bias adds not counted).

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import TuckerConv2d
        >>> cores = [torch.randn(4, 1), torch.randn(1, 1, 1, 1), torch.randn(4, 1)]
        >>> TuckerConv2d(cores).flops((1, 4, 2, 2))["dense"]
        128
        """
        n, h, w = input_shape[0], input_shape[-2], input_shape[-1]
        ho, wo = self._out_size(h, 0), self._out_size(w, 1)
        dense = 2 * max(n, 1) * ho * wo * self._dense_weight_numel
        fact = self._factorized_flops(max(n, 1), h, w)
        recon = self._kernel_program().cost + dense
        return {
            "factorized": fact,
            "reconstructed": recon,
            "dense": dense,
            "chosen": "reconstructed" if recon <= fact else "factorized",
        }

    def _choose(self, shape: tuple[int, ...], chain: bool, cached: bool = False) -> str:
        key = (shape[0], shape[2], shape[3], self._implementation, chain, cached)
        kind = self._plans.get(key)
        if kind is None:
            if chain or self._implementation == "factorized":
                kind = "factorized"
            elif self._implementation == "reconstructed":
                kind = "reconstructed"
            else:
                flops = self.flops(shape)
                recon = flops["dense"] if cached else flops["reconstructed"]
                kind = "reconstructed" if recon <= flops["factorized"] else "factorized"
            self._remember(key, kind)
        return kind

    def clear_cache(self) -> None:
        """Drop the kept kernel (needed only after writing into ``core.data`` in place).

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import TuckerConv2d
        >>> layer = TuckerConv2d([torch.randn(4, 2), torch.randn(2, 2, 3, 3), torch.randn(5, 2)])
        >>> layer.clear_cache()
        """
        self._kernel_cache = None

    def _cached_kernel(self) -> Tensor:
        params = list(self._modules["cores"]._parameters.values())  # type: ignore[union-attr]
        # ids are safe: the entry holds the parameters, so no other object takes their id
        key = [(id(p), p._version, p.data_ptr()) for p in params]  # type: ignore[union-attr]
        entry = self._kernel_cache
        if entry is not None and entry[0][1] == key:
            return entry[1]
        kernel = self._kernel_program()(params).contiguous()  # type: ignore[arg-type]
        self._kernel_cache = ([params, key], kernel)
        return kernel

    # ------------------------------------------------------------------ #
    # forward
    # ------------------------------------------------------------------ #
    def _factorized(self, x: Tensor, cores: list[Tensor], hooks: list[Any] | None) -> Tensor:
        raise NotImplementedError

    def _hook(self, hooks: list[Any] | None, k: int, t: Tensor) -> Tensor:
        if hooks is not None and hooks[k] is not None:
            return hooks[k](t)
        return t

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {self.in_channels}, H, W) "
                f"or ({self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        unbatched = x.ndim == 3
        if unbatched:
            x = x.unsqueeze(0)
        hooks = None
        if self.act_quantizers is not None:
            x = self._act("input", x)
            hooks = self._inter_hooks()
        cached = (
            hooks is None
            and not torch.is_grad_enabled()
            and self.inference_cache
            and self._modules.get("core_quantizers") is None
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )
        if self._choose(tuple(x.shape), hooks is not None, cached) == "reconstructed":
            if cached:
                kernel = self._cached_kernel()
            else:
                kernel = self._kernel_program()(self.effective_cores())
            y = F.conv2d(
                self._pad(x), kernel, self.bias, self.stride, self._conv_padding(), self.dilation
            )
        else:
            y = self._factorized(x, self.effective_cores(), hooks)
        if self.act_quantizers is not None:
            y = self._act("output", y)
        return y.squeeze(0) if unbatched else y

    # ------------------------------------------------------------------ #
    # dense view
    # ------------------------------------------------------------------ #
    def dense_weight(self) -> Tensor:
        """The ``(O, I, kh, kw)`` kernel rebuilt from the effective cores (differentiable).

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import TuckerConv2d
        >>> cores = [torch.randn(4, 2), torch.randn(2, 2, 3, 3), torch.randn(5, 2)]
        >>> TuckerConv2d(cores).dense_weight().shape
        torch.Size([4, 5, 3, 3])
        """
        return self._kernel_program()(self.effective_cores())

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the rebuilt kernel, the bias and every hyperparameter.

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import TuckerConv2d
        >>> cores = [torch.randn(4, 2), torch.randn(2, 2, 3, 3), torch.randn(5, 2)]
        >>> TuckerConv2d(cores, padding="same").to_dense()
        Conv2d(5, 4, kernel_size=(3, 3), stride=(1, 1), padding=same, bias=False)
        """
        return cast(nn.Conv2d, rebuild_conv(self, nn.Conv2d))

    def extra_repr(self) -> str:
        return conv_extra_repr(self)
