"""Exercise 9.1: per-tensor vs per-channel vs per-group weight quantization.

One scale for a whole weight tensor (per-tensor) must cover its largest
element, so the rows with small weights get few distinct levels; one scale
per output channel (per-channel) or per group of consecutive inputs
(per-group) follows the rows. At 8 bits the choice hardly matters; at 4, 3
and 2 bits it decides whether the model still works. Two real models:

1. **digits CNN**: a small CNN trained in the script on scikit-learn's
   digits (a few seconds); every Conv2d/Linear weight quantized with
   ``tnquant.quantize`` + ``tnquant.calibrate`` at 8/4/3/2 bits; test
   accuracy and the size :func:`tnquant.model_size_bits` counts (codes,
   scales, float32 biases). Per-group: the Linear weights in groups of 32
   inputs (``('group', 32)``, ``axis=1``); the convolutions, whose rows
   hold only 9 or 72 weights, stay per-channel in that row.
2. **MiniLM-L6** (pretrained sentence encoder): first one real weight matrix
   (the first feed-forward layer, SQNR in dB of the pure
   ``tnquant.quant.fake_quantize``), then all 36 Linear layers of the
   encoder quantized alike, judged by the mean cosine of the sentence
   embeddings to the original model's on held-out real sentences
   (``tnquant.cli.datasets.split_corpus``). Per-group: groups of 64 inputs.

Run: ``python examples/per_channel_vs_per_tensor.py`` (about 30 s on 2
cores); ``--quick`` for short settings (fewer training epochs and
sentences, about 10 s); ``--no-minilm`` for the digits part only.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from tnquant import QuantSpec, calibrate, model_size_bits, quantize, size_report
from tnquant.cli.datasets import digits, load_minilm, split_corpus
from tnquant.quant import fake_quantize

BITS = (8, 4, 3, 2)
MINILM_LAYERS = "encoder.encoder.layer.*"


# --------------------------------------------------------------------------- digits CNN
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
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def cnn_specs(bits: int) -> list[tuple[str, dict[str, QuantSpec]]]:
    """(label, ``weights=`` mapping) per granularity; layer names are Sequential indices."""
    channel = QuantSpec(bits=bits, granularity="channel", axis=0)
    return [
        ("per-tensor", {"*": QuantSpec(bits=bits, granularity="tensor")}),
        ("per-channel", {"*": channel}),
        # Linear layers 6 and 8: one scale per 32 consecutive inputs of each row
        (
            "per-group 32",
            {
                "6": QuantSpec(bits=bits, granularity=("group", 32), axis=1),
                "8": QuantSpec(bits=bits, granularity=("group", 32), axis=1),
                "*": channel,
            },
        ),
    ]


def digits_table(epochs: int) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    model = make_cnn()
    train(model, x_train, y_train, epochs)
    calib = [x_train[:256]]
    dense_bits = model_size_bits(model)
    print(
        f"1) digits CNN ({sum(p.numel() for p in model.parameters())} parameters, trained "
        f"{epochs} epochs in {time.perf_counter() - t0:.1f} s); every Conv2d/Linear weight "
        f"quantized, {len(y_test)} test images"
    )
    print(
        f"   {'bits':>4}  {'granularity':<14}{'size (bits)':>12}{'x smaller':>11}{'test acc':>10}"
    )
    print(
        f"   {32:>4}  {'float32':<14}{dense_bits:>12}{1.0:>11.2f}"
        f"{accuracy(model, x_test, y_test):>10.4f}"
    )
    for bits in BITS:
        for label, weights in cnn_specs(bits):
            m = copy.deepcopy(model)
            quantize(m, weights=weights, progress=False)
            calibrate(m, calib, progress=False)
            size = model_size_bits(m)
            print(
                f"   {bits:>4}  {label:<14}{size:>12}{dense_bits / size:>11.2f}"
                f"{accuracy(m, x_test, y_test):>10.4f}"
            )


# --------------------------------------------------------------------------- MiniLM-L6
def minilm_specs(bits: int) -> list[tuple[str, QuantSpec]]:
    """Linear weights are (out, in): channel = output row (axis 0), groups along inputs."""
    return [
        ("per-tensor", QuantSpec(bits=bits, granularity="tensor")),
        ("per-channel", QuantSpec(bits=bits, granularity="channel", axis=0)),
        ("per-group 64", QuantSpec(bits=bits, granularity=("group", 64), axis=1)),
    ]


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    noise = (x - y).double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(x.double().pow(2).sum().item() / noise)


def make_batches(tokenizer, sentences: Sequence[str], size: int = 32) -> list[dict]:
    ordered = sorted(sentences, key=lambda s: len(tokenizer(s)["input_ids"]))  # less padding
    return [
        dict(
            tokenizer(
                ordered[i : i + size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=64,
            )
        )
        for i in range(0, len(ordered), size)
    ]


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    return torch.cat([model(**b) for b in batches])


def minilm_tables(n_calib: int, n_test: int) -> None:
    t0 = time.perf_counter()
    model, tokenizer = load_minilm()
    weight = model.encoder.encoder.layer[0].intermediate.dense.weight.detach()
    row_max = weight.abs().amax(dim=1)
    print(
        f"\n2a) MiniLM-L6 encoder.layer.0.intermediate.dense.weight {tuple(weight.shape)}: "
        f"max|w| = {row_max.max():.3f}, median row max|w| = {row_max.median():.3f} "
        f"(x{row_max.max() / row_max.median():.1f}); SQNR in dB, higher is better"
    )
    print(f"   {'bits':>4}" + "".join(f"{label:>15}" for label, _ in minilm_specs(8)))
    for bits in BITS:
        cells = [sqnr_db(weight, fake_quantize(weight, spec)) for _, spec in minilm_specs(bits)]
        print(f"   {bits:>4}" + "".join(f"{c:>15.2f}" for c in cells))

    train, test = split_corpus(n_calib, n_test, seed=0)
    calib, held_out = make_batches(tokenizer, train), make_batches(tokenizer, test)
    reference = embed(model, held_out)
    n_weights = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("encoder.encoder.layer.")
    )
    print(
        f"\n2b) MiniLM-L6, all 36 Linear layers of {MINILM_LAYERS} quantized "
        f"({n_weights / 1e6:.1f}M weights); mean cosine of the embeddings to the original "
        f"on {len(test)} held-out sentences (loaded in {time.perf_counter() - t0:.1f} s)"
    )
    print(f"   {'bits':>4}  {'granularity':<14}{'bits/weight':>12}{'mean cos':>10}")
    for bits in BITS:
        for label, spec in minilm_specs(bits):
            m = copy.deepcopy(model)
            quantize(m, weights={MINILM_LAYERS: spec}, progress=False)
            calibrate(m, calib, progress=False)
            rows = [r for r in size_report(m) if str(r["name"]).startswith("encoder.encoder.")]
            bpw = sum(r["size_bits"] for r in rows) / n_weights
            cos = nn.functional.cosine_similarity(embed(m, held_out), reference).mean().item()
            print(f"   {bits:>4}  {label:<14}{bpw:>12.2f}{cos:>10.4f}")
    print("   (bits/weight: packed codes + float32 scales + float32 biases of those layers)")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="short settings: 10 training epochs, 16+16 sentences"
    )
    ap.add_argument("--no-minilm", action="store_true", help="only the digits CNN")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    digits_table(epochs=10 if args.quick else 25)
    if not args.no_minilm:
        minilm_tables(*((16, 16) if args.quick else (64, 256)))
    print(f"\ntotal time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
