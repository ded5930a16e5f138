"""The commands of ``tnquant``: ``compress``, ``report`` and ``export``; the parser and ``main``.

``compress`` checks every argument before any work, builds the model and
reads the data (:mod:`tnquant.cli.inputs`), runs the recipe's road with
:func:`tnquant.pipeline.run_pipeline`, measures the result
(:mod:`tnquant.cli.report`) and writes the output directory. ``report`` and
``export`` read such a directory as data (:mod:`tnquant.cli.checks`).

Examples
--------
>>> make_parser().parse_args(["report", "out/minilm", "--json"]).json
True
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tnquant.cli import checks
from tnquant.cli.causal import compare_lm, lm_recipe
from tnquant.cli.checks import UsageError, check_stage_report, dir_file, read_json
from tnquant.cli.compress import (
    budget_recipe,
    check_budget_args,
    parse_time,
    rotated_rows,
    run_recipe_text,
    searched_size,
    with_hidden,
)
from tnquant.cli.export_cmd import export_piece, read_model_inputs, record_inputs, whole_model
from tnquant.cli.inputs import Inputs, check_compress, prepare_compress, rebuild_base
from tnquant.cli.recipe import Recipe, load_recipe
from tnquant.cli.report import compare, format_report, layer_errors, layer_rows, plot, table, totals
from tnquant.io import IntegrityError
from tnquant.pipeline import PipelineResult, run_pipeline

__all__ = ["main", "make_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Exceptions that mean bad input: exit 2 (as does a ValueError that starts with "recipe").
_USAGE = (UsageError, IntegrityError, FileNotFoundError, NotADirectoryError)
REPORT, SOURCE, RECIPE, INPUTS, PLOT = (
    "report.json",
    "source.json",
    "recipe.toml",
    "export_inputs",
    "report.png",
)


def _say(*args: Any) -> None:
    print(*args, flush=True)


# --------------------------------------------------------------------------- #
# compress
# --------------------------------------------------------------------------- #


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _measure(
    args: argparse.Namespace,
    inputs: Inputs,
    result: PipelineResult,
    stages: dict[str, float],
    progress: bool,
) -> dict[str, Any]:
    """``report.json``: the layer table, the before/after table, the stage times."""
    original, student = inputs.original, result.model.eval()
    fact = rotated_rows(result.reports.get("factorize"), student)
    quant = rotated_rows(result.reports.get("quantize"), student)
    names = [r["name"] for r in fact or []] + [r["name"] for r in quant or []]
    errors = layer_errors(original, student, names, inputs.calib[0])
    t0 = time.perf_counter()
    if inputs.task == "causal-lm":  # perplexity and top-1 agreement on held-out text
        cmp = compare_lm(original, student, inputs.batches, progress)
    else:
        cmp = compare(original, student, inputs.batches, inputs.labels, progress)
    stages["eval"] = time.perf_counter() - t0
    rows = layer_rows(original, student, fact, quant, errors)
    search = result.info.get("search")
    if search is not None:
        search = {k: v for k, v in search.items() if k != "plan"}
        search["searched_size_bits"] = searched_size(student, result.info["search"]["plan"])
        search["measured_bits_per_weight"] = (
            search["searched_size_bits"] / search["searched_weights"]
        )
    return {
        "tnquant_report": 1,
        "model": args.model,
        "recipe": str(args.recipe) if args.recipe else _how(args),
        "budget": _how(args) if not args.recipe else None,
        "search": search,
        "gptq": result.info.get("gptq"),
        "notes": result.notes,
        "seed": args.seed,
        "calib_data": args.calib,
        "eval_data": args.eval or args.calib,
        "layers": rows,
        "totals": totals(rows, cmp),
        "compare": cmp,
        "stages": stages,
        "export_layers": inputs.names,
    }


def _how(args: argparse.Namespace) -> str:
    how = f"--bits {args.bits:g}" if args.bits is not None else f"--target {args.target}"
    return how + (f" --time {args.time}" if args.time else "")


def _write(
    out: Path, student: Any, recipe: Recipe, inputs: Inputs, seed: int, report: dict[str, Any],
    text: str,
) -> None:  # fmt: skip
    from tnquant.io import save

    save(student, out)
    rows = record_inputs(student, recipe.export, inputs.names, inputs.calib, inputs.batches)
    (out / INPUTS).mkdir(exist_ok=True)
    for name, x in rows.items():
        np.save(out / INPUTS / f"{name}.npy", x)
    (out / RECIPE).write_text(text, encoding="utf-8")
    (out / SOURCE).write_text(json.dumps({**inputs.source, "seed": seed}, indent=1))
    (out / REPORT).write_text(json.dumps(report, indent=1))


def _compress(args: argparse.Namespace) -> int:
    check_budget_args(args)
    seconds = None if args.time is None else parse_time(args.time)
    recipe = load_recipe(args.recipe) if args.recipe else budget_recipe(args.bits, args.target)
    progress, out = not args.no_progress, Path(args.out)
    kind = check_compress(args, recipe)  # every argument, before any work
    _seed(args.seed)
    t0 = time.perf_counter()
    inputs = prepare_compress(args, recipe, kind, progress)
    stages = {"load": time.perf_counter() - t0}
    if not args.recipe:
        recipe = with_hidden(recipe, inputs.original)
    road, note = lm_recipe(recipe) if inputs.task == "causal-lm" else (recipe, None)
    for line in (*inputs.notes, *([note] if note else [])):
        _say(f"note: {line}")
    if road.search is not None:
        _say(f"search: {road.search.budget_text()}" + (f" in {args.time}" if args.time else ""))
    result = run_pipeline(
        inputs.original,
        road,
        inputs.calib,
        labels=inputs.calib_labels,
        seed=args.seed,
        progress=progress,
        after=check_stage_report,  # a recipe pattern that reached no layer: exit 2
        time_s=None if seconds is None else max(seconds - stages["load"], 1.0),
        time_label=args.time,
    )
    stages.update(result.seconds)
    if seconds is not None and stages["load"] > 0.5 * seconds:
        result.notes.insert(0, f"loading took {stages['load']:.1f}s of the {args.time} budget")
    report = _measure(args, inputs, result, stages, progress)
    text = run_recipe_text(result.recipe, recipe, _how(args) if not args.recipe else args.recipe)
    _write(out, result.model, recipe, inputs, args.seed, report, text)
    _say(format_report(report))
    for line in result.notes:
        _say(f"note: {line}")
    if report["search"] is not None:
        s = report["search"]
        _say(
            f"searched layers: {s['measured_bits_per_weight']:.3f} bits/weight measured "
            f"({s['searched_size_bits']} bits over {s['searched_weights']} weights; "
            f"budget {s['bits_per_weight']:.3f})"
        )
    if plot(report, out / PLOT):
        _say(f"plot: {out / PLOT}")
    _say(f"saved to {out}")
    return EXIT_OK


# --------------------------------------------------------------------------- #
# report, export
# --------------------------------------------------------------------------- #


def _read(directory: Path, name: str, check: Any) -> dict[str, Any]:
    """``check(JSON object in directory/name, its path)``."""
    if not (directory / name).is_file():
        raise UsageError(f"{directory} has no {name}: not a 'tnquant compress' output")
    return check(read_json(dir_file(directory, name)), str(directory / name))


def _report(args: argparse.Namespace) -> int:
    report = _read(Path(args.dir), REPORT, checks.check_report)
    _say(json.dumps(report, indent=1) if args.json else format_report(report))
    return EXIT_OK


def _clear(out: Path, names: list[str]) -> None:
    """Remove what an earlier export left under ``out/<name>`` (``--force``)."""
    for target in (out / name for name in names):
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)


def _what(results: list[dict[str, Any]]) -> str:
    if len(results) == 1 and not results[0]["layer"]:
        return f"the whole model ({results[0]['ops']} ops)"
    return f"{len(results)} module(s)"


def _check_line(r: dict[str, Any]) -> str:
    """``emulator == fake-quant: 450/450 exact ...`` for one row of ``check.json``."""
    who = f"{r['layer']}: " if r["layer"] else ""
    line = f"{who}emulator == fake-quant: {r['exact']}/{r['rows']} exact"
    if r["check"] == "exact":
        return f"{line}, saturating inputs {r['saturating_exact']}/{r['saturating']} exact"
    return (
        f"{line} (accum/result narrow the types below the torch model's, so the check is the "
        f"relative difference: {r['rel_diff']:.3g}, tolerance {r['tolerance']:g})"
    )


def _export(args: argparse.Namespace) -> int:
    from tnquant.io import load

    directory = Path(args.dir)
    report = _read(directory, REPORT, checks.check_report)
    source = _read(directory, SOURCE, checks.check_source)
    recipe = load_recipe(dir_file(directory, RECIPE))  # data only: [model] class is not used
    if recipe.export is None:
        raise UsageError(f"the recipe in {directory} has no [export] table")
    ex, out = recipe.export, checks.check_out_dir(args.fixed_point, "--fixed-point", args.force)
    if out.resolve() == directory.resolve():
        raise UsageError(f"--fixed-point {args.fixed_point!r} is DIR itself; choose another")
    base = rebuild_base(
        source,
        directory,
        model=args.model,
        model_class=args.model_class,
        model_kwargs=args.model_kwargs,
    )
    try:
        model = load(directory, model=base).eval()
    except ValueError as e:  # IntegrityError too: a directory that does not fit its base
        raise UsageError(f"{directory} does not load onto its base model: {e}") from None
    if whole_model(ex):  # the whole model, into OUT itself
        pieces = {"": (model, read_model_inputs(directory, ex.num_samples))}
    else:
        pieces = checks.read_export_inputs(
            directory, model, report["export_layers"], ex.num_samples
        )
        _clear(out, list(pieces))
    results = [export_piece(n, m, x, ex, out / n if n else out) for n, (m, x) in pieces.items()]
    (out / "check.json").write_text(json.dumps(results, indent=1))
    _say(f"fixed-point export of {_what(results)} to {out}")
    for r in results:
        _say(_check_line(r))
    cols = ["layer", "ops", "input", "output", "rows", "exact", "saturating_exact", "ok"]
    _say(table([{**r, "layer": r["layer"] or "(whole model)"} for r in results], cols))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILURE


# --------------------------------------------------------------------------- #
# argument parsing, main
# --------------------------------------------------------------------------- #

EPILOG = """examples:
  tnquant compress minilm --recipe recipes/minilm.toml --calib corpus --out out/minilm
  tnquant compress minilm --calib corpus --bits 3.5 --time 5m --out out/minilm-b  # no recipe
  tnquant compress minilm --calib corpus --target cos=0.97 --out out/minilm-t
  tnquant compress minilm --recipe out/minilm-b/recipe.toml --calib corpus --out out/again
  tnquant compress digits-cnn --recipe recipes/digits.toml --calib digits --out out/digits
  tnquant compress ./my-hf-model --recipe r.toml --calib sentences.txt --eval held_out.txt \\
      --out out/mine
  tnquant compress ./my-llama --recipe llama.toml --calib corpus --out out/llama  # causal LM
  tnquant compress model.pt --recipe r.toml --calib inputs.npy --out out/mine  # [model] class
  tnquant report out/minilm --json
  tnquant export out/minilm --fixed-point out/minilm-fixed
  tnquant export out/mine --fixed-point out/mine-fx --model-class pkg.mod:Net  # a .pt base

