"""Run converted layers on torch's packed weight-only int8 / int4 CPU kernels.

:func:`to_packed_kernels` swaps every eligible converted layer for a
:class:`PackedLinear` (a dense ``QuantLinear``) or a :class:`PackedChain`
(``LowRankLinear``, and ``TuckerLinear`` of a matrix: its thin GEMMs one after
the other) that holds **the same codes and scales** in the kernels' layouts
(:mod:`tnquant.quant.packed_kernels`): int8 codes as they are, int4 codes in
int4pack nibbles, no float copy of a weight (``model_size_bits`` counts the
kernel buffers). The code mapping is exact; the products are not
bit-identical with the fake-quant / exact converted model (the kernels
accumulate in their own order and scale after the sum, and run in
``compute_dtype``, bfloat16 by default: the only vectorised one on this torch
build). Use it for CPU inference speed, keep the exact model for accuracy
numbers, export and :func:`tnquant.save` (the packed modules have no registry
entry, so ``save`` refuses them).

Which kernel (``kernel='auto'``): int4 for symmetric integer codes of at most
4 bits in ``[-8, 7]`` whose scales are constant within blocks of 32, 64, 128 or
256 along ``K`` (per tensor, per output channel, ``('group', n)`` along the
input axis) and ``N`` a multiple of 16; else int8 for symmetric integer codes of
at most 8 bits with one scale per output row. Everything else (affine codes,
Binary/Ternary/FixedPoint, a group along the output axis, activation
quantizers, ``TTLinear``: its cores are 3/4-d contractions, not a GEMM chain)
stays exact, with the reason in the report.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec, quantize, convert
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
>>> _ = quantize(model, weights=QuantSpec(bits=4, granularity="channel"), progress=False)
>>> _ = convert(model, progress=False)
>>> x = torch.randn(4, 64)
>>> exact = model(x)
>>> report = to_packed_kernels(model, progress=False)
>>> type(model[0]).__name__, report.rows[0]["status"]
('PackedLinear', 'int4 kernel')
>>> bool((model(x) - exact).abs().max() < 0.05)
True
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.core.modules import replace_module
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.packed_kernels import (
    PackedOperands,
    dequantize_operands,
    int4_group,
    int4pack_operands,
    int8pack_operands,
    packed_linear,
)
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import lookup
from tnquant.report import Report
from tnquant.specs import QuantSpec

__all__ = ["PackedLinear", "PackedChain", "to_packed_kernels", "KERNELS"]

#: the ``kernel`` choices of :func:`to_packed_kernels`
KERNELS = ("auto", "int8", "int4")


class PackedLinear(nn.Module):
    """``y = x W^T + b`` on a packed kernel (see the module docs); reads like an ``nn.Linear``.

    Parameters
    ----------
    ops
        The kernel operands (:func:`~tnquant.quant.packed_kernels.int8pack_operands`
        or :func:`~tnquant.quant.packed_kernels.int4pack_operands`).
    bias
        Optional ``(N,)`` bias, kept in its own dtype.

    Examples
    --------
    >>> import torch
    >>> from tnquant.quant.packed_kernels import int8pack_operands
    >>> ops = int8pack_operands(torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 1))
    >>> layer = PackedLinear(ops)
    >>> layer(torch.ones(1, 2)).tolist(), layer.weight.tolist()
    ([[3.0, 7.0]], [[1.0, 2.0], [3.0, 4.0]])
    """

    packed_weight: Tensor
    scales: Tensor

    def __init__(self, ops: PackedOperands, bias: Tensor | None = None) -> None:
        super().__init__()
        self.kind, self.group, self.unpackable = ops.kind, ops.group, ops.unpackable
        self.out_features, self.in_features = ops.shape
        self.register_buffer("packed_weight", ops.weight)
        self.register_buffer("scales", ops.scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def operands(self) -> PackedOperands:
        """The kernel operands this layer holds."""
        shape = (self.out_features, self.in_features)
        return PackedOperands(
            self.kind, self.packed_weight, self.scales, self.group, shape, self.unpackable
        )

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.operands(), self.bias)

    @property
    def weight(self) -> Tensor:
        """The ``(N, K)`` weight the kernel multiplies by, in the compute dtype (computed)."""
        ops = self.operands()
        if ops.unpackable:
            return dequantize_operands(ops)
        eye = torch.eye(self.in_features, dtype=ops.compute_dtype, device=ops.weight.device)
        return packed_linear(eye, ops).t()  # one nonzero term per sum: exact

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.kind == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kind}{group}, compute_dtype={self.scales.dtype}, "
            f"bias={self.bias is not None}"
        )


class PackedChain(nn.Module):
    """A factorized Linear as GEMMs in turn, each a :class:`PackedLinear`; bias on the last.

    Examples
    --------
    >>> import torch
    >>> from tnquant.quant.packed_kernels import int8pack_operands
    >>> v = PackedLinear(int8pack_operands(torch.tensor([[1, 1, 1]]), torch.ones(1, 1)))
    >>> u = PackedLinear(int8pack_operands(torch.tensor([[2], [3]]), torch.ones(1, 1)))
    >>> PackedChain([v, u], torch.tensor([0.0, 1.0]))(torch.ones(1, 3)).tolist()
    [[6.0, 10.0]]
    """

    def __init__(self, steps: list[PackedLinear], bias: Tensor | None = None) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.in_features = steps[0].in_features
        self.out_features = steps[-1].out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        steps = list(self.steps)
        for step in steps[:-1]:
            x = step(x)
        return cast(Tensor, packed_linear(x, cast(PackedLinear, steps[-1]).operands(), self.bias))

    @property
    def weight(self) -> Tensor:
        """The product of the steps' weights, ``(out, in)`` (computed)."""
        w = cast(PackedLinear, self.steps[0]).weight
        for step in list(self.steps)[1:]:
            w = cast(PackedLinear, step).weight @ w
        return w


