"""The whole digits CNN to fixed point: dense vs Tucker-2 vs CP convolution, W8/W6/W4.

A CNN (Conv2d(1, 8, 3, p1) -> ReLU -> MaxPool2d(2) -> Conv2d(8, 16, 3, p1) ->
ReLU -> AvgPool2d(2) -> Flatten -> Linear(64, 10)) is trained on
scikit-learn's digits (8x8 images, the whole network, not only its head);
the second convolution is dense, Tucker-2 (ranks (8, 4)) or CP (rank 8: 1x1,
depthwise 3x1, depthwise 1x3, 1x1), each factorization fitted to the weight,
then fine-tuned in float with distillation. For each precision
``Wb``: every weight and core ``QuantSpec(bits=b, scale='pow2',
granularity='channel')`` (cores per tensor), every convolution result (and
the Tucker intermediates) a ``FixedPoint(12, 5, RND, SAT)`` ``'output'`` /
``'inter_k'`` quantizer (the torch model casts where the export does; the CP
intermediates ``FixedPoint(16, 8, RND, SAT)``, which they need), the last
layer's ``FixedPoint(16, 6, RND, SAT)``; calibrated, then
``fixed_point(model, dir, FixedPoint(10, 3, RND, SAT), input_shape=(1, 8, 8))``.

Columns: accuracy of the float, fake-quant and emulator models on the 450
test images, images whose 10 outputs are equal bit for bit between emulator
and fake-quant, and between emulator and hls4ml's C simulation (io_parallel
and io_stream on the marked rows), multiplies, real multipliers, EBOPs,
memory bits (vs the dense convolution replaced), compile time.

Run: ``.venv/bin/python benchmarks/bench_export_cnn.py [--quick]`` (raw output:
``benchmarks/results/export_cnn.md``).
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

from tnquant import CP, FixedPoint, QuantSpec, Tucker, calibrate, factorize, finetune, quantize  # noqa: E402
from tnquant.cli.datasets import digits  # noqa: E402
from tnquant.export import fixed_point, to_hls4ml  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "export_cnn.md"
IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
MID = FixedPoint(12, 5, rounding="RND", overflow="SAT")
OUT = FixedPoint(16, 6, rounding="RND", overflow="SAT")
#: CP's intermediates (rank-8 sums of unnormalized factors) saturate ap_fixed<12,5>:
#: PTQ W8 accuracy 0.30 with MID, 0.91 with this type (measured when the CP row was added)
CP_MID = FixedPoint(16, 8, rounding="RND", overflow="SAT")
SHAPE = (1, 8, 8)


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def _accuracy(logits: Any, y: torch.Tensor) -> float:
    return float((np.asarray(logits).argmax(1) == y.numpy()).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="W8 and W4 only, one hls4ml compile")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    t_start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits()
    teacher = train_classifier(make_cnn, x_tr, y_tr, 20)
    with torch.no_grad():
        float_acc = _accuracy(teacher(x_te), y_te)
    calib = [x_tr[i : i + 64].double() for i in range(0, len(x_tr), 64)]
    labelled = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, len(x_tr), 64)]
    x_np = x_te.double().numpy().reshape(len(x_te), -1)
    bits_list = (8, 4) if args.quick else (8, 6, 4)
    hls_rows = {("tucker", 8), ("cp", 8)}
    if not args.quick:
        hls_rows |= {("dense", 8), ("tucker", 4)}
    work = Path(tempfile.mkdtemp(prefix="tnq_bench_cnn_"))
    rows = []
    try:
        for arch in ("dense", "tucker", "cp"):
            base = copy.deepcopy(teacher)
            if arch != "dense":
                spec = Tucker(rank=(8, 4)) if arch == "tucker" else CP(rank=8)
                factorize(base, {"3": spec}, progress=False)
                finetune(base, labelled, teacher, loss="kl", task_loss=F.cross_entropy,
                         epochs=3, lr=1e-3, progress=False)  # fmt: skip
            base.eval()
            with torch.no_grad():
                base_acc = _accuracy(base(x_te), y_te)
            for bits in bits_list:
                model = copy.deepcopy(base).double()
                acts = {"0.output": MID, "3.output": MID, "7.output": OUT}
                if arch == "tucker":
                    acts.update({"3.inter_0": MID, "3.inter_1": MID})
                if arch == "cp":
                    acts.update({f"3.inter_{k}": CP_MID for k in range(3)})
                quantize(
                    model,
                    weights=QuantSpec(bits, scale="pow2", granularity="channel"),
                    cores=QuantSpec(bits, scale="pow2"),
                    activations=acts,
                    progress=False,
                )
                calibrate(model, calib, progress=False)
                model.eval()
                em = fixed_point(model, work / f"{arch}{bits}", IN_T, input_shape=SHAPE)
                emu = em.predict(x_np)
                xq = np.ldexp(em.quantize_input(x_np).astype(np.float64), -IN_T.frac)
                with torch.no_grad():
                    fq = model(torch.from_numpy(xq).reshape(-1, *SHAPE)).numpy()
                same_fq = int(np.all(emu == fq, axis=1).sum())
                same_hw, compile_s = "", ""
                if (arch, bits) in hls_rows:
                    counts, times = [], []
                    for io in ("io_parallel", "io_stream"):
                        hm = to_hls4ml(model, work / f"hls_{arch}{bits}_{io}", IN_T,
                                       input_shape=SHAPE, io_type=io)  # fmt: skip
                        t0 = time.perf_counter()
                        hm.compile()
                        times.append(time.perf_counter() - t0)
                        got = np.asarray(hm.predict(np.ascontiguousarray(x_np))).reshape(emu.shape)
                        counts.append(str(int(np.all(got == emu, axis=1).sum())))
                    same_hw = " / ".join(counts)
                    compile_s = " / ".join(f"{t:.1f}" for t in times)
                tot = em.report().totals
                conv = [r for r in em.report().layers if r["layer"] == "3"][0]
                row = (
                    arch, f"W{bits}", round(float_acc, 3), round(base_acc, 3),
                    round(_accuracy(fq, y_te), 3), round(_accuracy(emu, y_te), 3), same_fq,
                    same_hw, tot["multiplies"], tot["multipliers"], tot["ebops"],
                    tot["memory_bits"], conv["multiplies"], conv["dense_multiplies"], compile_s,
                )  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(y_te)
    header = (
        "conv 3", "precision", "float acc", "factorized float acc", "fake-quant acc",
        "emulator acc", f"emu == fake-quant (of {n})",
        f"emu == hls4ml io_parallel / io_stream (of {n})", "multiplies", "real multipliers",
        "EBOPs", "memory bits", "conv 3 multiplies", "dense conv 3 multiplies", "compile s",
    )  # fmt: skip
    md = markdown_table(header, rows)
    total = time.perf_counter() - t_start
    text = (
        f"# The whole digits CNN to fixed point\n\ncommand: `{command}`\n\nmachine: {machine()}\n\n"
        f"{'QUICK run' if args.quick else 'full run'} ({total:.0f}s); the network, the "
        f"precisions and the columns are described in the script's docstring. 450 test "
        f"images.\n\n{md}\n"
    )
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({total:.0f}s)")


if __name__ == "__main__":
    main()
