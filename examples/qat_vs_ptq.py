"""Exercise 9.2: quantization-aware training (QAT) vs post-training quantization (PTQ).

A small CNN is trained in the script on scikit-learn's digits (a few
seconds). Each row quantizes every Conv2d/Linear weight (or every core of a
factorized layer) with one spec -- int8 / int4 / int2 per channel with
learned (LSQ) scales, ternary (TWN) and binary (XNOR), per channel -- and
compares:

- **PTQ**: ``tnquant.quantize`` + ``tnquant.calibrate`` on training images,
  no training;
- **QAT**: the same model, then ``tnquant.finetune`` through the
  straight-through estimators, on labelled batches ``(images, labels)``:
  cross-entropy plus KL distillation from the float CNN (``alpha=0.5``).

Two models: the dense CNN, and a factorized one (conv2 -> ``Tucker(ratio=0.5)``,
fc1 -> ``LowRank(ratio=0.25)``, fitted to the layer outputs, then fine-tuned
in float before quantization). Sizes are :func:`tnquant.model_size_bits`
(packed codes, scales, float32 biases); accuracy on the held-out test split.
At 8 and 4 bits PTQ is already about as good as the float model; at 2 bits, ternary
and binary, only QAT recovers it.

``--minilm`` adds the same comparison on the pretrained MiniLM-L6 encoder
(36 Linear layers, int4 / int3 / int2 per-channel LSQ, a short cosine
distillation from the original; judged by the mean cosine of the sentence embeddings to
the original's on held-out sentences).

Run: ``python examples/qat_vs_ptq.py`` (about 15 s on 2 cores); ``--quick``
for short settings (about 6 s); ``--minilm`` adds about 40 s.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tnquant import (
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
    size_report,
)
from tnquant.cli.datasets import digits

SPECS = [
    ("int8 channel", QuantSpec(bits=8, granularity="channel", learnable=True)),
    ("int4 channel", QuantSpec(bits=4, granularity="channel", learnable=True)),
    ("int2 channel", QuantSpec(bits=2, granularity="channel", learnable=True)),
    ("ternary channel", Ternary(granularity="channel")),
    ("binary channel", Binary(granularity="channel")),
]
# layer names of the Sequential below: 0 conv1, 2 conv2, 6 fc1, 8 fc2
FACTORIZED = {"2": Tucker(ratio=0.5), "6": LowRank(ratio=0.25)}


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def digits_table(train_epochs: int, qat_epochs: int) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    teacher = make_cnn()
    train(teacher, x_train, y_train, train_epochs)
    calib = list(x_train.split(128))
    labelled = list(zip(x_train.split(64), y_train.split(64), strict=True))
    float_bits = model_size_bits(teacher)
    print(
        f"digits CNN trained {train_epochs} epochs in {time.perf_counter() - t0:.1f} s; "
        f"QAT: {qat_epochs} epochs x {len(labelled)} batches of 64, AdamW lr 1e-3, "
        f"cross-entropy + KL to the float CNN; {len(y_test)} test images"
    )

    def distil(model: nn.Module, epochs: int) -> float:
        report = finetune(
            model,
            labelled,
            teacher,
            loss="kl",
            task_loss=F.cross_entropy,
            alpha=0.5,
            epochs=epochs,
            lr=1e-3,
            progress=False,
        )
        return report.history.time_s

    header = (
        f"{'model':<16}{'weights':<17}{'size (bits)':>12}{'x smaller':>11}"
        f"{'PTQ acc':>9}{'QAT acc':>9}{'QAT s':>7}"
    )
    print(header)
    print("-" * len(header))
    for arch in ("dense", "Tucker+LowRank"):
        base = copy.deepcopy(teacher)
        after = ""
        if arch != "dense":  # float rows: PTQ = as factorized, QAT = after float fine-tuning
            factorize(base, FACTORIZED, data=calib, progress=False)
            fitted = accuracy(base, x_test, y_test)
            seconds = distil(base, qat_epochs)
            after = f"{accuracy(base, x_test, y_test):>9.4f}{seconds:>7.1f}"
        size = model_size_bits(base)
        ptq = accuracy(base, x_test, y_test) if arch == "dense" else fitted
        print(f"{arch:<16}{'float32':<17}{size:>12}{float_bits / size:>11.2f}{ptq:>9.4f}" + after)
        for label, spec in SPECS:
            student = copy.deepcopy(base)
            quantize(student, weights=spec, progress=False)
            calibrate(student, calib, progress=False)
            size = model_size_bits(student)
            ptq = accuracy(student, x_test, y_test)
            seconds = distil(student, qat_epochs)
            qat = accuracy(student, x_test, y_test)
            print(
                f"{arch:<16}{label:<17}{size:>12}{float_bits / size:>11.2f}{ptq:>9.4f}"
                f"{qat:>9.4f}{seconds:>7.1f}"
            )


def minilm_table(steps: int) -> None:
    from tnquant.cli.datasets import load_minilm, split_corpus

    model, tokenizer = load_minilm()
    train_s, test_s = split_corpus(32 * steps, 128, seed=0)

    def batches(sentences: list[str]) -> list[dict]:
        ordered = sorted(sentences, key=lambda s: len(tokenizer(s)["input_ids"]))
        return [
            dict(
                tokenizer(
                    ordered[i : i + 32],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=64,
                )
            )
            for i in range(0, len(ordered), 32)
        ]

    calib, held_out = batches(train_s), batches(test_s)
    with torch.no_grad():
        reference = torch.cat([model(**b) for b in held_out])

    def cosine(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            emb = torch.cat([m(**b) for b in held_out])
        return F.cosine_similarity(emb, reference).mean().item()

    layers = "encoder.encoder.layer.*"
    n_weights = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("encoder.encoder.layer.")
    )
    print(
        f"\nMiniLM-L6: the 36 Linear layers of {layers} quantized; QAT = {steps} steps of "
        f"cosine distillation from the original (batches of 32, AdamW lr 3e-4); mean cosine "
        f"to the original embeddings on {len(test_s)} held-out sentences"
    )
    header = f"{'weights':<22}{'bits/weight':>12}{'PTQ cos':>9}{'QAT cos':>9}{'QAT s':>7}"
    print(header)
    print("-" * len(header))
    for bits in (4, 3, 2):
        spec = QuantSpec(bits=bits, granularity="channel", learnable=True)
        student = copy.deepcopy(model)
        quantize(student, weights={layers: spec}, progress=False)
        calibrate(student, calib, progress=False)
        rows = [r for r in size_report(student) if str(r["name"]).startswith("encoder.encoder.")]
        bpw = sum(r["size_bits"] for r in rows) / n_weights
        ptq = cosine(student)
        report = finetune(
            student, calib, teacher=model, loss="cosine", epochs=1, lr=3e-4, progress=False
        )
        qat = cosine(student)
        print(
            f"{f'int{bits} channel (LSQ)':<22}{bpw:>12.2f}{ptq:>9.4f}{qat:>9.4f}"
            f"{report.history.time_s:>7.1f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="short settings: 10 training epochs, 2 QAT epochs"
    )
    ap.add_argument(
        "--minilm",
        action="store_true",
        help="also PTQ vs QAT on the pretrained MiniLM-L6 (minutes)",
    )
    args = ap.parse_args(argv)
    start = time.perf_counter()
    digits_table(*((10, 2) if args.quick else (25, 8)))
    if args.minilm:
        minilm_table(steps=4 if args.quick else 8)
    print(f"\ntotal time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
