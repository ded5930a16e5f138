"""Where the time of MiniLM-L6 at batch 1 x 16 goes: float32 vs ``convert(kernels='packed')`` int4.

``torch.profiler`` over 10 forwards each (after 5 warm-up calls); prints the top
operators by self CPU time. Quoted in BENCHMARKS.md (kernel paths of convert).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_converted_int4.py``
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from tnquant import QuantSpec, convert, quantize  # noqa: E402
from tnquant.cli.datasets import load_minilm, split_corpus  # noqa: E402


def main() -> None:
    model, tok = load_minilm()
    _, test = split_corpus(64, 32, seed=0)
    batch = dict(
        tok(test[:1], return_tensors="pt", padding="max_length", truncation=True, max_length=16)
    )
    q = copy.deepcopy(model)
    spec = QuantSpec(bits=4, granularity=("group", 128), axis=1)
    quantize(q, weights={"encoder.encoder.layer.*": spec}, progress=False)
    convert(q, kernels="packed", progress=False)
    for name, m in (("float32", model), ("int4 packed bf16", q)):
        with torch.no_grad():
            for _ in range(5):
                m(**batch)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    m(**batch)
        print(name)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
