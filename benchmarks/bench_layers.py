"""Forward speed of the factorized Linear layers vs nn.Linear and TensorLy-Torch.

1024 -> 1024 at about 10x and 50x compression, batch 1/32/128/1024, 2 threads.
TensorLy-Torch's ``FactorizedLinear`` gets *identical* cores (same format,
tensorized shapes and ranks; TT as its 'blocktt', low rank as a 'cp' of the
untensorized matrix) and is timed with both of its implementations; the
faster counts. GFLOP/s counts the FLOPs of the cheapest contraction order of
*our* layer (``layer.flops(batch)``: factorized or reconstruction + GEMM,
whichever ``'auto'`` runs), so "% dense GF/s" says how close the layer gets to
the machine's dense GEMM rate.

Run: ``.venv/bin/python benchmarks/bench_layers.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, median_time  # noqa: E402

from tnquant import TT, LowRank, Tucker  # noqa: E402
from tnquant.layers import LowRankLinear, TTLinear, TuckerLinear  # noqa: E402

SHAPE = (16, 8, 8)


def tltorch_twin(layer, bias):
    """A TensorLy-Torch FactorizedLinear holding the same cores as ``layer``."""
    import tltorch

    kw = dict(in_tensorized_features=SHAPE, out_tensorized_features=SHAPE)
    if isinstance(layer, TTLinear):
        ranks = (1, *layer.ranks, 1)
        twin = tltorch.FactorizedLinear(**kw, factorization="blocktt", rank=ranks)
        targets = list(twin.weight.factors)
        sources = list(layer.cores)
    elif isinstance(layer, TuckerLinear) and len(layer.cores) == 3:  # Tucker-2, order 1
        u_out, core, u_in = layer.cores
        twin = tltorch.FactorizedLinear(
            in_tensorized_features=(1024,),
            out_tensorized_features=(1024,),
            factorization="tucker",
            rank=tuple(core.shape),
        )
        targets = [twin.weight.core, *twin.weight.factors]
        sources = [core, u_out, u_in]
    elif isinstance(layer, TuckerLinear):
        twin = tltorch.FactorizedLinear(
            **kw, factorization="tucker", rank=tuple(layer.cores[0].shape)
        )
        targets = [twin.weight.core, *twin.weight.factors]
        sources = list(layer.cores)
    else:
        u, v = layer.cores
        twin = tltorch.FactorizedLinear(
            in_tensorized_features=(1024,),
            out_tensorized_features=(1024,),
            factorization="cp",
            rank=u.shape[1],
        )
        targets = [twin.weight.weights, *twin.weight.factors]
        sources = [torch.ones(u.shape[1]), u, v.T]
    with torch.no_grad():
        for t, s in zip(targets, sources, strict=True):
            t.copy_(s)
        twin.bias.copy_(bias)
    return twin


def build(kind, ratio, dense):
    if kind == "TT":
        return TTLinear.from_dense(dense, TT(ratio=ratio, in_shape=SHAPE, out_shape=SHAPE))
    if kind == "Tucker (order 3)":
        return TuckerLinear.from_dense(dense, Tucker(ratio=ratio, in_shape=SHAPE, out_shape=SHAPE))
    if kind == "Tucker (order 1)":
        return TuckerLinear.from_dense(dense, Tucker(ratio=ratio))
    return LowRankLinear.from_dense(dense, LowRank(ratio=ratio))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    repeats = 5 if args.quick else 11
    dense = torch.nn.Linear(1024, 1024)
    rows = []
    with torch.no_grad():
        for kind in ("TT", "Tucker (order 3)", "Tucker (order 1)", "LowRank"):
            for ratio in (0.1, 0.02):
                layer = build(kind, ratio, dense)
                twin = tltorch_twin(layer, dense.bias)
                for batch in (1, 32, 128, 1024):
                    x = torch.randn(batch, 1024)
                    check = (layer(x) - dense(x)).norm() / dense(x).norm()
                    diff = (layer(x) - twin(x)).abs().max().item()
                    if diff > 1e-3 * layer(x).abs().max().item():
                        raise RuntimeError(f"{kind}: TensorLy-Torch twin differs by {diff}")
                    t_dense = median_time(lambda x=x: dense(x), repeats)
                    t_ours = median_time(lambda x=x, f=layer: f(x), repeats)
                    t_tl = []
                    for impl in ("factorized", "reconstructed"):
                        twin.implementation = impl
                        t_tl.append(median_time(lambda x=x, f=twin: f(x), repeats))
                    flops = layer.flops(batch)
                    ours_flops = min(flops["factorized"], flops["reconstructed"])
                    gf_ours = ours_flops / t_ours / 1e9
                    gf_dense = flops["dense"] / t_dense / 1e9
                    rows.append(
                        (
                            kind,
                            f"{layer.compression_ratio:.1f}x",
                            "x".join(map(str, layer.ranks)),
                            batch,
                            flops["chosen"],
                            t_dense / t_ours,
                            min(t_tl) / t_ours,
                            gf_ours,
                            100 * gf_ours / gf_dense,
                            f"{check.item():.2f}",
                        )
                    )
                    print(rows[-1], flush=True)
    header = [
        "layer",
        "compression",
        "ranks",
        "batch",
        "auto picks",
        "speed-up vs nn.Linear",
        "speed-up vs TensorLy-Torch (its faster impl.)",
        "GFLOP/s",
        "% of dense GFLOP/s",
        "rel. output error (random W)",
    ]
    text = "\n".join(
        [
            "command: .venv/bin/python benchmarks/bench_layers.py"
            + (" --quick" if args.quick else ""),
            f"machine: {machine()}",
            "",
            markdown_table(header, rows),
        ]
    )
    print(text)
    out = Path(__file__).resolve().parent / "results" / "layers.md"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
