"""Hessian-trace sensitivities (HAWQ-v2 style) for ``sensitivity(metric='hessian')``.

The loss is the squared distance of the model output to the unchanged
model's, ``L(W) = 1/2 sum ||f(x; W) - f(x; W0)||^2`` over the calibration
data. At ``W0`` its gradient is zero and its Hessian is the Gauss-Newton
matrix ``J^T J``, so changing layer ``l``'s weight by ``dW`` costs, to
second order and with the Hessian's diagonal block taken as isotropic,
``dL = 1/2 (Tr(H_l) / n_l) ||dW||^2``. Relative to ``D = sum ||f(x; W0)||^2``
that is the output relative MSE ``(Tr(H_l) / n_l) ||dW||^2 / D``: the units
of ``metric='output'``, at the cost of one Hutchinson estimate per layer
(``E[v^T H v] = Tr(H)`` for Rademacher ``v``; ``H v`` by double
back-propagation) instead of one model pass per candidate.

Examples
--------
>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(4, 3, bias=False))
>>> x = torch.randn(64, 4)
>>> traces, den = hutchinson_traces(model, [model[0]], [x], probes=64)
>>> exact = 3 * float((x ** 2).sum())  # Tr(J^T J) of a linear map: out * sum ||x||^2
>>> abs(traces[0] - exact) / exact < 0.05
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tnquant.batches import call_model, iterate_batches
from tnquant.core.output import model_output
from tnquant.registry import lookup

__all__ = ["hutchinson_traces", "candidate_weight"]


def hutchinson_traces(
    model: nn.Module,
    modules: Sequence[nn.Module],
    data: Any,
    num_batches: int | None = None,
    probes: int = 4,
    seed: int = 0,
) -> tuple[list[float], float]:
    """Hutchinson estimates of ``Tr(H_l)`` for each module's ``weight``, and ``D``.

    Parameters
    ----------
    model
        The model (eval mode is the caller's choice; parameters are not changed).
    modules
        Layers with a ``weight`` parameter.
    data
        Calibration batches (see :mod:`tnquant.batches`).
    num_batches
        Use at most this many batches.
    probes
        Rademacher vectors per batch.
    seed
        Seed of the probes.

    Returns
    -------
    (traces, D)
        ``traces[l]`` estimates ``Tr(H_l)`` of the output-distance loss
        summed over the batches; ``D`` is ``sum ||f(x)||^2``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> traces, den = hutchinson_traces(model, [model[0], model[2]], [torch.randn(8, 2)])
    >>> len(traces), den > 0
    (2, True)
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    weights: list[Tensor] = [cast(Tensor, m.weight) for m in modules]
    saved = [w.requires_grad for w in weights]
    # a transposed kind (GPT-2's Conv1D) stores (in, out): probes drawn (out, in) as for a Linear
    transposed = [bool(getattr(lookup(m), "transposed", False)) for m in modules]
    gen = torch.Generator().manual_seed(seed)
    traces = [0.0] * len(weights)
    den = 0.0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in iterate_batches(data, num_batches, what="search"):
            # the math attention kernel has a double backward; the fused CPU/flash ones don't
            with sdpa_kernel(SDPBackend.MATH):
                out = model_output(call_model(model, batch))
            ref = out.detach()
            den += float(ref.double().pow(2).sum())
            loss = 0.5 * (out - ref).pow(2).sum()
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for p in range(probes):
                vs = [_probe(w, t, gen) for w, t in zip(weights, transposed, strict=True)]
                dot = torch.stack([(g * v).sum() for g, v in zip(grads, vs, strict=True)]).sum()
                hvs = torch.autograd.grad(dot, weights, retain_graph=p < probes - 1)
                for k, (hv, v) in enumerate(zip(hvs, vs, strict=True)):
                    traces[k] += float((hv * v).sum()) / probes
    finally:
        for w, flag in zip(weights, saved, strict=True):
            w.requires_grad_(flag)
    return traces, den


def _probe(w: Tensor, transposed: bool, gen: torch.Generator) -> Tensor:
    """A Rademacher probe shaped like ``w`` (drawn in the ``(out, in)`` layout)."""
    shape = w.mT.shape if transposed else w.shape
    v = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(w)
    return v.mT if transposed else v


def candidate_weight(layer: nn.Module) -> Tensor:
    """The dense weight a (quantized, factorized or plain) layer computes with.

    Examples
    --------
    >>> from torch import nn
    >>> candidate_weight(nn.Linear(3, 2)).shape
    torch.Size([2, 3])
    """
    for name in ("dense_weight", "effective_weight"):
        fn = getattr(layer, name, None)
        if callable(fn):
            kind = lookup(layer)
            # a transposed quantized kind (GPT-2's Conv1D) computes with (out, in) but
            # stores (in, out), as its dense layer's ``weight`` does
            transposed = name == "effective_weight" and kind is not None and kind.transposed
            return fn().mT if transposed else fn()
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"cannot find the weight of a {type(layer).__name__}")
    return weight
