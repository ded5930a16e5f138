"""Stand-ins for quantized tensors in the ONNX export: weights as codes, activations as QDQ.

:func:`weight_standin` turns one weight or core (with its ``Quantizer``,
``FrozenTensor`` or nothing) into an :class:`OnnxWeight`, a module whose
``forward()`` returns the tensor through a ``DequantizeLinear`` of its integer
codes (:mod:`tnquant.export.onnx_ops`); :func:`act_standin` turns an
activation quantizer into an :class:`OnnxAct` (``QuantizeLinear`` /
``DequantizeLinear``). What ONNX cannot represent exactly is refused with
a ``ValueError`` that names the tensor and the reason.

=================================  =========================================================
weight spec                        ONNX
=================================  =========================================================
``QuantSpec`` (integer)            codes in the narrowest of int4, uint4, int8, uint8,
                                   int16, uint16, int32 holding ``[qmin, qmax]`` (int4/uint4
                                   unless ``int4=False``) + ``DequantizeLinear``: per tensor,
                                   per channel (``axis``), per group (``block_size``)
``FixedPoint``                     the mantissas (int8/16/32) + scale ``2**-(W-I)``
``Binary``, ``Ternary('twn')``     int4 codes in ``{-1, (0,) 1}`` x the scale
``Ternary('ttq')``                 two ``DequantizeLinear`` (positive and negative codes,
                                   each with its scale) added: exact, one is always 0
``QuantSpec(dtype=float8_*)``      float8 codes + ``DequantizeLinear`` (scale 1)
``QuantSpec(dtype=float16/bf16)``  a float16/bfloat16 initialiser + ``Cast``
no quantizer, or mode ``'off'``    the float tensor
=================================  =========================================================

Activations: a calibrated, per-tensor integer ``QuantSpec`` with round to
nearest even (``QuantizeLinear``'s rounding) or a ``FixedPoint`` with
``RND_CONV``/``SAT``: QDQ with a uint8/int16/uint16 zero point (signed codes
of at most 8 bits are shifted to uint8, zero point + 128: the same values, and
the type onnxruntime's QDQ passes handle; its int8 -> uint8 rewrite mistypes
the ``QuantizeLinear`` it moves past a ``Reshape``) and a float ``Clip`` first
where ``[qmin, qmax]`` is narrower than the type; a float
format: a saturating ``Clip`` + ``Cast`` there and back. Refused: dynamic
(uncalibrated) ranges, other rounding modes, per-channel/group ranges,
``Binary``/``Ternary`` activations, quantizers still observing.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> from tnquant.quant import Quantizer
>>> w = torch.randn(4, 64)
>>> s = weight_standin("fc.weight", w, Quantizer(QuantSpec(bits=4, granularity=("group", 32),
...                                                          axis=1)))
>>> s.onnx_type, s.layout, tuple(s.scale.shape), s.block_size
('int4', 'block', (4, 2), 32)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tnquant.export.onnx_ops import container
from tnquant.quant.frozen import FrozenTensor, spec_summary
from tnquant.quant.quantizer import Quantizer
from tnquant.specs import Binary, FixedPoint, QuantSpec, Ternary

__all__ = ["OnnxWeight", "OnnxAct", "weight_standin", "act_standin"]


def _scale_layout(
    name: str, shape: tuple[int, ...], block: tuple[int, ...], scale: Tensor
) -> tuple[str, Tensor, int, int]:
    """``(layout, onnx-shaped scale, axis, block_size)`` of a block layout."""
    split = [d for d, (s, b) in enumerate(zip(shape, block, strict=True)) if b != s]
    if not split:
        return "tensor", scale.reshape(()), 0, 0
    if len(split) == 1:
        d = split[0]
        if block[d] == 1 and all(
            b == s for k, (s, b) in enumerate(zip(shape, block, strict=True)) if k != d
        ):
            return "channel", scale.reshape(-1), d, 0
    grouped = [d for d, b in enumerate(block) if b != 1]
    if len(grouped) == 1 and all(block[d] == 1 for d in range(len(shape)) if d != grouped[0]):
        d = grouped[0]
        return (
            "block",
            scale.reshape([s // b for s, b in zip(shape, block, strict=True)]),
            d,
            block[d],
        )
    raise ValueError(
        f"{name}: blocks {block} of a tensor of shape {shape} split more than one axis; "
        f"ONNX DequantizeLinear takes one scale per tensor, per axis or per block along one axis"
    )


class OnnxWeight(nn.Module):
    """One exported weight: its codes, scale and zero point (or the float tensor).

    ``forward()`` returns the dequantized tensor through the ``tnquant_onnx``
    ops; ``onnx_type`` names the codes' ONNX type (``'float'`` when not
    quantized), ``layout`` the scale's (``'tensor'``, ``'channel'``,
    ``'block'``) and ``spec`` the quantizer's summary.

    Examples
    --------
    >>> import torch
    >>> OnnxWeight.float_tensor("b", torch.ones(3))().tolist()
    [1.0, 1.0, 1.0]
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    codes_neg: Tensor
    scale_neg: Tensor
    value: Tensor

    def __init__(self, name: str, kind: str, onnx_type: str, spec: str) -> None:
        super().__init__()
        self.tensor_name, self.kind, self.onnx_type, self.spec = name, kind, onnx_type, spec
        self.layout, self.axis, self.block_size = "tensor", 0, 0
        self.cast_to: torch.dtype = torch.float32

    @classmethod
    def float_tensor(cls, name: str, tensor: Tensor) -> OnnxWeight:
        """A tensor kept in float (no quantizer, or one switched off)."""
        new = cls(name, "float", "float", "float")
        new.register_buffer("value", tensor.detach().clone())
        return new

    def forward(self) -> Tensor:
        ops = torch.ops.tnquant_onnx
        if self.kind == "float":
            return self.value
        if self.kind == "cast":
            return self.codes.to(self.cast_to)
        axis, block = self.axis, self.block_size
        parts = [(self.codes, self.scale)]
        if self.kind == "two-sided":
            parts.append((self.codes_neg, self.scale_neg))
        zp = self._buffers.get("zero_point")
        outs = [
            ops.dequantize(c, s, axis, block)
            if zp is None
            else ops.dequantize_zp(c, s, zp, axis, block)
            for c, s in parts
        ]
        return outs[0] if len(outs) == 1 else outs[0] + outs[1]

    def n_bytes(self) -> int:
        """Bytes its initialisers take in the file (int4/uint4 packed two a byte)."""
        bits = {"int4": 4, "uint4": 4, "uint16": 16, "float": 32}
        total = 0
        for key, buf in self._buffers.items():
            if buf is None:
                continue
            if key.startswith("codes") or key == "zero_point":
                width = bits.get(self.onnx_type, buf.element_size() * 8)
                total += (buf.numel() * width + 7) // 8
            else:
                total += buf.numel() * buf.element_size()
        return total


