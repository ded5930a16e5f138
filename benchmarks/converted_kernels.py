"""The kernel paths of ``convert`` against float, for ``bench_converted.py``.

MiniLM-L6 (the 36 encoder Linear layers; embeddings, norms float32) at batch
1 x 16 tokens (latency) and 32 x 64 tokens (throughput), and one 1024 x 1024
Linear factorized as LowRank(ratio=0.25) (rank 128) at 16 and 2048 rows:

- float32; bfloat16 (the whole model cast: what bf16 alone buys, a reference);
- ``convert(kernels='exact')``: the codes dequantized per call, then the float op
  (bit-identical to the fake-quant model);
- ``convert(kernels='packed')``: torch's weight-only ``_weight_int8pack_mm`` /
  ``_weight_int4pack_mm_for_cpu`` with the same codes and scales, bfloat16
  compute (``kernel_dtype=torch.float32`` is a scalar loop: shown on the
  1024^2 layer only);
- ``convert(kernels='int8_dynamic')`` and torch.ao ``quantize_dynamic``
  (activations quantized per batch).

torchao and optimum-quanto rows only when importable (they are not in .venv:
the rows say so). Memory: ``held MB`` is the bytes of the model's parameters
and buffers (what it keeps in memory); ``tracemalloc KB`` the peak of Python
allocations during one forward (torch's tensor memory is not Python's: it is in
the RSS); ``peak RSS MB`` the process's high-water mark
(``resource.getrusage``) after the model was built and run once, in the order
of the rows (so a row's figure includes all the rows above it).
"""

from __future__ import annotations

import copy
import importlib.util
import resource
import statistics
import tracemalloc
import warnings

import torch
import torch.nn.functional as F
from common import markdown_table, median_time

from tnquant import LowRank, QuantSpec, convert, factorize, quantize
from tnquant.pipeline import QuantizeSection, Recipe, run_pipeline

LAYERS = "encoder.encoder.layer.*"
INT8 = QuantSpec(bits=8, granularity="channel", axis=0)
INT4 = QuantSpec(bits=4, granularity=("group", 128), axis=1)  # along the input axis


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _held_mb(model) -> float:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


def _dynamic(model, names):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(
            copy.deepcopy(model), {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8
        )


def minilm_models(model, calib, names) -> dict[str, torch.nn.Module]:
    """The compared MiniLM models (built in this order; see the module docs)."""
    models = {"float32": model, "bfloat16 (cast, reference)": copy.deepcopy(model).bfloat16()}
    for label, spec in (("int8 per-channel", INT8), ("int4 group-128", INT4)):
        section = QuantizeSection(weights={LAYERS: spec}, convert=False)
        fq = run_pipeline(model, Recipe(quantize=section), calib, progress=False).model
        models[f"{label}, exact"] = convert(fq, inplace=False, progress=False).model
        packed = convert(copy.deepcopy(fq), kernels="packed", progress=False)
        assert all("kernel" in (r["note"] or "") for r in packed.rows), packed.rows
        models[f"{label}, packed bf16"] = packed.model
        if spec is INT8:
            models[f"{label}, int8_dynamic"] = convert(
                copy.deepcopy(fq), kernels="int8_dynamic", progress=False
            ).model
    models["torch.ao quantize_dynamic int8"] = _dynamic(model, names)
    return models


def layer_models() -> dict[str, torch.nn.Module]:
    """A 1024^2 Linear, its LowRank(0.25) float, int4-cores exact and packed versions."""
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    models: dict[str, torch.nn.Module] = {"dense float32": dense}
    dense_q = copy.deepcopy(dense)
    quantize(dense_q, weights=INT4, progress=False)
    models["dense int4 group-128, packed bf16"] = convert(
        dense_q, kernels="packed", progress=False
    ).model
    lr = copy.deepcopy(dense)
    factorize(lr, LowRank(ratio=0.25), progress=False)
    models["LowRank(0.25) float32"] = lr
    cores = {k: QuantSpec(bits=4, granularity="channel", axis=0) for k in (0, 1)}
    lr_q = copy.deepcopy(lr)
    quantize(lr_q, cores=cores, progress=False)
    models["LowRank + int4 cores, exact"] = convert(lr_q, inplace=False, progress=False).model
    for dtype in (torch.bfloat16, torch.float32):
        m = convert(copy.deepcopy(lr_q), kernels="packed", kernel_dtype=dtype, progress=False).model
        models[f"LowRank + int4 cores, packed {str(dtype)[6:]}"] = m
    return models


def _memory(models, call) -> dict[str, tuple[float, float, float]]:
    out = {}
    with torch.no_grad():
        for label, m in models.items():
            tracemalloc.start()
            call(m)
            peak = tracemalloc.get_traced_memory()[1] / 1e3
            tracemalloc.stop()
            out[label] = (_held_mb(m), peak, _rss_mb())
    return out


def _times(models, call, rounds, repeats, skip=()) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models if k not in skip}
    with torch.no_grad():
        for _ in range(rounds):
            for label in times:
                m = models[label]
                times[label].append(median_time(lambda m=m: call(m), repeats=repeats))
    return {k: statistics.median(v) for k, v in times.items()}


