"""Size on disk and forward time of converted (integer-storage) MiniLM-L6 models.

Models (the 36 Linear layers of ``encoder.encoder.layer.*`` compressed;
embeddings, LayerNorms and pooler float32 in every row):

- ``float32``: the pretrained model;
- ``int8 per-channel``: ``quantize`` (symmetric, per output channel, min-max)
  + ``calibrate``, before (fake-quant) and after ``convert`` (packed int8
  codes + float32 scales in :class:`~tnquant.quant.frozen.FrozenTensor`);
- ``TT(0.25)``: ``factorize(TT(ratio=0.25, order=2))`` (weight-only TT-SVD:
  the size and the speed depend on the ranks only, which the ratio fixes;
  the data-aware fit of ``bench_ptq_minilm.py`` has the same shapes), float
  and with int8 per-channel cores (rank axes), converted;
- ``convert(kernels='int8_dynamic')``: tnquant's explicit inexact fast path, the
  same int8 codes and scales as the converted model on torch's dynamic int8
  Linear (activations quantized per batch); not bit-identical, not savable
  with ``tnquant.save`` (its size is ``torch.save`` of its state dict);
- reference: ``torch.ao.quantization.quantize_dynamic`` on the same 36
  layers (per-channel int8 weights, activations quantized per batch to
  uint8 on the fly, fbgemm/x86 int8 GEMM kernels). Not bit-identical to
  tnquant's int8 model (dynamic activation quantization); its "on disk"
  size is ``torch.save`` of its state dict (tnquant ``save`` cannot describe
  torch's quantized modules).

Size on disk: total bytes of the files ``tnquant.save`` writes
(``tensors.safetensors`` + ``model.json``). ``encoder Linear MB``: the
:func:`tnquant.model_size_bits` of the 36 compressed modules (codes, scales,
biases) / 8e6, the part compression acts on (the 23.4 MB float word
embedding dominates the whole file).

Forward: one batch of 32 held-out sentences (max_length 64, padded to the
longest), ``torch.no_grad``, eval mode; median seconds over repeats, the
models measured in interleaved rounds and each model's time the median of
its round medians; ratios against float32 of the same run. A converted
``FrozenTensor`` dequantizes its codes on every forward call (unpack + scale
multiply per weight), then runs the float matmul: it costs time, it does not
save it.

The kernel paths of ``convert(kernels=...)`` (packed int8 / int4, bf16) against
float, ``quantize_dynamic`` and the exact path, at batch 1 x 16 and 32 x 64
tokens and on a factorized 1024^2 layer, with memory: ``converted_kernels.py``
(appended to the results; ``--kernels-only`` runs just those tables and writes
``results/converted_kernels.md``).

Run: ``.venv/bin/python benchmarks/bench_converted.py [--quick] [--kernels-only]``
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, median_time  # noqa: E402
from converted_kernels import kernel_section  # noqa: E402

from tnquant import TT, QuantSpec, convert, factorize, load, model_size_bits, save  # noqa: E402
from tnquant.cli.datasets import load_minilm, split_corpus  # noqa: E402
from tnquant.pipeline import QuantizeSection, Recipe, run_pipeline  # noqa: E402

LAYERS = "encoder.encoder.layer.*"
RESULTS = Path(__file__).resolve().parent / "results" / "converted.md"
FAST = "int8 per-channel, convert(kernels='int8_dynamic') (inexact fast path)"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def linear_bits(model, names) -> int:
    return sum(model_size_bits(model.get_submodule(n)) for n in names)


def build_models(
    model, calib, names
) -> tuple[dict[str, torch.nn.Module], torch.nn.Module, float, str]:
    """The compared models, the fake-quant TT model, the TT fit's seconds, a note."""
    models: dict[str, torch.nn.Module] = {"float32 (original)": model}
    int8 = QuantizeSection(
        weights={LAYERS: QuantSpec(bits=8, granularity="channel", axis=0)}, convert=False
    )  # quantize + calibrate; converted twice below
    int8_fq = run_pipeline(model, Recipe(quantize=int8), calib, progress=False).model
    models["int8 per-channel, fake-quant"] = int8_fq
    models["int8 per-channel, converted"] = convert(int8_fq, inplace=False, progress=False).model
    fast = convert(copy.deepcopy(int8_fq), kernels="int8_dynamic", progress=False).model
    models[FAST] = fast

    tt = copy.deepcopy(model)
    t0 = time.perf_counter()
    factorize(tt, {LAYERS: TT(ratio=0.25, order=2)}, progress=False)
    tt_sec = time.perf_counter() - t0
    models["TT(0.25) float32"] = tt
    cores = QuantizeSection(
        cores={
            0: QuantSpec(bits=8, granularity="channel", axis=3),
            -1: QuantSpec(bits=8, granularity="channel", axis=0),
        },
        include=(LAYERS,),
        convert=False,
    )  # quantize + calibrate
    tt_q = run_pipeline(tt, Recipe(quantize=cores), calib, progress=False).model
    models["TT(0.25) + int8 cores, converted"] = convert(tt_q, inplace=False, progress=False).model
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = quantize_dynamic(
                copy.deepcopy(model),
                {n: per_channel_dynamic_qconfig for n in names},
                dtype=torch.qint8,
            )
        models["torch quantize_dynamic int8 (reference)"] = dyn
        dyn_note = f"quantized engine {torch.backends.quantized.engine}"
    except Exception as err:  # noqa: BLE001 - the reference row is optional
        dyn_note = f"quantize_dynamic unavailable: {type(err).__name__}: {err}"
        print(dyn_note)
    return models, tt_q, tt_sec, dyn_note


