"""The errors :func:`~tnquant.planning.sensitivity.sensitivity` measures, on the shared core.

:class:`Evaluator` gives the error of a candidate layer in place of one
searched layer by the chosen metric (see :mod:`tnquant.planning.sensitivity`).
Its passes over the data go through :mod:`tnquant.core.capture` (eval mode,
no grad, every train/eval flag restored, hooks removed), the model's output
is :func:`tnquant.core.output.model_output`, and candidates are put in and
taken out with :func:`tnquant.core.modules.replace_module`.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 2))
>>> [x.shape for x in layer_inputs(model, [(["0"], model[0])], [torch.ones(5, 3)], None, 4)]
[torch.Size([4, 3])]
>>> rel_mse([(torch.ones(2), torch.ones(2) * 2)])
0.25
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.core.capture import hooks, outputs, run
from tnquant.core.modules import replace_module
from tnquant.planning.hessian import candidate_weight, hutchinson_traces
from tnquant.planning.inputs import search_batches
from tnquant.registry import lookup

__all__ = ["Evaluator", "Targets", "layer_inputs", "model_outputs", "rel_mse", "put"]

#: searched layers: all the names of each one, and the module
Targets = list[tuple[list[str], nn.Module]]


def put(model: nn.Module, names: list[str], new: nn.Module) -> None:
    """Put ``new`` at every name in ``names`` (a shared layer has several)."""
    for name in names:
        replace_module(model, name, new)


def _rows(x: Tensor, module: nn.Module) -> Tensor:
    """A layer input as rows (a matrix kind), indices (Embedding) or a batch (a conv).

    The registry's weight kind decides: ``'linear'`` (Linear, GPT-2's Conv1D)
    keeps the last axis, ``'embedding'`` flattens the indices, a convolution
    keeps ``(N, C, *spatial)`` (one unbatched input gains its batch axis).
    """
    kind = lookup(module)
    weight_kind = None if kind is None else kind.weight_kind
    if weight_kind == "linear":
        return x.reshape(-1, x.shape[-1])
    if weight_kind == "embedding":
        return x.reshape(-1)
    batched = cast(Tensor, module.weight).dim()  # (out, in, *k): input (N, C, *spatial)
    return x if x.dim() == batched else x.unsqueeze(0)


def layer_inputs(
    model: nn.Module, targets: Targets, data: Any, num_batches: int | None, max_rows: int
) -> list[Tensor]:
    """Inputs each target saw on ``data``: a seeded random subset of ``max_rows`` at most.

    Every batch's inputs are subsampled as they come, then their
    concatenation (the generator is seeded once, so the subset is the same
    on the same data).

    Raises
    ------
    ValueError
        For a target the data never reaches.
    """
    chunks: dict[str, list[Tensor]] = {names[0]: [] for names, _ in targets}
    gen = torch.Generator().manual_seed(0)

    def subsample(x: Tensor) -> Tensor:
        if x.shape[0] <= max_rows:
            return x
        idx = torch.randperm(x.shape[0], generator=gen)[:max_rows].sort().values
        return x[idx.to(x.device)]

    def record(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        chunks[name].append(subsample(_rows(args[0].detach(), module)))

    with hooks({names[0]: m for names, m in targets}, pre=record):
        run(model, search_batches(data, num_batches))
    out = []
    for names, _ in targets:
        if not chunks[names[0]]:
            raise ValueError(
                f"layer {names[0]!r} was never called on the data; exclude it "
                f"(exclude=[{names[0]!r}]) or pass data that reaches it"
            )
        out.append(subsample(torch.cat(chunks[names[0]])))
    return out


def model_outputs(model: nn.Module, data: Any, num_batches: int | None) -> list[Tensor]:
    """:func:`~tnquant.core.output.model_output` of ``model`` on every batch, detached."""
    return outputs(model, search_batches(data, num_batches))


def rel_mse(pairs: Iterable[tuple[Tensor, Tensor]]) -> float:
    """``sum ||y - ref||^2 / sum ||ref||^2`` over ``(y, ref)`` pairs, in float64."""
    num = den = 0.0
    for y, ref in pairs:
        num += float((y.double() - ref.double()).pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _chunks(x: Tensor, size: int = 2048) -> list[Tensor]:
    return list(x.split(size)) if x.shape[0] else [x]


class Evaluator:
    """The error of a candidate layer in place of target ``k``, by the chosen metric."""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        targets: Targets,
        metric: Any,
        metric_name: str,
        num_batches: int | None,
        max_rows: int,
    ) -> None:
        self.model, self.data, self.targets = model, data, targets
        self.metric_name, self.num_batches = metric_name, num_batches
        self.fn = cast(Callable[[nn.Module], float], metric)
        self.inputs: list[Tensor] = []
        self.ref_out: list[Tensor] = []
        self.reference: float | None = None
        self.chunks: list[Tensor] = []
        self.refs: list[Tensor] = []
        self.local = metric_name in ("layer", "scaled")
        if self.local:
            self.inputs = layer_inputs(model, targets, data, num_batches, max_rows)
        if metric_name in ("output", "scaled"):
            self.ref_out = model_outputs(model, data, num_batches)
        self.traces: list[float] = []
        self.den = 0.0
        if metric_name == "hessian":
            self.traces, self.den = hutchinson_traces(
                model, [m for _, m in targets], data, num_batches
            )
        if not self.local and metric_name not in ("output", "hessian"):
            with torch.no_grad():
                self.reference = float(self.fn(model))

    def start(self, k: int) -> None:
        """Prepare the measurements of target ``k`` (its reference outputs, layer metrics)."""
        if self.local:
            self.chunks = _chunks(self.inputs[k])
            with torch.no_grad():
                self.refs = [self.targets[k][1](x) for x in self.chunks]

    def finish(self, k: int) -> None:
        """Free what target ``k`` no longer needs."""
        if self.local:
            self.inputs[k] = self.inputs[k][:0]
            self.chunks, self.refs = [], []

    def error(self, k: int, cand: nn.Module, *, output: bool = False) -> float:
        """The error of ``cand`` in place of target ``k`` (``output``: the model output's)."""
        if self.local and not output:
            with torch.no_grad():
                return rel_mse(
                    (cand(x), ref) for x, ref in zip(self.chunks, self.refs, strict=True)
                )
        names, module = self.targets[k]
        if self.metric_name == "hessian":
            with torch.no_grad():
                weight = cast(Tensor, module.weight)
                change = float((candidate_weight(cand).double() - weight.double()).pow(2).sum())
            return self.traces[k] / weight.numel() * change / self.den if self.den > 0 else 0.0
        put(self.model, names, cand)
        try:
            if self.metric_name in ("output", "scaled"):
                outs = model_outputs(self.model, self.data, self.num_batches)
                return rel_mse(zip(outs, self.ref_out, strict=True))
            with torch.no_grad():
                return max(0.0, float(self.fn(self.model)) - cast(float, self.reference))
        finally:
            put(self.model, names, module)
