"""The ``[search]`` and ``[ptq]`` sections of the road, and the fidelity they measure.

:class:`SearchSection` asks :func:`tnquant.pipeline.run_pipeline` to choose
a format, rank and weight quantizer per layer (:func:`tnquant.search`) under
a budget of bits per weight of the searched layers (``bits``) or a fidelity
floor (``target``: ``'cos=0.97'``, ``'acc=0.9'``, ``'ppl=1.1'``). The plan
becomes the road's ``factorize`` and ``quantize`` sections, spelled out per
layer, so a recipe written from it (:func:`tnquant.cli.recipe_write.recipe_toml`)
reruns without searching. :class:`PtqSection` turns on the Hadamard rotation
(:func:`tnquant.ptq.rotate`, before the search) and GPTQ rounding
(:func:`tnquant.ptq.gptq`, after calibration: ``'auto'`` keeps GPTQ or
round-to-nearest, whichever gives the lower output error on the
calibration batches).

A floor is met by bisection on the budget: the sensitivities are measured
once, then each probed budget's plan is applied to a copy and its fidelity
to the original measured on the calibration batches, before any
fine-tuning (which then only raises it); the smallest budget that meets the
floor wins.

Examples
--------
>>> SearchSection(bits=4).budget_text()
'4 bits/weight'
>>> SearchSection(target="cos=0.97").goal
('cos', 0.97)
>>> SearchSection(bits=4, target="cos=0.9")
Traceback (most recent call last):
...
ValueError: search needs exactly one of bits= (bits per weight) and target= ... target='cos=0.9'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tnquant.batches import call_model
from tnquant.core.capture import evaluating
from tnquant.core.output import model_output

__all__ = [
    "SearchSection",
    "PtqSection",
    "FORMATS",
    "METRICS",
    "TARGETS",
    "GPTQ_CHOICES",
    "parse_target",
    "fidelity",
    "output_error",
]

#: Names of ``formats`` (``'dense'``: leave a layer unfactorized).
FORMATS = ("dense", "lowrank", "tucker", "tt")
#: The search's error metrics (:func:`tnquant.search`).
METRICS = ("output", "layer", "scaled", "hessian")
#: Fidelity floors: mean cosine, top-1 agreement (at least); perplexity ratio (at most).
TARGETS = ("cos", "acc", "ppl")
GPTQ_CHOICES = ("auto", True, False)
_QUANTIZER_WORDS = ("ternary", "binary")


def parse_target(text: Any, what: str = "target") -> tuple[str, float]:
    """``'cos=0.97'`` -> ``('cos', 0.97)``; ``ValueError`` naming ``what`` otherwise.

    ``cos`` and ``acc`` are floors in (0, 1]; ``ppl`` (student perplexity over
    the original's) a ceiling >= 1.

    Examples
    --------
    >>> parse_target("ppl=1.05")
    ('ppl', 1.05)
    >>> parse_target("cos:0.9")
    Traceback (most recent call last):
    ...
    ValueError: target must be 'cos=X', 'acc=X' or 'ppl=X', got 'cos:0.9'
    """
    if not isinstance(text, str) or text.count("=") != 1:
        raise ValueError(f"{what} must be 'cos=X', 'acc=X' or 'ppl=X', got {text!r}")
    kind, _, number = (s.strip() for s in text.partition("="))
    if kind not in TARGETS:
        raise ValueError(f"{what} must start with one of {list(TARGETS)}, got {text!r}")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{what} must be 'cos=X', 'acc=X' or 'ppl=X', got {text!r}") from None
    ok = value >= 1.0 if kind == "ppl" else 0.0 < value <= 1.0
    if not ok or not math.isfinite(value):
        expected = "a number >= 1" if kind == "ppl" else "a number in (0, 1]"
        raise ValueError(f"{what} {kind}= must be {expected}, got {number!r}")
    return kind, value


@dataclass(frozen=True)
class SearchSection:
    """Options of the search stage (see the module docs).

    ``bits``: most bits per weight of the searched layers (their stored bits,
    biases and scales included, over their original weight count); or
    ``target``: a fidelity floor. ``formats``/``ratios``: the factorizations
    tried; ``quantizers``: integer widths and ``'ternary'``/``'binary'``;
    ``metric``, ``num_batches``, ``include``/``exclude``: those of
    :func:`tnquant.search`; ``observer``: of the integer candidates;
    ``learnable``: the applied quantizers learn their scales (LSQ);
    ``data_aware``: fit the chosen factorized layers to the calibration
    data (the ``factorize`` stage does; the search measures the plain
    decompositions, whose errors the fit only lowers, so a floor is met
    with a margin).
    """

    bits: float | None = None
    target: str | None = None
    formats: tuple[str, ...] = FORMATS
    ratios: tuple[float, ...] = (0.5, 0.25)
    quantizers: tuple[Any, ...] = (8, 6, 5, 4, 3, 2, "ternary", "binary")
    metric: str = "output"
    num_batches: int | None = 2
    observer: str = "mse"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    learnable: bool = True
    data_aware: bool = True

    def __post_init__(self) -> None:
        if (self.bits is None) == (self.target is None):
            raise ValueError(
                "search needs exactly one of bits= (bits per weight) and target= "
                f"(e.g. 'cos=0.97'), got bits={self.bits!r} and target={self.target!r}"
            )
        if self.bits is not None and (
            isinstance(self.bits, bool)
            or not isinstance(self.bits, (int, float))
            or not 0 < self.bits <= 32
        ):
            raise ValueError(
                f"bits must be a number in (0, 32] (bits per weight), got {self.bits!r}"
            )
        if self.target is not None:
            parse_target(self.target)
        for f in self.formats:
            if f not in FORMATS:
                raise ValueError(f"formats must be among {list(FORMATS)}, got {f!r}")
        if not self.formats:
            raise ValueError("formats must name at least one format, got []")
        for q in self.quantizers:
            if q not in _QUANTIZER_WORDS and (
                isinstance(q, bool) or not isinstance(q, int) or not 2 <= q <= 8
            ):
                raise ValueError(
                    f"quantizers must hold integer widths in 2..8, 'ternary' or 'binary', got {q!r}"
                )
        if not self.quantizers:
            raise ValueError("quantizers must name at least one quantizer, got []")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")

    @property
    def goal(self) -> tuple[str, float] | None:
        """The parsed ``target`` (``None`` under a bits budget)."""
        return None if self.target is None else parse_target(self.target)

    def budget_text(self) -> str:
        """``'4 bits/weight'`` or ``'cos >= 0.97'``."""
        if self.bits is not None:
            return f"{self.bits:g} bits/weight"
        kind, value = parse_target(self.target)
        return f"{kind} {'<=' if kind == 'ppl' else '>='} {value:g}"

    def candidates(self) -> Any:
        """The :class:`~tnquant.planning.Candidates` grid of these options."""
        from tnquant.planning import Candidates

        return Candidates(
            formats=tuple(f for f in self.formats if f != "dense"),
            ratios=self.ratios,
            bits=tuple(q for q in self.quantizers if q not in _QUANTIZER_WORDS),
            ternary="ternary" in self.quantizers,
            binary="binary" in self.quantizers,
            keep_float=False,
            dense="dense" in self.formats,
            observer=self.observer,
        )


@dataclass(frozen=True)
class PtqSection:
    """``rotate`` (Hadamard-rotate the Linear inputs first; ``rotate_include`` globs,
    default: the search's ``include``), ``gptq`` (``'auto'``, ``True``, ``False``) and
    ``gptq_batches`` (calibration batches GPTQ reads)."""

    rotate: bool = False
    rotate_include: tuple[str, ...] | None = None
    gptq: Any = False
    gptq_batches: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rotate, bool):
            raise TypeError(f"rotate must be a bool, got {type(self.rotate).__name__}")
        if self.gptq not in GPTQ_CHOICES or (
            self.gptq != "auto" and not isinstance(self.gptq, bool)
        ):
            raise ValueError(f"gptq must be 'auto', True or False, got {self.gptq!r}")


# --------------------------------------------------------------------------- #
# measurements
# --------------------------------------------------------------------------- #


def _rows(out: Tensor) -> Tensor:
    return out.detach().double().reshape(out.shape[0], -1)


def _logits_ce(logits: Tensor, batch: Any) -> tuple[float, int]:
    """Summed next-token cross entropy and token count of a causal-LM batch."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    mask = torch.ones_like(ids) if mask is None else mask
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    lg = logits[:, :-1][keep].double()
    tg = ids[:, 1:][keep]
    return float(torch.nn.functional.cross_entropy(lg, tg, reduction="sum")), int(tg.numel())


def fidelity(original: nn.Module, student: nn.Module, batches: list[Any], kind: str) -> float:
    """Mean cosine (``'cos'``), top-1 agreement (``'acc'``) or perplexity ratio (``'ppl'``).

    Per sample of the model outputs on ``batches``: the cosine of the flattened
    outputs; the share of positions whose argmax agrees; the student's
    next-token perplexity over the original's (causal LM logits).

    Examples
    --------
    >>> from torch import nn
    >>> m = nn.Linear(4, 3)
    >>> round(fidelity(m, m, [torch.randn(5, 4)], "cos"), 6)
    1.0
    """
    sums = {"a": 0.0, "b": 0.0, "n": 0.0}
    with evaluating(original), evaluating(student), torch.no_grad():
        for batch in batches:
            ref = model_output(call_model(original, batch))
            new = model_output(call_model(student, batch))
            if kind == "cos":
                cos = torch.nn.functional.cosine_similarity(_rows(ref), _rows(new), dim=1)
                sums["a"] += float(cos.sum())
                sums["n"] += cos.numel()
            elif kind == "acc":
                same = ref.argmax(-1) == new.argmax(-1)
                sums["a"] += float(same.sum())
                sums["n"] += same.numel()
            else:
                ce_ref, n = _logits_ce(ref, batch)
                ce_new, _ = _logits_ce(new, batch)
                sums["a"], sums["b"], sums["n"] = (
                    sums["a"] + ce_new,
                    sums["b"] + ce_ref,
                    sums["n"] + n,
                )
    if kind == "ppl":
        return math.exp((sums["a"] - sums["b"]) / max(sums["n"], 1.0))
    return sums["a"] / max(sums["n"], 1.0)


def output_error(original: nn.Module, student: nn.Module, batches: list[Any]) -> float:
    """Relative MSE of ``student``'s output against ``original``'s over ``batches``.

    Examples
    --------
    >>> from torch import nn
    >>> m = nn.Linear(4, 3)
    >>> output_error(m, m, [torch.randn(5, 4)])
    0.0
    """
    num = den = 0.0
    with evaluating(original), evaluating(student), torch.no_grad():
        for batch in batches:
            ref = model_output(call_model(original, batch)).double()
            new = model_output(call_model(student, batch)).double()
            num += float((new - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / den if den > 0 else 0.0


def meets(kind: str, value: float, floor: float) -> bool:
    """Whether a measured fidelity ``value`` meets the ``floor`` (a ceiling for ``'ppl'``)."""
    return value <= floor if kind == "ppl" else value >= floor
