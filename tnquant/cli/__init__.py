"""The ``tnquant`` command line: ``compress``, ``report`` and ``export``.

``tnquant compress MODEL --recipe R --calib DATA --out DIR`` runs a recipe
(:mod:`tnquant.cli.recipe`) on a model (MODEL and DATA:
:mod:`tnquant.cli.inputs`) through :func:`tnquant.pipeline.run_pipeline`
and writes ``DIR``: the compressed model (:func:`tnquant.save` format),
``report.json``, ``recipe.toml`` (a copy), ``source.json`` (what the base
model was), ``export_inputs/`` (input rows of the recipe's export layers, or
held-out inputs of the whole model) and ``report.png``. ``tnquant report DIR``
prints its tables; ``tnquant export DIR --fixed-point OUT`` writes the
fixed-point export of the export layers (or of the whole model when the
recipe's ``[export]`` names no ``layers``) and counts the rows where the
integer emulator equals the fake-quant model bit for bit
(:mod:`~tnquant.cli.export_cmd`).

``compress`` checks every argument before any work. ``report`` and ``export``
read DIR as data (:mod:`tnquant.cli.checks`) and never import a module or
call a class that a file in DIR names; a checkpoint base's class comes from
``export --model-class``. Only ``compress`` imports a ``[model] class``: the
one of the user's own ``--recipe``.

Exit codes: 0 success, 2 a usage, recipe or input-file error (one line on
stderr), 1 a failure while running (or an emulator output that differs from
the fake-quant model's).

The package: :mod:`~tnquant.cli.commands` (the commands, the parser,
``main``), :mod:`~tnquant.cli.inputs` (MODEL and DATA),
:mod:`~tnquant.cli.recipe` (the recipe schema, derived from the pipeline's
sections and ``FinetuneConfig``), :mod:`~tnquant.cli.checks` (every input
check), :mod:`~tnquant.cli.report` (measurements and printing) and
:mod:`~tnquant.cli.datasets` (the real models and data of the shortcuts,
the examples and the benchmarks).

Examples
--------
>>> args = make_parser().parse_args(["report", "out/minilm", "--json"])
>>> args.command, args.dir, args.json
('report', 'out/minilm', True)
"""

from tnquant.cli.commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main, make_parser
from tnquant.cli.report import format_report

__all__ = ["main", "make_parser", "format_report", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]
