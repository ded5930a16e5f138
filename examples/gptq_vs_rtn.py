"""GPTQ vs round-to-nearest: the same quantizers, a better rounding, no training.

The 36 Linear layers of the pretrained MiniLM-L6 sentence encoder are
quantized per channel at 4, 3 and 2 bits ('mse' ranges) and calibrated
(PTQ, round-to-nearest). :func:`tnquant.ptq.gptq` then re-rounds their
weights one layer at a time on the calibration sentences (Frantar et al.
2023): each column's rounding error is spread over the columns not yet
rounded, so that the layer's output on those sentences moves as little as
possible. The scales, the codes' range and so the size in bits stay the
same. Judged by the mean cosine of the sentence embeddings to the original
model's on held-out sentences.

Run: ``python examples/gptq_vs_rtn.py`` (about 2 minutes on 2 cores);
``--quick``: one bit width, fewer sentences (about 30 s).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tnquant import QuantSpec, calibrate, quantize
from tnquant.cli.datasets import load_minilm, split_corpus
from tnquant.ptq import gptq

LAYERS = "encoder.encoder.layer.*"


def make_batches(tokenizer, sentences: Sequence[str], size: int = 32) -> list[dict]:
    return [
        dict(
            tokenizer(
                list(sentences[i : i + size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=64,
            )
        )
        for i in range(0, len(sentences), size)
    ]


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    return torch.cat([model(**b) for b in batches])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="int3 only, 64/128 sentences")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    n_calib, n_test, bits_list = (64, 128, (3,)) if args.quick else (256, 512, (4, 3, 2))
    model, tokenizer = load_minilm()
    train, test = split_corpus(n_calib, n_test, seed=0)
    calib, held_out = make_batches(tokenizer, train), make_batches(tokenizer, test)
    reference = embed(model, held_out)
    print(f"MiniLM-L6, 36 Linear layers; {n_calib} calibration / {n_test} held-out sentences")
    print(
        f"{'weights':<26}{'RTN cos':>9}{'GPTQ cos':>10}{'layer error RTN -> GPTQ':>26}{'GPTQ s':>8}"
    )
    for bits in bits_list:
        student = copy.deepcopy(model)
        spec = QuantSpec(bits=bits, granularity="channel", observer="mse")
        quantize(student, weights={LAYERS: spec}, progress=False)
        calibrate(student, calib, progress=False)
        rtn = F.cosine_similarity(embed(student, held_out), reference).mean().item()
        t0 = time.perf_counter()
        report = gptq(student, calib, progress=False)
        seconds = time.perf_counter() - t0
        cos = F.cosine_similarity(embed(student, held_out), reference).mean().item()
        e_rtn = sorted(r["rtn_error"] for r in report.rows)[len(report.rows) // 2]
        e_gptq = sorted(r["error"] for r in report.rows)[len(report.rows) // 2]
        print(
            f"{f'int{bits} per-channel mse':<26}{rtn:>9.4f}{cos:>10.4f}"
            f"{f'{e_rtn:.4f} -> {e_gptq:.4f}':>26}{seconds:>8.1f}"
        )
    print(
        "layer error: median over the layers of |X W^T - X Q^T|^2 / |X W^T|^2 on the "
        "calibration inputs"
    )


if __name__ == "__main__":
    main()
