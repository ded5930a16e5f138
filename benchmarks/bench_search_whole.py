"""The whole MiniLM-L6 under one budget: the search with its embeddings vs with int8 embeddings.

MiniLM-L6's three embedding tables hold 11.9M of its 22.7M parameters. This
benchmark searches one plan per whole-model budget (``budget_bits`` =
b x 22,713,216 parameters, as :func:`tnquant.model_size_bits` counts every
stored bit: embeddings, LayerNorms and biases included) over every layer the
registry knows (the 36 encoder Linears, the pooler and the 3 embeddings):

- **embeddings searched**: tables per row or per group of 64 along a row,
  int8/6/5/4/3/2 (min-max scales: the 'mse' observer took 205 s per
  candidate on the 30522 x 384 word table, 1 thread), ternary per row, or
  ``TTEmbedding`` at ratios 1/2, 1/4, 1/8 with the same core quantizers;
- **embeddings int8**: the same search and the same measurements with the
  tables fixed at int8 per row (the candidates of the embeddings cut to that
  one).

The Linear layers' candidates are dense int8/6/5/4/3/2 per channel ('mse'
observer) and ternary. ``metric='scaled'``: each candidate's own output
error (an embedding's: its lookups on the captured token ids), rescaled per
layer to the sentence embedding's relative MSE by one model pass; 64
calibration sentences. PTQ only: no fine-tuning. Judged on 512 held-out
sentences (mean cosine and recall@10 of the sentence embeddings against the
original model's, as ``bench_search.py``).

Writes ``benchmarks/results/search_whole.md``.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_search_whole.py``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import os
import pickle
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embed, judge, knn, machine, make_batches, markdown_table  # noqa: E402

from tnquant import model_size_bits  # noqa: E402
from tnquant.cli.datasets import load_minilm, split_corpus  # noqa: E402
from tnquant.planning import Candidates, Plan, apply, search, sensitivity  # noqa: E402
from tnquant.planning.sensitivity import Sensitivity  # noqa: E402
from tnquant.quant import Quantizer  # noqa: E402
from tnquant.registry import weight_pairs  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "search_whole.md"
EMB = "*embeddings*"
INT8_ROW = "dense/int8/channel"


def candidates(quick: bool) -> dict:
    linear = Candidates(
        formats=(), bits=(8, 6, 5, 4, 3, 2), ternary=True, binary=False, observer="mse"
    )
    table = Candidates(
        formats=() if quick else ("tt",),
        ratios=(0.5, 0.25, 0.125),
        bits=(8, 6, 5, 4, 3, 2),
        ternary=True,
        binary=False,
        observer="minmax",  # 'mse' takes 205 s per candidate on the 30522 x 384 table
        embedding_granularity=("channel", ("group", 64)),
    )
    return {EMB: table, "*": linear}


def cached_sensitivity(model, calib, cands, quick: bool) -> tuple[Sensitivity, str]:
    key = hashlib.sha256(
        repr((sorted(cands.items()), quick, [b["input_ids"].tolist() for b in calib])).encode()
    ).hexdigest()[:16]
    path = Path.home() / ".cache" / "tnquant-bench" / f"search-whole-{key}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f), "cached"
    t0 = time.perf_counter()
    sens = sensitivity(model, calib, cands, metric="scaled", progress=True)
    how = f"{time.perf_counter() - t0:.0f}s"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(sens, f)
    return sens, how


def int8_tables(sens: Sensitivity) -> Sensitivity:
    """The same measurements with each embedding's candidates cut to its int8 per-row table."""
    keep = [
        [c for c, ch in enumerate(cs) if "embeddings" not in n or ch.label() == INT8_ROW]
        for n, cs in zip(sens.names, sens.choices, strict=True)
    ]

    def pick(rows: list[list]) -> list[list]:
        return [[row[c] for c in ks] for row, ks in zip(rows, keep, strict=True)]

    return dataclasses.replace(
        sens,
        choices=pick(sens.choices),
        sizes=pick(sens.sizes),
        errors=pick(sens.errors),
        ranks=pick(sens.ranks),
    )


def freeze_weights(model: torch.nn.Module) -> None:
    """Fix every dynamic weight quantizer's qparams on its weight (what convert would store)."""
    for module in model.modules():
        for _, tensor, q in weight_pairs(module):
            if isinstance(q, Quantizer) and q.dynamic:
                q.freeze(tensor.detach())