def _spec_reason(frozen: Any) -> str | None:
    if isinstance(frozen, Quantizer):
        return "not converted (a Quantizer); run convert first"
    if not isinstance(frozen, FrozenTensor):
        return f"not quantized ({type(frozen).__name__})"
    spec = frozen.spec
    if not isinstance(spec, QuantSpec) or spec.dtype is not None:
        return f"weight spec {type(spec).__name__} is not an integer QuantSpec"
    if not spec.symmetric or spec.bits > 8 or frozen.storage != "packed":
        return (
            f"needs symmetric codes of <= 8 bits, got bits={spec.bits}, symmetric={spec.symmetric}"
        )
    if frozen.packed.device.type != "cpu":
        return f"not on the CPU ({frozen.packed.device}); the packed kernels are CPU kernels"
    return None


def _operands(
    frozen: Any, transpose: bool, kernel: str, dtype: torch.dtype
) -> PackedOperands | str:
    """The operands of a 2-d frozen weight used as ``(N, K)`` (``.T`` first when
    ``transpose``), or the reason none fits."""
    reason = _spec_reason(frozen)
    if reason is not None or len(frozen.shape) != 2:
        return reason or f"a {len(frozen.shape)}-d tensor is not a GEMM weight"
    codes, scale = frozen.codes(), frozen.scale
    if transpose:
        codes, scale = codes.t(), scale.t()
    n, k = codes.shape
    block = k // scale.shape[1]
    small = frozen.qmin >= -8 and frozen.qmax <= 7
    if kernel in ("auto", "int4") and small and n % 16 == 0 and int4_group(k, block):
        return int4pack_operands(codes, scale, dtype)
    if kernel == "int4":
        return (
            f"int4 needs codes in [-8, 7], N % 16 == 0 and K, the scale block along K "
            f"divisible by 32/64/128/256; got [{frozen.qmin}, {frozen.qmax}], N={n}, K={k}, "
            f"block={block}"
        )
    if scale.shape[1] != 1:
        return f"int8 needs one scale per output row; the scale varies along K (block {block})"
    return int8pack_operands(codes, scale, dtype)


