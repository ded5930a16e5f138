"""Peak memory of every stage on MiniLM-L6: factorize, TTEmbedding, search, finetune, convert.

Each stage runs in its own Python process (so one stage's peak cannot hide
another's): the process loads the pretrained MiniLM-L6, records its resident
set, starts ``tracemalloc`` and runs the stage. Reported per stage:

- ``rss peak`` (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the part of
  it above the loaded model (``+ over load``: what the stage itself needed;
  torch's tensors live outside Python's allocator, so this is the number that
  sees them);
- ``py peak``: ``tracemalloc``'s peak of Python allocations during the stage;
- the bytes of the tensors the stage works on, for scale (``table``: the
  float32 word-embedding table, 30,522 x 384 = 46.9 MB; ``weights``: the
  encoder's Linear weights, 14.2M float32 = 56.6 MB).

The bounds the issue sets, checked by the numbers (not asserted): the
``TTEmbedding`` fit of the word-embedding table takes at most about one more
copy of the table, and a converted model holds no float copy of a weight
beside its codes (its ``+ over load`` is below the float model's weights).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py [--stages a,b]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = HERE / "results" / "memory.md"
STAGES = ("load", "float_forward", "factorize", "tt_embedding", "convert", "finetune", "search")


def _mib(n: float) -> float:
    return n / 2**20


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _batches(tokenizer, n: int, batch: int, length: int):
    from tnquant.cli.datasets import split_corpus

    sentences = split_corpus(n * batch, 0)[0]
    return [
        dict(tokenizer(sentences[i : i + batch], padding="max_length", truncation=True,
                       max_length=length, return_tensors="pt"))
        for i in range(0, n * batch, batch)
    ]  # fmt: skip


def _stage(name: str) -> dict:
    """Run one stage in this process; its numbers."""
    import torch

    from tnquant import TT, QuantSpec, Tucker, calibrate, convert, factorize, quantize
    from tnquant.cli.datasets import load_minilm

    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    model.eval()
    batches = _batches(tokenizer, 4, 32, 64)
    load_rss = _rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    note = ""
    if name == "float_forward":
        with torch.no_grad():
            for b in batches:
                model(**b)
    elif name == "factorize":
        ffn = {"encoder.encoder.layer.*.intermediate.dense": Tucker(ratio=0.5),
               "encoder.encoder.layer.?.output.dense": Tucker(ratio=0.5)}  # fmt: skip
        factorize(model, ffn, data=batches[:2], progress=False)
        note = "12 FFN layers, Tucker-2 ratio 0.5, data-aware (2 batches)"
    elif name == "tt_embedding":
        factorize(model, {"encoder.embeddings.word_embeddings": TT(ratio=0.1)}, progress=False)
        note = "word embeddings 30,522 x 384 -> TTEmbedding, ratio 0.1"
    elif name == "convert":
        quantize(model, weights=QuantSpec(8, granularity="channel"), progress=False)
        calibrate(model, batches[:1], progress=False)
        convert(model)
        with torch.no_grad():
            for b in batches:
                model(**b)
        note = "int8 per-channel weights, converted, 4 forwards of 32 x 64"
    elif name == "finetune":
        import copy

        from tnquant import finetune

        teacher = copy.deepcopy(model)
        quantize(model, weights=QuantSpec(4, granularity="channel", learnable=True),
                 progress=False)  # fmt: skip
        finetune(model, batches, teacher=teacher, epochs=1, progress=False)
        note = "int4 LSQ student + float teacher, 4 steps of 32 x 64"
    elif name == "search":
        from tnquant import model_size_bits, search

        budget = model_size_bits(model) // 6
        search(model, batches[:2], budget_bits=budget, progress=False)
        note = "budget 1/6 of the float bits, 2 calibration batches"
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "stage": name,
        "load_rss_mib": load_rss,
        "rss_peak_mib": _rss_mib(),
        "py_peak_mib": _mib(py_peak),
        "seconds": seconds,
        "note": note,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_stage(args.one)))
        return
    from common import machine, markdown_table

    rows = []
    for name in args.stages.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            rows.append([name, "failed", "", "", "", out.stderr.strip().splitlines()[-1][:80]])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([
            name, round(r["rss_peak_mib"]), round(r["rss_peak_mib"] - r["load_rss_mib"]),
            round(r["py_peak_mib"], 1), round(r["seconds"], 1), r["note"],
        ])  # fmt: skip
        print(rows[-1], flush=True)
    table = markdown_table(
        ["stage", "rss peak MiB", "+ over load MiB", "py peak MiB", "s", "what"], rows
    )
    text = (
        f"# Peak memory per stage, MiniLM-L6\n\n{machine()}\n\n"
        f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py`\n\n"
        f"For scale: the word-embedding table is 44.7 MiB (float32), the encoder's Linear "
        f"weights 54.0 MiB, the whole float model 86.7 MiB.\n\n{table}\n"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
