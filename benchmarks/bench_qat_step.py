"""Cost of fake quantization in a training step (target: <= 1.5x without quantizers).

One step = forward + backward + AdamW step, timed by ``median_time`` (medians
of repeated blocks, all in this run). Models:

- ``stack``: the 36 Linear layers of a MiniLM-L6 encoder (per block q, k, v,
  o 384x384, FFN 384->1536->384, ReLU between), random init, input
  ``(64, tokens, 384)``; dense, ``LowRank(ratio=0.5)`` and ``TT(ratio=0.5,
  order=2)`` (weight-only factorization);
- ``digits CNN``: the CNN of ``bench_qat_digits.py`` at batch 64, dense and
  Tucker(conv2)+LowRank(fc1).

Each model is timed without quantizers and with per-channel int4 LSQ
(``QuantSpec(bits=4, granularity='channel', learnable=True)``) on every
weight/core, calibrated: on the eager path and with each backend of
:mod:`tnquant.quant.fused` (what ``finetune(fused=True)`` and its ``'auto'``
default on large models use): ``cpp``, the C++ kernel ``'auto'`` takes on
the CPU, and ``compile``, ``torch.compile`` (built before timing). When
brevitas imports (``PYTHONPATH`` holding a brevitas that was installed next
to, not into, this torch), the dense stack is also timed with
``brevitas.nn.QuantLinear`` (4-bit per-channel float scales).

Teacher cache (``finetune(teacher_cache=...)``, issue 19 item 5 / issue 20
item 1): whole ``finetune`` runs of the stack distilled from its dense float
self (``loss='mse'``, AdamW, ``fused='auto'``) on a fixed list of 4 batches,
``teacher_cache=False`` (the teacher runs every step) against ``'auto'`` (once
per batch), for the int4 LSQ dense, ``LowRank(0.5)`` and ``TT(0.5, order=2)``
students, against the float students' steps (the dense float stack, and the
same-format float factorized one, trained on the same batches with the
teacher's outputs as fixed targets: no teacher pass). Each run is timed in
process CPU seconds (one thread; the machine may be shared) at 1 and 3 epochs;
*steady* ms/step is ``(T3 - T1) / 8`` (epochs 2-3, where the cache is full),
*3-epoch* ms/step is ``T3 / 12`` (the cache's first-epoch teacher passes
included); medians over ``repeats`` interleaved rounds.

Run: ``.venv/bin/python benchmarks/bench_qat_step.py [--quick] [--teacher-only]``
(``--quick``: 4 tokens, 5 repeats; full: 16 tokens, 11 repeats; teacher-cache
rows: 3 rounds quick, 5 full; ``--teacher-only``: those rows alone).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qat_digits import make_cnn  # noqa: E402
from common import machine, markdown_table, median_time  # noqa: E402

from tnquant import TT, LowRank, QuantSpec, Tucker, calibrate, factorize, quantize  # noqa: E402
from tnquant.qat import finetune  # noqa: E402
from tnquant.quant import fused  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "qat_step.md"
CACHE_RESULTS = Path(__file__).resolve().parent / "results" / "qat_step_teacher_cache.md"
N_CACHE_BATCHES = 4
SPEC = QuantSpec(bits=4, granularity="channel", learnable=True)


def linear_stack(linear=nn.Linear) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(6):
        for _ in range(4):
            layers += [linear(384, 384), nn.ReLU()]
        layers += [linear(384, 1536), nn.ReLU(), linear(1536, 384), nn.ReLU()]
    return nn.Sequential(*layers)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y) if y.dtype == torch.int64 else F.mse_loss(out, y)
        loss.backward()
        opt.step()

    return step


def brevitas_stack():
    try:
        import brevitas.nn as qnn
        from brevitas.quant import Int8WeightPerChannelFloat
    except Exception as err:  # noqa: BLE001
        return None, f"brevitas not importable ({type(err).__name__}: {err})"
    import brevitas

    def make(i, o):
        return qnn.QuantLinear(
            i, o, bias=True, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4
        )

    return linear_stack(make), f"brevitas {brevitas.__version__}"


def _finetune_seconds(student, data, epochs, **kw) -> tuple[float, int]:
    """CPU seconds of one ``finetune`` call (this process) and the teacher's passes.

    CPU time rather than wall time: the machine is shared, and with one
    thread CPU time is the work done; the fixed set-up cost of a call
    cancels in ``T3 - T1``.
    """
    t0 = time.process_time()
    report = finetune(student, data, epochs=epochs, lr=1e-5, progress=False, **kw)
    return time.process_time() - t0, report.history.teacher_calls


FORMATS = [
    ("dense", None),
    ("LowRank(0.5)", LowRank(ratio=0.5)),
    ("TT(0.5, order=2)", TT(ratio=0.5, order=2)),
]


def _students(stack: nn.Module, xs: list[torch.Tensor]) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Per format: the float (factorized, no quantizer) model and its int4 LSQ student."""
    out = {}
    for label, spec in FORMATS:
        m = copy.deepcopy(stack)
        if spec is not None:
            factorize(m, spec, progress=False)
        q = copy.deepcopy(m)
        quantize(q, weights=SPEC, progress=False)
        calibrate(q, xs[:1], progress=False)
        out[label] = (m, q)
    return out


