"""Regenerate the PNG figures of the docs from tnquant itself.

Run from the repository root (about half a minute on 2 cores; needs the
``hf`` and ``plot`` extras for the pretrained MiniLM-L6 weight and
matplotlib)::

    .venv/bin/python docs/figures/make_figures.py

Writes into ``docs/figures/``:

- ``sqnr_bits.png``: SQNR of ``fake_quantize`` vs bit width per granularity
  (and power-of-two scales) on a real MiniLM-L6 weight;
- ``rank_error.png``: TT rank vs relative weight error, and the error vs the
  fraction of parameters kept for TT, Tucker and low rank, on the same weight;
- ``ap_fixed_modes.png``: the ``ap_fixed`` rounding and overflow modes on a ramp.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tnquant import TT, Binary, FixedPoint, LowRank, QuantSpec, Ternary, Tucker  # noqa: E402
from tnquant.cli.datasets import load_minilm  # noqa: E402
from tnquant.decompose import decompose_linear  # noqa: E402
from tnquant.quant import choose_qparams, fake_quantize  # noqa: E402
from tnquant.quant.observers import estimate_range  # noqa: E402

HERE = Path(__file__).resolve().parent
META = {"Software": None}  # no version stamp: reruns give identical files


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    noise = (x - y).double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(x.double().pow(2).sum().item() / noise)


def minilm_weight() -> torch.Tensor:
    """The first feed-forward weight of layer 0, (1536, 384) float32."""
    model, _ = load_minilm()
    return model.encoder.encoder.layer[0].intermediate.dense.weight.detach().clone()


def quantized(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``fake_quantize`` with the spec's observer choosing the range (as calibration does)."""
    qparams = None
    if spec.observer != "minmax":
        lo, hi = estimate_range(w, spec)
        qparams = choose_qparams(w, spec, min_val=lo, max_val=hi)
    return fake_quantize(w, spec, qparams)


def fig_sqnr(w: torch.Tensor) -> None:
    bits = [2, 3, 4, 5, 6, 8]
    rows = {
        "per-tensor": lambda b: QuantSpec(bits=b),
        "per-channel": lambda b: QuantSpec(bits=b, granularity="channel", axis=0),
        "per-group 64": lambda b: QuantSpec(bits=b, granularity=("group", 64), axis=1),
        "per-channel, pow2 scales": lambda b: QuantSpec(
            bits=b, granularity="channel", axis=0, scale="pow2"
        ),
        "per-channel, MSE clipping": lambda b: QuantSpec(
            bits=b, granularity="channel", axis=0, observer="mse"
        ),
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, make in rows.items():
        style = "--" if "pow2" in label or "MSE" in label else "-"
        ax.plot(
            bits, [sqnr_db(w, quantized(w, make(b))) for b in bits], style, marker="o", label=label
        )
    for label, spec, marker in [
        ("binary (XNOR), per-channel", Binary(granularity="channel"), "s"),
        ("ternary (TWN), per-channel", Ternary(granularity="channel"), "^"),
    ]:
        ax.plot(
            [spec.bits],
            [sqnr_db(w, fake_quantize(w, spec))],
            marker,
            color="k",
            label=label,
            linestyle="none",
        )
    ax.set_xlabel("bits per weight (codes only)")
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title(f"fake_quantize on MiniLM-L6 layer 0 FFN-in weight {tuple(w.shape)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "sqnr_bits.png", dpi=110, metadata=META)
    plt.close(fig)


def fig_rank(w: torch.Tensor) -> None:
    dense = w.numel()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.9))
    ranks = [1, 2, 4, 8, 16, 32, 48, 64]
    errs, kept = [], []
    for r in ranks:
        dec = decompose_linear(w, TT(rank=r, order=3))
        errs.append(dec.rel_error)
        kept.append(dec.n_params / dense)
    ax1.plot(ranks, errs, marker="o")
    for r, e, k in zip(ranks, errs, kept, strict=True):
        ax1.annotate(f"{1 / k:.0f}x", (r, e), fontsize=7, textcoords="offset points", xytext=(3, 4))
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("TT rank (all inner bonds, order 3)")
    ax1.set_ylabel(r"relative error $\|W-\hat W\|_F / \|W\|_F$")
    ax1.set_title("TT-matrix: rank vs error (labels: compression)", fontsize=9)
    ax1.grid(alpha=0.3)

    ratios = [0.02, 0.05, 0.1, 0.25, 0.5, 0.75]
    for label, make in [
        ("TT (order 3)", lambda q: TT(ratio=q, order=3)),
        ("Tucker (order 1, Tucker-2)", lambda q: Tucker(ratio=q)),
        ("LowRank", lambda q: LowRank(ratio=q)),
    ]:
        decs = [decompose_linear(w, make(q)) for q in ratios]
        ax2.plot(
            [d.n_params / dense for d in decs], [d.rel_error for d in decs], marker="o", label=label
        )
    ax2.set_xlim(0, 0.8)
    ax2.set_xlabel("fraction of the dense parameters kept")
    ax2.set_ylabel("relative weight error")
    ax2.set_title("same weight, by format (ratio=0.02 .. 0.75)", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "rank_error.png", dpi=110, metadata=META)
    plt.close(fig)


def fig_ap_fixed() -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.9))
    x = torch.linspace(-0.75, 0.75, 2001, dtype=torch.float64)
    for mode in ["TRN", "TRN_ZERO", "RND"]:
        ax1.plot(
            x, fake_quantize(x, FixedPoint(4, 2, rounding=mode, overflow="SAT")), label=mode, lw=1.2
        )
    ax1.plot(x, x, "k:", lw=0.8, label="input")
    # the RND_* modes differ only on ties (halfway between two steps): markers there
    ties = torch.tensor([-0.625, -0.375, -0.125, 0.125, 0.375, 0.625], dtype=torch.float64)
    for k, (mode, marker) in enumerate(
        [("RND", "o"), ("RND_ZERO", "v"), ("RND_INF", "^"), ("RND_MIN_INF", "s"), ("RND_CONV", "D")]
    ):
        y = fake_quantize(ties, FixedPoint(4, 2, rounding=mode, overflow="SAT"))
        ax1.plot(ties + 0.012 * (k - 2), y, marker, ms=4, linestyle="none", label=f"{mode} on ties")
    ax1.set_title("rounding modes, ap_fixed<4,2,Q,SAT> (step 0.25)", fontsize=9)
    ax1.set_ylim(-0.9, 0.9)
    ax1.set_xlabel("input")
    ax1.set_ylabel("fixed-point value")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=6, ncol=2)

    x = torch.linspace(-4, 4, 2001, dtype=torch.float64)
    for mode in ["WRAP", "SAT", "SAT_SYM", "SAT_ZERO"]:
        ax2.plot(
            x,
            fake_quantize(x, FixedPoint(4, 2, rounding="RND_CONV", overflow=mode)),
            label=mode,
            lw=1.2,
        )
    ax2.plot(x, x, "k:", lw=0.8, label="input")
    ax2.set_ylim(-2.6, 2.6)
    ax2.set_title("overflow modes, ap_fixed<4,2,RND_CONV,O> (range [-2, 1.75])", fontsize=9)
    ax2.set_xlabel("input")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "ap_fixed_modes.png", dpi=110, metadata=META)
    plt.close(fig)


def main() -> None:
    torch.manual_seed(0)
    fig_ap_fixed()
    w = minilm_weight()
    fig_sqnr(w)
    fig_rank(w)
    for name in ("sqnr_bits.png", "rank_error.png", "ap_fixed_modes.png"):
        print(HERE / name)


if __name__ == "__main__":
    main()
