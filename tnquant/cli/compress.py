"""``tnquant compress MODEL --bits B`` / ``--target cos=0.97``: a recipe built in code; ``--time``.

Without ``--recipe``, :func:`budget_recipe` builds the road that measured
best on MiniLM-L6 (``BENCHMARKS.md``): Hadamard rotation, a searched plan
under ``B`` bits per weight of the searched layers (or the smallest one that
meets the fidelity floor), GPTQ or round-to-nearest (whichever lowers the
output error on the calibration batches), calibration, distillation on the
hidden states of the model's blocks (:func:`hidden_blocks`) with the
student's dropout off, conversion to integer storage. The recipe as run (the
plan spelled out per layer) is written to ``DIR/recipe.toml``, so that
``tnquant compress MODEL --recipe DIR/recipe.toml`` reruns it without
searching. ``--time`` (:func:`parse_time`) sizes the search and the
fine-tuning steps to fit; the report says what was cut.

Examples
--------
>>> parse_time("2m30s"), parse_time("300s"), parse_time("5m")
(150.0, 300.0, 300.0)
>>> budget_recipe(bits=3.5, target=None).search.bits
3.5
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, cast

from torch import nn

from tnquant.cli.checks import UsageError
from tnquant.cli.recipe import FinetuneSection, PtqSection, Recipe, SearchSection, parse_recipe
from tnquant.cli.recipe_write import recipe_toml
from tnquant.pipeline_stages import parse_target
from tnquant.sizes import model_size_bits

__all__ = [
    "parse_time",
    "check_budget_args",
    "budget_recipe",
    "hidden_blocks",
    "with_hidden",
    "rotated_rows",
    "searched_size",
    "run_recipe_text",
]

_TIME = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
#: Fine-tuning of the built recipe (the MiniLM QAT settings that measured best).
FINETUNE = FinetuneSection(epochs=8, lr=3e-4, loss="mse", dropout=False)
HEADER = (
    "written by tnquant compress {how}\n"
    "the plan as run, one [factorize] / [quantize.weights] entry per layer: rerun with\n"
    "  tnquant compress MODEL --recipe THIS_FILE --calib DATA --out DIR"
)


def parse_time(text: Any) -> float:
    """Seconds of a ``--time`` value: ``'5m'``, ``'300s'``, ``'2m30s'``, ``'1h'``, ``'90'``.

    Examples
    --------
    >>> parse_time("1h")
    3600.0
    >>> parse_time("5 minutes")
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: --time must be a duration like '5m', ... got '5 minutes'
    """
    s = str(text).strip()
    match = _TIME.match(s) if s else None
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        seconds = float(s)
    elif match is None or not any(match.groups()):
        raise UsageError(f"--time must be a duration like '5m', '300s' or '2m30s', got {text!r}")
    else:
        h, m, sec = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + sec
    if seconds <= 0:
        raise UsageError(f"--time must be a positive duration, got {text!r}")
    return seconds


def check_budget_args(args: Any) -> None:
    """``--recipe``, or exactly one of ``--bits`` and ``--target``; ``--time`` parses.

    Examples
    --------
    >>> from argparse import Namespace
    >>> check_budget_args(Namespace(recipe=None, bits=4.0, target="cos=0.9", time=None))
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: give one of --bits (bits per weight) and --target ... not both
    """
    bits, target = args.bits, args.target
    if bits is not None and target is not None:
        raise UsageError(
            "give one of --bits (bits per weight) and --target (a fidelity floor), not both"
        )
    if args.recipe is not None and (bits is not None or target is not None):
        raise UsageError(
            f"--recipe {args.recipe!r} and --{'bits' if bits is not None else 'target'}: "
            "the budget of a recipe goes in its [search] table; give one of them"
        )
    if args.recipe is None and bits is None and target is None:
        raise UsageError(
            "give --recipe FILE, or --bits B (bits per weight) or --target cos=X for a "
            "searched recipe built for you"
        )
    if bits is not None and not 0 < bits <= 32:
        raise UsageError(f"--bits must be a number of bits per weight in (0, 32], got {bits:g}")
    if target is not None:
        try:
            parse_target(target, "--target")
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.time is not None:
        parse_time(args.time)


def budget_recipe(bits: float | None, target: str | None) -> Recipe:
    """The recipe ``--bits``/``--target`` runs (see the module docs), with its TOML as ``text``."""
    recipe = Recipe(
        search=SearchSection(bits=bits, target=target),
        ptq=PtqSection(rotate=True, gptq="auto"),
        finetune=FINETUNE,
    )
    how = f"--bits {bits:g}" if bits is not None else f"--target {target}"
    return parse_recipe(recipe_toml(recipe, HEADER.format(how=how)))


def hidden_blocks(model: nn.Module) -> tuple[str, ...] | None:
    """The blocks of the largest ``nn.ModuleList`` of ``model`` (its transformer layers), if any.

    Examples
    --------
    >>> from torch import nn
    >>> m = nn.Module()
    >>> m.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    >>> hidden_blocks(m), hidden_blocks(nn.Linear(2, 2))
    (('layers.0', 'layers.1', 'layers.2'), None)
    """
    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = name, n
    if best is None:
        return None
    blocks = cast(nn.ModuleList, model.get_submodule(best))
    return tuple(f"{best}.{k}" for k in range(len(blocks)))


def with_hidden(recipe: Recipe, model: nn.Module) -> Recipe:
    """``recipe`` distilling the hidden states of ``model``'s blocks (when it has any)."""
    ft, blocks = recipe.finetune, hidden_blocks(model)
    if ft is None or blocks is None or ft.hidden is not None:
        return recipe
    return dataclasses.replace(recipe, finetune=dataclasses.replace(ft, hidden=blocks))


def _rotated_parent(name: str, student: nn.Module) -> str:
    from tnquant.ptq import RotatedLinear

    parent = name.rsplit(".", 1)[0] if name.endswith(".layer") else None
    if parent is not None and isinstance(student.get_submodule(parent), RotatedLinear):
        return parent
    return name


def rotated_rows(rows: Any, student: nn.Module) -> list[dict[str, Any]] | None:
    """A stage report's rows, a rotated layer's ``<name>.layer`` named ``<name>``
    (the original's module: the row then counts the rotation too)."""
    if rows is None:
        return None
    return [{**r, "name": _rotated_parent(r["name"], student)} for r in rows]


def searched_size(student: nn.Module, plan: dict[str, Any]) -> int:
    """Stored bits of the searched layers of ``student`` (``plan``: ``Plan.to_dict()``)."""
    return sum(model_size_bits(student.get_submodule(n)) for n in plan["choices"])


def run_recipe_text(ran: Recipe, given: Recipe, how: str) -> str:
    """The ``DIR/recipe.toml`` of a run: ``given``'s text, or after a search or a
    cut the recipe as run (``ran``: the plan per layer, GPTQ resolved)."""
    if given.search is None and ran.finetune == given.finetune and ran.ptq == given.ptq:
        return given.text
    return recipe_toml(ran, HEADER.format(how=how))
