"""QAT / distillation of the pretrained MiniLM-L6 encoder against PTQ at the same size.

For every row: compress the 36 Linear layers of ``encoder.encoder.layer.*``
(dense quantization, or data-aware TT / Tucker / LowRank factorization on
the training batches, then per-core quantization), calibrate (PTQ), judge,
then distil from the original model (``finetune``, LSQ scales + cores) and
judge again. The PTQ and QAT numbers of a row share the same model size.

Judged on held-out sentences (disjoint from the training split):

- ``cos``: mean cosine of the compressed sentence embeddings to the original;
- ``R@10``: overlap of the 10 nearest neighbours (cosine, self excluded) of
  each held-out sentence under the original vs the compressed embeddings.

Size: ``bits/w`` = sum of :func:`tnquant.size_report` ``size_bits`` of the 36
modules that replace the encoder's Linear layers (codes, scales, zero points,
float32 biases; every core of a factorized layer) / number of original
weights of those Linear layers (10,616,832). Embeddings, LayerNorms and the
(unused by the pooled output) pooler stay float and are not counted.

Rows ``mixed <b> bits``: a plan from :func:`tnquant.search` (:mod:`tnquant.planning`)
(``metric='output'`` on 64 training sentences; dense int8/6/5/4/3/2 per
channel with the ``'mse'`` observer, or ternary, per layer) at a budget of
``b`` bits per original weight, its quantizers made learnable (LSQ), then
the same calibrate / judge / distil / judge. ``--formats lowrank`` also lets
the search pick ``LowRank(ratio=0.5)`` (plain SVD) with quantized cores per
layer; ``--fit N`` then fits the layers the plan factorizes to their inputs
on the first ``N`` training batches (``apply(..., data=)``: same ranks and
size, lower output error) instead of the plain SVD the search measured;
``--fit-search`` makes the search measure the candidates fitted that way
too (``sensitivity(fit_data=)``).

``--gptq N``: after calibration, re-round the dense quantized weights with
:func:`tnquant.ptq.gptq` on the first ``N`` training batches (the weight
qparams are kept, so the size is unchanged); ``RTN cos`` is the PTQ model
before it, ``PTQ cos`` after it, and QAT starts from the GPTQ weights.

``--rotate``: first replace the encoder's Linear layers by
:class:`tnquant.ptq.RotatedLinear` (random Hadamard rotation of the inputs,
weights ``W R``; the same float model), so that every row quantizes, searches,
GPTQ-rounds and fine-tunes the rotated weights. bits/w adds each rotation's
stored seed (64 bits per layer).

Run: ``.venv/bin/python benchmarks/bench_qat_minilm.py [--quick] [--rows a,b,..]
[--device cuda] [--train N] [--epochs E] [--loss cosine|mse|hidden] [--gptq N]
[--rotate] [--mixed B] [--formats lowrank] [--fit N [--fit-search]] [--no-dropout] [--corpus FILE]``
(``--quick``: 256 train / 128 held-out sentences, 1 epoch). The results
file is rewritten after every row, so a run stopped early keeps what it did.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

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

from tnquant import TT, LowRank, QuantSpec, Tucker, calibrate, factorize, finetune, quantize  # noqa: E402
from tnquant.batches import move_batch  # noqa: E402
from tnquant.cli.datasets import load_minilm, split_corpus  # noqa: E402
from tnquant.planning import Candidates, Plan, apply, search, sensitivity  # noqa: E402
from tnquant.ptq import gptq, rotate  # noqa: E402

LAYERS = "encoder.encoder.layer.*"
RESULTS = Path(__file__).resolve().parent / "results" / "qat_minilm.md"


# ------------------------------------------------------------------ rows


def dense_rows():
    def spec(bits, gran):
        g = ("group", 64) if gran == "g64" else "channel"
        return QuantSpec(bits=bits, granularity=g, axis=1 if gran == "g64" else 0, learnable=True)

    return [
        (f"dense int{b} {g}", None, spec(b, g))
        for b, g in [(4, "g64"), (4, "channel"), (3, "g64"), (3, "channel"), (2, "g64")]
    ]


def factor_rows():
    rows = []
    for fname, make in [
        ("Tucker", lambda r: Tucker(ratio=r)),
        ("TT", lambda r: TT(ratio=r, order=2)),
        ("LowRank", lambda r: LowRank(ratio=r)),
    ]:
        for ratio in (0.5, 0.25):
            for bits in (8, 4):
                rows.append(
                    (
                        f"{fname}({ratio}) int{bits} ch",
                        (fname, ratio, make(ratio)),
                        QuantSpec(bits=bits, granularity="channel", learnable=True),
                    )
                )
    # ~2.2 bits per original weight: fewer parameters at 4 bits or more at 3 ('mse' ranges)
    for ratio, bits in [(0.55, 4), (0.73, 3)]:
        rows.append(
            (
                f"LowRank({ratio}) int{bits} ch mse",
                ("LowRank", ratio, LowRank(ratio=ratio)),
                QuantSpec(bits=bits, granularity="channel", observer="mse", learnable=True),
            )
        )
    return rows


def select(rows, wanted):
    if not wanted:
        return rows
    keys = [w.strip().lower() for w in wanted.split(",") if w.strip()]
    return [r for r in rows if any(k in r[0].lower() for k in keys)]


def mixed_plan(model, calib, bits_per_weight_budget: float, n_weights: int, cache: dict):
    """A searched mixed-precision plan at the budget, with learnable (LSQ) quantizers."""
    if "sens" not in cache:
        cands = Candidates(
            formats=cache.get("formats", ()),
            ratios=(0.5,),
            bits=(8, 6, 5, 4, 3, 2),
            ternary=True,
            binary=False,
            observer="mse",
        )
        t0 = time.perf_counter()
        cache["sens"] = sensitivity(
            model,
            calib[:2],
            cands,
            metric="output",
            include=[LAYERS],
            fit_data=cache["fit_search"],
            progress=False,
        )
        cache["sens_s"] = time.perf_counter() - t0
    sens = cache["sens"]
    budget = sens.fixed_bits + int(bits_per_weight_budget * n_weights)
    plan = search(
        model,
        calib[:2],
        metric="output",
        budget_bits=budget,
        precomputed=sens,
        verify_plan=False,
        progress=False,
    )
    learn = {}
    for name, choice in plan.items():
        w = choice.weights
        if isinstance(w, QuantSpec):
            w = dataclasses.replace(w, learnable=True)
        learn[name] = dataclasses.replace(choice, weights=w)
    return Plan(learn)


def build_student(
    model, label, factor, spec, calib, held_out, reference, ref_knn, n_weights, state
):
    """The compressed (PTQ) student of one row and its factorized-float cosine ('' if dense)."""
    if label.startswith("mixed"):
        student = copy.deepcopy(model)
        apply(
            student,
            mixed_plan(model, calib, float(label.split()[1]), n_weights, state),
            data=state["fit"],
            progress=False,
        )
        return student, ""
    if factor is None:
        student, fz = copy.deepcopy(model), ""
    else:
        key = factor[:2]
        if key not in state.setdefault("factorized", {}):
            base = copy.deepcopy(model)
            factorize(base, {LAYERS: factor[2]}, data=calib, progress=False)
            cos_f, _ = judge(base, held_out, reference, ref_knn)
            state["factorized"] = {key: (base, cos_f)}
        base, cos_f = state["factorized"][key]
        student, fz = copy.deepcopy(base), f"{cos_f:.3f}"
    quantize(student, weights={LAYERS: spec}, progress=False)
    return student, fz


def plan_summary(student) -> str:
    """How many layers a mixed plan factorized and at which bit widths it quantized."""
    from collections import Counter

    from tnquant.layers import FactorizedLayer
    from tnquant.quant.quantizer import Quantizer

    kinds = Counter(
        type(m).__name__
        for n, m in student.named_modules()
        if n.startswith("encoder.encoder.layer.")
        and (isinstance(m, FactorizedLayer) or hasattr(m, "weight_quantizer"))
    )
    bits = Counter(
        getattr(q.spec, "bits", type(q.spec).__name__)
        for n, q in student.named_modules()
        if isinstance(q, Quantizer) and n.startswith("encoder.encoder.layer.")
    )
    return (
        ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        + "; quantizers by bits: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(bits.items(), key=str))
    )


def write(args, text_head, table, notes, total):
    header = (
        "model",
        "bits/w",
        "float cos (factorized)",
        "RTN cos",
        "PTQ cos",
        "PTQ R@10",
        "QAT cos",
        "QAT R@10",
        "finetune s",
        "steps",
    )
    md = markdown_table(header, table)
    text = (
        text_head
        + f"{md}\n\nTotal wall time of the rows: {total:.0f}s.\n"
        + "".join(f"- {n}\n" for n in notes)
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="256/128 sentences, 1 epoch")
    ap.add_argument("--rows", default="", help="comma list of substrings of row labels")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train", type=int, default=None, help="training sentences")
    ap.add_argument("--test", type=int, default=None, help="held-out sentences")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument(
        "--scale-lr",
        type=float,
        default=None,
        help="learning rate of the LSQ scales (default: --lr)",
    )
    ap.add_argument("--loss", default="cosine", choices=["cosine", "mse", "hidden"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--gptq",
        type=int,
        default=0,
        help="GPTQ rounding on this many training batches after calibration",
    )
    ap.add_argument(
        "--formats",
        default="",
        help="factorizations the mixed rows may pick (e.g. 'lowrank', ratio 0.5)",
    )
    ap.add_argument(
        "--fit-search",
        action="store_true",
        help="with --fit N: the search measures the factorized candidates fitted "
        "to the same N batches (sensitivity(fit_data=))",
    )
    ap.add_argument(
        "--no-dropout",
        action="store_true",
        help="finetune(dropout=False): no dropout in the student while it trains "
        "(default here: dropout=True, the student's own, as in the earlier "
        "result files; finetune's own default with a teacher is off)",
    )
    ap.add_argument(
        "--fit",
        type=int,
        default=0,
        help="fit the layers a mixed plan factorizes to N training batches "
        "(data-aware; default: the plain decompositions the search measured)",
    )
    ap.add_argument(
        "--rotate",
        action="store_true",
        help="rotate the layers' inputs (tnquant.ptq.rotate) before quantizing",
    )
    ap.add_argument("--mixed", default="3.0,2.5", help="budgets (bits/w) of mixed rows")
    ap.add_argument("--time-limit", type=float, default=None, help="start no row after (s)")
    ap.add_argument(
        "--corpus",
        default=None,
        help="text file of sentence_corpus(seed=0), one a line (another Python's "
        "stdlib gives other docstrings: carry this machine's corpus)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    n_train, n_test = (256, 128) if args.quick else (1024, 512)
    n_train, n_test = args.train or n_train, args.test or n_test
    epochs = args.epochs or (1 if args.quick else 2)
    device = torch.device(args.device)
    command = "python " + " ".join(sys.argv)
    where = (
        machine()
        if device.type == "cpu"
        else f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    )
    print(command, "\n", where, flush=True)

    model, tokenizer = load_minilm()
    model.to(device)
    if args.corpus:
        lines = Path(args.corpus).read_text().splitlines()
        train, test = lines[:n_train], lines[n_train : n_train + n_test]
    else:
        train, test = split_corpus(n_train, n_test, seed=0)
    calib = [move_batch(b, device) for b in make_batches(tokenizer, train)]
    held_out = [move_batch(b, device) for b in make_batches(tokenizer, test)]
    reference = embed(model, held_out)
    ref_knn = knn(reference)
    # students start from `base`: the model itself, or its rotated copy (same function)
    base = model
    if args.rotate:
        base = copy.deepcopy(model)
        rotate(base, include=[LAYERS], progress=False)
    names = linear_names(model)
    n_weights = sum(names.values())
    hidden = [f"encoder.encoder.layer.{i}" for i in range(6)] if args.loss == "hidden" else None
    loss = "mse" if args.loss == "hidden" else args.loss
    mixed = [(f"mixed {b} bits", None, None) for b in args.mixed.split(",") if b.strip()]
    rows = select(mixed + dense_rows() + factor_rows(), args.rows)
    text_head = (
        f"# QAT on MiniLM-L6\n\ncommand: `{command}`\n\nmachine: {where}\n\n"
        f"{'QUICK run' if args.quick else 'run'}: {n_train} train / {n_test} held-out "
        f"sentences (split_corpus seed 0, max_length 64), distillation {epochs} epochs x "
        f"{len(calib)} batches of 32, AdamW lr {args.lr}"
        f"{f' (scales {args.scale_lr})' if args.scale_lr else ''} cosine schedule, loss "
        f"{args.loss}{' (hidden states of the 6 layers)' if hidden else ' (pooled embeddings)'}"
        f"; quantizers LSQ (`learnable=True`), initialised by `calibrate`"
        f"{', inputs Hadamard-rotated (tnquant.ptq.rotate)' if args.rotate else ''}"
        f"{f', mixed plans may factorize ({args.formats}, ratio 0.5)' if args.formats else ''}"
        f"{f', planned factorizations fitted to {args.fit} batches' if args.fit else ''}"
        f"{' (the search measured them fitted)' if args.fit and args.fit_search else ''}"
        f"{', student dropout off while training' if args.no_dropout else ''}"
        f"{f', weights re-rounded by GPTQ on {args.gptq} batches' if args.gptq else ''}.\n\n"
        f"bits/w = size_report bits of the {len(names)} modules replacing "
        f"encoder.encoder.layer.* Linear layers (codes, scales, zero points, float32 "
        f"biases, all cores) / {n_weights} original weights. PTQ = same quantize + "
        f"calibrate, no finetune (same size). float cos = the factorized float model "
        f"(data-aware fit on the train batches) before quantization.\n\n"
    )
    table: list[tuple] = []
    notes: list[str] = []
    # fit: batches for a data-aware fit of the planned factorizations (None: plain SVD);
    # fit_search: the same batches for the search's sensitivities, or None
    fit = calib[: args.fit] if args.fit else None
    state: dict = {
        "formats": tuple(f for f in args.formats.split(",") if f),
        "fit": fit,
        "fit_search": fit if args.fit_search else None,
    }
    t_all = time.perf_counter()
    for label, factor, spec in rows:
        if args.time_limit and time.perf_counter() - t_all > args.time_limit:
            notes.append(f"stopped before '{label}': time limit {args.time_limit:.0f}s")
            break
        t0 = time.perf_counter()
        try:
            student, fz = build_student(
                base, label, factor, spec, calib, held_out, reference, ref_knn, n_weights, state
            )
            if label.startswith("mixed"):
                notes.append(f"'{label}' plan: {plan_summary(student)}")
            calibrate(student, calib, progress=False)
            bits = bits_per_weight(student, names)
            cos_p, r_p = judge(student, held_out, reference, ref_knn)
            cos_rtn = round(cos_p, 4)
            if args.gptq:
                gptq(student, calib[: args.gptq], progress=False)
                cos_p, r_p = judge(student, held_out, reference, ref_knn)
            rep = finetune(
                student,
                calib,
                teacher=model,
                loss=loss,
                hidden=hidden,
                epochs=epochs,
                lr=args.lr,
                scale_lr=args.scale_lr,
                dropout=not args.no_dropout,
                progress=False,
            )
            cos_q, r_q = judge(student, held_out, reference, ref_knn)
        except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
            notes.append(f"'{label}' failed: {type(err).__name__}: {err}")
            print(notes[-1], flush=True)
            continue
        row = (
            label,
            round(bits, 3),
            fz,
            cos_rtn,
            round(cos_p, 4),
            round(r_p, 3),
            round(cos_q, 4),
            round(r_q, 3),
            round(rep.history.time_s, 1),
            len(rep.history.step),
        )
        table.append(row)
        print(f"{row}  [{time.perf_counter() - t0:.0f}s]", flush=True)
        if "sens_s" in state and not any(n.startswith("search") for n in notes):
            notes.append(
                f"search sensitivity (metric 'output', 64 sentences): {state['sens_s']:.0f}s"
            )
        write(args, text_head, table, notes, time.perf_counter() - t_all)
    md = write(args, text_head, table, notes, time.perf_counter() - t_all)
    print(md)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
