"""Export a factorized, quantized model to fixed point and check hls4ml against the emulator.

Run: ``python examples/export_fixed_point.py [out_dir] [--quick]``. ``out_dir``
(default: a new temporary directory) receives the exports; ``--quick`` checks 32
samples instead of 256 and skips the hls4ml C simulation. The C simulation needs
hls4ml and g++ (skipped otherwise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tnquant import FixedPoint, LowRank, QuantSpec, factorize, quantize
from tnquant.export import fixed_point, to_hls4ml


def export(out_dir: Path, quick: bool = False) -> None:
    """Export the toy model to ``out_dir``; ``quick``: 32 samples, no C simulation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    factorize(model, {"0": LowRank(rank=4)}, progress=False)
    quantize(
        model,
        cores=QuantSpec(bits=8, scale="pow2", granularity="channel", axis=0),
        weights={"2": FixedPoint(8, 2, rounding="RND_CONV", overflow="SAT")},
        progress=False,
    )
    input_spec = FixedPoint(12, 4, rounding="RND", overflow="SAT")
    em = fixed_point(model, out_dir / "export", input_spec)
    print(em)
    for op in em.ops:
        print(
            f"  {op.name:5s} {op.kind:5s} accum={[str(t) for t in op.accum_types]} "
            f"result={op.result_type}"
        )
    x = np.random.default_rng(0).normal(size=(32 if quick else 256, 16))
    y = em.predict(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).float()).double().numpy()
    print(f"max |emulator - float model| = {np.abs(y - ref).max():.3g}")
    print("\nbit budget and resource estimate (also in report.md / report.json):")
    print(em.report().table())
    # a narrowed accumulator: the emulator follows hls4ml; the report says how far it drifts
    narrow = FixedPoint(10, 1, rounding="TRN", overflow="WRAP")
    fixed_point(model, out_dir / "export_narrow", input_spec, accum={"0.1": narrow}, sample=x)
    rows = json.loads((out_dir / "export_narrow" / "report.json").read_text())["drift"]
    print(f"\ndrift from the fake-quant torch model with accum['0.1'] = {narrow}:")
    for row in rows:
        print(
            f"  layer {row['layer']:3s} max_abs={row['max_abs']:.4g} "
            f"max_rel={row['max_rel']:.3g} accum_overflow={row['accum_overflow']:.3%} "
            f"({row['overflow_modes']})"
        )
    if quick:
        print("--quick: skipping the hls4ml C simulation")
        return
    if shutil.which("g++") is None:
        print("g++ not found: skipping the hls4ml C simulation")
        return
    hls_model = to_hls4ml(model, out_dir / "hls", input_spec)
    hls_model.compile()
    same = np.array_equal(np.asarray(hls_model.predict(x)).reshape(y.shape), y)
    print(f"hls4ml C simulation bit-exact with the emulator: {same}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        help="directory for the exports (default: a new temporary directory)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="32 samples, no hls4ml C simulation (tests)"
    )
    args = ap.parse_args(argv)
    out_dir = args.out_dir if args.out_dir is not None else Path(tempfile.mkdtemp())
    print(f"exports in {out_dir}")
    export(out_dir, args.quick)


if __name__ == "__main__":
    main()
