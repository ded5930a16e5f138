"""Searched mixed plans vs uniform plans vs plain per-channel PTQ on the pretrained MiniLM-L6.

The 36 Linear layers of ``encoder.encoder.layer.*`` (q/k/v, attention output,
FFN in/out of the 6 blocks) are compressed; embeddings, LayerNorms and the
(unused) pooler stay float32 and are not counted. Three families of models,
each judged by the sentence embeddings of 512 held-out real sentences against
the original model's (mean cosine, nearest-neighbour recall@10; the same
judging as ``bench_ptq_minilm.py``):

- **plain PTQ**: every layer ``QuantSpec(k, per-channel)``, min-max scales,
  k = 8, 6, 5, 4, 3, 2;
- **uniform**: the same format and quantizer on every layer, drawn from the
  search's own candidates: dense int-k per-channel with the ``'mse'``
  clipping observer, dense ternary, and LowRank at ratio 1/2 with int8 /
  int4 cores;
- **searched**: :func:`tnquant.search` (:mod:`tnquant.planning`) with ``metric='output'`` (the
  relative MSE of the sentence embedding with only one layer changed,
  measured on 64 calibration sentences disjoint from the judged ones),
  candidates dense or LowRank at ratio 1/2 (weight-only SVD), float, int8, 6,
  5, 4, 3, 2 per channel (``'mse'`` observer) and ternary, allocated by the
  exact DP under a budget. Budgets: every plain/uniform model's own size
  (so each comparison is at equal or smaller size), and 2, 2.5, ... 8 bits
  per original weight.

Size: ``bits/w`` = (``model_size_bits`` of the compressed model - the bits of
everything outside the 36 layers) / the 10,616,832 weights of those layers
(codes at their packed width, float32 scales, float32 biases, every core).

Writes ``benchmarks/results/search.md`` and ``search_pareto.png``.
Run: ``.venv/bin/python benchmarks/bench_search.py [--quick]``
"""

from __future__ import annotations

import argparse
import copy
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

from tnquant import LowRank, QuantSpec, Ternary, model_size_bits  # noqa: E402
from tnquant.cli.datasets import load_minilm, split_corpus  # noqa: E402
from tnquant.planning import Candidates, Choice, Plan, apply, search, sensitivity  # noqa: E402
from tnquant.quant import Quantizer  # noqa: E402
from tnquant.registry import weight_pairs  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "search.md"
LAYERS = "encoder.encoder.layer.*"


class Judge:
    """Applies plans to copies of the model and judges them on the held-out sentences.

    Each (layer, choice) is built once (``apply`` on that layer alone, weight
    qparams fixed) and shared by every plan that picks it.
    """

    def __init__(self, model, held_out, fixed_bits: int, n_weights: int) -> None:
        self.model, self.held_out = model, held_out
        self.fixed_bits, self.n_weights = fixed_bits, n_weights
        self.reference = embed(model, held_out)
        self.ref_knn = knn(self.reference)
        self.built: dict[tuple[str, Choice], torch.nn.Module] = {}

    def layer(self, name: str, choice: Choice) -> torch.nn.Module:
        key = (name, choice)
        if key not in self.built:
            holder = torch.nn.Sequential(copy.deepcopy(self.model.get_submodule(name)))
            apply(holder, Plan({"0": choice}), progress=False)
            for module in holder.modules():  # qparams once ('mse' would search every call)
                for _, tensor, q in weight_pairs(module):
                    if isinstance(q, Quantizer) and q.dynamic:
                        q.freeze(tensor.detach())
            self.built[key] = holder[0].eval()
        return self.built[key]

    def __call__(self, plan: Plan) -> tuple[int, float, float]:
        """(bits of the searched layers, cos, R@10) of ``plan``."""
        new = copy.deepcopy(self.model)
        for name, choice in plan.items():
            parent, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent), attr, self.layer(name, choice))
        cos, r10 = judge(new, self.held_out, self.reference, self.ref_knn)
        return model_size_bits(new) - self.fixed_bits, cos, r10

    def bpw(self, bits: int) -> float:
        return bits / self.n_weights


