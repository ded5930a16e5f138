"""The CPU backend of fused fake quantization: a small C++ kernel, one call per weight.

:mod:`tnquant.quant.fused` compiles the LSQ fake quantization with
:func:`torch.compile`; on a CPU each compiled call also pays about
0.2 ms of guards, AOT-autograd wrappers and graph launches (measured on
the 72 cores of a LowRank MiniLM-sized stack: ~13 ms of a 119 ms step),
which eats what the fused loop saves on small tensors. This module
builds ``csrc/lsq_cpu.cpp`` with :func:`torch.utils.cpp_extension.load`
(g++ and ninja; about 20-30 s once, then cached in
``~/.cache/torch_extensions``) and calls it through one plain
:class:`torch.autograd.Function`: one pass over the weight forward, one
backward, a few microseconds of Python per call.

The kernel sees the tensor as ``R`` rows of ``C`` elements, each row with
its own scale (and zero point): per-tensor and per-channel along the
leading dimensions, and every block layout whose scale varies only along
leading dimensions. Float32 and float64. Other calls (another layout or
dtype, a device other than the CPU, a build that fails) return ``None``
and the caller takes another path.

Examples
--------
>>> import torch
>>> from tnquant.quant.ste import lsq_fake_quantize
>>> w = torch.randn(64, 32, requires_grad=True)
>>> s = torch.full((64, 1), 0.1, requires_grad=True)
>>> out = fake_quantize(w, s, None, -8, 7, 1.0, "nearest_even")
>>> out is None or torch.equal(out, lsq_fake_quantize(w, s, None, -8, 7))
True
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

__all__ = ["available", "fake_quantize", "ROUNDINGS"]

#: Rounding modes of the kernel, by name -> the kernel's code.
ROUNDINGS = {"nearest_even": 0, "half_up": 1, "floor": 2}

SOURCE = Path(__file__).resolve().parent / "csrc" / "lsq_cpu.cpp"

#: Built for this machine's vector unit; no FMA contraction (bit-exact forward values);
#: no errno on floor/round, so that they vectorize; ``omp simd`` for the reductions.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd"]

_STATE: dict[str, Any] = {"module": None, "broken": None}


def _module() -> Any:
    """The built extension, or None when it cannot be built (warned once)."""
    if _STATE["module"] is None and _STATE["broken"] is None:
        try:
            from torch.utils.cpp_extension import load

            _STATE["module"] = load(
                name="tnquant_lsq_cpu", sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False
            )
        except Exception as err:  # noqa: BLE001 - no compiler / ninja: the caller goes elsewhere
            reason = f"{type(err).__name__}: {err}"
            _STATE["broken"] = reason
            warnings.warn(
                f"tnquant: the fused CPU fake-quantization kernel did not build "
                f"({reason[:300]}); using another path",
                RuntimeWarning,
                stacklevel=4,
            )
    return _STATE["module"]


def available() -> bool:
    """Whether the C++ kernel builds (tried once, then remembered).

    Examples
    --------
    >>> isinstance(available(), bool)
    True
    """
    return _module() is not None


def _rows(x: Tensor, scale: Tensor, zero_point: Tensor | None) -> int | None:
    """Rows ``R`` such that ``scale`` holds one value per row of ``x.reshape(R, -1)``.

    ``None`` when the scale varies along a dimension after one it is constant on
    (then no such row view exists), or the zero point is shaped otherwise.
    """
    if scale.dim() > x.dim() or (zero_point is not None and zero_point.shape != scale.shape):
        return None
    shape = (1,) * (x.dim() - scale.dim()) + tuple(scale.shape)
    last = max((i for i, n in enumerate(shape) if n != 1), default=-1)
    if any(shape[i] != x.shape[i] for i in range(last + 1)):
        return None
    return math.prod(x.shape[: last + 1])


class _CpuLSQ(Function):
    """LSQ/LSQ+ fake quantization through the C++ kernel (see the module docs)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor | None,
        qmin: int,
        qmax: int,
        grad_scale: float,
        mode: int,
        rows: int,
    ) -> Tensor:
        x2 = x.reshape(rows, -1).contiguous()
        s = scale.reshape(rows).contiguous()
        zp = zero_point.reshape(rows).contiguous() if zero_point is not None else s.new_empty(0)
        ctx.save_for_backward(x2, s, zp)
        ctx.meta = (qmin, qmax, grad_scale, mode, zero_point is not None)
        ctx.shapes = (x.shape, scale.shape)
        return _STATE["module"].lsq_forward(x2, s, zp, qmin, qmax, mode).view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, s, zp = ctx.saved_tensors
        qmin, qmax, grad_scale, mode, affine = ctx.meta
        x_shape, s_shape = ctx.shapes
        need_x, need_s, need_zp = ctx.needs_input_grad[:3]
        gx, gs, gz = _STATE["module"].lsq_backward(
            grad.reshape(x2.shape).contiguous(), x2, s, zp, qmin, qmax, mode, need_x
        )
        grad_x = gx.view(x_shape) if need_x else None
        grad_s = (gs * grad_scale).view(s_shape) if need_s else None
        grad_zp = (gz * grad_scale).view(s_shape) if affine and need_zp else None
        return grad_x, grad_s, grad_zp, None, None, None, None, None


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float,
    rounding: str,
) -> Tensor | None:
    """The kernel's result, or ``None`` when it does not apply (the caller goes elsewhere).

    Same arguments, values and gradients as
    :func:`~tnquant.quant.ste.lsq_fake_quantize`.
    """
    if (
        x.device.type != "cpu"
        or rounding not in ROUNDINGS
        or x.dtype not in (torch.float32, torch.float64)
        or scale.dtype != x.dtype
        or (zero_point is not None and zero_point.dtype != x.dtype)
        or x.numel() == 0
    ):
        return None
    # the scale broadcasts over x: expand it to x's leading dimensions it is constant on
    rows = _rows(x, scale, zero_point)
    if rows is None or _module() is None:
        return None
    if rows == 1 and x.dim() > 1:
        # per-tensor: one scale per row of x's last dimension, so the rows run in parallel
        rows = x.numel() // x.shape[-1]
        shape = (rows,)
        scale = scale.reshape(()).expand(shape)
        zero_point = None if zero_point is None else zero_point.reshape(()).expand(shape)
    return _CpuLSQ.apply(x, scale, zero_point, qmin, qmax, grad_scale, ROUNDINGS[rounding], rows)
