"""What ``tnquant compress`` measures and ``tnquant report`` prints.

The before/after table, the per-layer errors and the export inputs read the
model through the one model-walking core: :func:`tnquant.core.outputs`
(the one rule for "the model's output"), :func:`tnquant.core.capture_inputs`
and :func:`tnquant.core.capture_outputs`, with train/eval mode restored.

Examples
--------
>>> print(table([{"a": 1.5, "b": None}], ["a", "b"]))
a    b
1.5  -
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tnquant.cli import checks
from tnquant.cli.causal import format_lm
from tnquant.core import capture_inputs, capture_outputs, evaluating, outputs
from tnquant.quantization import model_size_bits
from tnquant.report import Sizes

__all__ = [
    "compare",
    "layer_errors",
    "layer_rows",
    "totals",
    "export_inputs",
    "format_report",
    "table",
    "plot",
]


# --------------------------------------------------------------------------- #
# measurements
# --------------------------------------------------------------------------- #


def _outputs(model: nn.Module, batches: list[Any], progress: bool, desc: str) -> torch.Tensor:
    return torch.cat(
        [o.float().flatten(1) for o in outputs(model, batches, desc=desc, progress=progress)]
    )


def compare(
    original: nn.Module,
    student: nn.Module,
    batches: list[Any],
    labels: list[torch.Tensor] | None,
    progress: bool,
) -> dict[str, Any]:
    """The before/after table: size, accuracy on ``labels`` (else cosine to the original).

    A causal LM's table is :func:`tnquant.cli.causal.compare_lm` (perplexity, top-1 agreement).
    """
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
    rows = [
        {"model": n, "size_bits": model_size_bits(m), metric: v, "eval_s": s}
        for n, m, v, s in zip(names, models, values, times, strict=True)
    ]
    return {"metric": metric, "samples": len(ref), "rows": rows}


def layer_errors(
    original: nn.Module, student: nn.Module, names: list[str], batch: Any
) -> dict[str, float]:
    """Relative output error of each compressed layer on the original layer's inputs."""
    before = dict(original.named_modules())
    modules = {n: before[n] for n in names if n in before}
    inputs = capture_inputs(original, modules, [batch])
    outs = capture_outputs(original, modules, [batch])
    after, errors = dict(student.named_modules()), {}
    with evaluating(student):
        for name, x in inputs.items():
            ref = torch.cat(outs[name])
            diff = (after[name](x) - ref).double().norm()
            errors[name] = (diff / ref.double().norm().clamp_min(1e-30)).item()
    return errors


def _bits_of(module: nn.Module) -> str:
    bits = sorted(
        {
            int(m.spec.bits)
            for n, m in module.named_modules()
            if hasattr(m, "spec") and hasattr(m.spec, "bits") and "act_quantizers" not in n
        }
    )
    return "/".join(str(b) for b in bits) if bits else "32"


def layer_rows(
    original: nn.Module, student: nn.Module, fact: Any, quant: Any, errors: dict[str, float]
) -> list[dict[str, Any]]:
    """One row per factorized or quantized layer: format, ranks, bits, sizes, error."""
    frows = {r["name"]: r for r in fact} if fact is not None else {}
    qnames = {r["name"] for r in quant} if quant is not None else set()
    before, after = dict(original.named_modules()), dict(student.named_modules())
    rows = []
    for name in (n for n in before if n in frows or n in qnames):
        f = frows.get(name, {})
        params = sum(p.numel() for p in before[name].parameters())
        rows.append(
            {
                "name": name,
                "kind": type(before[name]).__name__,
                "format": f.get("format", "dense"),
                "ranks": f.get("ranks"),
                "bits": _bits_of(after[name]),
                "params_before": params,
                "params_after": f.get("params_after", params),
                "bits_before": model_size_bits(before[name]),
                "size_bits": model_size_bits(after[name]),
                "error": errors.get(name),
            }
        )
    return rows


def totals(rows: list[dict[str, Any]], cmp: dict[str, Any]) -> dict[str, Any]:
    """Sums over the layer rows, and the whole model's sizes from the before/after table."""
    out = {
        k: sum(r[k] for r in rows)
        for k in ("params_before", "params_after", "bits_before", "size_bits")
    }
    out["layers_compression"] = out["bits_before"] / max(out["size_bits"], 1)
    sizes = [r["size_bits"] for r in cmp["rows"]]
    out["model_bits_before"], out["model_bits_after"] = sizes
    out["model_compression"] = sizes[0] / max(sizes[1], 1)
    return out


