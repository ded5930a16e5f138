"""Stand-ins for tnquant's layers in the ONNX export: the chains of ops on the cores.

:data:`STANDINS` maps each quantized or factorized layer class to a builder
``(module, name, int4) -> nn.Module``; the stand-in's ``forward`` is the
layer's canonical chain written in plain torch ops on its
:class:`~tnquant.export.onnx_tensors.OnnxWeight` s, so that the ONNX graph is
that chain (MatMul / Gemm / Conv / Gather / Reshape / Transpose) on the
dequantized codes, with a QDQ pair at every activation site
(``'input'``, ``'inter_k'``, ``'output'``) that holds a quantizer:

=================  ================================================================
``QuantLinear``    ``Gemm``/``MatMul`` (+ ``Add``) on ``DequantizeLinear(W)``
``QuantConv2d``    ``Conv`` (``Pad`` first for ``'same'`` or a non-zero padding mode)
``QuantEmbedding`` ``Gather`` on the dequantized table
``LowRankLinear``  ``x V^T`` (``inter_0``), then ``U^T`` + bias
``TuckerLinear``   order 1: ``x U_in`` (``inter_0``), ``G^T`` (``inter_1``), ``U_out^T``;
                   order d: one ``Transpose``/``MatMul`` mode product per input factor,
                   ``G`` as one matrix, one per output factor (``inter_0..2d-1``)
``TTLinear``       one ``MatMul`` per core in ``chain_order`` (each core reshaped, or
                   transposed and reshaped, to a matrix; no dense weight is formed)
``TuckerConv2d``   1x1 ``Conv`` (``U_in^T``), ``Conv`` by ``G``, 1x1 ``Conv`` (``U_out``)
``CPConv2d``       1x1 ``Conv``, depthwise ``(kh, 1)`` and ``(1, kw)`` ``Conv``, 1x1 ``Conv``
=================  ================================================================

The results equal the layer's own forward up to float summation order (the
layer may contract in another order, or rebuild the weight).

Examples
--------
>>> import torch
>>> from tnquant.layers import TTLinear
>>> from tnquant.export.onnx_ops import register
>>> register()
>>> layer = TTLinear([torch.randn(1, 2, 3, 2), torch.randn(2, 4, 5, 1)], in_features=14)
>>> x = torch.randn(3, 14)
>>> bool(torch.allclose(STANDINS[TTLinear](layer, "tt", True)(x), layer(x), atol=1e-4))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.export.onnx_tensors import OnnxWeight, act_standin, weight_standin
from tnquant.layers import (
    CPConv2d,
    LowRankLinear,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)
from tnquant.registry import weight_pairs

__all__ = ["STANDINS", "Standin"]

_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


class Standin(nn.Module):
    """The common part of every stand-in: weights, bias, activation quantizers.

    Examples
    --------
    >>> from torch import nn
    >>> s = Standin(nn.Linear(2, 3, bias=False), "fc", True)
    >>> s.bias is None, len(s.weights)
    (True, 1)
    """

    bias: Tensor | None

    def __init__(self, module: nn.Module, name: str, int4: bool) -> None:
        super().__init__()
        prefix = f"{name}." if name else ""
        self.weights = nn.ModuleList(
            weight_standin(prefix + tname, t, q, int4=int4) for tname, t, q in weight_pairs(module)
        )
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.acts = nn.ModuleDict()
        quantizers = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
        for key, q in (quantizers or {}).items():
            act = act_standin(f"{prefix}act_quantizers.{key}", q)
            if act is not None:
                self.acts[key] = act

    def act(self, key: str, x: Tensor) -> Tensor:
        """``x`` through the activation quantizer at ``key``, if any."""
        return cast(Tensor, self.acts[key](x)) if key in self.acts else x

    def values(self) -> list[Tensor]:
        """The dequantized weights / cores, in the layer's order."""
        return [cast(OnnxWeight, w)() for w in self.weights]


