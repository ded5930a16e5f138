"""The main job, end to end, on the pretrained MiniLM-L6 sentence encoder.

1. Quantize a real weight matrix (the first feed-forward layer) with every
   quantizer family and print the error table (SQNR in dB).
2. Factorize every Linear layer of the encoder, weight-only and data-aware
   (fitted on calibration sentences), and print the size and the cosine of
   the sentence embeddings to the original model's on held-out sentences.
3. The whole road on one model (``tnquant.pipeline.run_pipeline``, the road
   ``tnquant compress`` runs): data-aware low-rank factorization, 4-bit
   per-channel cores, PTQ calibration, a short distillation from the original
   model through the straight-through estimators, and conversion to packed
   integer storage; the size in bits per original weight and the cosine at
   every stage.

Run: ``python examples/demo.py [--quick]`` (minutes on 2 cores; ``make demo`` runs the CLI road).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from tnquant import (
    TT,
    Binary,
    FixedPoint,
    LowRank,
    QuantSpec,
    Ternary,
    Tucker,
    factorize,
    size_report,
)
from tnquant.cli.datasets import load_minilm, split_corpus
from tnquant.pipeline import (
    FactorizeSection,
    FinetuneSection,
    QuantizeSection,
    Recipe,
    run_pipeline,
)
from tnquant.quant import fake_quantize


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    noise = (x - y).double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(x.double().pow(2).sum().item() / noise)


def quantizer_table(weight: torch.Tensor) -> None:
    specs = [
        ("int8 per-tensor", QuantSpec(bits=8)),
        ("int8 per-channel", QuantSpec(bits=8, granularity="channel", axis=0)),
        ("int4 per-channel", QuantSpec(bits=4, granularity="channel", axis=0)),
        ("int4 per-group 64", QuantSpec(bits=4, granularity=("group", 64), axis=1)),
        ("int4 per-channel pow2", QuantSpec(bits=4, granularity="channel", scale="pow2")),
        ("int3 per-group 32", QuantSpec(bits=3, granularity=("group", 32), axis=1)),
        ("ternary (TWN) per-channel", Ternary(granularity="channel")),
        ("binary (XNOR) per-channel", Binary(granularity="channel")),
        ("ap_fixed<8,1,RND,SAT>", FixedPoint(8, 1, rounding="RND", overflow="SAT")),
        ("float8_e4m3fn", QuantSpec(dtype="float8_e4m3fn")),
        ("bfloat16", QuantSpec(dtype="bfloat16")),
    ]
    print(f"\n1) quantizers on a real weight {tuple(weight.shape)} (SQNR, higher is better)")
    print(f"   {'quantizer':<28}{'bits':>5}{'SQNR dB':>10}")
    for label, spec in specs:
        print(f"   {label:<28}{spec.bits:>5}{sqnr_db(weight, fake_quantize(weight, spec)):>10.2f}")


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    return torch.cat([model(**b) for b in batches])


def make_batches(tokenizer, sentences, size=32):
    return [
        dict(
            tokenizer(
                sentences[i : i + size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=64,
            )
        )
        for i in range(0, len(sentences), size)
    ]


QUICK = False  # --quick: fewer sentences and specs (seconds, for the test suite)


def factorization_table(model, tokenizer) -> None:
    train, test = split_corpus(*((32, 32) if QUICK else (256, 256)), seed=0)
    calib, held_out = make_batches(tokenizer, train), make_batches(tokenizer, test)
    reference = embed(model, held_out)
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    print(
        f"\n2) factorize all Linear layers of MiniLM-L6 ({dense / 1e6:.1f}M weights); "
        f"cosine of embeddings to the original on {len(test)} held-out sentences"
    )
    print(f"   {'spec':<26}{'fit':<12}{'params kept':>12}{'mean cos':>10}{'time s':>8}")
    specs = [
        ("LowRank(ratio=0.5)", LowRank(ratio=0.5)),
        ("Tucker(ratio=0.5)", Tucker(ratio=0.5)),
        ("TT(ratio=0.5, order=2)", TT(ratio=0.5, order=2)),
    ]
    for label, spec in specs[:1] if QUICK else specs:
        for aware in (False, True):
            student = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = factorize(
                student, spec, include=["encoder.*"], data=calib if aware else None, progress=False
            )
            seconds = time.perf_counter() - t0
            cos = torch.nn.functional.cosine_similarity(embed(student, held_out), reference).mean()
            kept = report.totals()["params_after"] / report.totals()["params_before"]
            fit = "data-aware" if aware else "weights"
            print(f"   {label:<26}{fit:<12}{kept:>12.2f}{cos.item():>10.3f}{seconds:>8.1f}")


def encoder_bits_per_weight(model) -> float:
    """Stored bits of the encoder's Linear-replacing layers per original weight."""
    rows = [r for r in size_report(model) if str(r["name"]).startswith("encoder.encoder.")]
    bits = sum(r["size_bits"] for r in rows)
    return bits / ENCODER_LINEAR_WEIGHTS


ENCODER_LINEAR_WEIGHTS = 6 * (4 * 384 * 384 + 2 * 384 * 1536)


def pipeline(model, tokenizer) -> None:
    train, test = split_corpus(*((32, 32) if QUICK else (512, 256)), seed=1)
    calib, held_out = make_batches(tokenizer, train), make_batches(tokenizer, test)
    reference = embed(model, held_out)

    def cosine(m) -> float:
        return torch.nn.functional.cosine_similarity(embed(m, held_out), reference).mean().item()

    print("\n3) compress -> quantize -> calibrate -> distil -> convert (MiniLM-L6 encoder)")
    print(f"   {'stage':<44}{'bits/weight':>12}{'mean cos':>10}{'time s':>8}")
    layers = "encoder.encoder.*"
    recipe = Recipe(
        factorize=FactorizeSection({layers: LowRank(ratio=0.5)}),  # data-aware by default
        quantize=QuantizeSection(
            weights={layers: QuantSpec(bits=4, granularity="channel", learnable=True)}
        ),
        finetune=FinetuneSection(loss="cosine", epochs=2, lr=3e-4),  # distilled from model
    )
    labels = {
        "factorize": "LowRank(ratio=0.5), data-aware, float32",
        "calibrate": "+ 4-bit per-channel cores (LSQ), PTQ",
        "finetune": f"+ distillation, 2 epochs x {len(calib)} batches",
        "convert": "+ convert to packed int4 storage",
    }
    seconds = {"quantize": 0.0}

    def after(stage: str, student, report, stage_seconds: float) -> None:
        if stage == "quantize":  # printed with calibrate: a quantized model is calibrated next
            seconds["quantize"] = stage_seconds
            return
        total = stage_seconds + (seconds["quantize"] if stage == "calibrate" else 0.0)
        bits, cos = encoder_bits_per_weight(student), cosine(student)
        print(f"   {labels[stage]:<44}{bits:>12.2f}{cos:>10.3f}{total:>8.1f}")

    run_pipeline(model, recipe, calib, progress=False, after=after)
    print(
        f"   (original: 32.00 bits/weight; {ENCODER_LINEAR_WEIGHTS / 1e6:.1f}M encoder "
        "Linear weights; embeddings and pooler stay float)"
    )


def main(argv: list[str] | None = None) -> None:
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short settings (tests)")
    QUICK = parser.parse_args(argv).quick
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    weight = model.encoder.encoder.layer[0].intermediate.dense.weight.detach()
    quantizer_table(weight)
    factorization_table(model, tokenizer)
    pipeline(model, tokenizer)


if __name__ == "__main__":
    main()