def export_inputs(
    model: nn.Module, names: list[str], batches: list[Any], rows: int
) -> dict[str, np.ndarray]:
    """Up to ``rows`` input rows of each module ``names`` (``export_inputs/<name>.npy``).

    Batches are read one at a time until every module has ``rows`` rows.

    Examples
    --------
    >>> from tnquant.cli.inputs import digits_cnn
    >>> rows = export_inputs(digits_cnn(), ["classifier"], [torch.zeros(3, 1, 8, 8)], 2)
    >>> rows["classifier"].shape
    (2, 512)
    """
    modules = dict(model.named_modules())
    wanted = {n: modules[n] for n in names}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in batches:
        for name, x in capture_inputs(model, wanted, [batch]).items():
            seen[name].append(x.flatten(0, -2).float().cpu())
        if all(sum(len(t) for t in seen[n]) >= rows for n in names):
            break
    return {n: torch.cat(v)[:rows].numpy() for n, v in seen.items()}


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


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """``rows`` as aligned text columns ``cols`` (``-`` for a missing value)."""
    lines = [cols] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def format_report(report: dict[str, Any]) -> str:
    """The text of ``tnquant report``: per-layer table, totals, before/after.

    The totals line and the before/after table give both ratios: the whole
    model's (``whole_x``: every stored bit, embeddings and norms included)
    and the compressed layers' (``layers_x``: the rows of the layer table).

    ``report`` is the content of ``report.json`` as ``tnquant compress`` writes
    it; a field missing or of the wrong type raises a ``ValueError`` naming it.

    Examples
    --------
    >>> format_report({"tnquant_report": 1, "model": "m"})
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: report.json: field 'recipe' is missing; expected a string
    """
    checks.check_report(report)
    cols = [
        "name",
        "format",
        "ranks",
        "bits",
        "params_before",
        "params_after",
        "bits_before",
        "size_bits",
        "error",
    ]
    t = report["totals"]
    sizes = Sizes(
        t["model_bits_before"],
        t["model_bits_after"],
        t["params_before"],
        t["bits_before"],
        t["size_bits"],
    )
    lines = [
        f"model {report['model']}  recipe {report['recipe']}  seed {report['seed']}",
        "",
        table(report["layers"], cols),
        f"compressed layers: {t['params_before']} -> {t['params_after']} params, "
        f"{t['bits_before']} -> {t['size_bits']} bits ({t['layers_compression']:.2f}x)",
        f"whole model: {t['model_bits_before']} -> {t['model_bits_after']} bits "
        f"({t['model_compression']:.2f}x)",
        sizes.line(),
        "",
    ]
    cmp = report["compare"]
    rows = [{**r, "size_MiB": r["size_bits"] / 8 / 2**20} for r in cmp["rows"]]
    for r, whole, part in zip(
        rows, (1.0, sizes.model_ratio), (1.0, sizes.layers_ratio), strict=True
    ):
        r["whole_x"], r["layers_x"] = whole, part  # original, compressed
    if cmp["metric"] == "perplexity":  # a causal LM (tnquant.cli.causal.compare_lm)
        head, tail = format_lm(cmp, report["eval_data"])
        lines.append(head)
        lines.append(
            table(
                rows,
                [
                    "model",
                    "size_MiB",
                    "whole_x",
                    "layers_x",
                    "perplexity",
                    "top1_agreement",
                    "eval_s",
                ],
            )
        )
        lines.append(tail)
    else:
        what = "to the original outputs" if cmp["metric"] == "cosine" else "on the labels"
        lines.append(
            f"before/after on {cmp['samples']} samples of {report['eval_data']!r} "
            f"({cmp['metric']} {what})"
        )
        lines.append(
            table(rows, ["model", "size_MiB", "whole_x", "layers_x", cmp["metric"], "eval_s"])
        )
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report["stages"].items())
    lines.append(f"time: {stages}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bar charts of the layer sizes and errors to ``path``; ``False`` without matplotlib."""
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