def cached_sensitivity(model, calib, cands, quick: bool):
    key = hashlib.sha256(
        repr((cands, quick, [b["input_ids"].tolist() for b in calib])).encode()
    ).hexdigest()[:16]
    path = Path.home() / ".cache" / "tnquant-bench" / f"search-sens-{key}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f), "cached"
    t0 = time.perf_counter()
    sens = sensitivity(model, calib, cands, metric="output", include=[LAYERS], progress=True)
    how = f"{time.perf_counter() - t0:.0f}s"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(sens, f)
    return sens, how


def baseline_choices(quick: bool) -> list[tuple[str, str, Choice]]:
    out = [
        (
            "plain PTQ",
            f"int{k} per-channel min-max",
            Choice(None, QuantSpec(k, granularity="channel")),
        )
        for k in (8, 6, 5, 4, 3, 2)
    ]
    out += [
        (
            "uniform",
            f"int{k} per-channel mse",
            Choice(None, QuantSpec(k, granularity="channel", observer="mse")),
        )
        for k in (8, 6, 5, 4, 3, 2)
    ]
    out.append(("uniform", "ternary per-channel", Choice(None, Ternary(granularity="channel"))))
    if not quick:
        for k in (8, 4):
            out.append(
                (
                    "uniform",
                    f"LowRank(0.5) + int{k} cores",
                    Choice(LowRank(ratio=0.5), QuantSpec(k, granularity="channel", observer="mse")),
                )
            )
    return out