def exactness(out, tt_q, batch) -> list[str]:
    """Exactness of convert, and the fast path's agreement with the exact converted model."""
    checks = [
        f"converted int8 == fake-quant int8 bitwise: "
        f"{torch.equal(out['int8 per-channel, converted'], out['int8 per-channel, fake-quant'])}",
        f"converted TT+int8 == its fake-quant bitwise: "
        f"{torch.equal(out['TT(0.25) + int8 cores, converted'], tt_q.eval()(**batch))}",
    ]
    diff = (out[FAST] - out["int8 per-channel, converted"]).abs().max().item()
    fast_cos = F.cosine_similarity(out[FAST], out["int8 per-channel, converted"]).mean()
    checks.append(
        f"int8 fast path vs exact converted int8: max abs diff {diff:.3g}, mean cosine "
        f"{fast_cos.item():.5f} (not bit-identical, by design)"
    )
    return checks


def disk_sizes(models, names, batch, out) -> dict[str, tuple[int, float | None, str]]:
    """Bytes on disk, encoder Linear MB and a note (save/load exact) of every model."""
    sizes: dict[str, tuple[int, float | None, str]] = {}
    for label, m in models.items():
        if label.startswith("torch") or "int8_dynamic" in label:
            buf = io.BytesIO()
            torch.save(m.state_dict(), buf)
            sizes[label] = (buf.getbuffer().nbytes, None, "torch.save(state_dict)")
            continue
        with tempfile.TemporaryDirectory() as d:
            save(m, d)
            size = dir_bytes(Path(d))
            back = load(d, model=load_minilm()[0])
            with torch.no_grad():
                same = torch.equal(back.eval()(**batch), out[label])
        sizes[label] = (size, linear_bits(m, names) / 8e6, f"save/load exact: {same}")
    return sizes


