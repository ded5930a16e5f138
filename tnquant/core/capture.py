"""Hooked passes over data, written once: Gram matrices, layer inputs and outputs.

Every pass runs the model on batches by the rule of :mod:`tnquant.batches`
inside :func:`evaluating` (eval mode and no grad by default; every module's
own train/eval flag restored afterwards, also on error) with hooks that are
removed afterwards. ``factorize(data=)`` and GPTQ take Gram matrices,
``calibrate`` runs observers, the search takes layer inputs and outputs, the
CLI and the export drift take layer outputs: all through these functions.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
>>> grams = capture_grams(model, {"0": model[0]}, [torch.ones(4, 3)])
>>> grams["0"].h.tolist()[0], grams["0"].rows
([4.0, 4.0, 4.0], 4)
>>> model.training
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.batches import call_model, iterate_batches
from tnquant.core.output import model_output

__all__ = [
    "evaluating",
    "hooks",
    "run",
    "outputs",
    "Gram",
    "capture_grams",
    "capture_inputs",
    "capture_outputs",
]

PreHook = Callable[[str, nn.Module, tuple[Any, ...]], None]
PostHook = Callable[[str, nn.Module, tuple[Any, ...], Any], None]


@contextmanager
def evaluating(model: nn.Module, *, train: bool = False, grad: bool = False) -> Iterator[None]:
    """Run the body with ``model.train(train)`` and grad mode ``grad``; restore every flag.

    Examples
    --------
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Dropout(), nn.Dropout().eval())
    >>> with evaluating(m):
    ...     m[0].training
    False
    >>> m.training, m[0].training, m[1].training
    (True, True, False)
    """
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def hooks(
    modules: Mapping[str, nn.Module], pre: PreHook | None = None, post: PostHook | None = None
) -> Iterator[None]:
    """Forward hooks ``pre(name, module, args)`` / ``post(name, module, args, out)`` on ``modules``.

    The hooks are removed when the body ends, also on error.
    """
    handles = []
    try:
        for name, module in modules.items():
            if pre is not None:
                handles.append(
                    module.register_forward_pre_hook(lambda m, args, name=name: pre(name, m, args))
                )
            if post is not None:
                handles.append(
                    module.register_forward_hook(
                        lambda m, args, out, name=name: post(name, m, args, out)
                    )
                )
        yield
    finally:
        for handle in handles:
            handle.remove()


def run(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    desc: str = "",
    progress: bool = False,
    each: Callable[[Any], None] | None = None,
    what: str = "this step",
    arg: str = "data",
) -> int:
    """Run ``data`` through ``model`` under :func:`evaluating`; the number of batches run.

    ``each`` is called with every model output. Every batch is checked by
    :func:`tnquant.batches.iterate_batches`; ``what`` and ``arg`` name the
    verb and its argument in those messages (as in every pass below).

    Examples
    --------
    >>> import torch
    >>> run(torch.nn.Identity(), [torch.ones(1)] * 3, 2)
    2
    """
    count = 0
    with evaluating(model):
        for batch in tqdm(
            iterate_batches(data, num_batches, what=what, arg=arg),
            desc=desc or None,
            disable=not progress,
            leave=False,
        ):
            out = call_model(model, batch)
            if each is not None:
                each(out)
            count += 1
    return count


def outputs(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    desc: str = "",
    progress: bool = False,
    what: str = "this step",
    arg: str = "data",
) -> list[Tensor]:
    """:func:`~tnquant.core.output.model_output` of every batch, detached.

    Examples
    --------
    >>> import torch
    >>> [o.tolist() for o in outputs(torch.nn.ReLU(), [torch.tensor([-1.0, 2.0])])]
    [[0.0, 2.0]]
    """
    seen: list[Tensor] = []
    run(
        model,
        data,
        num_batches,
        desc=desc,
        progress=progress,
        what=what,
        arg=arg,
        each=lambda out: seen.append(model_output(out).detach()),
    )
    return seen


class Gram:
    """``X^T X`` (float64) of one layer's inputs, flattened to ``(rows, features)``; and ``rows``.

    Examples
    --------
    >>> import torch
    >>> g = Gram()
    >>> g.add(torch.ones(2, 3)); g.add(torch.ones(1, 3))
    >>> g.h[0, 0].item(), g.rows
    (3.0, 3)
    """

    def __init__(self) -> None:
        self.h: Tensor | None = None
        self.rows = 0

    def add(self, x: Tensor) -> None:
        """Accumulate one input (its last axis is the features)."""
        x = x.detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        g = x.T @ x
        self.h = g if self.h is None else self.h + g
        self.rows += x.shape[0]


def capture_grams(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    desc: str = "collect input statistics",
    progress: bool = False,
    what: str = "this step",
    arg: str = "data",
) -> dict[str, Gram]:
    """One :class:`Gram` per named module, of the first positional input it sees on ``data``.

    A module reached under several names gets one Gram (under its first name).
    """
    grams: dict[int, Gram] = {}
    first: dict[int, str] = {}
    for name, module in modules.items():
        first.setdefault(id(module), name)
        grams.setdefault(id(module), Gram())
    unique = {first[id(m)]: m for m in modules.values()}
    with hooks(unique, pre=lambda name, m, args: grams[id(m)].add(args[0])):
        run(model, data, num_batches, desc=desc, progress=progress, what=what, arg=arg)
    return {first[k]: g for k, g in grams.items()}


def capture_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    rows: int | None = None,
    progress: bool = False,
    what: str = "this step",
    arg: str = "data",
) -> dict[str, Tensor]:
    """The first positional input of each named module on ``data``, concatenated (``rows`` max).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> capture_inputs(m, {"1": m[1]}, [torch.ones(3, 2)] * 2, rows=4)["1"].shape
    torch.Size([4, 2])
    """
    seen: dict[str, list[Tensor]] = {name: [] for name in modules}
    counts = dict.fromkeys(modules, 0)

    def record(name: str, _m: nn.Module, args: tuple[Any, ...]) -> None:
        if rows is None or counts[name] < rows:
            seen[name].append(args[0].detach())
            counts[name] += args[0].shape[0]

    with hooks(modules, pre=record):
        run(model, data, num_batches, progress=progress, what=what, arg=arg)
    return {name: torch.cat(v)[:rows] for name, v in seen.items() if v}


def capture_outputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    progress: bool = False,
    what: str = "this step",
    arg: str = "data",
) -> dict[str, list[Tensor]]:
    """Every output (detached) of each named module on ``data``, batch by batch.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.ReLU())
    >>> capture_outputs(m, {"0": m[0]}, [torch.tensor([-1.0, 1.0])])["0"][0].tolist()
    [0.0, 1.0]
    """
    seen: dict[str, list[Tensor]] = {name: [] for name in modules}
    with hooks(
        modules, post=lambda name, _m, _a, out: seen[name].append(model_output(out).detach())
    ):
        run(model, data, num_batches, progress=progress, what=what, arg=arg)
    return seen