def _output(out):
    out = out[0] if isinstance(out, tuple) else out
    return getattr(out, "last_hidden_state", out).float()


def kernel_section(model, tokenizer, calib, names, sentences, rounds, repeats) -> str:
    """The markdown of both tables, the exactness lines and the optional-library note."""
    models = minilm_models(model, calib, names)
    shapes = {"1 x 16": (1, 16), "32 x 64": (32, 64)}
    batches = {
        k: dict(
            tokenizer(
                sentences[:b],
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=t,
            )
        )
        for k, (b, t) in shapes.items()
    }
    mem = _memory(models, lambda m: m(**batches["1 x 16"]))
    med = {k: _times(models, lambda m, b=b: m(**b), rounds, repeats) for k, b in batches.items()}
    with torch.no_grad():
        outs = {k: _output(m(**batches["32 x 64"])) for k, m in models.items()}
    ref = outs["float32"]
    rows = []
    for label in models:
        t1, t32 = med["1 x 16"][label], med["32 x 64"][label]
        cos = F.cosine_similarity(outs[label].flatten(1), ref.flatten(1)).mean().item()
        held, peak, rss = mem[label]
        rows.append(
            (
                label,
                round(t1 * 1e3, 2),
                round(t1 / med["1 x 16"]["float32"], 2),
                round(t32 * 1e3, 1),
                round(t32 / med["32 x 64"]["float32"], 2),
                round(cos, 5),
                round(held, 1),
                round(peak, 1),
                round(rss),
            )
        )
    header = (
        "MiniLM-L6",
        "ms 1x16",
        "/ float",
        "ms 32x64",
        "/ float",
        "cos to float (32x64)",
        "held MB",
        "tracemalloc KB",
        "peak RSS MB",
    )
    text = markdown_table(header, rows) + "\n\n"
    exact = []
    for label in ("int8 per-channel", "int4 group-128"):
        fq_out = outs[f"{label}, exact"]
        packed = outs[f"{label}, packed bf16"]
        diff = (packed - fq_out).abs().max().item()
        exact.append(f"{label}: packed bf16 vs exact: max abs diff {diff:.3g} (not bit-identical)")
    text += "".join(f"- {e}\n" for e in exact)
    layers = layer_models()
    xs = {n: torch.randn(n, 1024) for n in (16, 2048)}
    slow = {"LowRank + int4 cores, packed float32"}
    lmed = {
        n: _times(layers, lambda m, x=x: m(x), rounds, repeats, skip=slow if n > 16 else ())
        for n, x in xs.items()
    }
    lmem = _memory(layers, lambda m: m(xs[16]))
    lrows = []
    for label in layers:
        t16, t2k = lmed[16][label], lmed[2048].get(label)
        lrows.append(
            (
                label,
                round(t16 * 1e6),
                round(t16 / lmed[16]["dense float32"], 2),
                "-" if t2k is None else round(t2k * 1e3, 2),
                "-" if t2k is None else round(t2k / lmed[2048]["dense float32"], 2),
                round(lmem[label][0], 2),
            )
        )
    lheader = ("1024^2 layer", "us 16 rows", "/ dense", "ms 2048 rows", "/ dense", "held MB")
    text += "\n" + markdown_table(lheader, lrows) + "\n\n"
    missing = [
        n
        for n in ("torchao", "optimum.quanto")
        if importlib.util.find_spec(n.split(".")[0]) is None
    ]
    text += f"Not importable in .venv, so no rows: {', '.join(missing) or 'none'}.\n"
    return text