def timings(models, batch, rounds: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median forward seconds (interleaved rounds) and the dequantize-all seconds."""
    from tnquant.quant.frozen import FrozenTensor

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(rounds):
            for label, m in models.items():
                times[label].append(median_time(lambda m=m: m(**batch), repeats=repeats))
    med = {k: statistics.median(v) for k, v in times.items()}

    def dequant_all(m):  # what a converted model does on every forward call
        return [f.dequantize() for f in m.modules() if isinstance(f, FrozenTensor)]

    deq = {
        label: median_time(lambda m=models[label]: dequant_all(m), repeats=repeats)
        for label in ("int8 per-channel, converted", "TT(0.25) + int8 cores, converted")
    }
    return med, deq


def table_rows(models, sizes, med, out) -> list[tuple]:
    f_size, f_time = sizes["float32 (original)"][0], med["float32 (original)"]
    rows = []
    for label in models:
        size, lin, note = sizes[label]
        cos = F.cosine_similarity(out[label], out["float32 (original)"]).mean().item()
        rows.append(
            (
                label,
                round(size / 1e6, 2),
                round(size / f_size, 3),
                None if lin is None else round(lin, 2),
                round(med[label] * 1e3, 1),
                round(med[label] / f_time, 2),
                round(cos, 5),
                note,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer timing repeats")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--kernels-only",
        action="store_true",
        help="only the kernel-path tables (converted_kernels)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    command = "python " + " ".join(sys.argv)
    print(command)
    print(machine(), flush=True)
    rounds, repeats = (2, 3) if args.quick else (3, 7)

    model, tokenizer = load_minilm()
    train, test = split_corpus(64, 32, seed=0)
    batch = dict(tokenizer(test, return_tensors="pt", padding=True, truncation=True, max_length=64))
    calib = [
        dict(
            tokenizer(
                train[i : i + 32], return_tensors="pt", padding=True, truncation=True, max_length=64
            )
        )
        for i in (0, 32)
    ]
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder.encoder.layer.")
    ]
    kernels_md = kernel_section(model, tokenizer, calib, names, test, rounds, repeats)
    print(kernels_md, flush=True)
    kernels_text = (
        f"## Kernel paths of convert: latency and throughput\n\n"
        f"command: `{command}`\n\nmachine: {machine()}\n\nTiming: {rounds} interleaved "
        f"rounds x `median_time(repeats={repeats})`, median of the round medians; ratios "
        f"against float32 (or the dense layer) in the same run; batches padded to exactly "
        f"16 and 64 tokens.\n\n{kernels_md}"
    )
    if args.kernels_only:
        out = Path(args.out).with_name("converted_kernels.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(kernels_text)
        print(f"total {time.perf_counter() - t_start:.0f}s; wrote {out}")
        return
    models, tt_q, tt_sec, dyn_note = build_models(model, calib, names)
    with torch.no_grad():
        out = {k: m.eval()(**batch) for k, m in models.items()}
    checks = exactness(out, tt_q, batch)
    sizes = disk_sizes(models, names, batch, out)
    med, deq = timings(models, batch, rounds, repeats)
    rows = table_rows(models, sizes, med, out)
    for r in rows:
        print(r)
    header = (
        "model",
        "on disk MB",
        "size / float",
        "encoder Linear MB",
        "forward ms (32 sent.)",
        "time / float",
        "cos to float",
        "note",
    )
    md = markdown_table(header, [tuple("-" if v is None else v for v in r) for r in rows])
    deq_md = markdown_table(
        ("converted model", "dequantize all FrozenTensors, ms", "share of its forward"),
        [(k, round(v * 1e3, 1), round(v / med[k], 2)) for k, v in deq.items()],
    )
    total = time.perf_counter() - t_start
    tokens = int(batch["attention_mask"].sum())
    text = (
        f"# Converted MiniLM-L6: size on disk and forward time\n\n"
        f"command: `{command}`\n\nmachine: {machine()}\n\n"
        f"Batch: 32 held-out sentences (`split_corpus(64, 32)`), padded to "
        f"{batch['input_ids'].shape[1]} tokens ({tokens} real tokens), max_length 64. Timing: "
        f"{rounds} interleaved rounds x `median_time(repeats={repeats})`, median of the round "
        f"medians; ratios against float32 in the same run. TT factorization weight-only "
        f"(TT-SVD, order 2, {tt_sec:.0f}s). {dyn_note}.\n\n{md}\n\n"
        f"Cost of dequantizing every FrozenTensor of the converted model once (what each "
        f"forward call does before the float matmuls):\n\n{deq_md}\n\n"
        + "".join(f"- {c}\n" for c in checks)
        + f"\nTotal wall time: {total:.0f}s.\n\n"
        + kernels_text
    )
    print(md)
    print(deq_md)
    print("\n".join(checks))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"total {total:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
