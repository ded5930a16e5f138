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

Run: ``.venv/bin/python benchmarks/bench_qat_minilm.py [--quick] [--rows a,b,..]``
(``--quick``: 256 train / 128 held-out sentences, 1 epoch).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table  # noqa: E402

from tnquant import (  # noqa: E402
    TT,
    LowRank,
    QuantSpec,
    Tucker,
    calibrate,
    factorize,
    finetune,
    quantize,
    size_report,
)
from tnquant.datasets import load_minilm, split_corpus  # noqa: E402

LAYERS = "encoder.encoder.layer.*"
RESULTS = Path(__file__).resolve().parent / "results" / "qat_minilm.md"


def make_batches(tokenizer, sentences, size=32):
    return [
        dict(tokenizer(sentences[i : i + size], return_tensors="pt", padding=True,
                       truncation=True, max_length=64))
        for i in range(0, len(sentences), size)
    ]


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(**b) for b in batches])
    model.train(was)
    return out


def knn(emb: torch.Tensor, k: int = 10) -> torch.Tensor:
    e = F.normalize(emb, dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=1).indices


def judge(model, held_out, reference, ref_knn) -> tuple[float, float]:
    emb = embed(model, held_out)
    cos = F.cosine_similarity(emb, reference).mean().item()
    nn_ = knn(emb)
    overlap = [
        len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(nn_, ref_knn, strict=True)
    ]
    return cos, sum(overlap) / len(overlap)


def linear_names(model) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("encoder.encoder.layer.")}


def bits_per_weight(model, names: dict[str, int]) -> float:
    rows = [r for r in size_report(model) if r["name"] in names]
    if len(rows) != len(names):
        raise RuntimeError(f"size_report has {len(rows)} of the {len(names)} layer rows")
    return sum(r["size_bits"] for r in rows) / sum(names.values())


# ------------------------------------------------------------------ rows


def dense_rows():
    def spec(bits, gran):
        g = ("group", 64) if gran == "g64" else "channel"
        return QuantSpec(bits=bits, granularity=g, axis=1 if gran == "g64" else 0,
                         learnable=True)
    return [(f"dense int{b} {g}", None, spec(b, g))
            for b, g in [(4, "g64"), (4, "channel"), (3, "g64"), (3, "channel"), (2, "g64")]]


def factor_rows():
    rows = []
    for fname, make in [("LowRank", lambda r: LowRank(ratio=r)),
                        ("Tucker", lambda r: Tucker(ratio=r)),
                        ("TT", lambda r: TT(ratio=r, order=2))]:
        for ratio in (0.5, 0.25):
            for bits in (8, 4):
                rows.append((f"{fname}({ratio}) int{bits} ch", (fname, ratio, make(ratio)),
                             QuantSpec(bits=bits, granularity="channel", learnable=True)))
    return rows


def select(rows, wanted):
    if not wanted:
        return rows
    keys = [w.strip().lower() for w in wanted.split(",") if w.strip()]
    return [r for r in rows if any(k in r[0].lower() for k in keys)]


# --------------------------------------------------------------- per-layer


