"""``model_size_bits`` and ``size_report``: every bit a model stores.

Counting rules
--------------
Every tensor once (shared ones once, tied ones once), ``numel * element bits`` as stored:

- a weight under an active weight quantizer (mode not ``'off'``): what
  :func:`tnquant.convert` stores for it (once converted: its
  :class:`~tnquant.quant.frozen.FrozenTensor` buffers): the codes at their
  packed width in whole bytes per tensor (``ceil(n * code_bits / 8)``),
  ``scale`` (32 bits each for float32; pow2 scales are float32 too),
  ``zero_point`` (8 bits up to 8-bit codes, else 32), ``scale_neg``; the
  empty placeholder left for the float weight counts nothing. So a
  fake-quant model counts what it will store, and ``convert`` does not
  change the number. A tied weight (one parameter held by several layers,
  as an LM head tied to its embedding) counts once when its quantizers
  freeze it the same (``quantize`` gives tied members one quantizer, and
  ``convert`` one shared frozen tensor), and once more per layer that keeps
  it float;
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

import torch
from torch import Tensor, nn

from tnquant.core.modules import join
from tnquant.quant.frozen import FrozenTensor, tensor_bits
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import lookup, quant_state, weight_pairs
from tnquant.report import Report

__all__ = ["model_size_bits", "size_report", "SizeCounter", "same_frozen"]

_QPARAM_NAMES = ("scale", "zero_point", "scale_neg", "codebook")
_COLUMNS = ("name", "kind", "state", "codes_bits", "qparams_bits", "other_bits", "size_bits")


def _persistent(module: nn.Module) -> Iterable[Tensor]:
    for p in module._parameters.values():
        if p is not None:
            yield p
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield b


def _ident(t: Tensor) -> int:
    """The identity of a stored tensor: a view (a transposed kind's ``weight.mT``) is its base's."""
    base = t._base
    return id(base if base is not None else t)


def _frozen_of(q: Quantizer, t: Tensor, name: str) -> FrozenTensor:
    """What ``convert`` stores for ``t``; for a meta tensor, the skeleton of that layout.

    The buffers' shapes and dtypes depend on the spec, the shape and the dtype
    only, so a model on the meta device (no values to quantize) is counted
    without allocating anything.
    """
    if t.is_meta:
        return FrozenTensor(q.spec, tuple(t.shape), t.dtype, device="meta")
    return FrozenTensor.from_quantizer(q, t, name=name)


def same_frozen(a: FrozenTensor, b: FrozenTensor) -> bool:
    """Whether two frozen tensors store the same thing (spec, shape and every buffer equal).

    Examples
    --------
    >>> import torch
    >>> from tnquant.quant import Quantizer
    >>> from tnquant.specs import QuantSpec
    >>> w = torch.randn(4, 4)
    >>> f = lambda bits: FrozenTensor.from_quantizer(Quantizer(QuantSpec(bits)), w)
    >>> same_frozen(f(4), f(4)), same_frozen(f(4), f(8))
    (True, False)
    """
    if a is b:
        return True
    if a.spec != b.spec or a.shape != b.shape:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


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
        # id(float tensor) -> what convert will store for it, for tied tensors
        self._pending: dict[int, list[FrozenTensor]] = {}
        self._pairs: set[tuple[int, int]] = set()
        self._alive: list[FrozenTensor] = []
        self._quantized: set[int] = set()  # float tensors some layer stores as codes

    def _frozen(self, f: FrozenTensor, out: list[int]) -> None:
        if id(f.packed) in self.tensors:
            return  # a tied frozen tensor (its buffers shared after load): stored once
        self.tensors.add(id(f.packed))
        self._alive.append(f)  # its id stays its own while this counter lives
        out[0] += tensor_bits(f.packed)
        out[1] += f.nbits() - tensor_bits(f.packed)

    def _pending_weight(self, q: Quantizer, t: Tensor, name: str, out: list[int]) -> None:
        """Count what convert will store for ``t``, once per distinct frozen tensor of ``t``.

        A tied ``t`` (held by several layers) whose quantizers freeze it the
        same (one shared quantizer, as ``quantize`` gives tied members) is
        stored once by ``convert``, and counted once here.
        """
        if (_ident(t), id(q)) in self._pairs:
            return
        self._pairs.add((_ident(t), id(q)))
        f = _frozen_of(q, t, name)
        if not t.is_meta:
            seen = self._pending.setdefault(_ident(t), [])
            if any(same_frozen(f, g) for g in seen):
                return
            seen.append(f)
        self._frozen(f, out)

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
        float_weights: set[int] = set()
        for tname, t, q in weight_pairs(module):
            if isinstance(q, Quantizer):
                self.modules.update(id(m) for m in q.modules())
            if isinstance(q, Quantizer) and q.mode != "off":
                self._quantized.add(_ident(t))
                self._pending_weight(q, t, tname, out)
            else:
                float_weights.add(_ident(t))  # stored as it is, even if tied to a quantized layer
        for t in _persistent(module):
            if id(t) in self._quantized and id(t) not in float_weights:
                continue  # stored as codes (a factorized layer's cores sit in a child list)
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
