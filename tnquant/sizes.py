"""``model_size_bits`` and ``size_report``: every bit a model stores.

Counting rules
--------------
Every tensor once (shared ones once), ``numel * element bits`` as stored:

- a weight under an active weight quantizer (mode not ``'off'``): what
  :func:`tnquant.convert` stores for it (once converted: its
  :class:`~tnquant.quant.frozen.FrozenTensor` buffers): the codes at their
  packed width in whole bytes per tensor (``ceil(n * code_bits / 8)``),
  ``scale`` (32 bits each for float32; pow2 scales are float32 too),
  ``zero_point`` (8 bits up to 8-bit codes, else 32), ``scale_neg``; the
  empty placeholder left for the float weight counts nothing. So a
  fake-quant model counts what it will store, and ``convert`` does not
  change the number;
- activation quantizers: their stored ``scale``/``zero_point`` (none while
  uncalibrated);
- every other parameter and persistent buffer at its dtype width: biases,
  unquantized layers, norms (``BatchNorm``'s int64 ``num_batches_tracked``
  too).

Quantizer bookkeeping (mode, shapes, observer statistics) and specs are
metadata and not counted.

A model on the meta device (shapes, no values) is counted too: a weight
under a quantizer counts the layout ``convert`` would store for its spec,
shape and dtype.

Examples
--------
>>> from torch import nn
>>> model_size_bits(nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)))  # 10+8 float32, 1 int64
640
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from tnquant.core.modules import join
from tnquant.quant.frozen import FrozenTensor, tensor_bits
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import lookup, quant_state, weight_pairs
from tnquant.report import Report

__all__ = ["model_size_bits", "size_report", "SizeCounter"]

_QPARAM_NAMES = ("scale", "zero_point", "scale_neg")
_COLUMNS = ("name", "kind", "state", "codes_bits", "qparams_bits", "other_bits", "size_bits")


def _persistent(module: nn.Module) -> Iterable[Tensor]:
    for p in module._parameters.values():
        if p is not None:
            yield p
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield b


def _frozen_of(q: Quantizer, t: Tensor, name: str) -> FrozenTensor:
    """What ``convert`` stores for ``t``; for a meta tensor, the skeleton of that layout.

    The buffers' shapes and dtypes depend on the spec, the shape and the dtype
    only, so a model on the meta device (no values to quantize) is counted
    without allocating anything.
    """
    if t.is_meta:
        return FrozenTensor(q.spec, tuple(t.shape), t.dtype, device="meta")
    return FrozenTensor.from_quantizer(q, t, name=name)


class SizeCounter:
    """Counts stored bits by the rules of the module docs, each module and tensor once.

    Examples
    --------
    >>> from torch import nn
    >>> SizeCounter().subtree(nn.Linear(3, 1))  # [codes, qparams, other]
    [0, 0, 128]
    """

    def __init__(self) -> None:
        self.modules: set[int] = set()
        self.tensors: set[int] = set()

    @staticmethod
    def _frozen(f: FrozenTensor, out: list[int]) -> None:
        out[0] += tensor_bits(f.packed)
        out[1] += f.nbits() - tensor_bits(f.packed)

    def direct(self, module: nn.Module, out: list[int]) -> None:
        """Add the bits of ``module``'s own tensors (not its children's) to ``out``."""
        if id(module) in self.modules:
            return
        self.modules.add(id(module))
        if isinstance(module, FrozenTensor):
            self._frozen(module, out)
            return
        if isinstance(module, Quantizer):
            for name, t in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]:
                if name in _QPARAM_NAMES and id(t) not in self.tensors:
                    self.tensors.add(id(t))
                    out[1] += tensor_bits(t)
            self.modules.update(id(m) for m in module.modules())  # observers: metadata
            return
        for tname, t, q in weight_pairs(module):
            if isinstance(q, Quantizer):
                self.modules.update(id(m) for m in q.modules())
                if q.mode != "off":
                    self.tensors.add(id(t))
                    self._frozen(_frozen_of(q, t, tname), out)
        for t in _persistent(module):
            if id(t) not in self.tensors:
                self.tensors.add(id(t))
                out[2] += tensor_bits(t)

    def subtree(self, module: nn.Module) -> list[int]:
        """``[codes, qparams, other]`` bits of ``module`` and everything under it."""
        out = [0, 0, 0]
        stack = [module]
        while stack:
            m = stack.pop()
            self.direct(m, out)
            stack.extend(reversed(list(m.children())))
        return out


def model_size_bits(model: nn.Module) -> int:
    """Every bit ``model`` stores: codes, scales, zero points, biases, float tensors.

    See the module docs for the rules; a fake-quant model counts what
    :func:`tnquant.convert` would store.

    Examples
    --------
    >>> from torch import nn
    >>> model_size_bits(nn.Linear(4, 2))  # 10 float32 parameters
    320
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return sum(SizeCounter().subtree(model))


def _unit(module: nn.Module) -> bool:
    """A layer holding quantizers, or a quantizer part: one row with everything under it."""
    kind = lookup(module)
    return isinstance(module, (Quantizer, FrozenTensor)) or (
        kind is not None and kind.holds_quantizers
    )


def size_report(model: nn.Module) -> Report:
    """:func:`model_size_bits` per layer: codes, qparams, other bits and their sum.

    A quantized or factorized layer (or a stray quantizer) is one row with
    everything under it; any other module with tensors of its own (a
    ``LayerNorm``, the root's parameters) is a row of those. The rows'
    ``size_bits`` add up to :func:`model_size_bits`.

    Examples
    --------
    >>> from torch import nn
    >>> report = size_report(nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)))
    >>> [(r["name"], r["size_bits"]) for r in report], report.totals()["size_bits"]
    ([('0', 320), ('1', 128)], 448)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    counter = SizeCounter()
    report = Report("size", columns=_COLUMNS)
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, m = stack.pop()
        if id(m) in counter.modules:
            continue
        unit = _unit(m)
        if unit:
            out = counter.subtree(m)
        else:
            out = [0, 0, 0]
            counter.direct(m, out)
            children = [(join(name, n), c) for n, c in m.named_children()]
            stack.extend(reversed(children))
        if sum(out) or unit:
            report.add(
                name=name,
                kind=type(m).__name__,
                state=quant_state(m),
                codes_bits=out[0],
                qparams_bits=out[1],
                other_bits=out[2],
                size_bits=sum(out),
            )
    return report
