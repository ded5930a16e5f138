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
hls4ml cannot take, between the emulator and the exported ``tt_linear.h``
kernel of the TT layer compiled with g++ against hls4ml's ``ap_types``,
fed the same input mantissas); multiplies per inference and memory bits
(weights + biases) of the whole network vs the dense layers they replace,
the widest accumulator, from ``IntegerModel.report()``; the compile time
(hls4ml ``compile()``, or g++ for the TT kernel).

Run: ``.venv/bin/python benchmarks/bench_export.py [--quick]`` (``--quick``:
two precisions, two hls4ml compiles, one TT kernel compile).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
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

from tnquant import TT, LowRank, QuantSpec, Tucker, calibrate, factorize, finetune, quantize  # noqa: E402
from tnquant.cli.datasets import digits  # noqa: E402
from tnquant.export import IntegerModel, fixed_point, snap_biases, to_hls4ml  # noqa: E402
from tnquant.export.cheaders import c_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "export.md"

ARCHS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "LowRank": {"0": LowRank(rank=16), "2": LowRank(rank=12)},
    "Tucker": {"0": Tucker(rank=(24, 16)), "2": Tucker(rank=(16, 16))},
    "TT": {"0": TT(rank=8, order=2), "2": LowRank(rank=12)},
}
#: (arch, bits) rows checked against hls4ml's C simulation (TT rows: the C kernel)
HLS_FULL = {("dense", 8), ("LowRank", 8), ("LowRank", 4), ("Tucker", 6), ("Tucker", 4)}
HLS_QUICK = {("LowRank", 8), ("Tucker", 4)}
TT_KERNEL_FULL = {("TT", 8), ("TT", 4)}
TT_KERNEL_QUICK = {("TT", 4)}


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def accuracy_of(logits: np.ndarray | torch.Tensor, y: torch.Tensor) -> float:
    pred = np.asarray(logits).argmax(1)
    return float((pred == y.numpy()).mean())


def ap_types_dir() -> Path | None:
    try:
        import hls4ml
    except ImportError:
        return None
    path = Path(hls4ml.__file__).parent / "templates" / "vivado" / "ap_types"
    return path if (path / "ap_fixed.h").is_file() and shutil.which("g++") else None


def tt_kernel_check(em: IntegerModel, out_dir: Path, x: np.ndarray) -> tuple[int, float]:
    """Run the exported TT layer's C kernel (g++) on the emulator's inputs to it.

    Returns the number of samples whose outputs equal the emulator's bit for
    bit, and the g++ compile time.
    """
    ap = ap_types_dir()
    if ap is None:
        raise RuntimeError("needs g++ and hls4ml's ap_types headers")
    idx = next(i for i, op in enumerate(em.ops) if op.kind == "tt")
    op = em.ops[idx]
    trace = em.trace(em.quantize_input(x))
    x_in = em.quantize_input(x) if idx == 0 else trace[idx - 1][0]
    want = trace[idx][0]
    fn = c_name(op.name)
    d = len(op.weights)
    main = out_dir / "tt_main.cpp"
    main.write_text(f"""#include <cstdio>
#include "tnquant_tt_layers.h"
#include "tnquant_weights_int.h"
int main() {{
    double v;
    {fn}_input_t x[{op.in_features}];
    {fn}_res{d - 1}_t y[{op.out_features}];
    while (true) {{
        for (int i = 0; i < {op.in_features}; i++) {{
            if (scanf("%lf", &v) != 1) return 0;
            x[i] = v;
        }}
        {fn}(x, y);
        for (int i = 0; i < {op.out_features}; i++) printf("%.17g ", y[i].to_double());
        printf("\\n");
    }}
}}
""")
    exe = out_dir / "tt_main"
    t0 = time.perf_counter()
    subprocess.run(
        ["g++", "-O1", "-std=c++14", f"-I{ap}", f"-I{out_dir}", str(main), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    compile_s = time.perf_counter() - t0
    vals = np.ldexp(x_in.astype(np.float64), -op.input_type.frac)
    text = "\n".join(" ".join(repr(float(v)) for v in row) for row in vals)
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
    got = np.array([[float(v) for v in line.split()] for line in out.stdout.splitlines()])
    ref = np.ldexp(want.astype(np.float64), -op.result_type.frac)
    return int(np.all(got == ref, axis=1).sum()), compile_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    print(command)
    print(machine())
    t_start = time.perf_counter()
    bits_list = (8, 4) if args.quick else (8, 6, 4)
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
            for bits in bits_list:
                label = f"W{bits}A{bits}"
                model = copy.deepcopy(base).double()
                quantize(
                    model,
                    weights=QuantSpec(bits=bits, scale="pow2", granularity="channel"),
                    activations={
                        "*.input": QuantSpec(bits=bits, symmetric=False, scale="pow2"),
                        "*.inter_*": QuantSpec(bits=2 * bits, scale="pow2"),
                    },
                    progress=False,
                )
                calibrate(model, calib64, progress=False)
                snap_biases(model)
                model.eval()
                out_dir = work / f"{arch}_{bits}"
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
                if (arch, bits) in hls_rows:
                    hm = to_hls4ml(
                        model,
                        work / f"hls_{arch}_{bits}",
                        project_name=f"tnq_{arch.lower()}_{bits}",
                    )
                    t0 = time.perf_counter()
                    hm.compile()
                    compile_s = round(time.perf_counter() - t0, 1)
                    got = np.asarray(hm.predict(np.ascontiguousarray(x_np))).reshape(emu.shape)
                    hls_acc = round(accuracy_of(got, y_te), 4)
                    same_hw = f"{int(np.all(got == emu, axis=1).sum())} (hls4ml)"
                elif (arch, bits) in tt_rows:
                    n_same, cs = tt_kernel_check(em, out_dir, x_np)
                    compile_s = round(cs, 1)
                    same_hw = f"{n_same} (TT kernel)"
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
                    tot["dense_multiplies"],
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
        f"emu == hls4ml / C kernel (of {n_test})",
        "multiplies",
        "dense multiplies",
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
        f"{'yes' if all_fq else 'NO'}; emulator == hls4ml C simulation / TT C kernel "
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
        f"lr 1e-3). Factorizations: LowRank = layers 0, 2 LowRank(rank 16, 12); Tucker = "
        f"Tucker-2 (order 1) ranks (24, 16), (16, 16); TT = layer 0 TT(rank 8, order 2), layer "
        f"2 LowRank(12); the last Linear stays dense. `WbAb`: every weight/core "
        f"`QuantSpec(bits=b, scale='pow2', granularity='channel')`, every layer input "
        f"`QuantSpec(bits=b, symmetric=False, scale='pow2')` (ap_ufixed) and every "
        f"intermediate result inside a factorized layer `QuantSpec(bits=2b, scale='pow2')`, "
        f"calibrated on the training images; lossless accumulators; biases snapped to the "
        f"exported grid. "
        f"Fake-quant model in float64. hls4ml {_hls4ml_version()} C simulation (Vivado "
        f"backend, io_parallel, Latency, float64 inputs) on the marked rows; TT rows (no "
        f"hls4ml route) check the exported `tt_linear.h` kernel of the TT layer instead, "
        f"compiled with g++ against hls4ml's ap_types. Multiplies per inference and memory "
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
