"""Export a quantized, factorized model to ONNX (QDQ) and run it with onnxruntime.

The model: a low-rank and a TT layer (int4 cores, per channel), a dense
Linear with int4 per-group(32) weights, a dense Linear with int8 per-channel
weights, 8-bit activation quantizers calibrated on random data, then
converted to integer storage. The script writes ``out/export_onnx/model.onnx``
and prints what each tensor became, the file size against float32, and how
far onnxruntime's outputs are from tnquant's, with its graph optimizations off
(the graph as written: exact up to float summation order) and on (onnxruntime
fuses QDQ groups into its integer kernels, which are not exact).

Run: ``.venv/bin/python examples/export_onnx.py``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tnquant import TT, LowRank, QuantSpec, calibrate, convert, factorize, quantize
from tnquant.export import onnx
from tnquant.export.onnx import session


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    factorize(model, {"0": LowRank(rank=32), "2": TT(rank=8, order=2)}, progress=False)
    quantize(
        model,
        weights={
            "4": QuantSpec(bits=4, granularity=("group", 32), axis=1),
            "6": QuantSpec(bits=8, granularity="channel"),
        },
        cores=QuantSpec(bits=4, granularity="channel", axis=0),
        activations=QuantSpec(bits=8, symmetric=False),
        progress=False,
    )
    gen = torch.Generator().manual_seed(1)
    calibrate(model, [torch.randn(64, 256, generator=gen) for _ in range(8)], progress=False)
    convert(model, progress=False)
    return model


def main() -> None:
    model = build()
    x = torch.randn(32, 256)
    with torch.no_grad():
        ref = model(x).numpy()
    out = onnx(model, Path("out/export_onnx/model.onnx"), x)
    print(f"{'tensor':<28}{'onnx type':<11}{'layout':<9}{'spec':<24}bytes")
    for w in out.weights:
        print(f"{w['name']:<28}{w['onnx_type']:<11}{w['layout']:<9}{w['spec']:<24}{w['bytes']}")
    print(f"{len(out.activations)} activation quantizers as QuantizeLinear/DequantizeLinear")
    print(
        f"file {out.file_bytes} B, float32 weights/cores {out.float_bytes} B "
        f"({out.float_bytes / out.file_bytes:.1f}x)"
    )
    step = float(model[6].act_quantizers["output"].scale)
    for exact in (True, False):
        sess = session(out.path, exact=exact)
        y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        err = np.abs(y - ref)
        print(
            f"onnxruntime optimizations {'off' if exact else 'on '}: max |diff| "
            f"{err.max():.3g} ({err.max() / step:.2f} output steps), "
            f"{(err > 1e-5 * np.abs(ref).max()).mean():.2%} of outputs beyond 1e-5 x max|y|"
        )


if __name__ == "__main__":
    main()