class _Linear(Standin):
    def forward(self, x: Tensor) -> Tensor:
        (w,) = self.values()
        return self.act("output", F.linear(self.act("input", x), w, self.bias))


class _Embedding(Standin):
    def __init__(self, module: nn.Module, name: str, int4: bool) -> None:
        super().__init__(module, name, int4)
        self.padding_idx = cast(nn.Embedding, module).padding_idx

    def forward(self, idx: Tensor) -> Tensor:
        (w,) = self.values()
        return self.act("output", F.embedding(idx, w, self.padding_idx))


class _Conv(Standin):
    def __init__(self, module: nn.Module, name: str, int4: bool) -> None:
        super().__init__(module, name, int4)
        conv = cast(nn.Conv2d, module)
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding: Any = conv.padding
        self.pad: tuple[int, ...] | None = None
        self.pad_mode = _PAD_MODES[conv.padding_mode]
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            self.pad = tuple(conv._reversed_padding_repeated_twice)
            self.padding = 0

    def forward(self, x: Tensor) -> Tensor:
        (w,) = self.values()
        x = self.act("input", x)
        if self.pad is not None:
            x = F.pad(x, self.pad, mode=self.pad_mode)
        y = F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.act("output", y)


class _FactorizedLinear(Standin):
    def __init__(self, module: nn.Module, name: str, int4: bool) -> None:
        super().__init__(module, name, int4)
        layer = cast(Any, module)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.in_shape, self.out_shape = tuple(layer.in_shape), tuple(layer.out_shape)
        self.n_steps = len(layer.intermediate_names()) + 1

    def inter(self, k: int, t: Tensor) -> Tensor:
        return self.act(f"inter_{k}", t) if k < self.n_steps - 1 else t

    def chain(self, x2: Tensor, cores: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = self.act("input", x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        pad = math.prod(self.in_shape) - self.in_features
        if pad:
            x2 = F.pad(x2, (0, pad))
        y = self.chain(x2, self.values())
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return self.act("output", y.reshape(*lead, self.out_features))


class _LowRank(_FactorizedLinear):
    def chain(self, x2: Tensor, cores: list[Tensor]) -> Tensor:
        u, v = cores
        return F.linear(self.inter(0, F.linear(x2, v)), u)


class _Tucker(_FactorizedLinear):
    def chain(self, x2: Tensor, cores: list[Tensor]) -> Tensor:
        if len(self.in_shape) == 1 and len(cores) == 3 and cores[1].ndim == 2:
            u_out, g, u_in = cores
            t = self.inter(0, x2 @ u_in)
            return F.linear(self.inter(1, F.linear(t, g)), u_out)
        d = len(self.in_shape)
        g, factors = cores[0], cores[1:]
        n = x2.shape[0]
        t = x2.reshape(n, *self.in_shape)
        for m in range(d):  # input factors U_{d+1} .. U_2d, mode by mode
            t = self.inter(m, (t.movedim(1 + m, -1) @ factors[d + m]).movedim(-1, 1 + m))
        r_out, r_in = math.prod(g.shape[:d]), math.prod(g.shape[d:])
        t = F.linear(t.reshape(n, r_in), g.reshape(r_out, r_in)).reshape(n, *g.shape[:d])
        t = self.inter(d, t)
        for m in range(d):  # output factors U_1 .. U_d
            t = (t.movedim(1 + m, -1) @ factors[m].t()).movedim(-1, 1 + m)
            t = self.inter(d + 1 + m, t)
        return t.reshape(n, -1)


class _TT(_FactorizedLinear):
    def __init__(self, module: nn.Module, name: str, int4: bool) -> None:
        super().__init__(module, name, int4)
        self.chain_order = tuple(cast(TTLinear, module).chain_order)

    def chain(self, x2: Tensor, cores: list[Tensor]) -> Tensor:
        n, ins, d = x2.shape[0], self.in_shape, len(self.in_shape)
        if self.chain_order[0] == d - 1:  # right to left: t is (N, i_k * r_k, O_done)
            t = x2.reshape(n * math.prod(ins[:-1]), ins[-1], 1)
            for step, k in enumerate(range(d - 1, -1, -1)):
                a, o, i, b = cores[k].shape
                t = cores[k].reshape(a * o, i * b) @ t
                done = t.shape[-1] * o
                if k:
                    t = t.reshape(n * math.prod(ins[: k - 1]), ins[k - 1] * a, done)
                t = self.inter(step, t)
            return t.reshape(n, -1)
        t = x2.reshape(n, ins[0], math.prod(ins[1:]))  # left to right: (N, r_k * i_k, I_rest)
        for k in range(d):
            a, o, i, b = cores[k].shape
            t = cores[k].permute(1, 3, 0, 2).reshape(o * b, a * i) @ t
            if k < d - 1:
                rest = math.prod(ins[k + 2 :])
                t = t.reshape(t.shape[0] * o, b * ins[k + 1], rest)
            t = self.inter(k, t)
        return t.reshape(n, -1)


class _FactorizedConv(Standin):
    def __init__(self, module: nn.Module, name: str, int4: bool) -> None:
        super().__init__(module, name, int4)
        layer = cast(Any, module)
        self.stride, self.dilation = layer.stride, layer.dilation
        pads = tuple(layer._explicit_pad)  # (left, right, top, bottom)
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        self.pad: tuple[int, ...] | None = None
        self.pad_mode = _PAD_MODES[layer.padding_mode]
        self.hw = (pads[2], pads[0])
        if layer.padding_mode != "zeros" or not symmetric:
            self.pad, self.hw = pads, (0, 0)

    def chain(self, x: Tensor, cores: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = self.act("input", x)
        unbatched = x.ndim == 3
        if unbatched:
            x = x.unsqueeze(0)
        y = self.act("output", self.chain(x, self.values()))
        return y.squeeze(0) if unbatched else y

    def padded(self, t: Tensor) -> Tensor:
        return F.pad(t, self.pad, mode=self.pad_mode) if self.pad is not None else t


class _TuckerConv(_FactorizedConv):
    def chain(self, x: Tensor, cores: list[Tensor]) -> Tensor:
        u_out, g, u_in = cores
        t = self.act("inter_0", F.conv2d(x, u_in.t().reshape(u_in.shape[1], u_in.shape[0], 1, 1)))
        t = F.conv2d(self.padded(t), g, None, self.stride, self.hw, self.dilation)
        t = self.act("inter_1", t)
        return F.conv2d(t, u_out.reshape(*u_out.shape, 1, 1), self.bias)


class _CPConv(_FactorizedConv):
    def chain(self, x: Tensor, cores: list[Tensor]) -> Tensor:
        a_out, a_in, a_h, a_w = cores
        r = a_out.shape[1]
        t = self.act("inter_0", F.conv2d(x, a_in.t().reshape(r, a_in.shape[0], 1, 1)))
        sh, sw = self.stride
        dh, dw = self.dilation
        kh = a_h.t().reshape(r, 1, a_h.shape[0], 1)
        t = F.conv2d(self.padded(t), kh, None, (sh, 1), (self.hw[0], 0), (dh, 1), groups=r)
        t = self.act("inter_1", t)
        kw = a_w.t().reshape(r, 1, 1, a_w.shape[0])
        t = F.conv2d(t, kw, None, (1, sw), (0, self.hw[1]), (1, dw), groups=r)
        t = self.act("inter_2", t)
        return F.conv2d(t, a_out.reshape(*a_out.shape, 1, 1), self.bias)


#: the one table from a tnquant layer class to its stand-in
STANDINS: dict[type, Callable[[nn.Module, str, bool], nn.Module]] = {
    QuantLinear: _Linear,
    QuantConv2d: _Conv,
    QuantEmbedding: _Embedding,
    LowRankLinear: _LowRank,
    TuckerLinear: _Tucker,
    TTLinear: _TT,
    TuckerConv2d: _TuckerConv,
    CPConv2d: _CPConv,
}
