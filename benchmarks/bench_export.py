"""Export bit-exactness on real data: digits MLP -> factorized -> fixed point -> hls4ml.

An MLP (64 -> 128 -> ReLU -> 64 -> ReLU -> 10, dense layers and ReLU only,
the layers hls4ml's PyTorch route takes) is trained in the script on
scikit-learn's digits (8x8 images flattened to 64 inputs in [0, 1]). Each
factorization of it -- none (``dense``), ``LowRank`` on both hidden layers,
``Tucker`` (order 1, Tucker-2 on a Linear: three dense maps) on both, and
``TT`` (order 2) on the first layer with ``LowRank`` on the second -- is fitted
to the layer outputs (data-aware, ``factorize(data=...)``), fine-tuned in
float for a few epochs (cross-entropy + KL to the float MLP), then, for each
precision row ``WbAb``:

- every weight and core is quantized with ``QuantSpec(bits=b, scale='pow2',
  granularity='channel')`` and every layer input (the image, each ReLU
  output) with ``QuantSpec(bits=b, symmetric=False, scale='pow2')``
  (``ap_ufixed<b, .>``) and every intermediate result between the cores of a
  factorized layer with ``QuantSpec(bits=2b, scale='pow2')``, calibrated on
  the training images; accumulators are left lossless (the export derives
  widths that cannot overflow);
- biases are snapped to the grid the export stores them on (the products'
  binary point, round-to-nearest-even) with ``tnquant.export.snap_biases``:
  the only rounding the fixed-point export adds to the fake-quant model
  (``fixed_point`` does the same by default, ``snap_biases=True``);
- ``tnquant.export.fixed_point(model, dir, sample=...)`` gives the
  ``IntegerModel``; the fake-quant torch model runs in float64.

Columns: test accuracy of the float model, the fake-quant torch model, the
emulator (``IntegerModel.predict``) and hls4ml's C simulation
(``to_hls4ml(...).compile()`` then ``predict`` with float64 inputs; only the
rows marked, since each ``compile()`` costs 8-25 s); the number of test
images whose 10 logits are equal bit for bit between emulator and
fake-quant, and between emulator and hls4ml (or, for the TT rows, which
hls4ml cannot take, between the emulator and the whole network's generated
C++ project, :func:`tnquant.export.write_project` built by g++ and run on
the same inputs); multiplies per inference (every product, and the real
multipliers: weights neither 0 nor a power of two), HGQ-style EBOPs, BOPs
and memory bits (weights + biases) of the whole network vs the dense layers
they replace, the widest accumulator, from ``IntegerModel.report()``; the
compile time (hls4ml ``compile()``, or the C++ project's g++ build and run).
Precisions: ``WbAb`` (b-bit pow2 per-channel weights, b-bit inputs),
``W2tA8`` (ternary weights, pow2 alphas) and ``W1A8`` (binary), PTQ only.

Run: ``.venv/bin/python benchmarks/bench_export.py [--quick]`` (``--quick``:
three precisions, three hls4ml compiles, one C++ project build).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, train_classifier  # noqa: E402

from tnquant import (  # noqa: E402
    TT,
    Binary,
    LowRank,
    QuantSpec,
    Ternary,
    Tucker,
    calibrate,
    factorize,
    finetune,
    quantize,
)
from tnquant.cli.datasets import digits  # noqa: E402
from tnquant.export import fixed_point, run_project, snap_biases, to_hls4ml, write_project  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "export.md"

ARCHS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "LowRank": {"0": LowRank(rank=16), "2": LowRank(rank=12)},
    "Tucker": {"0": Tucker(rank=(24, 16)), "2": Tucker(rank=(16, 16))},
    "TT": {"0": TT(rank=8, order=2), "2": LowRank(rank=12)},
}
#: precision rows: weight spec (cores too) and activation bits
PRECISIONS: dict[str, tuple[Any, int]] = {
    "W8A8": (QuantSpec(bits=8, scale="pow2", granularity="channel"), 8),
    "W6A6": (QuantSpec(bits=6, scale="pow2", granularity="channel"), 6),
    "W4A4": (QuantSpec(bits=4, scale="pow2", granularity="channel"), 4),
    "W2tA8": (Ternary(granularity="channel", scale="pow2"), 8),
    "W1A8": (Binary(granularity="channel", scale="pow2"), 8),
}
#: (arch, precision) rows checked against hls4ml's C simulation (TT rows: the C++ project)
HLS_FULL = {
    ("dense", "W8A8"),
    ("LowRank", "W8A8"),
    ("LowRank", "W4A4"),
    ("Tucker", "W6A6"),
    ("Tucker", "W4A4"),
    ("dense", "W2tA8"),
    ("LowRank", "W1A8"),
}
HLS_QUICK = {("LowRank", "W8A8"), ("Tucker", "W4A4"), ("dense", "W2tA8")}
TT_KERNEL_FULL = {("TT", "W8A8"), ("TT", "W4A4"), ("TT", "W2tA8")}
TT_KERNEL_QUICK = {("TT", "W4A4")}


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def accuracy_of(logits: np.ndarray | torch.Tensor, y: torch.Tensor) -> float:
    pred = np.asarray(logits).argmax(1)
    return float((pred == y.numpy()).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    print(command)
    print(machine())
    t_start = time.perf_counter()
    labels = ["W8A8", "W4A4", "W2tA8"] if args.quick else list(PRECISIONS)
    hls_rows = HLS_QUICK if args.quick else HLS_FULL
    tt_rows = TT_KERNEL_QUICK if args.quick else TT_KERNEL_FULL
    float_epochs, ft_epochs = 30, 5

    x_tr, y_tr, x_te, y_te = digits()
    x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    t0 = time.perf_counter()
    teacher = train_classifier(make_mlp, x_tr, y_tr, float_epochs)
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        float_acc = accuracy_of(teacher(x_te), y_te)
    calib = [x_tr[i : i + 64] for i in range(0, len(x_tr), 64)]
    calib64 = [b.double() for b in calib]
    labelled = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, len(x_tr), 64)]
    x_np = x_te.double().numpy()
    n_test = len(y_te)

    work = Path(tempfile.mkdtemp(prefix="tnq_bench_export_"))
    rows = []
    try:
        for arch, mapping in ARCHS.items():
            base = copy.deepcopy(teacher)
            if mapping is not None:
                factorize(base, mapping, data=calib, progress=False)
                finetune(
                    base,
                    labelled,
                    teacher,
                    loss="kl",
                    task_loss=F.cross_entropy,
                    epochs=ft_epochs,
                    lr=1e-3,
                    progress=False,
                )
            base.eval()
            with torch.no_grad():
                base_acc = accuracy_of(base(x_te), y_te)
            for label in labels:
                wspec, bits = PRECISIONS[label]
                model = copy.deepcopy(base).double()
                quantize(
                    model,
                    weights=wspec,
                    activations={
                        "*.input": QuantSpec(bits=bits, symmetric=False, scale="pow2"),
                        "*.inter_*": QuantSpec(bits=2 * bits, scale="pow2"),
                    },
                    progress=False,
                )
                calibrate(model, calib64, progress=False)
                snap_biases(model)
                model.eval()
                out_dir = work / f"{arch}_{label}"
                t0 = time.perf_counter()
                em = fixed_point(model, out_dir, sample=x_np[:128])
                export_s = time.perf_counter() - t0
                with torch.no_grad():
                    fq = model(torch.from_numpy(x_np)).numpy()
                emu = em.predict(x_np)
                same_fq = int(np.all(emu == fq, axis=1).sum())
                hls_acc: Any = ""
                same_hw: Any = ""
                compile_s: Any = ""
                if (arch, label) in hls_rows:
                    hm = to_hls4ml(
                        model,
                        work / f"hls_{arch}_{label}",
                        project_name=f"tnq_{arch.lower()}_{label.lower()}",
                    )
                    t0 = time.perf_counter()
                    hm.compile()
                    compile_s = round(time.perf_counter() - t0, 1)
                    got = np.asarray(hm.predict(np.ascontiguousarray(x_np))).reshape(emu.shape)
                    hls_acc = round(accuracy_of(got, y_te), 4)
                    same_hw = f"{int(np.all(got == emu, axis=1).sum())} (hls4ml)"
                elif (arch, label) in tt_rows:
                    t0 = time.perf_counter()
                    project = write_project(em, work / f"cpp_{arch}_{label}", x_np)
                    got = run_project(project, x_np)
                    compile_s = round(time.perf_counter() - t0, 1)
                    same_hw = f"{int(np.all(got == emu, axis=1).sum())} (C++ project)"
                tot = em.report().totals
                row = (
                    arch,
                    label,
                    round(float_acc, 4),
                    round(base_acc, 4),
                    round(accuracy_of(fq, y_te), 4),
                    round(accuracy_of(emu, y_te), 4),
                    hls_acc,
                    same_fq,
                    same_hw,
                    tot["multiplies"],
                    tot["multipliers"],
                    tot["dense_multiplies"],
                    tot["ebops"],
                    tot["bops"],
                    tot["dense_bops"],
                    tot["memory_bits"],
                    tot["dense_memory_bits"],
                    tot["max_accum_width"],
                    round(export_s, 2),
                    compile_s,
                )
                rows.append(row)
                print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - t_start
    header = (
        "model",
        "precision",
        "float acc",
        "factorized float acc",
        "fake-quant acc",
        "emulator acc",
        "hls4ml acc",
        f"emu == fake-quant (of {n_test})",
        f"emu == hls4ml / C++ project (of {n_test})",
        "multiplies",
        "real multipliers",
        "dense multiplies",
        "EBOPs",
        "BOPs",
        "dense BOPs",
        "memory bits",
        "dense memory bits",
        "max accum bits",
        "export s",
        "compile s",
    )
    md = markdown_table(header, rows)
    print(md)
    all_fq = all(r[7] == n_test for r in rows)
    hw = [r[8] for r in rows if r[8] != ""]
    all_hw = all(str(h).startswith(f"{n_test} ") for h in hw)
    verdict = (
        f"**Emulator == fake-quant torch model on every test image in every row: "
        f"{'yes' if all_fq else 'NO'}; emulator == hls4ml C simulation / C++ project "
        f"on every test image in the {len(hw)} checked rows: "
        f"{'yes' if all_hw else 'NO'}.**"
    )
    print(verdict)
    text = (
        f"# Export bit-exactness on the digits MLP\n\ncommand: `{command}`\n\n"
        f"machine: {machine()}\n\n"
        f"{'QUICK run' if args.quick else 'full run'} ({total_s:.0f}s in all): MLP "
        f"64-128-64-10 with ReLUs, trained {float_epochs} epochs on {len(y_tr)} flattened "
        f"digits images ({train_s:.1f}s, Adam lr 3e-3); factorized models fitted to the layer "
        f"outputs and fine-tuned in float {ft_epochs} epochs (CE + KL to the float MLP, AdamW "
        f"lr 1e-3). Precisions: `WbAb` as below; `W2tA8` ternary weights "
        f"(`Ternary(granularity='channel', scale='pow2')`, TWN, every alpha a power of two) and "
        f"`W1A8` binary (`Binary(granularity='channel', scale='pow2')`) with 8-bit inputs, PTQ "
        f"only (no QAT: their accuracy is the post-training one). Factorizations: "
        f"LowRank = layers 0, 2 LowRank(rank 16, 12); Tucker = "
        f"Tucker-2 (order 1) ranks (24, 16), (16, 16); TT = layer 0 TT(rank 8, order 2), layer "
        f"2 LowRank(12); the last Linear stays dense. `WbAb`: every weight/core "
        f"`QuantSpec(bits=b, scale='pow2', granularity='channel')`, every layer input "
        f"`QuantSpec(bits=b, symmetric=False, scale='pow2')` (ap_ufixed) and every "
        f"intermediate result inside a factorized layer `QuantSpec(bits=2b, scale='pow2')`, "
        f"calibrated on the training images; lossless accumulators; biases snapped to the "
        f"exported grid. "
        f"Fake-quant model in float64. hls4ml {_hls4ml_version()} C simulation (Vivado "
        f"backend, io_parallel, Latency, float64 inputs) on the marked rows; TT rows (no "
        f"hls4ml route) check the whole network's generated C++ project instead "
        f"(`write_project` + `run_project`: g++ build and testbench). 'multiplies' counts "
        f"every product, 'real multipliers' those whose weight is neither 0 nor a power of "
        f"two (those are shifts), EBOPs as HGQ (each non-zero product: input width x the "
        f"weight code's effective bits), BOPs the declared widths (products x input width "
        f"x weight width) against the dense layers'. Multiplies per inference and memory "
        f"bits (weights + biases) from `IntegerModel.report()`, whole network, vs the dense "
        f"layers replaced, stored at the widest weight type of each layer (the report's "
        f"convention). Per-channel pow2 scales share one `ap_fixed` type per tensor, so "
        f"a b-bit weight is stored 1-3 bits wider (e.g. `ap_fixed<10,0>` for the first "
        f"dense W8 layer): that is why the factorized rows' 'dense memory bits' differ from "
        f"the dense row's 'memory bits' at the same precision. {n_test} test images.\n\n"
        f"{verdict}\n\n{md}\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({total_s:.0f}s)")


def _hls4ml_version() -> str:
    try:
        import hls4ml
    except ImportError:
        return "(not installed)"
    return str(hls4ml.__version__)


if __name__ == "__main__":
    main()