exit codes: 0 ok, 1 failure while running (or emulator check failed), 2 usage/recipe error
recipe schema: recipes/README.md (or: python -m pydoc tnquant.cli.recipe)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        self.print_usage(sys.stderr)
        raise SystemExit(f"{self.prog}: error: {message}") from None


def _compress_parser(sub: Any, fmt: Any) -> None:
    c = sub.add_parser(
        "compress",
        help="run a recipe, or a searched one under --bits/--target, on a model",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    c.add_argument(
        "model",
        metavar="MODEL",
        help="'minilm', 'digits-cnn', a Hugging Face model dir (a causal LM such as GPT-2 or "
        "Llama, or a text encoder such as BERT) or a checkpoint",
    )
    c.add_argument("--recipe", help="recipe TOML file (or --bits / --target)")
    c.add_argument(
        "--bits",
        type=float,
        metavar="B",
        help="no recipe: search a plan under B bits per weight of the searched layers, "
        "rotate, GPTQ or round-to-nearest, calibrate, distil hidden states, convert; "
        "DIR/recipe.toml is the plan as run",
    )
    c.add_argument(
        "--target",
        metavar="KIND=X",
        help="no recipe, the dual of --bits: the smallest plan that keeps cos=X (mean "
        "cosine), acc=X (top-1 agreement) or ppl=X (perplexity ratio) on --calib",
    )
    c.add_argument(
        "--time",
        metavar="DURATION",
        help="wall-clock budget ('5m', '300s', '2m30s'): the search and the fine-tuning "
        "steps are sized to fit (measured, then extrapolated); the report says what was cut",
    )
    c.add_argument(
        "--calib",
        required=True,
        metavar="DATA",
        help="'corpus', 'digits', a text file (one sentence a line), .npy or .pt",
    )
    c.add_argument(
        "--eval",
        metavar="DATA",
        help="held-out data for the before/after table "
        "(default: the held-out split of --calib's shortcut, or --calib itself)",
    )
    c.add_argument("--out", required=True, metavar="DIR", help="output directory")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")


def _export_parser(sub: Any, fmt: Any) -> None:
    e = sub.add_parser(
        "export",
        help="fixed-point export of the whole model (or the recipe's export layers), "
        "checked bit for bit against the fake-quant model",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--fixed-point", required=True, metavar="OUT", help="output directory")
    e.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT (each exported layer's OUT/<name>/ is cleared first; "
        "a whole-model export replaces its own files in OUT)",
    )
    e.add_argument(
        "--model",
        metavar="MODEL",
        help="the base model instead of the one "
        "DIR/source.json names: 'minilm', 'digits-cnn' or a Hugging Face model dir",
    )
    e.add_argument(
        "--model-class",
        metavar="pkg.mod:Class",
        help="the base model's class, for a checkpoint base (DIR's recipe is never imported)",
    )
    e.add_argument(
        "--model-kwargs",
        metavar="JSON",
        help="constructor arguments for --model-class, a JSON object",
    )


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tnquant`` (see :mod:`tnquant.cli`).

    Examples
    --------
    >>> make_parser().parse_args(["export", "d", "--fixed-point", "o"]).fixed_point
    'o'
    """
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="tnquant",
        epilog=EPILOG,
        formatter_class=fmt,
        description="Compress PyTorch models with tensor networks and quantization.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _compress_parser(sub, fmt)
    r = sub.add_parser(
        "report", help="print the report of a compressed model", epilog=EPILOG, formatter_class=fmt
    )
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--json", action="store_true", help="print report.json")
    _export_parser(sub, fmt)
    return parser


def _fail(args: argparse.Namespace, e: Exception) -> int:
    """One line on stderr for ``e``; exit 2 for bad input, 1 for a failure while running."""
    message = " ".join(str(e).split())  # one line
    usage = isinstance(e, _USAGE) or (isinstance(e, ValueError) and str(e).startswith("recipe"))
    if usage:
        print(f"tnquant: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"tnquant: error: {type(e).__name__}: {message} (rerun with --debug for the traceback)",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run the ``tnquant`` command line; return the exit code.

    Examples
    --------
    >>> main(["report", "/nonexistent"])  # the message goes to stderr
    2
    """
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK if e.code in (0, None) else EXIT_USAGE
    command = {"compress": _compress, "report": _report, "export": _export}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        print("tnquant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tnquant report DIR --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - one line for scripts, --debug for the traceback
        if args.debug:
            raise
        return _fail(args, e)
