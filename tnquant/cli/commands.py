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
import math
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
from tnquant.cli.inputs import Inputs, check_compress, prepare_compress, rebuild_base
from tnquant.cli.recipe import Recipe, load_recipe
from tnquant.cli.report import (
    compare,
    export_inputs,
    format_report,
    layer_errors,
    layer_rows,
    plot,
    table,
    totals,
)
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
    fact, quant = result.reports.get("factorize"), result.reports.get("quantize")
    names = [r["name"] for r in fact or []] + [r["name"] for r in quant or []]
    errors = layer_errors(original, student, names, inputs.calib[0])
    t0 = time.perf_counter()
    if inputs.task == "causal-lm":  # perplexity and top-1 agreement on held-out text
        cmp = compare_lm(original, student, inputs.batches, progress)
    else:
        cmp = compare(original, student, inputs.batches, inputs.labels, progress)
    stages["eval"] = time.perf_counter() - t0
    rows = layer_rows(original, student, fact, quant, errors)
    return {
        "tnquant_report": 1,
        "model": args.model,
        "recipe": str(args.recipe),
        "seed": args.seed,
        "calib_data": args.calib,
        "eval_data": args.eval or args.calib,
        "layers": rows,
        "totals": totals(rows, cmp),
        "compare": cmp,
        "stages": stages,
        "export_layers": inputs.names,
    }


def _write(
    out: Path, student: Any, recipe: Recipe, inputs: Inputs, seed: int, report: dict[str, Any]
) -> None:
    from tnquant.io import save

    save(student, out)
    rows = (
        export_inputs(student, inputs.names, inputs.calib, recipe.export.num_samples)
        if recipe.export
        else {}
    )
    (out / INPUTS).mkdir(exist_ok=True)
    for name, x in rows.items():
        np.save(out / INPUTS / f"{name}.npy", x)
    (out / RECIPE).write_text(recipe.text, encoding="utf-8")
    (out / SOURCE).write_text(json.dumps({**inputs.source, "seed": seed}, indent=1))
    (out / REPORT).write_text(json.dumps(report, indent=1))


def _compress(args: argparse.Namespace) -> int:
    recipe, progress, out = load_recipe(args.recipe), not args.no_progress, Path(args.out)
    kind = check_compress(args, recipe)  # every argument, before any work
    _seed(args.seed)
    t0 = time.perf_counter()
    inputs = prepare_compress(args, recipe, kind, progress)
    stages = {"load": time.perf_counter() - t0}
    road, note = lm_recipe(recipe) if inputs.task == "causal-lm" else (recipe, None)
    for line in (*inputs.notes, *([note] if note else [])):
        _say(f"note: {line}")
    result = run_pipeline(
        inputs.original,
        road,
        inputs.calib,
        labels=inputs.calib_labels,
        seed=args.seed,
        progress=progress,
        after=check_stage_report,  # a recipe pattern that reached no layer: exit 2
    )
    stages.update(result.seconds)
    report = _measure(args, inputs, result, stages, progress)
    _write(out, result.model, recipe, inputs, args.seed, report)
    _say(format_report(report))
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


def _export_one(name: str, module: Any, x: np.ndarray, ex: Any, out: Path) -> dict[str, Any]:
    """Export ``module`` to ``out/name`` and check its emulator on the recorded inputs ``x``."""
    from tnquant.export import fixed_point
    from tnquant.quant import fake_quantize
    from tnquant.specs import FixedPoint

    if ex.input == "auto":
        peak = float(np.abs(x).max()) or 1.0
        integer = max(1, math.floor(math.log2(peak)) + 2)
        spec = FixedPoint(ex.input_width, integer, rounding="RND", overflow="SAT")
    else:
        spec = FixedPoint.from_string(ex.input)
    em = fixed_point(
        module, out / name, spec, accum=ex.accum, result=ex.result, bias=ex.bias, hls4ml=ex.hls4ml
    )
    y = em.predict(x)
    with torch.no_grad():
        ref = module(fake_quantize(torch.from_numpy(x), spec)).double().numpy()
    diff = float(np.abs(y - ref).max())
    rel = diff / max(float(np.abs(ref).max()), 1e-30)
    return {
        "layer": name,
        "ops": len(em.ops),
        "input": em.input_type,
        "output": em.output_type,
        "rows": len(x),
        "max_abs_diff": diff,
        "rel_diff": rel,
        "ok": rel <= ex.tolerance,
        "dir": str(out / name),
    }


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
    inputs = checks.read_export_inputs(directory, model, report["export_layers"], ex.num_samples)
    _clear(out, list(inputs))
    results = [_export_one(name, module, x, ex, out) for name, (module, x) in inputs.items()]
    (out / "check.json").write_text(json.dumps(results, indent=1))
    _say(
        f"fixed-point export of {len(results)} module(s) to {out}; emulator vs fake-quant "
        f"model on recorded inputs (tolerance {ex.tolerance:g} relative):"
    )
    _say(
        table(
            results, ["layer", "ops", "input", "output", "rows", "max_abs_diff", "rel_diff", "ok"]
        )
    )
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILURE


# --------------------------------------------------------------------------- #
# argument parsing, main
# --------------------------------------------------------------------------- #

EPILOG = """examples:
  tnquant compress minilm --recipe recipes/minilm.toml --calib corpus --out out/minilm
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
        "compress", help="run a recipe on a model", epilog=EPILOG, formatter_class=fmt
    )
    c.add_argument(
        "model",
        metavar="MODEL",
        help="'minilm', 'digits-cnn', a Hugging Face model dir (a causal LM such as GPT-2 or "
        "Llama, or a text encoder such as BERT) or a checkpoint",
    )
    c.add_argument("--recipe", required=True, help="recipe TOML file")
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
        help="fixed-point export of the recipe's export layers",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--fixed-point", required=True, metavar="OUT", help="output directory")
    e.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT (each exported layer's OUT/<name>/ is cleared first)",
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