def teacher_cache_rows(stack: nn.Module, tokens: int, rounds: int) -> list[tuple]:
    """Rows of the teacher-cache table (see the module docs)."""
    torch.manual_seed(0)
    n = N_CACHE_BATCHES
    xs = [torch.randn(64, tokens, 384) for _ in range(n)]
    teacher = stack.eval()
    with torch.no_grad():
        labelled = [(x, teacher(x)) for x in xs]
    students = _students(stack, xs)
    runs: dict[str, tuple[str, Any]] = {}
    for label in students:
        runs[f"{label} float (fixed targets, no teacher)"] = (label, None)
        runs[f"{label} int4 ch LSQ, teacher every step"] = (label, False)
        runs[f"{label} int4 ch LSQ, teacher cached"] = (label, "auto")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    calls: dict[str, int] = {}
    for r in range(rounds + 1):  # round 0 warms up (the fused kernel builds once)
        for key, (label, cache) in runs.items():
            per_epochs = []
            for epochs in (1, 3):
                if cache is None:
                    m = copy.deepcopy(students[label][0])
                    t, c = _finetune_seconds(m, labelled, epochs, task_loss=F.mse_loss)
                else:
                    m = copy.deepcopy(students[label][1])
                    t, c = _finetune_seconds(m, xs, epochs, teacher=teacher, teacher_cache=cache)
                per_epochs.append(t)
                calls[key] = c
            if r:
                times[key].append((per_epochs[0], per_epochs[1]))
            print(key, [round(t, 3) for t in per_epochs], flush=True)

    def steady(key: str) -> float:
        return statistics.median((t3 - t1) / (2 * n) for t1, t3 in times[key])

    def whole(key: str) -> float:
        return statistics.median(t3 / (3 * n) for _, t3 in times[key])

    dense_float = next(iter(runs))
    rows = []
    for key, (label, _) in runs.items():
        own = f"{label} float (fixed targets, no teacher)"
        rows.append(
            (
                key,
                calls[key],
                round(steady(key) * 1e3, 1),
                round(steady(key) / steady(dense_float), 2),
                round(steady(key) / steady(own), 2),
                round(whole(key) * 1e3, 1),
                round(whole(key) / whole(dense_float), 2),
            )
        )
        print(rows[-1], flush=True)
    return rows