def mix_of(plan: Plan, prefix: str) -> str:
    kinds: dict[str, int] = {}
    for name, choice in plan.items():
        if name.startswith(prefix):
            kinds[choice.label()] = kinds.get(choice.label(), 0) + 1
    return ", ".join(f"{v}x {k}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def tables_of(plan: Plan) -> str:
    short = {
        "word_embeddings": "word",
        "position_embeddings": "pos",
        "token_type_embeddings": "type",
    }
    return "; ".join(
        f"{short.get(n.rsplit('.', 1)[-1], n)} {c.label()}"
        for n, c in plan.items()
        if "embeddings" in n
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="no TT embedding candidates")
    ap.add_argument("--grid", type=int, default=100_000, help="DP table width")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    command = "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)
    print(command, "\n", machine(), flush=True)
    t_all = time.perf_counter()

    model, tokenizer = load_minilm()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    whole = model_size_bits(model)
    train, test = split_corpus(256, 512, seed=0)
    by_len = lambda s: len(tokenizer(s)["input_ids"])  # noqa: E731
    calib = make_batches(tokenizer, sorted(train[:64], key=by_len))
    held_out = make_batches(tokenizer, sorted(test, key=by_len))
    reference = embed(model, held_out)
    ref_knn = knn(reference)

    sens, how = cached_sensitivity(model, calib, candidates(args.quick), args.quick)
    n_cands = sum(len(c) for c in sens.choices)
    print(f"sensitivity: {n_cands} candidates over {len(sens.names)} layers ({how})", flush=True)
    variants = {"embeddings searched": sens, "embeddings int8": int8_tables(sens)}
    for label, s in variants.items():
        print(f"{label}: smallest plan {s.min_size_bits() / n_params:.3f} bits/param", flush=True)

    rows = []
    for bpp in (3.5, 4.0, 5.5, 6.0):
        for label, s in variants.items():
            if bpp == 5.5 and label == "embeddings searched":
                continue
            budget = int(bpp * n_params)
            if s.min_size_bits() > budget:
                rows.append(
                    (
                        label,
                        bpp,
                        "",
                        "",
                        "",
                        "",
                        "",
                        f"no plan: needs >= {s.min_size_bits() / n_params:.2f} bits/param",
                    )
                )
                continue
            t0 = time.perf_counter()
            plan = search(
                model,
                calib,
                metric="scaled",
                budget_bits=budget,
                precomputed=s,
                grid=args.grid,
                verify_plan=False,
                progress=False,
            )
            t_search = time.perf_counter() - t0
            new = copy.deepcopy(model)
            t1 = time.perf_counter()
            report = apply(new, plan, progress=False)
            t_apply = time.perf_counter() - t1
            freeze_weights(new)  # qparams once: 'mse' would search again on every call
            size = model_size_bits(new)
            assert size == plan.predicted_size_bits == report.sizes.model_after
            cos, r10 = judge(new, held_out, reference, ref_knn)
            sizes = report.sizes
            rows.append(
                (
                    label,
                    bpp,
                    round(size / n_params, 3),
                    round(whole / size, 2),
                    round(sizes.layers_ratio, 2),
                    round(cos, 4),
                    round(r10, 3),
                    f"search {t_search:.1f}s, apply {t_apply:.0f}s; tables: {tables_of(plan)}; "
                    f"Linear: {mix_of(plan, 'encoder.encoder')}",
                )
            )
            print(rows[-1], flush=True)
            del new

    text = "\n".join(
        [
            "# The whole MiniLM-L6 under one budget: embeddings searched vs int8 (PTQ)",
            "",
            f"command: `{command}`",
            "",
            f"machine: {machine()}",
            "",
            f"{'QUICK run (no TT tables). ' if args.quick else ''}"
            f"Sensitivity (`metric='scaled'`, 64 calibration sentences): {n_cands} candidates over "
            f"{len(sens.names)} layers ({how}); total {time.perf_counter() - t_all:.0f}s. Whole "
            f"model {whole} bits, {n_params} parameters; budget = bits/param x {n_params}. "
            f"`whole x` = {whole} / model_size_bits after; `layers x` = the compressed layers' "
            f"bits before / after (`apply(...).sizes`). Judged on 512 held-out sentences.",
            "",
            markdown_table(
                (
                    "variant",
                    "budget bits/param",
                    "bits/param",
                    "whole x",
                    "layers x",
                    "cos",
                    "R@10",
                    "search time; plan",
                ),
                rows,
            ),
            "",
        ]
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
