"""``FrozenTensor``: one quantized tensor held in real low-bit storage.

:func:`tnquant.convert` replaces every *weight* quantizer of a model by a
``FrozenTensor`` built from that quantizer's codes
(:meth:`~tnquant.quant.Quantizer.quantize_codes`). Its ``forward`` ignores
its argument and returns the dequantized tensor, bitwise equal to what the
fake-quant quantizer returned: the same :func:`~tnquant.quant.dequantize`
arithmetic (:func:`~tnquant.quant.from_mantissa` for ``FixedPoint``).

Converted layout
----------------
Where a ``FrozenTensor`` sits after ``convert``:

- ``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding``: ``weight_quantizer``;
- factorized layers: ``core_quantizers[k]`` for every quantized core ``k``.

The float tensor it replaces is dropped: the layer's ``weight`` (or
``cores[k]``) becomes an empty placeholder ``nn.Parameter`` (``numel() ==
0``, the weight's dtype and device, ``requires_grad=False``). Activation
quantizers stay :class:`~tnquant.quant.Quantizer` modules.

Buffers (persistent: they are the state dict)
    ``packed``
        The codes, flattened row-major, in the container of :attr:`storage`:

        - ``'binary'`` (``Binary``): uint8, one bit per code, ``+1 -> 1``,
          ``-1 -> 0`` (:func:`~tnquant.quant.packing.pack_binary`);
        - ``'packed'``: uint8, ``code_bits`` = 1..8 bits per code (a bit stream),
          the smallest field holding ``[qmin, qmax]``, two's complement when
          ``qmin < 0`` else unsigned, least significant bit first
          (:func:`~tnquant.quant.packing.pack`): integer ``QuantSpec`` s of
          1..8 bits (3 bits take 3 bits), ``Ternary`` (2-bit signed),
          ``FixedPoint`` of width <= 8;
        - ``'int16'`` / ``'int32'`` / ``'int64'``: wider codes (``QuantSpec``
          of 9..16 bits, ``FixedPoint`` up to 64 bits) in that signed dtype,
          as their ``code_bits``-bit pattern (an unsigned code above the
          signed maximum is stored minus ``2**code_bits``);
        - ``'cast'`` (float-format ``QuantSpec``): uint8, the raw bytes of the
          saturated cast tensor (``float8_*``, ``float16``, ``bfloat16``) in
          the machine's (little-endian) byte order.

        A tensor of ``n`` codes takes ``ceil(n * code_bits / 8)`` bytes.
    ``scale``
        Float, the qparam shape (``shape[d] // block_size[d]``), the dtype
        the quantizer used (float32 for float32 weights). Empty (shape
        ``(0,)``) for ``FixedPoint`` and float formats, whose step is fixed by
        the spec.
    ``zero_point``
        Affine ``QuantSpec`` only: the qparam shape; uint8 up to 8 bits,
        int32 above.
    ``scale_neg``
        ``Ternary(method='ttq')`` only: the negative-side scale, like ``scale``.
    ``codebook``
        ``Codebook`` only: the table the (unsigned, ``'packed'``) indices
        address, ``(2^bits,)`` or the qparam shape plus ``(2^bits,)``, in the
        compute dtype; ``scale`` is then the absmax per block in
        ``spec.scale_dtype`` and the value is ``codebook[index] * scale``.

Metadata (plain attributes, all derived from ``spec``, ``shape`` and
``dtype``; :meth:`metadata` / :meth:`from_metadata` give them in JSON-safe
form, with the spec through :func:`tnquant.specs.spec_to_dict`):
``spec``, ``shape``, ``dtype`` (of the dequantized tensor; it follows
``module.to(dtype)``), ``block_size``, ``qmin``, ``qmax``, ``storage``,
``code_bits``, ``signed``, ``cast_dtype``, ``n_codes``.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> from tnquant.quant import Quantizer
>>> w = torch.randn(8, 6)
>>> q = Quantizer(QuantSpec(bits=4, granularity="channel"))
>>> frozen = FrozenTensor.from_quantizer(q, w)
>>> frozen.storage, frozen.code_bits, frozen.packed.dtype, frozen.packed.numel()
('packed', 4, torch.uint8, 24)
>>> torch.equal(frozen(), q(w))
True
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.quant.codebook import codebook_shape
from tnquant.quant.fixed_point import from_mantissa
from tnquant.quant.layout import (
    _WIDE,
    LAYOUTS,
    Layout,
    _block,
    _scale_dtype,
    layout_of,
    spec_summary,
    tensor_bits,
)
from tnquant.quant.observers import resize_for_load
from tnquant.quant.packing import pack, pack_binary, unpack, unpack_binary
from tnquant.quant.primitives import code_dtype, compute_dtype, dequantize
from tnquant.quant.qparams import QParams, expand, qparam_shape, to_blocks
from tnquant.specs import FLOAT_DTYPES, Codebook, FixedPoint, spec_from_dict

__all__ = ["FrozenTensor", "Layout", "LAYOUTS", "layout_of", "spec_summary", "tensor_bits"]

_FLOATS = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _fast_codes(packed: Tensor, bits: int, numel: int, signed: bool) -> Tensor | None:
    """The codes of an 8-bit or 4-bit ``'packed'`` stream without the generic bit loop.

    8 bits: the bytes themselves, viewed (no copy); 4 bits: low nibble, then high
    nibble of each byte, sign-extended by ``(u ^ 8) - 8``. ``None`` otherwise.
    """
    if bits == 8 and packed.numel() == numel:
        return packed.view(torch.int8) if signed else packed.to(torch.int16)
    if bits != 4 or packed.numel() != (numel + 1) // 2:
        return None
    pairs = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(-1)[:numel].view(torch.int8)
    return (pairs ^ 8) - 8 if signed else pairs


class FrozenTensor(nn.Module):
    """A quantized tensor in integer storage; ``forward(_)`` returns its float value.

    Build one with :meth:`from_quantizer` or :meth:`from_codes`; the
    constructor makes a zero-filled skeleton of the right buffer shapes (to
    load a state dict into, e.g. from :meth:`from_metadata`).

    Parameters
    ----------
    spec
        ``QuantSpec``, ``Binary``, ``Ternary`` or ``FixedPoint``.
    shape
        Shape of the tensor it stands for.
    dtype
        Float dtype of the dequantized tensor.
    device
        Where the buffers live.

    Examples
    --------
    >>> import torch
    >>> from tnquant import Binary
    >>> skeleton = FrozenTensor(Binary(), (4, 4))
    >>> skeleton.packed.shape, skeleton.scale.shape
    (torch.Size([2]), torch.Size([1, 1]))
    """

    packed: Tensor
    scale: Tensor
    zero_point: Tensor
    scale_neg: Tensor
    codebook: Tensor
    _anchor: Tensor

    def __init__(
        self,
        spec: Any,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        layout = layout_of(spec)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape must hold sizes >= 0, got {shape}")
        self.spec = spec
        self.shape = shape
        self.storage, self.code_bits, self.signed = layout.storage, layout.code_bits, layout.signed
        self.qmin, self.qmax = layout.qmin, layout.qmax
        self.cast_dtype = FLOAT_DTYPES[spec.dtype] if layout.storage == "cast" else None
        self.block_size = _block(spec, shape)
        self.n_codes = numel = math.prod(shape)
        if layout.storage in ("cast", "binary", "packed"):
            nbytes = (numel * layout.code_bits + 7) // 8
            packed = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        else:
            packed = torch.zeros(numel, dtype=_WIDE[layout.code_bits][1], device=device)
        self.register_buffer("packed", packed)
        qshape = qparam_shape(shape, self.block_size)
        sdtype = _scale_dtype(spec, dtype)
        scale = torch.ones(qshape if layout.has_scale else (0,), dtype=sdtype, device=device)
        self.register_buffer("scale", scale)
        if layout.has_zero_point:
            zdtype = torch.uint8 if layout.qmax <= 255 else torch.int32
            self.register_buffer("zero_point", torch.zeros(qshape, dtype=zdtype, device=device))
        if layout.has_scale_neg:
            self.register_buffer("scale_neg", torch.ones(qshape, dtype=sdtype, device=device))
        if isinstance(spec, Codebook):
            cshape = codebook_shape(spec, shape)
            cdtype = compute_dtype(dtype)
            self.register_buffer("codebook", torch.zeros(cshape, dtype=cdtype, device=device))
        # follows module.to(dtype)/.half(); not stored
        self.register_buffer(
            "_anchor", torch.empty(0, dtype=dtype, device=device), persistent=False
        )

    @classmethod
    def from_codes(cls, codes: Tensor, qparams: QParams, spec: Any) -> FrozenTensor:
        """Store ``codes`` and ``qparams`` as returned by :func:`~tnquant.quant.quantize`.

        Examples
        --------
        >>> import torch
        >>> from tnquant import Ternary
        >>> from tnquant.quant import quantize, dequantize
        >>> w = torch.tensor([[0.9, -0.8, 0.05, 0.7]])
        >>> codes, qp = quantize(w, Ternary())
        >>> frozen = FrozenTensor.from_codes(codes, qp, Ternary())
        >>> frozen.packed.numel(), torch.equal(frozen(), dequantize(codes, qp))
        (1, True)
        """
        if not isinstance(qparams, QParams):
            raise TypeError(f"qparams must be a QParams, got {type(qparams).__name__}")
        if tuple(codes.shape) != tuple(qparams.shape):
            raise ValueError(
                f"codes of shape {tuple(codes.shape)} do not match qparams for "
                f"shape {tuple(qparams.shape)}"
            )
        new = cls(spec, qparams.shape, qparams.dtype, device=codes.device)
        if tuple(qparams.block_size) != new.block_size:
            raise ValueError(
                f"qparams block_size {tuple(qparams.block_size)} does not match the "
                f"spec's {new.block_size} for shape {new.shape}"
            )
        with torch.no_grad():
            new.packed = new._pack(codes.detach())
            if new.scale.numel():
                new.scale = qparams.scale.detach().clone().reshape(new.scale.shape)
            if "zero_point" in new._buffers:
                if qparams.zero_point is None:
                    raise ValueError("an affine spec needs qparams with a zero point")
                zp = qparams.zero_point.detach().round().to(torch.int64)
                new.zero_point = zp.to(new.zero_point.dtype).reshape(new.zero_point.shape)
            if "scale_neg" in new._buffers:
                neg = qparams.scale if qparams.scale_neg is None else qparams.scale_neg
                new.scale_neg = neg.detach().clone().reshape(new.scale_neg.shape)
            if "codebook" in new._buffers:
                if qparams.codebook is None:
                    raise ValueError("a Codebook spec needs qparams with a codebook")
                sdtype = _scale_dtype(new.spec, qparams.dtype)
                new.scale = qparams.scale.detach().to(sdtype).reshape(new.scale.shape)
                cb = qparams.codebook.detach().to(new.codebook.dtype)
                new.codebook = cb.clone().reshape(new.codebook.shape)
        return new

    @classmethod
    def from_quantizer(cls, quantizer: Any, tensor: Tensor, name: str = "tensor") -> FrozenTensor:
        """Freeze ``quantizer``'s quantization of ``tensor`` (no side effects on either).

        Examples
        --------
        >>> import torch
        >>> from tnquant import FixedPoint
        >>> from tnquant.quant import Quantizer
        >>> q = Quantizer(FixedPoint(6, 2))
        >>> w = torch.tensor([0.3, -1.2, 5.0])
        >>> frozen = FrozenTensor.from_quantizer(q, w)
        >>> frozen.code_bits, torch.equal(frozen(), q(w))
        (6, True)
        """
        with torch.no_grad():
            codes, qp = quantizer.quantize_codes(tensor.detach(), name=name)
        return cls.from_codes(codes, qp, quantizer.spec)

    def _pack(self, codes: Tensor) -> Tensor:
        if self.storage == "cast":
            return codes.to(self.cast_dtype).contiguous().reshape(-1).view(torch.uint8).clone()
        if self.storage == "binary":
            return pack_binary(codes)
        if self.storage == "packed":
            return pack(codes, self.code_bits, signed=self.signed)
        c = codes.reshape(-1).to(torch.int64)
        if not self.signed and self.code_bits < 64:
            c = torch.where(c >= (1 << (self.code_bits - 1)), c - (1 << self.code_bits), c)
        return c.to(_WIDE[self.code_bits][1])

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the dequantized tensor."""
        return self._anchor.dtype

    def codes(self) -> Tensor:
        """The integer codes (cast tensor for float formats), in :attr:`shape`.

        Examples
        --------
        >>> import torch
        >>> from tnquant import QuantSpec
        >>> from tnquant.quant import quantize
        >>> codes, qp = quantize(torch.tensor([-1.0, 0.5, 1.0]), QuantSpec(bits=2))
        >>> FrozenTensor.from_codes(codes, qp, QuantSpec(bits=2)).codes().tolist()
        [-1, 0, 1]
        """
        p, n = self.packed, self.n_codes
        if self.storage == "cast":
            return p.view(cast(torch.dtype, self.cast_dtype)).reshape(self.shape)
        if self.storage == "binary":
            return unpack_binary(p, n).reshape(self.shape)
        dtype = code_dtype(self.qmin, self.qmax)
        fast = _fast_codes(p, self.code_bits, n, self.signed)
        if fast is not None and fast.dtype == dtype:
            return fast.reshape(self.shape)
        if self.storage == "packed":
            return unpack(p, self.code_bits, n, signed=self.signed, dtype=dtype).reshape(self.shape)
        c = p.to(torch.int64)
        if not self.signed and self.code_bits < 64:
            c = torch.where(c < 0, c + (1 << self.code_bits), c)
        return c.to(dtype).reshape(self.shape)

    def qparams(self) -> QParams:
        """The qparams that dequantize :meth:`codes` (a fresh ``QParams`` of the buffers).

        Examples
        --------
        >>> from tnquant import QuantSpec
        >>> FrozenTensor(QuantSpec(bits=4, granularity="channel"), (3, 5)).qparams().block_size
        (1, 5)
        """
        zp = None
        if "zero_point" in self._buffers:
            zp = self.zero_point.to(code_dtype(self.qmin, self.qmax))
        scale_neg = self.scale_neg if "scale_neg" in self._buffers else None
        codebook = self.codebook if "codebook" in self._buffers else None
        scale = self.scale
        if not scale.numel():
            ones = (1,) * len(self.shape)
            scale = torch.ones(ones, dtype=compute_dtype(self.dtype), device=self.packed.device)
            if isinstance(self.spec, FixedPoint):
                scale = scale * self.spec.scale
        return QParams(
            scale,
            zp,
            self.qmin,
            self.qmax,
            self.block_size,
            self.shape,
            self.dtype,
            scale_neg=scale_neg,
            cast_dtype=self.cast_dtype,
            codebook=codebook,
        )

    def dequantize(self) -> Tensor:
        """The float tensor (bitwise the fake-quant value the codes came from)."""
        codes = self.codes()
        if isinstance(self.spec, FixedPoint):
            return from_mantissa(codes, self.spec, dtype=self.dtype)
        scale = self.scale
        if (
            self.storage == "packed"
            and scale.numel()
            and not self._buffers.keys() & {"zero_point", "scale_neg", "codebook"}
            and scale.dtype == torch.promote_types(compute_dtype(self.dtype), scale.dtype)
        ):
            # symmetric codes: one fused integer * float multiply, the same value per
            # element as dequantize's codes.to(float) * scale (int -> float is exact)
            out = to_blocks(codes, self.block_size) * expand(scale, self.shape, self.block_size)
            return out.reshape(self.shape).to(self.dtype)
        return dequantize(codes, self.qparams())

    def forward(self, _ignored: Any = None) -> Tensor:
        """Return :meth:`dequantize`; the argument (the dropped float tensor) is ignored."""
        return self.dequantize()

    def nbits(self) -> int:
        """Stored bits: every persistent buffer, ``numel * element bits``.

        Examples
        --------
        >>> from tnquant import QuantSpec
        >>> FrozenTensor(QuantSpec(bits=4), (10, 3)).nbits()  # 15 bytes + one float32 scale
        152
        """
        return sum(
            tensor_bits(b)
            for n, b in self._buffers.items()
            if b is not None and n not in self._non_persistent_buffers_set
        )

    def metadata(self) -> dict[str, Any]:
        """JSON-safe ``{'spec', 'shape', 'dtype'}``; :meth:`from_metadata` rebuilds the skeleton.

        Examples
        --------
        >>> from tnquant import Binary
        >>> FrozenTensor(Binary(), (2, 3)).metadata()["shape"]
        [2, 3]
        """
        from tnquant.specs import spec_to_dict

        return {
            "spec": spec_to_dict(self.spec),
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], device: Any = None) -> FrozenTensor:
        """A zero skeleton from :meth:`metadata`, ready for ``load_state_dict``.

        ``ValueError`` names a missing, unknown or ill-typed field (``meta`` may
        come from a file); ``device='meta'`` allocates nothing.

        Examples
        --------
        >>> from tnquant import QuantSpec
        >>> f = FrozenTensor(QuantSpec(bits=8, symmetric=False), (4,))
        >>> FrozenTensor.from_metadata(f.metadata()).zero_point.dtype
        torch.uint8
        """
        keys = set(meta) if isinstance(meta, dict) else set()
        if not {"spec", "shape"} <= keys <= {"spec", "shape", "dtype"}:
            raise ValueError(f"metadata must hold 'spec', 'shape' (and 'dtype'), got {meta!r:.60}")
        name, shape, data = meta.get("dtype", "float32"), meta["shape"], meta["spec"]
        dtype = _FLOATS.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise ValueError(f"metadata 'dtype' must be one of {list(_FLOATS)}, got {name!r:.60}")
        if not isinstance(shape, (list, tuple)) or any(type(s) is not int or s < 0 for s in shape):
            raise ValueError(f"metadata 'shape' must be a list of ints >= 0, got {shape!r:.60}")
        try:
            spec = spec_from_dict(data) if isinstance(data, dict) else None
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as err:
            raise ValueError(f"metadata 'spec' is not a valid spec: {err}") from None
        if type(spec) not in LAYOUTS:
            raise ValueError(f"metadata 'spec' must be a quantizer spec dict, got {data!r:.60}")
        return cls(spec, tuple(shape), dtype, device=device)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # scales come in the dtype they were saved in
        resize_for_load(self, state_dict, prefix, ("scale", "scale_neg"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{spec_summary(self.spec)}, shape={self.shape}, storage={self.storage!r}, "
            f"code_bits={self.code_bits}, dtype={self.dtype}"
        )