def mix_of(plan: Plan) -> str:
    kinds: dict[str, int] = {}
    for choice in plan.values():
        kinds[choice.label()] = kinds.get(choice.label(), 0) + 1
    return ", ".join(f"{v}x {k}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def plot(path: Path, baselines, searched) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for family, marker in (("plain PTQ", "s"), ("uniform", "^")):
        pts = sorted((b[2], b[3]) for b in baselines if b[0] == family)
        ax.plot(*zip(*pts, strict=True), marker, label=family, alpha=0.8)
    pts = sorted((s[1], s[2]) for s in searched)
    ax.plot(*zip(*pts, strict=True), "o-", label="searched (mixed)")
    ax.set_xlabel("bits per original Linear weight")
    ax.set_ylabel("mean cosine to the original embeddings")
    ax.set_xlim(1.8, 8.5)
    ax.set_ylim(max(0.0, min(b[3] for b in baselines) - 0.05), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("MiniLM-L6, 36 encoder Linear layers, PTQ (no fine-tuning)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def compare(baselines, searched) -> tuple[list[tuple], int, int]:
    rows, wins = [], 0
    for family, label, size, cos, r10 in baselines:
        fits = [s for s in searched if s[1] <= size + 1e-9]
        if not 1.99 <= size <= 8.2 or not fits:
            continue
        best = max(fits, key=lambda s: s[2])
        win = best[2] >= cos
        wins += win
        rows.append(
            (
                family,
                label,
                round(size, 3),
                round(cos, 4),
                round(r10, 3),
                round(best[1], 3),
                round(best[2], 4),
                round(best[3], 3),
                "yes" if win else "NO",
            )
        )
    return rows, wins, len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="dense candidates only")
    ap.add_argument("--grid", type=int, default=100_000, help="DP table width")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    command = "python " + " ".join(sys.argv)
    print(command, "\n", machine(), flush=True)
    t_all = time.perf_counter()

    model, tokenizer = load_minilm()
    train, test = split_corpus(256, 512, seed=0)
    by_len = lambda s: len(tokenizer(s)["input_ids"])  # noqa: E731
    calib = make_batches(tokenizer, sorted(train[:64], key=by_len))
    held_out = make_batches(tokenizer, sorted(test, key=by_len))
    cands = Candidates(
        formats=() if args.quick else ("lowrank",),
        ratios=(0.5,),
        bits=(8, 6, 5, 4, 3, 2),
        ternary=True,
        binary=False,
        observer="mse",
    )
    sens, how = cached_sensitivity(model, calib, cands, args.quick)
    n_weights = sum(model.get_submodule(n).weight.numel() for n in sens.names)
    n_cands = sum(len(c) for c in sens.choices)
    print(f"sensitivity: {n_cands} candidates over {len(sens.names)} layers ({how})", flush=True)
    run = Judge(model, held_out, sens.fixed_bits, n_weights)

    baselines, budgets = [], []
    for family, label, choice in baseline_choices(args.quick):
        bits, cos, r10 = run(Plan({n: choice for n in sens.names}))
        baselines.append((family, label, run.bpw(bits), cos, r10))
        budgets.append(bits)  # the searched plan may take exactly as many bits
        print(baselines[-1], flush=True)
    budgets += [int(b * n_weights) for b in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0)]

    searched = []
    for bits in sorted(set(budgets)):
        if not 1.99 <= run.bpw(bits) <= 8.2:
            continue
        t1 = time.perf_counter()
        try:
            plan = search(
                model,
                calib,
                metric="output",
                budget_bits=sens.fixed_bits + bits,
                precomputed=sens,
                grid=args.grid,
                verify_plan=False,
                progress=False,
            )
        except ValueError as err:
            print(f"budget {run.bpw(bits):.3f} bits/w: {err}")
            continue
        t_search = time.perf_counter() - t1
        size, cos, r10 = run(plan)
        searched.append(
            (
                run.bpw(bits),
                run.bpw(size),
                cos,
                r10,
                plan.predicted_error or 0.0,
                f"{t_search:.1f}s; {mix_of(plan)}",
            )
        )
        print(searched[-1], flush=True)
    rows, wins, total = compare(baselines, searched)
    png = plot(Path(args.out).with_name("search_pareto.png"), baselines, searched)
    text = "\n".join(
        [
            "# Searched mixed plans vs uniform plans vs plain per-channel PTQ (MiniLM-L6)",
            "",
            f"command: `{command}`",
            "",
            f"machine: {machine()}",
            "",
            f"{'QUICK run (dense candidates only). ' if args.quick else ''}"
            f"Sensitivity (`metric='output'`, 64 calibration sentences): {n_cands} candidates "
            f"over {len(sens.names)} layers ({how}); total {time.perf_counter() - t_all:.0f}s. "
            f"Judged on 512 held-out sentences (cos, R@10 vs the original embeddings). bits/w "
            f"over the {n_weights} weights of the 36 Linear layers. Budgets: each baseline's "
            f"exact size, and 2..8 bits/w; DP grid {args.grid}.",
            "",
            f"**Searched >= baseline (cosine) at equal or smaller size: {wins}/{total}.**",
            "",
            "## Comparison at equal size",
            "",
            markdown_table(
                (
                    "baseline family",
                    "baseline",
                    "bits/w",
                    "cos",
                    "R@10",
                    "searched bits/w (<=)",
                    "searched cos",
                    "searched R@10",
                    "searched >= baseline",
                ),
                rows,
            ),
            "",
            "## Baselines",
            "",
            markdown_table(
                ("family", "model", "bits/w", "cos", "R@10"),
                [(f, lab, round(s, 3), round(c, 4), round(r, 3)) for f, lab, s, c, r in baselines],
            ),
            "",
            "## Searched plans",
            "",
            "`predicted err` = summed per-layer output relative MSE on the calibration sentences "
            "(the DP's objective).",
            "",
            markdown_table(
                (
                    "budget bits/w",
                    "bits/w",
                    "cos",
                    "R@10",
                    "predicted err (sum)",
                    "search time; plan",
                ),
                [
                    (round(b, 3), round(s, 3), round(c, 4), round(r, 3), f"{p:.3g}", note)
                    for b, s, c, r, p, note in searched
                ],
            ),
            "",
            f"![Pareto front]({png.name})" if png else "",
            "",
        ]
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