def write_teacher_cache(rows: list[tuple], command: str, tokens: int, rounds: int) -> str:
    header = (
        "run",
        "teacher passes (3 epochs)",
        "steady ms/step",
        "ratio to dense float",
        "ratio to its float",
        "3-epoch ms/step",
        "ratio to dense float",
    )
    md = markdown_table(header, rows)
    text = (
        f"# QAT step time with and without the teacher cache\n\ncommand: `{command}`\n\n"
        f"machine: {machine()}\n\nwhole finetune runs, stack of 36 MiniLM-sized Linear "
        f"layers, {N_CACHE_BATCHES} batches of (64, {tokens}, 384), medians of {rounds} "
        f"rounds (see the module docs of benchmarks/bench_qat_step.py).\n\n{md}\n"
    )
    CACHE_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    CACHE_RESULTS.write_text(text)
    print(md)
    print(f"wrote {CACHE_RESULTS}")
    return md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--teacher-only", action="store_true", help="only the teacher-cache rows")
    args = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    print(command)
    print(machine())
    tokens, repeats = (4, 5) if args.quick else (16, 11)
    rounds = 3 if args.quick else 5
    if args.teacher_only:
        torch.manual_seed(0)
        rows = teacher_cache_rows(linear_stack(), tokens, rounds)
        write_teacher_cache(rows, command, tokens, rounds)
        return
    torch.manual_seed(0)
    xs, ys = torch.randn(64, tokens, 384), torch.randn(64, tokens, 384)
    xd, yd = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))

    cases = []
    stack = linear_stack()
    for label, spec in [
        ("dense", None),
        ("LowRank(0.5)", LowRank(ratio=0.5)),
        ("TT(0.5, order=2)", TT(ratio=0.5, order=2)),
    ]:
        m = copy.deepcopy(stack)
        if spec is not None:
            factorize(m, spec, progress=False)
        cases.append((f"stack {label}", m, xs, ys))
    cnn = make_cnn()
    cases.append(("digits CNN dense", cnn, xd, yd))
    fcnn = copy.deepcopy(cnn)
    factorize(fcnn, {"2": Tucker(ratio=0.5), "6": LowRank(ratio=0.25)}, progress=False)
    cases.append(("digits CNN Tucker+LowRank", fcnn, xd, yd))

    rows = []
    for label, m, x, y in cases:
        q = copy.deepcopy(m)
        quantize(q, weights=SPEC, progress=False)
        calibrate(q, [x], progress=False)
        t_float = median_time(step_fn(m, x, y), repeats=repeats)
        t_quant = median_time(step_fn(q, x, y), repeats=repeats)
        rows.append(
            (
                label,
                "tnquant int4 ch LSQ (eager)",
                round(t_float * 1e3, 2),
                round(t_quant * 1e3, 2),
                round(t_quant / t_float, 2),
            )
        )
        print(rows[-1], flush=True)
        for backend in ("cpp", "compile"):
            with fused.fused(False, backend):
                if not fused.available():
                    continue
            with fused.fused(True, backend):
                t_fused = median_time(step_fn(q, x, y), repeats=repeats)
            rows.append(
                (
                    label,
                    f"tnquant int4 ch LSQ (fused, {backend})",
                    round(t_float * 1e3, 2),
                    round(t_fused * 1e3, 2),
                    round(t_fused / t_float, 2),
                )
            )
            print(rows[-1], flush=True)

    bstack, note = brevitas_stack()
    if bstack is not None:
        bstack.load_state_dict(stack.state_dict(), strict=False)
        t_float = median_time(step_fn(stack, xs, ys), repeats=repeats)
        t_b = median_time(step_fn(bstack, xs, ys), repeats=repeats)
        rows.append(
            (
                "stack dense",
                note + " QuantLinear int4 ch",
                round(t_float * 1e3, 2),
                round(t_b * 1e3, 2),
                round(t_b / t_float, 2),
            )
        )
        print(rows[-1], flush=True)
    header = ("model", "quantizers", "float step ms", "fake-quant step ms", "ratio")
    md = markdown_table(header, rows)
    print(md)
    text = (
        f"# QAT step time\n\ncommand: `{command}`\n\nmachine: {machine()}\n\n"
        f"{'QUICK run' if args.quick else 'full run'}: forward + backward + AdamW step, "
        f"medians of {repeats} blocks; stack input (64, {tokens}, 384), CNN batch 64. "
        f"Target ratio <= 1.5. Brevitas: {note}.\n\n{md}\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    rows = teacher_cache_rows(stack, tokens, rounds)
    write_teacher_cache(rows, command, tokens, rounds)


if __name__ == "__main__":
    main()
