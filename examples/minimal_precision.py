"""Exercise 9.3: the minimal precision per layer that keeps the accuracy.

On scikit-learn's digits: train a small CNN (a few seconds), then let
``tnquant.search`` find, per layer, the lowest-precision weights (int8 down
to binary) whose summed accuracy drop on a validation split stays within
1 point of the float model, with the fewest stored bits. The plan is
verified end to end; when the measured drop exceeds the target (the
per-layer drops do not simply add up) the target is tightened and the
search repeated from the same sensitivities. Finally the accuracy/size
table compares the plan with uniform precisions on the held-out test split.

``--minilm`` does the same on the pretrained MiniLM-L6 sentence encoder:
the 36 Linear layers of ``encoder.encoder.layer.*`` get int8..int2 (``'mse'``
clipping observer) or ternary weights, chosen by ``tnquant.search`` with
``metric='output'`` (the relative MSE of the sentence embeddings with only
one layer changed, on 64 real sentences) under a target on that error. The
embeddings are unit vectors, so a relative MSE of ``2 (1 - c)`` is a mean
cosine ``c``: the search starts at the target for a cosine of 0.95 and
tightens it until the cosine to the original embeddings on held-out
sentences is at least 0.95. Reported: bits per original weight and cosine,
next to uniform precisions.

Run: ``python examples/minimal_precision.py`` (about 5 s on 2 cores; ``--quick``
changes nothing there); ``--minilm`` (a few minutes: one model pass per
candidate and layer); ``--minilm --quick`` searches only the 2 feed-forward
layers of the first block, on 16 sentences (about 15 s).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

from tnquant import QuantSpec, calibrate, model_size_bits
from tnquant.cli.datasets import digits
from tnquant.planning import Candidates, Choice, Plan, apply, search, sensitivity

TARGET_DROP = 0.01  # accuracy may fall by at most 1 point
MIN_COSINE = 0.95  # MiniLM: the embeddings must keep this mean cosine to the original


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


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 25) -> None:
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


def uniform_plan(model: nn.Module, spec: object) -> Plan:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return Plan({n: Choice(None, spec) for n in names})


def digits_search(epochs: int) -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    # hold out a validation split of the training set for the search
    x_fit, y_fit, x_val, y_val = x_train[:850], y_train[:850], x_train[850:], y_train[850:]
    model = make_cnn()
    train(model, x_fit, y_fit, epochs)
    float_val, float_test = accuracy(model, x_val, y_val), accuracy(model, x_test, y_test)
    print(
        f"float CNN: val accuracy {float_val:.4f}, test accuracy {float_test:.4f}, "
        f"{model_size_bits(model)} bits ({time.perf_counter() - start:.1f} s)"
    )

    def val_error(m: nn.Module) -> float:  # lower is better: the search's metric
        return 1.0 - accuracy(m, x_val, y_val)

    # precision only (no factorization): float, int8..int2, ternary, binary; per channel
    cands = Candidates(formats=(), bits=(8, 6, 4, 3, 2), ternary=True, binary=True)
    sens = sensitivity(model, [x_fit[:256]], cands, metric=val_error, progress=False)
    print("\nper-layer accuracy drop (val) with only that layer quantized, and its bits:")
    for k, name in enumerate(sens.names):
        cells = [
            f"{c.label().split('/', 1)[1]}: {e:+.3f} ({s} b)"
            for c, e, s in zip(sens.choices[k], sens.errors[k], sens.sizes[k], strict=True)
        ]
        print(f"  {name}: " + "; ".join(cells))

    target = TARGET_DROP
    for _ in range(8):
        plan = search(
            model, [x_fit[:256]], metric=val_error, target=target, precomputed=sens, progress=False
        )
        print(
            f"\ntarget {target:.4f}: predicted drop {plan.predicted_error:.4f}, measured "
            f"{plan.measured_error:.4f}, {plan.measured_size_bits} bits"
        )
        if plan.measured_error <= TARGET_DROP:
            break
        if not plan.predicted_error:  # a tighter target cannot change the plan any more
            print(
                "no plan met the target: every chosen layer alone costs no accuracy, but "
                "together they do (a smoother metric, e.g. the validation loss, helps)"
            )
            break
        target *= 0.75
    print("\nchosen precision per layer:")
    print(plan.table())

    rows = [
        ("float32", None),
        ("int8/channel", QuantSpec(8, granularity="channel")),
        ("int4/channel", QuantSpec(4, granularity="channel")),
        ("int2/channel", QuantSpec(2, granularity="channel")),
    ]
    print(f"\n{'model':<22}{'val acc':>9}{'test acc':>10}{'size (bits)':>13}{'x smaller':>11}")
    dense_bits = model_size_bits(model)
    for label, spec in rows + [("searched (mixed)", "plan")]:
        m = copy.deepcopy(model)
        if spec == "plan":
            apply(m, plan, progress=False)
        elif spec is not None:
            apply(m, uniform_plan(m, spec), progress=False)
        size = model_size_bits(m)
        print(
            f"{label:<22}{accuracy(m, x_val, y_val):>9.4f}{accuracy(m, x_test, y_test):>10.4f}"
            f"{size:>13}{dense_bits / size:>11.2f}"
        )
    print(
        f"\nplan as JSON: {len(plan.to_json())} characters; "
        f"digits time {time.perf_counter() - start:.1f} s"
    )


# --------------------------------------------------------------------------- MiniLM-L6
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
    model.eval()
    return torch.cat([model(**b) for b in batches])


def minilm_search(quick: bool) -> None:
    from tnquant.cli.datasets import load_minilm, split_corpus

    start = time.perf_counter()
    model, tokenizer = load_minilm()
    n_calib, n_test = (16, 64) if quick else (64, 256)
    include = (
        [f"encoder.encoder.layer.0.{n}.dense" for n in ("intermediate", "output")]
        if quick
        else ["encoder.encoder.layer.*"]
    )
    train_s, test_s = split_corpus(n_calib, n_test, seed=0)
    calib, held_out = make_batches(tokenizer, train_s), make_batches(tokenizer, test_s)
    reference, ref_calib = embed(model, held_out), embed(model, calib)

    def judge(plan: Plan) -> tuple[float, float, float]:
        """(bits per weight of the searched layers, calib relative MSE, held-out cosine)."""
        m = copy.deepcopy(model)
        apply(m, plan, progress=False)
        calibrate(m, calib, progress=False)  # freeze the weight scales ('mse' searched once)
        rel = float((embed(m, calib) - ref_calib).pow(2).sum() / ref_calib.pow(2).sum())
        cos = nn.functional.cosine_similarity(embed(m, held_out), reference).mean().item()
        return (model_size_bits(m) - sens.fixed_bits) / n_weights, rel, cos

    cands = Candidates(
        formats=(), bits=(8, 6, 5, 4, 3, 2), ternary=True, binary=False, observer="mse"
    )
    t0 = time.perf_counter()
    sens = sensitivity(model, calib, cands, metric="output", include=include, progress=not quick)
    n_weights = sum(model.get_submodule(n).weight.numel() for n in sens.names)
    print(
        f"\nMiniLM-L6: {len(sens.names)} Linear layers ({', '.join(include)}) "
        f"({n_weights / 1e6:.2f}M weights), {sum(len(c) for c in sens.choices)} candidates, "
        f"output sensitivity on {len(train_s)} sentences in {time.perf_counter() - t0:.1f} s; "
        f"cosine to the original on {len(test_s)} held-out sentences"
    )

    target = 2 * (1 - MIN_COSINE)  # relative MSE of unit vectors = 2 (1 - mean cosine)
    for _ in range(10):
        plan = search(
            model,
            calib,
            metric="output",
            target=target,
            precomputed=sens,
            verify_plan=False,
            progress=False,
        )
        bpw, rel, cos = judge(plan)
        print(
            f"  target rel. MSE {target:.4f}: predicted {plan.predicted_error:.4f}, "
            f"measured {rel:.4f}; {bpw:.2f} bits/weight, held-out cosine {cos:.4f}"
        )
        if cos >= MIN_COSINE:
            break
        target *= 0.85
    counts: dict[str, int] = {}
    for choice in plan.values():
        counts[choice.label()] = counts.get(choice.label(), 0) + 1
    print("  chosen: " + ", ".join(f"{v}x {k}" for k, v in sorted(counts.items())))

    print(f"\n  {'model':<24}{'bits/weight':>12}{'rel. MSE':>10}{'mean cos':>10}")
    float_bpw = (model_size_bits(model) - sens.fixed_bits) / n_weights
    print(f"  {'float32':<24}{float_bpw:>12.2f}{0.0:>10.4f}{1.0:>10.4f}")
    uniform = [
        (f"int{b}/channel mse", QuantSpec(b, granularity="channel", observer="mse"))
        for b in (8, 4, 3)
    ]
    for label, spec in uniform:
        row = judge(Plan({n: Choice(None, spec) for n in sens.names}))
        print(f"  {label:<24}{row[0]:>12.2f}{row[1]:>10.4f}{row[2]:>10.4f}")
    print(f"  {'searched (mixed)':<24}{bpw:>12.2f}{rel:>10.4f}{cos:>10.4f}")
    print(
        f"  (bits/weight: packed codes, float32 scales and biases of the searched layers "
        f"per original weight; MiniLM time {time.perf_counter() - start:.1f} s)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short settings (MiniLM: block 0's feed-forward layers, 16 sentences)",
    )
    ap.add_argument(
        "--minilm",
        action="store_true",
        help="also search MiniLM-L6 for a held-out cosine >= 0.95 (minutes)",
    )
    args = ap.parse_args(argv)
    start = time.perf_counter()
    digits_search(epochs=25)  # seconds already: --quick shortens only the MiniLM part
    if args.minilm:
        minilm_search(args.quick)
    print(f"\ntotal time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