#: factorized layer class name -> [(core index, used transposed)] in chain order
_CHAINS = {
    "LowRankLinear": [(1, False), (0, False)],
    "TuckerLinear": [(2, True), (1, False), (0, False)],
}


def _act_reason(module: nn.Module) -> str | None:
    acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    if acts is not None and len(acts):
        return "has activation quantizers (the packed kernel would bypass them)"
    return None


def _packed(module: nn.Module, kernel: str, dtype: torch.dtype) -> nn.Module | str:
    """The packed replacement of ``module``, or why it stays exact."""
    kind = lookup(module)
    reason = _act_reason(module)
    if reason is not None:
        return reason
    bias = cast("Tensor | None", module._parameters.get("bias"))
    if kind is not None and kind.role == "quantized" and kind.dense is nn.Linear:
        if kind.transposed:
            return "transposed (Conv1D) weights are not taken yet"
        ops = _operands(module._modules.get("weight_quantizer"), False, kernel, dtype)
        return ops if isinstance(ops, str) else PackedLinear(ops, bias)
    chain = _CHAINS.get(type(module).__name__)
    if chain is None:
        return f"{type(module).__name__} is not a GEMM chain (stays exact)"
    quantizers = cast("nn.ModuleList | None", module._modules.get("core_quantizers"))
    if quantizers is None or len(quantizers) != len(chain):
        return "cores not quantized"
    if any(len(shape) != 1 for shape in (module.in_shape, module.out_shape)):  # type: ignore[arg-type]
        return "tensorized (multi-mode) Tucker is not a GEMM chain"
    steps = []
    for k, transpose in chain:
        ops = _operands(quantizers[k], transpose, kernel, dtype)
        if isinstance(ops, str):
            return f"core {k}: {ops}"
        steps.append(PackedLinear(ops))
    return PackedChain(steps, bias)


def to_packed_kernels(
    model: nn.Module,
    *,
    kernel: str = "auto",
    compute_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> Report:
    """Swap eligible converted layers for packed-kernel ones (CPU; see the module docs).

    Parameters
    ----------
    model
        A converted model (:func:`tnquant.convert`) on the CPU; changed in place.
    kernel
        ``'auto'`` (int4 where it fits, else int8), ``'int8'`` or ``'int4'``.
    compute_dtype
        The dtype the kernels run in: ``torch.bfloat16`` (default; vectorised)
        or ``torch.float32`` (a scalar loop on this torch build, far slower than
        ``F.linear``), ``torch.float16``.
    progress
        Show a progress bar.

    Returns
    -------
    Report
        One row per quantized ``Linear`` and factorized Linear: ``name``,
        ``status`` (``'int8 kernel'``, ``'int4 kernel'``, ``'int4+int8 kernels'``
        for a chain of both, or ``'kept'``) and ``reason``.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec, quantize, convert
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Linear(16, 8))
    >>> _ = quantize(model, weights={"0": QuantSpec(bits=8, granularity="channel"),
    ...              "1": QuantSpec(bits=4, symmetric=False)}, progress=False)
    >>> _ = convert(model, progress=False)
    >>> [row["status"] for row in to_packed_kernels(model, progress=False).rows]
    ['int8 kernel', 'kept']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    if compute_dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(
            f"compute_dtype must be torch.bfloat16, torch.float32 or torch.float16, "
            f"got {compute_dtype!r}"
        )
    report = Report("packed kernels", columns=("name", "status", "reason"))
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if (kind := lookup(m)) is not None
        and kind.dense is nn.Linear
        and kind.role in ("quantized", "factorized")
    ]
    for name, module in tqdm(targets, desc="packed kernels", disable=not progress):
        new = _packed(module, kernel, compute_dtype) if name else "the model itself; wrap it"
        if isinstance(new, str):
            report.add(name=name, status="kept", reason=new)
            continue
        replace_module(model, name, new)
        kinds = sorted({s.kind for s in new.modules() if isinstance(s, PackedLinear)})
        report.add(
            name=name,
            status="+".join(kinds) + (" kernels" if len(kinds) > 1 else " kernel"),
            reason="",
        )
    return report
