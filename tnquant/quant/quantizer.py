"""``Quantizer``: the module that fake-quantizes one tensor under any spec.

States
------
``mode`` is one of :data:`MODES`:

- ``'quantize'`` (the default): the output is fake-quantized. Which qparams:

  - **stored** ones once the quantizer is *initialized* (by :meth:`freeze`,
    by the first call of a learnable quantizer, or by loading a state dict);
  - otherwise **dynamic** ones, computed from each input (weights): for a
    ``QuantSpec`` with ``spec.observer`` applied to that one tensor, for
    ``Binary``/``Ternary`` from the tensor (XNOR ``mean|W|``, TWN).

  ``FixedPoint`` and float-format ``QuantSpec`` s have no qparams to store.
- ``'observe'``: the observer (``QuantSpec`` only) records the input, and the
  input is returned unchanged (calibration).
- ``'off'``: identity.

Transitions (each returns the quantizer): :meth:`observe`, :meth:`freeze`
(store qparams from the observer or from a given tensor, then
``'quantize'``), :meth:`enable` (``'quantize'``), :meth:`disable`
(``'off'``), :meth:`reset` (forget stored qparams and observations).

Learnable specs hold ``nn.Parameter`` s (``learnable`` is ignored by
float-format specs): ``QuantSpec(learnable=True)``
trains its scale with LSQ (and, affine, its zero point with LSQ+, as a float
rounded in the forward pass); ``Binary(learnable=True)`` its ``alpha``;
``Ternary(method='ttq')`` ``alpha_p``/``alpha_n`` (``scale``/``scale_neg``);
``Codebook(learnable=True)`` its entries (``codebook``) and block scales
(``|p|`` rounded to ``spec.scale_dtype`` with a straight-through gradient).
They are initialised on the first quantizing call from the calibrated
observer if it saw data, else from that input with ``spec.observer``
(min-max by default; TWN/XNOR for ternary/binary). The effective scale is
``|p|`` (at least the smallest normal number), snapped to a power of two
with a straight-through gradient for ``scale='pow2'`` (``QuantSpec``: by its
``pow2_rounding``; ``Binary``/``Ternary``: ``k = round(log2 |p|)``, as their
data-derived scales are).

Exactness: for a given input, ``forward(x)`` equals
``dequantize(*quantize_codes(x))`` bitwise (except stochastic rounding,
which draws anew on every call).

State dict: scales, zero points, the tensor shape and the mode are tensors
(``mode_id``); they load into a fresh ``Quantizer(spec)`` whose tensors are
still empty (they are resized on load).

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> from tnquant.quant.primitives import dequantize
>>> q = Quantizer(QuantSpec(bits=8, symmetric=False)).observe()
>>> _ = q(torch.randn(16, 4)); _ = q(torch.randn(16, 4))
>>> q.freeze().mode, q.initialized
('quantize', True)
>>> x = torch.randn(3, 4)
>>> torch.equal(q(x), dequantize(*q.quantize_codes(x)))
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tnquant.quant.binary import POW2_ROUNDING
from tnquant.quant.codebook import scale_torch_dtype
from tnquant.quant.observers import Observer, estimate_qparams, make_observer, resize_for_load
from tnquant.quant.primitives import (
    HANDLERS,
    choose_qparams,
    code_dtype,
    fake_quantize_blocks,
    quantize,
    rebind_qparams,
)
from tnquant.quant.qparams import QParams, block_size
from tnquant.quant.ste import lsq_grad_scale, pow2_ste
from tnquant.specs import Binary, Codebook, QuantSpec, Ternary

__all__ = ["Quantizer", "MODES"]

#: The states of a :class:`Quantizer`, in ``mode_id`` order.
MODES = ("quantize", "observe", "off")


def _stores_qparams(spec: Any) -> bool:
    if isinstance(spec, QuantSpec):
        return spec.dtype is None
    return isinstance(spec, (Binary, Ternary, Codebook))


def _is_learnable(spec: Any) -> bool:
    return _stores_qparams(spec) and bool(spec.learnable)


class Quantizer(nn.Module):
    """Fake-quantizes its input under ``spec`` (see the module docs for the states).

    Parameters
    ----------
    spec
        ``QuantSpec``, ``Binary``, ``Ternary`` or ``FixedPoint``.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> q = Quantizer(QuantSpec(bits=4, learnable=True))
    >>> y = q(torch.linspace(-1, 1, 8))  # initialises the LSQ scale
    >>> isinstance(q.scale, torch.nn.Parameter), q.scale.shape
    (True, torch.Size([1]))
    """

    scale: Tensor
    zero_point: Tensor
    scale_neg: Tensor
    codebook: Tensor
    tensor_shape: Tensor
    mode_id: Tensor

    def __init__(self, spec: Any) -> None:
        super().__init__()
        if type(spec) not in HANDLERS:
            valid = [t.__name__ for t in HANDLERS]
            raise TypeError(f"spec must be one of {valid}, got {type(spec).__name__}")
        self.spec = spec
        self.learnable = _is_learnable(spec)
        self.observer: Observer | None = None
        if isinstance(spec, QuantSpec) and spec.dtype is None:
            self.observer = make_observer(spec)
        self._slots: tuple[str, ...] = ()
        if _stores_qparams(spec):
            self._slots = ("scale",)
            if isinstance(spec, QuantSpec) and not spec.symmetric:
                self._slots += ("zero_point",)
            if isinstance(spec, Ternary) and spec.method == "ttq":
                self._slots += ("scale_neg",)
            if isinstance(spec, Codebook):
                self._slots += ("codebook",)
        for name in self._slots:
            if self.learnable:
                self.register_parameter(name, nn.Parameter(torch.empty(0)))
            else:
                self.register_buffer(name, torch.empty(0))
        self.register_buffer("tensor_shape", torch.empty(0, dtype=torch.int64))
        self.register_buffer("mode_id", torch.zeros((), dtype=torch.int8))
        self._mode = "quantize"
        self._shape: tuple[int, ...] | None = None

    # ----------------------------------------------------------------- state
    @property
    def mode(self) -> str:
        """``'quantize'``, ``'observe'`` or ``'off'``."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {value!r}")
        if value == "observe" and self.observer is None:
            raise ValueError(
                f"a {type(self.spec).__name__} quantizer has no observer: its scale comes from "
                "each tensor (Binary, Ternary) or from the format (FixedPoint, float dtypes); "
                "observe() applies to integer QuantSpecs"
            )
        self._mode = value
        self.mode_id.fill_(MODES.index(value))

    @property
    def initialized(self) -> bool:
        """Whether stored qparams are used (else they are computed per call)."""
        return self._shape is not None

    @property
    def dynamic(self) -> bool:
        """Whether ``'quantize'`` computes qparams from every input."""
        return bool(self._slots) and not self.initialized

    def observe(self) -> Quantizer:
        """Switch to ``'observe'``: record inputs, return them unchanged.

        Examples
        --------
        >>> import torch
        >>> from tnquant import QuantSpec
        >>> q = Quantizer(QuantSpec()).observe()
        >>> x = torch.randn(3)
        >>> q(x) is x, q.observer.num_batches.item()
        (True, 1)
        """
        self.mode = "observe"
        return self

    def enable(self) -> Quantizer:
        """Switch to ``'quantize'``.

        Examples
        --------
        >>> from tnquant import QuantSpec
        >>> Quantizer(QuantSpec()).disable().enable().mode
        'quantize'
        """
        self.mode = "quantize"
        return self

    def disable(self) -> Quantizer:
        """Switch to ``'off'`` (identity).

        Examples
        --------
        >>> import torch
        >>> from tnquant import QuantSpec
        >>> x = torch.randn(3)
        >>> Quantizer(QuantSpec(bits=2)).disable()(x) is x
        True
        """
        self.mode = "off"
        return self

    def freeze(self, x: Tensor | None = None, *, qparams: QParams | None = None) -> Quantizer:
        """Store qparams (``qparams`` if given, from ``x`` if given, else from the observer).

        Then ``'quantize'``.

        A learnable quantizer takes them as the starting point of training.
        ``FixedPoint`` and float formats have nothing to store.

        Examples
        --------
        >>> import torch
        >>> from tnquant import QuantSpec
        >>> q = Quantizer(QuantSpec(bits=4)).freeze(torch.tensor([-7.0, 3.0]))
        >>> q.initialized, q.qparams().scale.item()
        (True, 1.0)
        """
        if self._slots:
            if qparams is not None:
                qp = qparams
            elif x is not None:
                qp = self._tensor_qparams(x)
            elif self.observer is not None and self.observer.has_data:
                qp = self.observer.compute_qparams()
            else:
                raise ValueError(
                    "freeze() needs a tensor x, or observed data (call observe() "
                    "and run batches first)"
                )
            self._store(qp)
        self.mode = "quantize"
        return self

    def reset(self) -> Quantizer:
        """Forget stored qparams and observations (learnables re-initialise).

        Examples
        --------
        >>> import torch
        >>> from tnquant import QuantSpec
        >>> Quantizer(QuantSpec()).freeze(torch.ones(2)).reset().dynamic
        True
        """
        for name in self._slots:
            self._assign(name, torch.empty(0, device=self.tensor_shape.device))
        self.tensor_shape = torch.empty(0, dtype=torch.int64, device=self.tensor_shape.device)
        self._shape = None
        if self.observer is not None:
            self.observer.reset()
        return self

    # ------------------------------------------------------------- qparams
    def _assign(self, name: str, value: Tensor) -> None:
        if self.learnable:
            getattr(self, name).data = value
        else:
            setattr(self, name, value)

    def _store(self, qp: QParams) -> None:
        with torch.no_grad():
            self._assign("scale", qp.scale.detach().clone())
            if "zero_point" in self._slots:
                zp = qp.zero_point
                if zp is None:
                    raise ValueError("an affine quantizer needs qparams with a zero point")
                dtype = qp.scale.dtype if self.learnable else code_dtype(qp.qmin, qp.qmax)
                self._assign("zero_point", zp.detach().to(dtype).clone())
            if "scale_neg" in self._slots:
                neg = qp.scale if qp.scale_neg is None else qp.scale_neg
                self._assign("scale_neg", neg.detach().clone())
            if "codebook" in self._slots:
                if qp.codebook is None:
                    raise ValueError("a Codebook quantizer needs qparams with a codebook")
                self._assign("codebook", qp.codebook.detach().clone())
        self._shape = tuple(qp.shape)
        self.tensor_shape = torch.tensor(self._shape, dtype=torch.int64, device=qp.scale.device)

    def _tensor_qparams(self, x: Tensor) -> QParams:
        """QParams computed from ``x`` alone (the dynamic ones)."""
        if isinstance(self.spec, QuantSpec):
            return estimate_qparams(x.detach(), self.spec)
        return HANDLERS[type(self.spec)].choose(x.detach(), self.spec)

    def _effective(self, name: str) -> Tensor:
        value = getattr(self, name)
        if not self.learnable:
            return value
        if isinstance(self.spec, Codebook):
            # |p| rounded to the stored scale dtype (straight-through); 0 stays 0
            value = value.abs()
            stored = value.to(scale_torch_dtype(self.spec)).to(value.dtype)
            return value + (stored - value).detach()
        value = value.abs().clamp_min(torch.finfo(value.dtype).tiny)
        if self.spec.scale == "pow2":
            rounding = (
                self.spec.pow2_rounding if isinstance(self.spec, QuantSpec) else POW2_ROUNDING
            )
            value = pow2_ste(value, rounding)
        return value

    def _stored_qparams(self, x: Tensor | None, differentiable: bool) -> QParams:
        spec = self.spec
        shape = self._shape if self._shape is not None else ()
        scale = self._effective("scale")
        zp = scale_neg = None
        if "zero_point" in self._slots:
            zp = self.zero_point
            if self.learnable and not differentiable:
                zp = torch.round(zp.clamp(spec.qmin, spec.qmax)).to(
                    code_dtype(spec.qmin, spec.qmax)
                )
        if "scale_neg" in self._slots:
            scale_neg = self._effective("scale_neg")
        if not differentiable:
            scale = scale.detach()
            scale_neg = None if scale_neg is None else scale_neg.detach()
        codebook = None
        if "codebook" in self._slots:
            codebook = self.codebook if differentiable else self.codebook.detach()
        if isinstance(spec, (QuantSpec, Codebook)):
            qmin, qmax = spec.qmin, spec.qmax
        else:
            qmin, qmax = -1, 1
        qp = QParams(
            scale,
            zp,
            qmin,
            qmax,
            block_size(shape, spec.granularity, spec.axis),
            shape,
            scale.dtype,
            scale_neg=scale_neg,
            codebook=codebook,
        )
        return qp if x is None else rebind_qparams(qp, tuple(x.shape), x.dtype)

    def qparams(self, x: Tensor | None = None) -> QParams:
        """The qparams the next ``'quantize'`` call uses (for ``x`` when dynamic).

        Examples
        --------
        >>> import torch
        >>> from tnquant import QuantSpec
        >>> Quantizer(QuantSpec(bits=4)).qparams(torch.tensor([-7.0, 1.0])).scale.item()
        1.0
        """
        if self.initialized:
            return self._stored_qparams(x, differentiable=False)
        if x is None:
            raise ValueError("this quantizer computes qparams from each input; pass x")
        if not self._slots:
            return choose_qparams(x, self.spec)
        return self._tensor_qparams(x)

    def quantize_codes(self, x: Tensor, name: str = "tensor") -> tuple[Tensor, QParams]:
        """Integer codes and qparams of ``x``; ``dequantize`` gives ``forward(x)`` exactly.

        Examples
        --------
        >>> import torch
        >>> from tnquant import QuantSpec
        >>> codes, qp = Quantizer(QuantSpec(bits=4)).quantize_codes(torch.tensor([-7.0, 1.0]))
        >>> codes.tolist()
        [-7, 1]
        """
        return quantize(x, self.spec, self.qparams(x), name=name)

    # -------------------------------------------------------------- forward
    def _initialize(self, x: Tensor) -> None:
        if self.observer is not None and self.observer.has_data:
            self._store(self.observer.compute_qparams())
        else:
            self._store(self._tensor_qparams(x))

    def _fake_uniform(self, x: Tensor, qp: QParams, zero_point: Tensor | None) -> Tensor:
        spec = self.spec
        grad_scale = 1.0
        if self.learnable:
            numel = x.numel() // max(qp.scale.numel(), 1)
            grad_scale = lsq_grad_scale(max(numel, 1), spec.qmax)
        return fake_quantize_blocks(
            x,
            qp.scale,
            zero_point,
            qp.block_size,
            qp.qmin,
            qp.qmax,
            rounding=spec.rounding,
            grad_scale=grad_scale,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self._mode == "off":
            return x
        if self._mode == "observe":
            if self.observer is not None:
                self.observer(x)
            return x
        spec = self.spec
        if not self._slots:
            return HANDLERS[type(spec)].fake_quantize(x, spec, None, None)
        if self.learnable and not self.initialized:
            self._initialize(x)
        if not self.initialized:
            qp = self._tensor_qparams(x)
            if isinstance(spec, QuantSpec):
                return self._fake_uniform(x, qp, qp.zero_point)
            return HANDLERS[type(spec)].fake_quantize(x, spec, qp, None)
        qp = self._stored_qparams(x, differentiable=True)
        if isinstance(spec, QuantSpec):
            return self._fake_uniform(x, qp, qp.zero_point)
        return HANDLERS[type(spec)].fake_quantize(x, spec, qp, None)

    # ----------------------------------------------------------- state dict
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        resize_for_load(self, state_dict, prefix, self._slots + ("tensor_shape",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        stored = bool(self._slots) and self.scale.numel() > 0
        self._shape = tuple(int(s) for s in self.tensor_shape.tolist()) if stored else None
        mode = int(self.mode_id)
        self._mode = MODES[mode] if 0 <= mode < len(MODES) else "quantize"

    def extra_repr(self) -> str:
        state = "stored" if self.initialized else ("dynamic" if self._slots else "fixed")
        return f"spec={self.spec!r}, mode={self._mode!r}, qparams={state}"
