"""Shared helpers for the benchmark scripts: machine line, timing, tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def machine() -> str:
    """One line naming the machine, torch and thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}"
    )


def median_time(fn: Callable[[], Any], repeats: int = 15, min_time: float = 0.02) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` timed blocks.

    Each block runs ``fn`` enough times to last at least ``min_time``.
    """
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 16:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ MiniLM judging
# shared by bench_ptq_minilm, bench_qat_minilm and bench_search


def linear_names(model) -> dict[str, int]:
    """The encoder's Linear layers (the ones every MiniLM row compresses) -> weight count."""
    return {
        n: m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder.encoder.layer.")
    }


def bits_per_weight(model, names: dict[str, int]) -> float:
    """``size_report`` bits of the modules that replace the ``names`` layers, per weight.

    A layer rotated by :func:`tnquant.ptq.rotate` counts its ``<name>.layer``
    and its rotation's stored seed (``<name>.rotation``).
    """
    from tnquant import size_report

    sizes = {r["name"]: r["size_bits"] for r in size_report(model)}
    total = 0
    for name in names:
        if name in sizes:
            total += sizes[name]
        elif f"{name}.layer" in sizes:
            total += sizes[f"{name}.layer"] + sizes.get(f"{name}.rotation", 0)
        else:
            raise RuntimeError(f"size_report has no row for the layer {name!r}")
    return total / sum(names.values())


def make_batches(
    tokenizer, sentences: Sequence[str], size: int = 32, max_length: int = 64
) -> list[dict]:
    """Tokenized batches (padded to the longest in each batch, truncated at max_length)."""
    return [
        dict(
            tokenizer(
                list(sentences[i : i + size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
        )
        for i in range(0, len(sentences), size)
    ]


def embed(model, batches) -> Any:
    """Sentence embeddings of every batch, in eval mode (the training mode is restored)."""
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(**b) for b in batches])
    model.train(was)
    return out


def knn(emb, k: int = 10) -> Any:
    """Indices of each row's k nearest neighbours by cosine, itself excluded."""
    import torch.nn.functional as F

    e = F.normalize(emb, dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=1).indices


def judge(model, held_out, reference, ref_knn) -> tuple[float, float]:
    """(mean cosine to the reference embeddings, recall@10 of the nearest neighbours)."""
    import torch.nn.functional as F

    emb = embed(model, held_out)
    cos = F.cosine_similarity(emb, reference).mean().item()
    overlap = [
        len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(knn(emb), ref_knn, strict=True)
    ]
    return cos, sum(overlap) / len(overlap)


def train_classifier(
    make: Callable[[], Any], x, y, epochs: int, lr: float = 3e-3, batch: int = 64
) -> Any:
    """A float classifier from ``make()`` trained with Adam + cross-entropy (seeded, eval mode)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
