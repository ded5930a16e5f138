"""What ``tnquant export`` does with each piece it exports: the input rows, the export, the check.

A recipe's ``[export]`` table either names ``layers`` (each matched module,
a chain such as MiniLM's feed-forward block, goes to ``OUT/<name>/``) or
leaves them out: then the **whole model** goes to ``OUT`` itself.

``compress`` records the input rows the check runs on
(:func:`record_inputs`): for layers, what reaches each module on the
calibration data (``export_inputs/<name>.npy``, flat rows); for the whole
model, the held-out model inputs themselves, in their own shape
(``export_inputs/model.npy``, e.g. ``(N, 1, 8, 8)`` for digits; the export's
``input_shape`` is that sample shape).

``export`` (:func:`export_piece`) runs :func:`tnquant.export.fixed_point` on
the module in float64 (its biases snapped to the stored grid, as the export
does by default) and counts, row by row, the outputs of the integer emulator
that equal the torch fake-quant model's **bit for bit**, on the recorded rows
and on :data:`SATURATING_ROWS` rows that drive the input type to both ends
(:func:`saturating_inputs`). Any mismatch fails the check. Only when the
recipe narrows types with ``accum``/``result`` (the torch model does not
carry them, so the two differ by design) is the check instead the largest
relative difference on the recorded rows against ``tolerance``.

Examples
--------
>>> from tnquant.specs import FixedPoint
>>> saturating_inputs(FixedPoint(8, 3), 4)[:2]
array([[ 3.96875,  3.96875,  3.96875,  3.96875],
       [-3.96875, -3.96875, -3.96875, -3.96875]])
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tnquant.cli.checks import UsageError, dir_file
from tnquant.cli.report import export_inputs
from tnquant.specs import FixedPoint

__all__ = [
    "WHOLE",
    "SATURATING_ROWS",
    "whole_model",
    "check_model_batch",
    "record_inputs",
    "read_model_inputs",
    "saturating_inputs",
    "export_piece",
]

#: The file stem of the whole model's recorded inputs (``export_inputs/model.npy``).
WHOLE = "model"
#: Rows of saturating inputs added to every exact check.
SATURATING_ROWS = 16


def whole_model(ex: Any) -> bool:
    """True when the ``[export]`` table ``ex`` exports the whole model (no ``layers``).

    Examples
    --------
    >>> from tnquant.cli.recipe import ExportSection
    >>> whole_model(ExportSection()), whole_model(ExportSection(layers=("classifier",)))
    (True, False)
    """
    return ex is not None and not ex.layers


def check_model_batch(batch: Any) -> None:
    """Refuse a batch the whole-model export cannot record: float ``(B, F)`` or ``(B, C, H, W)``.

    Examples
    --------
    >>> check_model_batch(torch.zeros(2, 1, 8, 8))
    >>> check_model_batch({"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: recipe table 'export' has no 'layers', so it exports ...
    """
    ok = isinstance(batch, torch.Tensor) and batch.is_floating_point() and batch.ndim in (2, 4)
    if not ok:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else ""
        raise UsageError(
            "recipe table 'export' has no 'layers', so it exports the whole model, whose "
            "inputs must be float tensors (batch, features) or (batch, C, H, W); the data "
            f"gives {type(batch).__name__}{shape}: name the modules to export with export.layers"
        )


def record_inputs(
    model: torch.nn.Module, ex: Any, names: list[str], calib: list[Any], held_out: list[Any]
) -> dict[str, np.ndarray]:
    """The input rows ``compress`` records (``export_inputs/<stem>.npy``) for ``[export]`` ``ex``.

    Layers: up to ``ex.num_samples`` flat input rows of each module
    ``names`` on the ``calib`` batches. The whole model: up to
    ``ex.num_samples`` samples of the ``held_out`` batches (float tensors
    ``(batch, features)`` or ``(batch, C, H, W)``), as float32 in their own
    shape, under :data:`WHOLE`.

    Examples
    --------
    >>> from tnquant.cli.recipe import ExportSection
    >>> held_out = [torch.zeros(3, 1, 8, 8), torch.ones(3, 1, 8, 8)]
    >>> rows = record_inputs(torch.nn.Flatten(), ExportSection(num_samples=4), [], [], held_out)
    >>> rows["model"].shape
    (4, 1, 8, 8)
    """
    if ex is None:
        return {}
    if not whole_model(ex):
        return export_inputs(model, names, calib, ex.num_samples)
    seen: list[torch.Tensor] = []
    for batch in held_out:
        check_model_batch(batch)
        seen.append(batch.detach().float().cpu())
        if sum(len(t) for t in seen) >= ex.num_samples:
            break
    if not seen:
        raise UsageError("the whole-model export has no held-out batch to record")
    return {WHOLE: torch.cat(seen)[: ex.num_samples].numpy()}


def read_model_inputs(directory: Path, rows: int) -> np.ndarray:
    """Up to ``rows`` recorded whole-model inputs of ``directory``, checked, as float32.

    The file is memory-mapped without pickle and must hold a float array of
    2 dimensions (flat samples) or 4 (``(N, C, H, W)``), at least one sample,
    all finite.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / "export_inputs").mkdir()
    >>> np.save(d / "export_inputs" / "model.npy", np.zeros((5, 1, 8, 8)))
    >>> read_model_inputs(d, 3).shape
    (3, 1, 8, 8)
    """
    path = dir_file(directory, "export_inputs", f"{WHOLE}.npy")
    if not path.is_file():
        raise UsageError(f"{path} is missing (or not a regular file)")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path} is not a readable .npy array: {e}") from None
    if not isinstance(x, np.ndarray) or x.ndim not in (2, 4) or x.dtype.kind != "f":
        raise UsageError(
            f"{path} must hold a float array (N, features) or (N, C, H, W), got "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    if len(x) == 0 or 0 in x.shape:
        raise UsageError(f"{path} holds no input samples (shape {x.shape})")
    out = np.array(x[:rows], dtype=np.float32)
    if not np.isfinite(out).all():
        raise UsageError(f"{path} holds non-finite inputs (nan or inf)")
    return out


def saturating_inputs(spec: FixedPoint, features: int, rows: int = SATURATING_ROWS) -> np.ndarray:
    """``rows`` inputs that reach (and pass) both ends of the input type ``spec``.

    All at the largest value, all at its negative, a checkerboard of the two
    and its inverse, then random signs of twice the largest value (each input
    saturates) and uniform values within twice the range (about half do);
    seeded, so every run checks the same rows.

    Examples
    --------
    >>> x = saturating_inputs(FixedPoint(6, 2), 3, rows=6)
    >>> x.shape, float(x.max()) <= 2 * 1.9375
    ((6, 3), True)
    """
    top = 2.0 ** (spec.integer - 1) - 2.0**-spec.frac
    rng = np.random.default_rng(0)
    checker = np.where(np.arange(features) % 2 == 0, top, -top)
    fixed = np.stack([np.full(features, top), np.full(features, -top), checker, -checker])
    half = (rows - len(fixed) + 1) // 2
    signs = rng.choice([-2.0 * top, 2.0 * top], size=(half, features))
    uniform = rng.uniform(-2.0 * top, 2.0 * top, size=(rows, features))
    return np.concatenate([fixed, signs, uniform])[:rows]


def _input_spec(ex: Any, x: np.ndarray) -> FixedPoint:
    if ex.input != "auto":
        return FixedPoint.from_string(ex.input)
    peak = float(np.abs(x).max()) or 1.0
    integer = max(1, math.floor(math.log2(peak)) + 2)
    return FixedPoint(ex.input_width, integer, rounding="RND", overflow="SAT")


def _compare(
    em: Any, module: torch.nn.Module, x: np.ndarray, shape: tuple[int, ...] | None
) -> tuple[int, float, float]:
    """Rows where emulator == fake-quant model bit for bit; largest abs and relative difference."""
    y = np.asarray(em.predict(x), dtype=np.float64)
    xq = np.ldexp(
        em.quantize_input(x).astype(np.float64), -FixedPoint.from_string(em.input_type).frac
    )
    t = torch.from_numpy(xq)
    with torch.no_grad():
        ref = module(t.reshape(-1, *shape) if shape else t).double().cpu().numpy()
    ref = ref.reshape(y.shape)
    same = int(np.all(y == ref, axis=1).sum())
    diff = float(np.abs(y - ref).max())
    return same, diff, diff / max(float(np.abs(ref).max()), 1e-30)


def export_piece(
    name: str, module: torch.nn.Module, x: np.ndarray, ex: Any, out: Path
) -> dict[str, Any]:
    """Export ``module`` (the whole model when ``name`` is ``''``) to ``out``; check it on ``x``.

    ``x`` holds the recorded rows: flat for a layer, ``(N, C, H, W)`` (the
    export's ``input_shape`` is ``(C, H, W)``) or flat for the whole model.
    The module is turned to float64 and its biases snapped to the stored
    grid, in place. A module that does not export (a float scale, an
    unsupported layer, a type too wide) raises :class:`UsageError` with the
    export's message, which names the layer and tensor.

    Returns
    -------
    dict
        The row of ``check.json``: ``layer``, ``ops``, ``input``, ``output``,
        ``rows``/``exact`` (recorded rows, and those bit-exact),
        ``saturating``/``saturating_exact``, ``max_abs_diff``, ``rel_diff``,
        ``check`` (``'exact'`` or ``'tolerance'``), ``tolerance`` (``None`` for
        an exact check), ``ok``, ``dir``.

    Examples
    --------
    >>> import tempfile
    >>> from torch import nn
    >>> from tnquant import QuantSpec, quantize
    >>> from tnquant.cli.recipe import ExportSection
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = quantize(model, weights=QuantSpec(bits=6, scale="pow2"), progress=False)
    >>> x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    >>> row = export_piece("", model, x, ExportSection(), Path(tempfile.mkdtemp()))
    >>> row["exact"], row["saturating_exact"], row["ok"]
    (8, 16, True)
    """
    from tnquant.export import fixed_point

    shape = tuple(int(n) for n in x.shape[1:]) if x.ndim == 4 else None
    flat = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float64)
    spec = _input_spec(ex, flat)
    what = "the whole model" if not name else f"export layer {name!r}"
    module.double()
    try:
        em = fixed_point(
            module,
            out,
            spec,
            accum=ex.accum,
            result=ex.result,
            bias=ex.bias,
            hls4ml=ex.hls4ml,
            input_shape=shape,
        )
    except ValueError as e:
        raise UsageError(f"{what} does not export to fixed point: {e}") from None
    exact_check = ex.accum is None and ex.result is None
    same, diff, rel = _compare(em, module, flat, shape)
    sat_rows, sat_same = 0, None
    if exact_check:
        sat = saturating_inputs(spec, flat.shape[1])
        sat_rows, (sat_same, _, _) = len(sat), _compare(em, module, sat, shape)
    ok = (same == len(flat) and sat_same == sat_rows) if exact_check else rel <= ex.tolerance
    return {
        "layer": name,
        "ops": len(em.ops),
        "input": em.input_type,
        "output": em.output_type,
        "rows": len(flat),
        "exact": same,
        "saturating": sat_rows,
        "saturating_exact": sat_same,
        "max_abs_diff": diff,
        "rel_diff": rel,
        "check": "exact" if exact_check else "tolerance",
        "tolerance": None if exact_check else ex.tolerance,
        "ok": bool(ok),
        "dir": str(out),
    }
