"""The ``tnquant`` command line: ``compress``, ``report`` and ``export``.

``tnquant compress MODEL --recipe R --calib DATA --out DIR`` runs a recipe
(:mod:`tnquant.recipe`) on a model (MODEL and DATA: :mod:`tnquant.cli_inputs`)
and writes ``DIR``: the compressed model (:func:`tnquant.save` format),
``report.json``, ``recipe.toml`` (a copy), ``source.json`` (what the base
model was), ``export_inputs/`` (input rows of the recipe's export layers) and
``report.png``. ``tnquant report DIR`` prints its tables; ``tnquant export DIR
--fixed-point OUT`` writes the fixed-point export of the export layers and
checks the integer emulator against the fake-quant model.

``compress`` checks every argument before any work. ``report`` and ``export``
read DIR as data (:mod:`tnquant.cli_checks`) and never import a module or
call a class that a file in DIR names; a checkpoint base's class comes from
``export --model-class``. Only ``compress`` imports a ``[model] class``: the
one of the user's own ``--recipe``.

Exit codes: 0 success, 2 a usage, recipe or input-file error (one line on
stderr), 1 a failure while running (or an emulator check out of tolerance).

Examples
--------
>>> args = make_parser().parse_args(["report", "out/minilm", "--json"])
>>> args.command, args.dir, args.json
('report', 'out/minilm', True)
"""

from __future__ import annotations

import argparse
import copy
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
from torch import nn

from tnquant import cli_checks as checks
from tnquant.batches import call_model
from tnquant.cli_checks import UsageError, dir_file, read_json
from tnquant.cli_inputs import capture_inputs, check_compress, prepare_compress, rebuild_base
from tnquant.io import IntegrityError
from tnquant.recipe import load_recipe

