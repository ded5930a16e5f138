"""SQNR of the quantizers on the real pretrained MiniLM-L6 Linear weights.

Rows: per-tensor / per-channel / per-group(32, 64, 128) at 8/4/3/2 bits,
binary and ternary, and MSE-optimal clipping at <= 4 bits; SQNR in dB over
all 37 Linear weights of the encoder
(signal and noise energies summed over layers) and the mean per-layer SQNR.
Also the cost of ``fake_quantize`` relative to a plain ``x.clone()``.

Run: ``.venv/bin/python benchmarks/bench_quant.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, median_time  # noqa: E402

from tnquant import Binary, QuantSpec, Ternary  # noqa: E402
from tnquant.cli.datasets import load_minilm  # noqa: E402
from tnquant.quant import choose_qparams, fake_quantize  # noqa: E402
from tnquant.quant.observers import estimate_range  # noqa: E402


def linear_weights() -> list[tuple[str, torch.Tensor]]:
    model, _ = load_minilm(pooled=False)
    return [
        (n, m.weight.detach().clone())
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


def sqnr_rows(weights):
    specs = []
    for bits in (8, 4, 3, 2):
        specs.append((f"int{bits}", "tensor", QuantSpec(bits=bits)))
        specs.append((f"int{bits}", "channel", QuantSpec(bits=bits, granularity="channel", axis=0)))
        for g in (32, 64, 128):
            specs.append(
                (f"int{bits}", f"group {g}", QuantSpec(bits=bits, granularity=("group", g), axis=1))
            )
        if bits <= 4:
            specs.append(
                (
                    f"int{bits}",
                    "channel, mse clip",
                    QuantSpec(bits=bits, granularity="channel", axis=0, observer="mse"),
                )
            )
            specs.append(
                (
                    f"int{bits}",
                    "group 64, mse clip",
                    QuantSpec(bits=bits, granularity=("group", 64), axis=1, observer="mse"),
                )
            )
    specs.append(("binary", "tensor", Binary()))
    specs.append(("binary", "channel", Binary(granularity="channel", axis=0)))
    specs.append(("ternary", "tensor", Ternary()))
    specs.append(("ternary", "channel", Ternary(granularity="channel", axis=0)))
    rows = []
    for label, gran, spec in specs:
        signal = noise = 0.0
        per_layer = []
        for _, w in weights:
            qparams = None
            if isinstance(spec, QuantSpec) and spec.observer != "minmax":
                lo, hi = estimate_range(w, spec)
                qparams = choose_qparams(w, spec, min_val=lo, max_val=hi)
            err = (w - fake_quantize(w, spec, qparams)).double().pow(2).sum().item()
            sig = w.double().pow(2).sum().item()
            signal, noise = signal + sig, noise + err
            per_layer.append(10 * math.log10(sig / err))
        rows.append((label, gran, 10 * math.log10(signal / noise), sum(per_layer) / len(per_layer)))
    return rows


def cost_rows(weights):
    w = max((w for _, w in weights), key=lambda t: t.numel())
    rows = []
    base = median_time(lambda: w.clone())
    one_op = median_time(lambda: w * 0.5)
    for label, spec in [
        ("int8 per-tensor", QuantSpec(bits=8)),
        ("int8 per-channel", QuantSpec(bits=8, granularity="channel")),
        ("int4 per-group 64", QuantSpec(bits=4, granularity=("group", 64), axis=1)),
        ("ternary", Ternary()),
        ("binary", Binary()),
    ]:
        t = median_time(lambda spec=spec: fake_quantize(w, spec))
        rows.append((label, f"{tuple(w.shape)}", t / base, t / one_op))
    return rows


def main() -> None:
    torch.manual_seed(0)
    weights = linear_weights()
    parts = [
        "command: .venv/bin/python benchmarks/bench_quant.py",
        f"machine: {machine()}",
        f"{len(weights)} Linear weights, {sum(w.numel() for _, w in weights)} parameters",
        "",
        markdown_table(
            ["format", "granularity", "SQNR dB (all weights)", "mean per-layer dB"],
            sqnr_rows(weights),
        ),
        "",
        markdown_table(
            ["fake_quantize", "weight", "time / x.clone()", "time / (x * 0.5)"], cost_rows(weights)
        ),
    ]
    text = "\n".join(parts)
    print(text)
    out = Path(__file__).resolve().parent / "results" / "quant.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