def _frozen(name: str, tensor: Tensor, quantizer: Any) -> FrozenTensor:
    if isinstance(quantizer, FrozenTensor):
        return quantizer
    if quantizer.mode == "observe":
        raise ValueError(
            f"{name}: its quantizer is still observing; finish calibration "
            f"(tnquant.calibrate, or freeze()) before exporting"
        )
    if getattr(quantizer.spec, "rounding", None) == "stochastic":
        raise ValueError(
            f"{name}: stochastic rounding draws new codes on every call; run "
            f"tnquant.convert(model) first (it draws them once), then export"
        )
    with torch.no_grad():
        frozen = FrozenTensor.from_quantizer(quantizer, tensor, name=name)
        if not torch.equal(frozen(), quantizer(tensor)):
            raise RuntimeError(f"{name}: its codes do not reproduce the fake-quant values")
    return frozen


def _check_float32(name: str, dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        raise ValueError(
            f"{name}: the ONNX export writes float32 models (DequantizeLinear's float "
            f"output), got a {dtype} tensor; export model.float()"
        )


def weight_standin(name: str, tensor: Tensor, quantizer: Any, *, int4: bool = True) -> OnnxWeight:
    """The :class:`OnnxWeight` of ``tensor`` under ``quantizer`` (see the module docs).

    Parameters
    ----------
    name
        The tensor's name in the model (``'fc1.weight'``, ``'0.cores.1'``), for messages.
    tensor
        The float tensor (ignored when ``quantizer`` is a ``FrozenTensor``).
    quantizer
        A ``Quantizer``, a ``FrozenTensor``, ``nn.Identity`` or ``None``.
    int4
        Allow int4/uint4 codes (opset 21); else int8/uint8 hold them.

    Examples
    --------
    >>> import torch
    >>> from tnquant import Ternary
    >>> from tnquant.quant import Quantizer
    >>> s = weight_standin("w", torch.randn(3, 8), Quantizer(Ternary(method="ttq")))
    >>> s.kind, s.onnx_type
    ('two-sided', 'int4')
    """
    if quantizer is None or isinstance(quantizer, nn.Identity):
        _check_float32(name, tensor.dtype)
        return OnnxWeight.float_tensor(name, tensor)
    if isinstance(quantizer, Quantizer) and quantizer.mode == "off":
        _check_float32(name, tensor.dtype)
        return OnnxWeight.float_tensor(name, tensor)
    if not isinstance(quantizer, (Quantizer, FrozenTensor)):
        raise TypeError(
            f"{name}: expected a Quantizer, a FrozenTensor or None as its quantizer, "
            f"got {type(quantizer).__name__}"
        )
    frozen = _frozen(name, tensor, quantizer)
    _check_float32(name, frozen.dtype)
    spec, codes = frozen.spec, frozen.codes()
    if frozen.storage == "cast":
        return _cast_weight(name, spec, codes)
    qp = frozen.qparams()
    found = container(frozen.qmin, frozen.qmax, int4=int4)
    if found is None:
        raise ValueError(
            f"{name}: codes in [{frozen.qmin}, {frozen.qmax}] fit no ONNX DequantizeLinear "
            f"input type (int32 at most)"
        )
    onnx_type, _, _, carrier = found
    scale = qp.scale.detach().to(torch.float32)
    if not bool((torch.isfinite(scale) & ((scale == 0) | (scale.abs() >= 2.0**-126))).all()):
        raise ValueError(
            f"{name}: a scale is not a normal float32 number ({scale.min().item():.3g}); "
            f"DequantizeLinear would not reproduce it"
        )
    layout, scale, axis, block = _scale_layout(name, frozen.shape, qp.block_size, scale)
    kind = "affine" if qp.zero_point is not None else "symmetric"
    if qp.scale_neg is not None:
        kind = "two-sided"
    new = OnnxWeight(name, kind, onnx_type, spec_summary(spec))
    new.layout, new.axis, new.block_size = layout, axis, block
    new.register_buffer("scale", scale.contiguous())
    if qp.scale_neg is not None:
        neg = _scale_layout(name, frozen.shape, qp.block_size, qp.scale_neg.detach())[1]
        new.register_buffer("codes", codes.clamp_min(0).to(carrier))
        new.register_buffer("codes_neg", codes.clamp_max(0).to(carrier))
        new.register_buffer("scale_neg", neg.to(torch.float32).contiguous())
    else:
        new.register_buffer("codes", codes.to(carrier))
    if qp.zero_point is not None:
        zp = _scale_layout(name, frozen.shape, qp.block_size, qp.zero_point.detach())[1]
        new.register_buffer("zero_point", zp.to(torch.int64).to(carrier).contiguous())
    # a symmetric tensor gets no zero point: with one, onnxruntime fuses the QDQ group
    # around a Gemm into its QGemm integer kernel, which is not exact (on AVX2 it
    # saturates u8 x s8 products: 18 output steps on a small MLP)
    return new


def _cast_weight(name: str, spec: QuantSpec, codes: Tensor) -> OnnxWeight:
    fmt = str(spec.dtype)
    if fmt.startswith("float8"):
        new = OnnxWeight(name, "symmetric", fmt, spec_summary(spec))
        new.register_buffer("codes", codes.contiguous())
        new.register_buffer("scale", torch.ones((), dtype=torch.float32))
        return new
    new = OnnxWeight(name, "cast", fmt, spec_summary(spec))
    new.register_buffer("codes", codes.contiguous())
    return new


class OnnxAct(nn.Module):
    """One exported activation quantizer: QDQ (``'int'``) or a saturating cast (``'cast'``).

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> from tnquant.quant import Quantizer
    >>> q = Quantizer(QuantSpec(bits=6)).freeze(torch.tensor([-1.0, 1.0]))
    >>> a = act_standin("fc.input", q)
    >>> a.onnx_type, a.clip, a.zero_point.item()  # int6 codes, shifted to uint8
    ('uint8', True, 128)
    """

    scale: Tensor
    zero_point: Tensor

    def __init__(self, name: str, kind: str, onnx_type: str, spec: str) -> None:
        super().__init__()
        self.tensor_name, self.kind, self.onnx_type, self.spec = name, kind, onnx_type, spec
        self.lo, self.hi, self.clip = 0.0, 0.0, False
        self.cast_dtype: torch.dtype = torch.float16

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "cast":
            info = torch.finfo(self.cast_dtype)
            return x.clamp(info.min, info.max).to(self.cast_dtype).to(x.dtype)
        return torch.ops.tnquant_onnx.qdq(
            x, self.scale, self.zero_point, self.lo, self.hi, self.clip
        )


def _refuse_act(name: str, why: str) -> ValueError:
    return ValueError(f"{name}: {why}; ONNX QuantizeLinear cannot represent it exactly")


def act_standin(name: str, quantizer: Any) -> OnnxAct | None:
    """The :class:`OnnxAct` of an activation quantizer (``None``: identity).

    Examples
    --------
    >>> from tnquant import QuantSpec
    >>> from tnquant.quant import Quantizer
    >>> act_standin("x", Quantizer(QuantSpec(bits=8)))
    Traceback (most recent call last):
    ...
    ValueError: x: its range is computed from every input (not calibrated); run \
tnquant.calibrate(model, data) before exporting
    """
    if quantizer is None or isinstance(quantizer, nn.Identity):
        return None
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"{name}: expected a Quantizer, got {type(quantizer).__name__}")
    if quantizer.mode == "off":
        return None
    if quantizer.mode == "observe":
        raise ValueError(f"{name}: its quantizer is still observing; finish calibration first")
    spec = quantizer.spec
    if isinstance(spec, (Binary, Ternary)):
        raise _refuse_act(name, f"a {type(spec).__name__} activation quantizer has no QDQ form")
    if isinstance(spec, QuantSpec) and spec.dtype is not None:
        act = OnnxAct(name, "cast", str(spec.dtype), spec_summary(spec))
        act.cast_dtype = spec.torch_dtype or torch.float16
        return act
    if isinstance(spec, FixedPoint):
        if (spec.rounding, spec.overflow) != ("RND_CONV", "SAT"):
            raise _refuse_act(
                name,
                f"{spec} rounds with {spec.rounding} and overflows with {spec.overflow} "
                f"(QuantizeLinear rounds half to even and saturates: RND_CONV, SAT)",
            )
        qmin, qmax = spec.qmin, spec.qmax
        scale, zp = (
            torch.tensor(spec.scale, dtype=torch.float32),
            torch.zeros((), dtype=torch.int64),
        )
    else:
        if spec.rounding != "nearest_even":
            raise _refuse_act(
                name, f"rounding={spec.rounding!r} (QuantizeLinear rounds half to even)"
            )
        if quantizer.dynamic:
            raise ValueError(
                f"{name}: its range is computed from every input (not calibrated); "
                f"run tnquant.calibrate(model, data) before exporting"
            )
        qp = quantizer.qparams()
        if qp.scale.numel() != 1:
            raise _refuse_act(
                name, f"a {spec.granularity!r} activation range ({qp.scale.numel()} scales)"
            )
        qmin, qmax = qp.qmin, qp.qmax
        scale = qp.scale.detach().reshape(()).to(torch.float32)
        zp = torch.zeros((), dtype=torch.int64)
        if qp.zero_point is not None:
            zp = qp.zero_point.detach().reshape(()).round().to(torch.int64)
    if qmin < 0 and qmax <= 127 and qmin >= -128:
        # int8 codes shifted to uint8 (zero point + 128): the same values, and the
        # type onnxruntime's QDQ passes handle (its s8 -> u8 rewrite mistypes the
        # QuantizeLinear it inserts past a Reshape)
        qmin, qmax, zp = qmin + 128, qmax + 128, zp + 128
    found = container(qmin, qmax, int4=False)
    if found is None or found[0] == "int32":
        raise _refuse_act(name, f"codes in [{qmin}, {qmax}] need more than 16 bits")
    onnx_type, lo, hi, carrier = found
    act = OnnxAct(name, "int", onnx_type, spec_summary(spec))
    act.register_buffer("scale", scale.clone())
    act.register_buffer("zero_point", zp.to(carrier))
    act.clip = (qmin, qmax) != (lo, hi)
    z = float(zp)
    act.lo = float(torch.tensor(qmin - z) * scale)
    act.hi = float(torch.tensor(qmax - z) * scale)
    return act
