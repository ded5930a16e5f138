"""The three torch ops behind the ONNX export, their ONNX translations, and retyping.

The stand-in modules of :mod:`tnquant.export.onnx_tensors` call three ops of
the ``tnquant_onnx`` torch library, registered on the first export (never at
import, see :func:`register`), which ``torch.onnx.export(dynamo=True)``
translates through :func:`translations`:

==============================================  ==========================================
``dequantize(codes, scale, axis, block_size)``  ``DequantizeLinear(codes, scale)``
``dequantize_zp(codes, scale, zp, axis, bs)``   ``DequantizeLinear(codes, scale, zp)``
``qdq(x, scale, zp, lo, hi, clip)``             ``[Clip(x, lo, hi) ->] QuantizeLinear ->
                                                DequantizeLinear`` (per tensor)
==============================================  ==========================================

``axis``/``block_size`` are ``DequantizeLinear``'s attributes (opset 21):
a 0-d scale is per tensor, a 1-d one per ``axis``, one of the codes' rank
with ``block_size > 0`` per block along ``axis``. The optional ``Clip`` (in
float, before ``QuantizeLinear``) narrows the container's range to the
quantizer's ``[qmin, qmax]``: clipping ``x`` to ``(qmin - zp) * scale`` and
``(qmax - zp) * scale`` gives the same codes as clamping them, because those
bounds divided by the scale round to the integers ``qmin - zp`` and ``qmax -
zp``.

torch has no 4-bit or unsigned 16-bit tensors, so such codes travel as
int8/uint8/int32 buffers and :func:`retype` rewrites their initialisers to
``INT4``/``UINT4``/``UINT16`` afterwards (packed two codes a byte).

Examples
--------
>>> import torch
>>> register()
>>> codes = torch.tensor([[-3, 1], [2, 7]], dtype=torch.int8)
>>> torch.ops.tnquant_onnx.dequantize(codes, torch.tensor([0.5, 0.25]), 0, 0).tolist()
[[-1.5, 0.5], [0.5, 1.75]]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["register", "translations", "retype", "CONTAINERS", "container", "dequantize_ref"]

#: the ONNX integer code types, in order of preference: name, qmin, qmax, torch carrier
CONTAINERS: tuple[tuple[str, int, int, torch.dtype], ...] = (
    ("int4", -8, 7, torch.int8),
    ("uint4", 0, 15, torch.uint8),
    ("int8", -128, 127, torch.int8),
    ("uint8", 0, 255, torch.uint8),
    ("int16", -(2**15), 2**15 - 1, torch.int16),
    ("uint16", 0, 2**16 - 1, torch.int32),
    ("int32", -(2**31), 2**31 - 1, torch.int32),
)


def container(
    qmin: int, qmax: int, *, int4: bool = True
) -> tuple[str, int, int, torch.dtype] | None:
    """The narrowest ONNX code type holding ``[qmin, qmax]`` (``None``: none does).

    Examples
    --------
    >>> container(-7, 7)[0], container(0, 255)[0], container(-7, 7, int4=False)[0]
    ('int4', 'uint8', 'int8')
    >>> container(0, 15, int4=False)[0]
    'uint8'
    """
    unsigned_first = sorted(CONTAINERS, key=lambda e: not e[0].startswith("u"))
    for entry in unsigned_first if qmin >= 0 else CONTAINERS:
        name, lo, hi, _ = entry
        if not int4 and name.endswith("int4"):
            continue
        if lo <= qmin and qmax <= hi:
            return entry
    return None


def dequantize_ref(
    codes: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int, block_size: int
) -> Tensor:
    """``(codes - zp) * scale`` with ONNX ``DequantizeLinear``'s broadcasting rules, in torch.

    Examples
    --------
    >>> codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.int8)
    >>> dequantize_ref(codes, torch.tensor([[1.0, 0.5]]), None, 1, 2).tolist()
    [[1.0, 2.0, 1.5, 2.0]]
    """
    q = codes.to(scale.dtype)
    s, z = scale, zero_point
    if scale.ndim == 1 and codes.ndim > 1:
        view = [1] * codes.ndim
        view[axis] = -1
        s = s.reshape(view)
        z = None if z is None else z.reshape(view)
    elif block_size > 0:
        s = s.repeat_interleave(block_size, dim=axis)
        z = None if z is None else z.repeat_interleave(block_size, dim=axis)
    if z is not None:
        q = q - z.to(scale.dtype)
    return q * s


@functools.cache
def register() -> None:
    """Define the ``tnquant_onnx`` ops (once per process; the first export calls it).

    Examples
    --------
    >>> register()
    >>> hasattr(torch.ops.tnquant_onnx, "qdq")
    True
    """

    @torch.library.custom_op("tnquant_onnx::dequantize", mutates_args=())
    def dequantize(codes: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor:
        return dequantize_ref(codes, scale, None, axis, block_size)

    @torch.library.custom_op("tnquant_onnx::dequantize_zp", mutates_args=())
    def dequantize_zp(
        codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int
    ) -> Tensor:
        return dequantize_ref(codes, scale, zero_point, axis, block_size)

    @torch.library.custom_op("tnquant_onnx::qdq", mutates_args=())
    def qdq(
        x: Tensor, scale: Tensor, zero_point: Tensor, lo: float, hi: float, clip: bool
    ) -> Tensor:
        lo_t, hi_t = scale.new_tensor(lo), scale.new_tensor(hi)
        info = torch.iinfo(zero_point.dtype)
        t = x.clamp(lo_t, hi_t) if clip else x
        zp = zero_point.to(x.dtype)
        q = (torch.round(t / scale) + zp).clamp(info.min, info.max)
        return (q - zp) * scale

    def fake_dq(codes: Tensor, scale: Tensor, *rest: Any) -> Tensor:
        return codes.new_empty(codes.shape, dtype=scale.dtype)

    dequantize.register_fake(fake_dq)
    dequantize_zp.register_fake(fake_dq)
    qdq.register_fake(lambda x, *rest: torch.empty_like(x))


def translations() -> dict[Any, Callable[..., Any]]:
    """The ``custom_translation_table`` of ``torch.onnx.export`` for the three ops.

    Examples
    --------
    >>> sorted(str(k) for k in translations())
    ['tnquant_onnx.dequantize.default', 'tnquant_onnx.dequantize_zp.default', \
'tnquant_onnx.qdq.default']
    """
    from onnxscript import opset21 as op

    register()

    def dq(codes: Any, scale: Any, axis: int, block_size: int) -> Any:
        return op.DequantizeLinear(codes, scale, axis=axis, block_size=block_size)

    def dq_zp(codes: Any, scale: Any, zero_point: Any, axis: int, block_size: int) -> Any:
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)

    def qdq(x: Any, scale: Any, zero_point: Any, lo: float, hi: float, clip: bool) -> Any:
        if clip:
            x = op.Clip(x, op.Constant(value_float=lo), op.Constant(value_float=hi))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    ops = torch.ops.tnquant_onnx
    return {ops.dequantize.default: dq, ops.dequantize_zp.default: dq_zp, ops.qdq.default: qdq}


def retype(model: Any, targets: dict[str, str]) -> list[str]:
    """Rewrite the initialisers named in ``targets`` to their ONNX code type, in place.

    ``targets`` maps an initialiser name to ``'int4'``, ``'uint4'`` or
    ``'uint16'``; the values must fit (they are the codes of those types).
    Returns the names not found (the caller says what that means).

    Examples
    --------
    >>> import numpy as np
    >>> from onnx import helper, numpy_helper
    >>> g = helper.make_graph([], "g", [], [], [numpy_helper.from_array(
    ...     np.array([-8, 7, 1], dtype=np.int8), "w")])
    >>> m = helper.make_model(g)
    >>> retype(m, {"w": "int4"}), m.graph.initializer[0].data_type  # TensorProto.INT4
    ([], 22)
    """
    import ml_dtypes
    import numpy as np
    from onnx import numpy_helper

    kinds = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "uint16": np.uint16}
    found = set()
    for init in model.graph.initializer:
        target = targets.get(init.name)
        if target is None:
            continue
        values = numpy_helper.to_array(init).astype(np.int64)
        new = numpy_helper.from_array(values.astype(kinds[target]), init.name)
        init.CopyFrom(new)
        found.add(init.name)
    return [name for name in targets if name not in found]