def sensitivity(model, spec, factor, calib, held_out, reference, ref_knn):
    """PTQ cosine with only one group of layers compressed (the others float)."""
    L = "encoder.encoder.layer."
    groups = {
        "attention q/k/v": [L + "*.attention.self.*"],
        "attention output": [L + "*.attention.output.dense"],
        "FFN in (intermediate)": [L + "*.intermediate.dense"],
        "FFN out (output)": [L + "?.output.dense"],
    }
    groups.update({f"block {i}": [f"{L}{i}.*"] for i in range(6)})
    out = []
    for label, mapping in groups.items():
        student = copy.deepcopy(model)
        if factor is not None:
            factorize(student, {p: factor for p in mapping}, data=calib, progress=False)
        quantize(student, weights={p: spec for p in mapping}, progress=False)
        calibrate(student, calib, progress=False)
        cos, r10 = judge(student, held_out, reference, ref_knn)
        out.append((label, cos, r10))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="256/128 sentences, 1 epoch")
    ap.add_argument("--rows", default="", help="comma list of substrings of row labels")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--loss", default="cosine", choices=["cosine", "mse", "hidden"])
    ap.add_argument("--sensitivity", default="dense int3 channel,LowRank(0.5) int4 ch",
                    help="rows whose per-layer-group PTQ sensitivity is measured ('' for none)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    n_train, n_test = (256, 128) if args.quick else (1024, 512)
    epochs = args.epochs or (1 if args.quick else 2)
    command = "python " + " ".join(sys.argv)
    print(command)
    print(machine())

    model, tokenizer = load_minilm()
    train, test = split_corpus(n_train, n_test, seed=0)
    calib, held_out = make_batches(tokenizer, train), make_batches(tokenizer, test)
    reference = embed(model, held_out)
    ref_knn = knn(reference)
    names = linear_names(model)
    n_weights = sum(names.values())
    hidden = [f"encoder.encoder.layer.{i}" for i in range(6)] if args.loss == "hidden" else None
    loss = "mse" if args.loss == "hidden" else args.loss
    print(f"{len(names)} Linear layers, {n_weights} weights; {n_train} train / {n_test} held-out "
          f"sentences; {epochs} epochs x {len(calib)} batches of 32, lr {args.lr}, "
          f"loss {args.loss}")

    rows = select(dense_rows() + factor_rows(), args.rows)
    table = []
    factorized_cache: dict[tuple[str, float], tuple[torch.nn.Module, float, float]] = {}
    t_all = time.perf_counter()
    for label, factor, spec in rows:
        t0 = time.perf_counter()
        if factor is None:
            student, fz = copy.deepcopy(model), ""
        else:
            key = factor[:2]
            if key not in factorized_cache:
                tf = time.perf_counter()
                base = copy.deepcopy(model)
                factorize(base, {LAYERS: factor[2]}, data=calib, progress=False)
                cos_f, _ = judge(base, held_out, reference, ref_knn)
                factorized_cache = {key: (base, cos_f, time.perf_counter() - tf)}
            base, cos_f, fsec = factorized_cache[key]
            student, fz = copy.deepcopy(base), f"{cos_f:.3f}"
        quantize(student, weights={LAYERS: spec}, progress=False)
        calibrate(student, calib, progress=False)
        bits = bits_per_weight(student, names)
        cos_p, r_p = judge(student, held_out, reference, ref_knn)
        rep = finetune(student, calib, teacher=model, loss=loss, hidden=hidden, epochs=epochs,
                       lr=args.lr, progress=False)
        cos_q, r_q = judge(student, held_out, reference, ref_knn)
        row = (label, round(bits, 3), fz, round(cos_p, 4), round(r_p, 3), round(cos_q, 4),
               round(r_q, 3), round(rep.history.time_s, 1))
        table.append(row)
        print(f"{row}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    total = time.perf_counter() - t_all
    header = ("model", "bits/w", "float cos (factorized)", "PTQ cos", "PTQ R@10", "QAT cos",
              "QAT R@10", "finetune s")
    md = markdown_table(header, table)
    print(md)

    sens_md = ""
    for label, factor, spec in select(dense_rows() + factor_rows(), args.sensitivity) \
            if args.sensitivity else []:
        t0 = time.perf_counter()
        res = sensitivity(model, spec, None if factor is None else factor[2], calib, held_out,
                          reference, ref_knn)
        part = markdown_table(("compressed group (others float)", "PTQ cos", "PTQ R@10"),
                              [(g, round(c, 4), round(r, 3)) for g, c, r in res])
        sens_md += f"\nPer-layer-group sensitivity of `{label}` (PTQ, no finetune; " \
                   f"{time.perf_counter() - t0:.0f}s):\n\n{part}\n"
        print(sens_md)

    text = (f"# QAT on MiniLM-L6\n\ncommand: `{command}`\n\nmachine: {machine()}\n\n"
            f"{'QUICK run' if args.quick else 'full run'}: {n_train} train / {n_test} held-out "
            f"sentences (split_corpus seed 0, max_length 64), distillation {epochs} epochs x "
            f"{len(calib)} batches of 32, AdamW lr {args.lr} cosine schedule, loss "
            f"{args.loss} on the pooled embeddings"
            f"{' (hidden states of the 6 layers)' if hidden else ''}; quantizers LSQ "
            f"(`learnable=True`), minmax-initialised by `calibrate`.\n\n"
            f"bits/w = size_report bits of the {len(names)} modules replacing "
            f"encoder.encoder.layer.* Linear layers (codes, scales, zero points, float32 "
            f"biases, all cores) / {n_weights} original weights. PTQ = same quantize + "
            f"calibrate, no finetune (same size). float cos = the factorized float model "
            f"(data-aware fit on the train batches) before quantization.\n\n{md}\n\n"
            f"Total wall time of the rows: {total:.0f}s.\n{sens_md}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