__all__ = ["main", "make_parser", "format_report", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Exceptions that mean bad input: exit 2 (as does a ValueError that starts with "recipe").
_USAGE = (UsageError, IntegrityError, FileNotFoundError, NotADirectoryError)
REPORT, SOURCE, RECIPE, INPUTS, PLOT = (
    "report.json", "source.json", "recipe.toml", "export_inputs", "report.png")


def _say(*args: Any) -> None:
    print(*args, flush=True)


# --------------------------------------------------------------------------- #
# measurements
# --------------------------------------------------------------------------- #


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[Any], progress: bool, desc: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    from tnquant.qat.losses import default_outputs

    model.eval()
    return torch.cat([default_outputs(call_model(model, b)).float().flatten(1)
                      for b in tqdm(batches, desc=desc, disable=not progress, leave=False)])


def _compare(original: nn.Module, student: nn.Module, batches: list[Any],
             labels: list[torch.Tensor] | None, progress: bool) -> dict[str, Any]:
    from tnquant import model_size_bits

    outs, times = [], []
    for model, desc in ((original, "eval original"), (student, "eval compressed")):
        t0 = time.perf_counter()
        outs.append(_outputs(model, batches, progress, desc))
        times.append(time.perf_counter() - t0)
    ref, out = outs
    if labels is not None:
        y, metric = torch.cat(labels), "accuracy"
        values = [(o.argmax(1) == y).float().mean().item() for o in outs]
    else:
        metric = "cosine"
        values = [1.0, nn.functional.cosine_similarity(out, ref).mean().item()]
    names, models = ("original", "compressed"), (original, student)
    rows = [{"model": n, "size_bits": model_size_bits(m), metric: v, "eval_s": s}
            for n, m, v, s in zip(names, models, values, times, strict=True)]
    return {"metric": metric, "samples": len(ref), "rows": rows}


@torch.no_grad()
def _layer_errors(original: nn.Module, student: nn.Module, names: list[str],
                  batch: Any) -> dict[str, float]:
    """Relative output error of each compressed layer on the original layer's inputs."""
    modules = dict(original.named_modules())
    seen: dict[str, tuple[Any, Any]] = {}
    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            seen.setdefault(name, (args, out))
        return record

    hooks = [modules[n].register_forward_hook(hook(n)) for n in names if n in modules]
    try:
        call_model(original.eval(), batch)
    finally:
        for h in hooks:
            h.remove()
    compressed, errors = dict(student.eval().named_modules()), {}
    for name, (args, out) in seen.items():
        diff = (compressed[name](*args) - out).double().norm()
        errors[name] = (diff / out.double().norm().clamp_min(1e-30)).item()
    return errors


def _bits_of(module: nn.Module) -> str:
    bits = sorted({int(m.spec.bits) for n, m in module.named_modules()
                   if hasattr(m, "spec") and hasattr(m.spec, "bits")
                   and "act_quantizers" not in n})
    return "/".join(str(b) for b in bits) if bits else "32"


def _layer_rows(original: nn.Module, student: nn.Module, fact: Any, quant: Any,
                errors: dict[str, float]) -> list[dict[str, Any]]:
    from tnquant import model_size_bits

    frows = {r["name"]: r for r in fact} if fact is not None else {}
    qnames = {r["name"] for r in quant} if quant is not None else set()
    before, after = dict(original.named_modules()), dict(student.named_modules())
    rows = []
    for name in (n for n in before if n in frows or n in qnames):
        f = frows.get(name, {})
        params = sum(p.numel() for p in before[name].parameters())
        rows.append({"name": name, "kind": type(before[name]).__name__,
                     "format": f.get("format", "dense"), "ranks": f.get("ranks"),
                     "bits": _bits_of(after[name]), "params_before": params,
                     "params_after": f.get("params_after", params),
                     "bits_before": model_size_bits(before[name]),
                     "size_bits": model_size_bits(after[name]), "error": errors.get(name)})
    return rows


def _totals(rows: list[dict[str, Any]], compare: dict[str, Any]) -> dict[str, Any]:
    out = {k: sum(r[k] for r in rows) for k in ("params_before", "params_after", "bits_before",
                                                "size_bits")}
    out["layers_compression"] = out["bits_before"] / max(out["size_bits"], 1)
    sizes = [r["size_bits"] for r in compare["rows"]]
    out["model_bits_before"], out["model_bits_after"] = sizes
    out["model_compression"] = sizes[0] / max(sizes[1], 1)
    return out


# --------------------------------------------------------------------------- #
# printing, plots
# --------------------------------------------------------------------------- #


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) or "-"
    return str(value)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = [cols] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def format_report(report: dict[str, Any]) -> str:
    """The text of ``tnquant report``: per-layer table, totals, before/after.

    ``report`` is the content of ``report.json`` as ``tnquant compress`` writes
    it; a field missing or of the wrong type raises a ``ValueError`` naming it.

    Examples
    --------
    >>> format_report({"tnquant_report": 1, "model": "m"})
    Traceback (most recent call last):
    ...
    tnquant.cli_checks.UsageError: report.json: field 'recipe' is missing; expected a string
    """
    checks.check_report(report)
    cols = ["name", "format", "ranks", "bits", "params_before", "params_after", "bits_before",
            "size_bits", "error"]
    t = report["totals"]
    lines = [f"model {report['model']}  recipe {report['recipe']}  seed {report['seed']}", "",
             _table(report["layers"], cols),
             f"compressed layers: {t['params_before']} -> {t['params_after']} params, "
             f"{t['bits_before']} -> {t['size_bits']} bits ({t['layers_compression']:.2f}x)",
             f"whole model: {t['model_bits_before']} -> {t['model_bits_after']} bits "
             f"({t['model_compression']:.2f}x)", ""]
    cmp = report["compare"]
    rows = [{**r, "size_MiB": r["size_bits"] / 8 / 2**20} for r in cmp["rows"]]
    what = "to the original outputs" if cmp["metric"] == "cosine" else "on the labels"
    lines.append(f"before/after on {cmp['samples']} samples of {report['eval_data']!r} "
                 f"({cmp['metric']} {what})")
    lines.append(_table(rows, ["model", "size_MiB", cmp["metric"], "eval_s"]))
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report["stages"].items())
    lines.append(f"time: {stages}")
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["layers"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(rows)), 7), sharex=True)
    idx = np.arange(len(rows))
    ax1.bar(idx - 0.2, [r["bits_before"] for r in rows], 0.4, label="before")
    ax1.bar(idx + 0.2, [r["size_bits"] for r in rows], 0.4, label="after")
    ax1.set_yscale("log")
    ax1.set_ylabel("size (bits)")
    ax1.legend()
    ax2.bar(idx, [r["error"] or 0.0 for r in rows])
    ax2.set_ylabel("relative output error")
    ax2.set_xticks(idx, [r["name"] for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- #
# commands
# --------------------------------------------------------------------------- #


def _compress(args: argparse.Namespace) -> int:
    from tnquant import calibrate, convert, factorize, finetune, quantize, save

    recipe, progress, out = load_recipe(args.recipe), not args.no_progress, Path(args.out)
    kind = check_compress(args, recipe)  # every argument, before any work
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    original, source, calib, calib_labels, batches, labels, names = prepare_compress(
        args, recipe, kind, progress)
    eval_arg = args.eval or args.calib
    stages["load"] = time.perf_counter() - t0
    student, fact, quant = copy.deepcopy(original), None, None
    if recipe.factorize is not None:
        t0, f = time.perf_counter(), recipe.factorize
        fact = factorize(student, f.mapping(), data=calib if f.data_aware else None,
                         num_batches=f.num_batches, progress=progress)
        stages["factorize"] = time.perf_counter() - t0
    if recipe.quantize is not None:
        t0 = time.perf_counter()
        quant = quantize(student, **recipe.quantize.kwargs(), progress=progress)
        calibrate(student, calib, recipe.calibrate.num_batches,
                  bias_correction=recipe.calibrate.bias_correction, progress=progress)
        stages["quantize+calibrate"] = time.perf_counter() - t0
    if recipe.finetune is not None:
        ft = recipe.finetune
        data = calib if ft.task_loss is None else list(zip(calib, calib_labels or [],
                                                           strict=True))
        t0 = time.perf_counter()
        finetune(student, data, teacher=original if ft.distill else None, loss=ft.loss,
                 temperature=ft.temperature, alpha=ft.alpha, epochs=ft.epochs,
                 task_loss=nn.functional.cross_entropy if ft.task_loss else None,
                 max_steps=ft.max_steps, lr=ft.lr, scale_lr=ft.scale_lr,
                 weight_decay=ft.weight_decay, optimizer=ft.optimizer, schedule=ft.schedule,
                 warmup=ft.warmup, clip_grad_norm=ft.clip_grad_norm, train=ft.train,
                 shuffle=ft.shuffle, seed=args.seed, progress=progress)
        stages["finetune"] = time.perf_counter() - t0
    if recipe.quantize is not None and recipe.quantize.convert:
        t0 = time.perf_counter()
        convert(student, progress=progress)
        stages["convert"] = time.perf_counter() - t0
    student.eval()
    layer_names = [r["name"] for r in fact or []] + [r["name"] for r in quant or []]
    errors = _layer_errors(original, student, layer_names, calib[0])
    t0 = time.perf_counter()
    compare = _compare(original, student, batches, labels, progress)
    stages["eval"] = time.perf_counter() - t0
    rows = _layer_rows(original, student, fact, quant, errors)
    save(student, out)
    inputs = capture_inputs(student, names, calib, recipe.export.num_samples
                            ) if recipe.export else {}
    (out / INPUTS).mkdir(exist_ok=True)
    for name, x in inputs.items():
        np.save(out / INPUTS / f"{name}.npy", x)
    (out / RECIPE).write_text(recipe.text, encoding="utf-8")
    (out / SOURCE).write_text(json.dumps({**source, "seed": args.seed}, indent=1))
    report = {"tnquant_report": 1, "model": args.model, "recipe": str(args.recipe),
              "seed": args.seed, "calib_data": args.calib, "eval_data": eval_arg,
              "layers": rows, "totals": _totals(rows, compare), "compare": compare,
              "stages": stages, "export_layers": names}
    (out / REPORT).write_text(json.dumps(report, indent=1))
    _say(format_report(report))
    if _plot(report, out / PLOT):
        _say(f"plot: {out / PLOT}")
    _say(f"saved to {out}")
    return EXIT_OK


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


def _export(args: argparse.Namespace) -> int:
    from tnquant import load
    from tnquant.export import fixed_point
    from tnquant.quant import fake_quantize
    from tnquant.specs import FixedPoint

    directory = Path(args.dir)
    report = _read(directory, REPORT, checks.check_report)
    source = _read(directory, SOURCE, checks.check_source)
    recipe = load_recipe(dir_file(directory, RECIPE))  # data only: [model] class is not used
    if recipe.export is None:
        raise UsageError(f"the recipe in {directory} has no [export] table")
    ex, out = recipe.export, checks.check_out_dir(args.fixed_point, "--fixed-point", args.force)
    if out.resolve() == directory.resolve():
        raise UsageError(f"--fixed-point {args.fixed_point!r} is DIR itself; choose another")
    base = rebuild_base(source, directory, model=args.model, model_class=args.model_class,
                        model_kwargs=args.model_kwargs)
    try:
        model = load(directory, model=base).eval()
    except ValueError as e:  # IntegrityError too: a directory that does not fit its base
        raise UsageError(f"{directory} does not load onto its base model: {e}") from None
    inputs = checks.read_export_inputs(directory, model, report["export_layers"], ex.num_samples)
    results = []
    _clear(out, list(inputs))
    for name, (module, x) in inputs.items():
        if ex.input == "auto":
            peak = float(np.abs(x).max()) or 1.0
            integer = max(1, math.floor(math.log2(peak)) + 2)
            spec = FixedPoint(ex.input_width, integer, rounding="RND", overflow="SAT")
        else:
            spec = FixedPoint.from_string(ex.input)
        em = fixed_point(module, out / name, spec, accum=ex.accum, result=ex.result,
                         bias=ex.bias, hls4ml=ex.hls4ml)
        y = em.predict(x)
        with torch.no_grad():
            xq = fake_quantize(torch.from_numpy(x), spec)
            ref = module(xq).double().numpy()
        diff = float(np.abs(y - ref).max())
        rel = diff / max(float(np.abs(ref).max()), 1e-30)
        results.append({"layer": name, "ops": len(em.ops), "input": em.input_type,
                        "output": em.output_type, "rows": len(x), "max_abs_diff": diff,
                        "rel_diff": rel, "ok": rel <= ex.tolerance, "dir": str(out / name)})
    (out / "check.json").write_text(json.dumps(results, indent=1))
    _say(f"fixed-point export of {len(results)} module(s) to {out}; emulator vs fake-quant "
         f"model on recorded inputs (tolerance {ex.tolerance:g} relative):")
    _say(_table(results, ["layer", "ops", "input", "output", "rows", "max_abs_diff",
                          "rel_diff", "ok"]))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILURE


# --------------------------------------------------------------------------- #
# argument parsing, main
# --------------------------------------------------------------------------- #

EPILOG = """examples:
  tnquant compress minilm --recipe recipes/minilm.toml --calib corpus --out out/minilm
  tnquant compress digits-cnn --recipe recipes/digits.toml --calib digits --out out/digits
  tnquant compress ./my-hf-model --recipe r.toml --calib sentences.txt --eval held_out.txt \\
      --out out/mine
  tnquant compress model.pt --recipe r.toml --calib inputs.npy --out out/mine  # [model] class
  tnquant report out/minilm --json
  tnquant export out/minilm --fixed-point out/minilm-fixed
  tnquant export out/mine --fixed-point out/mine-fx --model-class pkg.mod:Net  # a .pt base

exit codes: 0 ok, 1 failure while running (or emulator check failed), 2 usage/recipe error
recipe schema: recipes/README.md (or python -c "import tnquant.recipe; help(tnquant.recipe)")
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        self.print_usage(sys.stderr)
        raise SystemExit(f"{self.prog}: error: {message}") from None


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tnquant`` (see the module docs).

    Examples
    --------
    >>> make_parser().parse_args(["export", "d", "--fixed-point", "o"]).fixed_point
    'o'
    """
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="tnquant", epilog=EPILOG, formatter_class=fmt,
                     description="Compress PyTorch models with tensor networks and quantization.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("compress", help="run a recipe on a model", epilog=EPILOG,
                       formatter_class=fmt)
    c.add_argument("model", metavar="MODEL",
                   help="'minilm', 'digits-cnn', a Hugging Face model dir or a checkpoint")
    c.add_argument("--recipe", required=True, help="recipe TOML file")
    c.add_argument("--calib", required=True, metavar="DATA",
                   help="'corpus', 'digits', a text file (one sentence a line), .npy or .pt")
    c.add_argument("--eval", metavar="DATA", help="held-out data for the before/after table "
                   "(default: the held-out split of --calib's shortcut, or --calib itself)")
    c.add_argument("--out", required=True, metavar="DIR", help="output directory")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    r = sub.add_parser("report", help="print the report of a compressed model", epilog=EPILOG,
                       formatter_class=fmt)
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--json", action="store_true", help="print report.json")
    e = sub.add_parser("export", help="fixed-point export of the recipe's export layers",
                       epilog=EPILOG, formatter_class=fmt)
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--fixed-point", required=True, metavar="OUT", help="output directory")
    e.add_argument("--force", action="store_true", help="write into a non-empty OUT (each "
                   "exported layer's OUT/<name>/ is cleared first)")
    e.add_argument("--model", metavar="MODEL", help="the base model instead of the one "
                   "DIR/source.json names: 'minilm', 'digits-cnn' or a Hugging Face model dir")
    e.add_argument("--model-class", metavar="pkg.mod:Class", help="the base model's class, "
                   "for a checkpoint base (DIR's recipe is never imported)")
    e.add_argument("--model-kwargs", metavar="JSON", help="constructor arguments for "
                   "--model-class, a JSON object")
    return parser


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
        message = " ".join(str(e).split())  # one line
        usage = isinstance(e, _USAGE) or (isinstance(e, ValueError)
                                          and str(e).startswith("recipe"))
        if usage:
            print(f"tnquant: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        print(f"tnquant: error: {type(e).__name__}: {message} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILURE
