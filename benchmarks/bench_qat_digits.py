"""PTQ vs QAT on a small CNN trained on scikit-learn's digits (exercise 9.2).

A 4-layer CNN (conv 1->16, conv 16->32, maxpool, fc 512->64, fc 64->10) is
trained in the script. Each row quantizes *every* Conv2d/Linear weight (or
every core of a factorized layer) with the same spec -- per-channel int8 /
int4 / int2 (LSQ, ``learnable=True``), binary (XNOR, per-channel) and ternary
(TWN, per-channel) -- and compares

- PTQ: ``quantize`` + ``calibrate`` on training images, no training;
- QAT: the same, then ``finetune`` with cross-entropy on the labels plus
  KL distillation from the float CNN (``alpha=0.5``), AdamW.

Models: dense; "Tucker+LowRank" (conv2 -> Tucker(ratio=0.5), fc1 ->
LowRank(ratio=0.25)); "CP+LowRank" (conv2 -> CP(ratio=0.5), fc1 -> LowRank
(ratio=0.25)); conv1 (1 input channel) and fc2 stay dense in every model.
Size: :func:`tnquant.model_size_bits` (codes, scales, float32 biases,
everything the model stores). Accuracy on the held-out 25 % split.

Run: ``.venv/bin/python benchmarks/bench_qat_digits.py [--quick]``
(``--quick``: 2 QAT epochs instead of 10, 10 training epochs instead of 40).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, train_classifier  # noqa: E402

from tnquant import (  # noqa: E402
    CP,
    Binary,
    LowRank,
    QuantSpec,
    Ternary,
    Tucker,
    calibrate,
    factorize,
    finetune,
    model_size_bits,
    quantize,
)
from tnquant.cli.datasets import digits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "qat_digits.md"


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def accuracy(model, x, y) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


SPECS = [
    ("int8 ch", QuantSpec(bits=8, granularity="channel", learnable=True)),
    ("int4 ch", QuantSpec(bits=4, granularity="channel", learnable=True)),
    ("int2 ch", QuantSpec(bits=2, granularity="channel", learnable=True)),
    ("ternary ch", Ternary(granularity="channel")),
    ("binary ch", Binary(granularity="channel")),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    print(command)
    print(machine())
    qat_epochs, float_epochs = (2, 10) if args.quick else (10, 40)

    x_tr, y_tr, x_te, y_te = digits()
    t0 = time.perf_counter()
    teacher = train_classifier(make_cnn, x_tr, y_tr, float_epochs)
    train_s = time.perf_counter() - t0
    calib = [x_tr[i : i + 64] for i in range(0, len(x_tr), 64)]
    labelled = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, len(x_tr), 64)]

    archs = {
        "dense": None,
        "Tucker+LowRank": {"2": Tucker(ratio=0.5), "6": LowRank(ratio=0.25)},
        "CP+LowRank": {"2": CP(ratio=0.5), "6": LowRank(ratio=0.25)},
    }
    rows = []
    float_bits = model_size_bits(teacher)
    rows.append(("dense", "float32", float_bits, 1.0, accuracy(teacher, x_te, y_te), "", ""))
    for arch, mapping in archs.items():
        base = copy.deepcopy(teacher)
        if mapping is not None:
            factorize(base, mapping, data=calib, progress=False)
            # float fine-tune of the factorized model first (a few epochs)
            finetune(
                base,
                labelled,
                teacher,
                loss="kl",
                task_loss=F.cross_entropy,
                epochs=qat_epochs,
                lr=1e-3,
                progress=False,
            )
            rows.append(
                (
                    arch,
                    "float32",
                    model_size_bits(base),
                    float_bits / model_size_bits(base),
                    accuracy(base, x_te, y_te),
                    "",
                    "",
                )
            )
        for label, spec in SPECS:
            student = copy.deepcopy(base)
            quantize(student, weights=spec, progress=False)
            calibrate(student, calib, progress=False)
            bits = model_size_bits(student)
            ptq = accuracy(student, x_te, y_te)
            rep = finetune(
                student,
                labelled,
                teacher,
                loss="kl",
                task_loss=F.cross_entropy,
                alpha=0.5,
                epochs=qat_epochs,
                lr=1e-3,
                progress=False,
            )
            qat = accuracy(student, x_te, y_te)
            row = (
                arch,
                label,
                bits,
                round(float_bits / bits, 1),
                round(ptq, 4),
                round(qat, 4),
                round(rep.history.time_s, 1),
            )
            rows.append(row)
            print(row, flush=True)
    header = ("model", "weights", "size bits", "x smaller", "PTQ acc", "QAT acc", "QAT s")
    rows = [
        (
            r[0],
            r[1],
            r[2],
            r[3] if r[3] != 1.0 else 1.0,
            r[4] if r[1] != "float32" else "",
            r[5] if r[1] != "float32" else r[4],
            r[6],
        )
        for r in rows
    ]
    md = markdown_table(header, rows)
    print(md)
    text = (
        f"# PTQ vs QAT on a digits CNN\n\ncommand: `{command}`\n\nmachine: {machine()}\n\n"
        f"{'QUICK run' if args.quick else 'full run'}: float CNN trained {float_epochs} "
        f"epochs ({train_s:.1f}s); QAT {qat_epochs} epochs x {len(labelled)} batches of 64, "
        f"AdamW lr 1e-3, cross-entropy + KL to the float CNN (alpha 0.5). Factorized "
        f"models are fine-tuned in float for {qat_epochs} epochs before quantization. "
        f"All Conv2d/Linear weights and cores quantized with the row's spec (first conv and "
        f"last fc too). Float rows: accuracy in the QAT column. {len(y_te)} test images.\n\n"
        f"{md}\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
