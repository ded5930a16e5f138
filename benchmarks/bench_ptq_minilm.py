"""Post-training quantization (PTQ only, no fine-tuning) of the pretrained MiniLM-L6 encoder.

Every row compresses the 36 Linear layers of ``encoder.encoder.layer.*``
(q/k/v, attention output, FFN in, FFN out of the 6 blocks) and nothing else:
the embeddings (word/position/token-type), the LayerNorms and the pooler
stay float32 (the pooler is not used by the mean-pooled sentence embedding).
Rows:

- dense weights only, symmetric, min-max scales unless marked ``mse`` (the
  ``'mse'`` observer's clipping search): per-tensor int8/int4 (to show the
  collapse), per-channel (output axis) int8/int4/int3/int2, per-group 64/128
  (input axis) int4, ternary (TWN, per-channel), and per-channel int3/int2
  with empirical bias correction (``calibrate(..., bias_correction=True)``);
  per-channel int4/int3/int2 re-rounded by GPTQ (:func:`tnquant.ptq.gptq` on the
  calibration batches after ``calibrate``; same qparams, same size); the same
  after a random Hadamard rotation of every layer's input
  (:func:`tnquant.ptq.rotate`, before ``quantize``; bits/w adds the 64-bit seed
  each rotation stores);
- data-aware factorization (``factorize(model, {LAYERS: spec},
  data=calib_batches)``: whitened SVD for LowRank / Tucker, TT-SVD + ALS
  in the output metric for TT) at ratio 0.5 and 0.25, then per-core
  per-channel int8 / int4 (min-max). Core axes (chosen by measuring the
  output error of one layer, see the results file): LowRank ``U (out, r)``
  per output row (axis 0) and ``V (r, in)`` per rank row (axis 0); Tucker
  every core along axis 0 (``U_out`` per output row, ``G`` per output-rank
  row, ``U_in`` per input row); TT (order 2: cores ``(1, o1, i1, r)``,
  ``(r, o2, i2, 1)``) along the rank axes, 3 and 0; LowRank + int4 also with
  GPTQ-rounded cores (``V`` on the layer inputs, then ``U`` on ``Q(V) x``).

Judged on held-out sentences (``split_corpus`` seed 0; disjoint from the
calibration ones) against the original model's embeddings:

- ``cos``: mean cosine of compressed vs original sentence embeddings;
- ``R@10``: for each held-out sentence, the overlap of its 10 nearest
  neighbours (cosine, itself excluded) among the held-out set under the
  original and under the compressed embeddings, averaged.

Size: ``bits/w`` = sum of :func:`tnquant.size_report` ``size_bits`` over the
36 modules that replace the Linear layers (packed codes, float32 scales,
zero points, float32 biases, every core of a factorized layer) / the
10,616,832 weights of the original 36 Linear layers. The float32 original
is 32 bits/w plus its biases (32.07).

Caching (so a re-run stays under 10 min on 2 cores): the original model's
held-out embeddings and every data-aware factorized float model (saved with
:func:`tnquant.save`, reloaded with :func:`tnquant.load`) go to
``--cache`` (default ``~/.cache/tnquant-bench``), keyed by a hash of the
sentences, the settings and the tnquant factorization sources. A cold run
spends ~10 extra minutes on the two TT ALS fits.

Run: ``.venv/bin/python benchmarks/bench_ptq_minilm.py [--quick] [--rows a,b] [--no-cache]``
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

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

import tnquant  # noqa: E402
from tnquant import (  # noqa: E402
    TT,
    LowRank,
    QuantSpec,
    Ternary,
    Tucker,
    calibrate,
    factorize,
    load,
    quantize,
    save,
)
from tnquant.cli.datasets import load_minilm, minilm_path, split_corpus  # noqa: E402
from tnquant.ptq import gptq, rotate  # noqa: E402

LAYERS = "encoder.encoder.layer.*"
MAX_LENGTH = 64
BATCH = 32
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ptq_minilm.md"
PKG = Path(tnquant.__file__).resolve().parent


# ----------------------------------------------------------------- data / judging


def token_length(tokenizer, sentence: str) -> int:
    return len(tokenizer(sentence, truncation=True, max_length=MAX_LENGTH)["input_ids"])


# ----------------------------------------------------------------------- caching


def source_hash() -> str:
    """Hash of the sources a factorized model depends on (stale cache on any change)."""
    h = hashlib.sha256()
    files = [
        PKG / "factorization.py",
        *sorted((PKG / "decompose").glob("*.py")),
        *sorted((PKG / "layers").glob("*.py")),
    ]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def cached_reference(model, held_out, test, cache: Path | None) -> tuple[torch.Tensor, str]:
    if cache is None:
        return embed(model, held_out), "computed"
    path = cache / f"ref-{key_of(test, MAX_LENGTH, str(minilm_path()), torch.__version__)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True), f"cached ({path.name})"
    ref = embed(model, held_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    return ref, "computed and cached"


def factorized(model, spec, calib, train, cache: Path | None, log: list[str]):
    """The data-aware factorized float model (from the cache when there)."""
    path = None
    if cache is not None:
        path = cache / f"fac-{key_of(repr(spec), LAYERS, train, MAX_LENGTH, source_hash())}"
        if (path / "model.json").exists():
            t0 = time.perf_counter()
            out = load(path, model=copy.deepcopy(model))
            log.append(f"{spec!r}: loaded from cache in {time.perf_counter() - t0:.1f}s")
            return out
    student = copy.deepcopy(model)
    t0 = time.perf_counter()
    factorize(student, {LAYERS: spec}, data=calib, progress=False)
    fsec = time.perf_counter() - t0
    log.append(f"{spec!r}: data-aware factorize took {fsec:.0f}s")
    if path is not None:
        save(student, path)
        back = load(path, model=copy.deepcopy(model))
        with torch.no_grad():
            same = torch.equal(back(**calib[0]), student(**calib[0]))
        if not same:
            raise RuntimeError(f"save/load round trip of {spec!r} changed the outputs")
    return student


# -------------------------------------------------------------------------- rows


def ch(bits: int, axis: int = 0, observer: str = "minmax") -> QuantSpec:
    return QuantSpec(bits=bits, granularity="channel", axis=axis, observer=observer)


def dense_rows(quick: bool):
    rows = [
        ("int8 per-tensor", QuantSpec(bits=8), False),
        ("int4 per-tensor", QuantSpec(bits=4), False),
        ("int8 per-channel", ch(8), False),
        ("int4 per-channel", ch(4), False),
        ("int4 per-channel mse", ch(4, observer="mse"), False),
        ("int4 per-group 128", QuantSpec(bits=4, granularity=("group", 128), axis=1), False),
        ("int4 per-group 64", QuantSpec(bits=4, granularity=("group", 64), axis=1), False),
        ("int3 per-channel", ch(3), False),
        ("int3 per-channel mse", ch(3, observer="mse"), False),
        ("int3 per-channel mse + bias corr.", ch(3, observer="mse"), True),
        ("int4 per-channel mse + GPTQ", ch(4, observer="mse"), "gptq"),
        ("int3 per-channel + GPTQ", ch(3), "gptq"),
        ("int3 per-channel mse + GPTQ", ch(3, observer="mse"), "gptq"),
        ("int2 per-channel mse + GPTQ", ch(2, observer="mse"), "gptq"),
        ("int3 per-channel mse + rotation", ch(3, observer="mse"), "rotate"),
        ("int4 per-channel mse + rotation + GPTQ", ch(4, observer="mse"), "rotate+gptq"),
        ("int3 per-channel mse + rotation + GPTQ", ch(3, observer="mse"), "rotate+gptq"),
        ("int2 per-channel mse + rotation + GPTQ", ch(2, observer="mse"), "rotate+gptq"),
        ("int2 per-channel", ch(2), False),
        ("int2 per-channel mse", ch(2, observer="mse"), False),
        ("int2 per-channel mse + bias corr.", ch(2, observer="mse"), True),
        ("ternary (TWN) per-channel", Ternary(granularity="channel"), False),
    ]
    if quick:
        rows = [
            r
            for r in rows
            if r[0] in ("int8 per-channel", "int4 per-channel", "int2 per-channel mse + bias corr.")
        ]
    return rows


FACTORS = [
    ("LowRank", LowRank, {}, lambda b: {"weights": ch(b, 0)}),
    ("Tucker", Tucker, {}, lambda b: {"weights": ch(b, 0)}),
    ("TT(order 2)", TT, {"order": 2}, lambda b: {"cores": {0: ch(b, 3), -1: ch(b, 0)}}),
]


def factor_rows(quick: bool):
    rows = []
    for fname, cls, extra, qargs in FACTORS:
        for ratio in (0.5,) if quick else (0.5, 0.25):
            spec = cls(ratio=ratio, **extra)
            for bits in (4,) if quick else (8, 4):
                rows.append(
                    (f"{fname}({ratio}) + int{bits} per-channel cores", spec, bits, qargs, False)
                )
            if fname == "LowRank" and not quick:
                rows.append(
                    (f"{fname}({ratio}) + int4 per-channel cores + GPTQ", spec, 4, qargs, True)
                )
    if quick:
        rows = [r for r in rows if r[0].startswith("LowRank")]
    return rows


def select(rows, wanted: str):
    if not wanted:
        return rows
    keys = [w.strip().lower() for w in wanted.split(",") if w.strip()]
    return [r for r in rows if any(k in r[0].lower() for k in keys)]


# -------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="128/128 sentences, a few rows")
    ap.add_argument("--rows", default="", help="comma list of substrings of row labels")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "tnquant-bench"))
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    command = "python " + " ".join(sys.argv)
    print(command)
    print(machine(), flush=True)
    cache = None if args.no_cache else Path(args.cache)
    n_calib, n_test = (128, 128) if args.quick else (256, 512)

    model, tokenizer = load_minilm()
    train, test = split_corpus(n_calib, n_test, seed=0)
    train = sorted(train, key=lambda s: token_length(tokenizer, s))
    test = sorted(test, key=lambda s: token_length(tokenizer, s))
    calib, held_out = make_batches(tokenizer, train), make_batches(tokenizer, test)
    t0 = time.perf_counter()
    reference, how = cached_reference(model, held_out, test, cache)
    ref_sec = time.perf_counter() - t0
    ref_knn = knn(reference)
    names = linear_names(model)
    n_weights = sum(names.values())
    float_bits = bits_per_weight(model, names)
    t0 = time.perf_counter()
    cos0, r0 = judge(model, held_out, reference, ref_knn)
    judge_sec = time.perf_counter() - t0
    print(
        f"{len(names)} Linear layers, {n_weights} weights; {n_calib} calibration / {n_test} "
        f"held-out sentences; reference embeddings {how} ({ref_sec:.1f}s); one judge "
        f"pass {judge_sec:.1f}s; float self-check cos {cos0:.4f} R@10 {r0:.3f}",
        flush=True,
    )

    header = ("model", "bits/w", "cos", "R@10", "row s")
    dense_table = [
        (
            "float32 (original)",
            round(float_bits, 3),
            round(cos0, 4),
            round(r0, 3),
            round(judge_sec, 1),
        )
    ]
    for label, spec, bc in select(dense_rows(args.quick), args.rows):
        t0 = time.perf_counter()
        student = copy.deepcopy(model)
        if str(bc).startswith("rotate"):  # random Hadamard rotation of the layers' inputs
            rotate(student, include=[LAYERS], progress=False)
        quantize(student, weights={LAYERS: spec}, progress=False)
        # bias correction runs the whole model once per layer (36 passes): on 2 of the 8
        # length-sorted calibration batches (64 sentences, short and long ones)
        bias = bc is True
        calibrate(student, calib[1::4] if bias else calib, bias_correction=bias, progress=False)
        if str(bc).endswith("gptq"):  # re-round on all calibration batches, qparams kept
            gptq(student, calib, progress=False)
        bits = bits_per_weight(student, names)
        cos, r10 = judge(student, held_out, reference, ref_knn)
        row = (
            label,
            round(bits, 3),
            round(cos, 4),
            round(r10, 3),
            round(time.perf_counter() - t0, 1),
        )
        dense_table.append(row)
        print(row, flush=True)

    fac_log: list[str] = []
    fac_table = []
    float_cos: dict[str, tuple[float, float, float]] = {}
    current: tuple[str, torch.nn.Module] | None = None
    for label, spec, bits, qargs, use_gptq in select(factor_rows(args.quick), args.rows):
        t0 = time.perf_counter()
        if current is None or current[0] != repr(spec):
            current = (repr(spec), factorized(model, spec, calib, train, cache, fac_log))
            fc, fr = judge(current[1], held_out, reference, ref_knn)
            float_cos[repr(spec)] = (bits_per_weight(current[1], names), fc, fr)
            print(fac_log[-1], f"float cos {fc:.4f} R@10 {fr:.3f}", flush=True)
        fbits, fc, fr = float_cos[repr(spec)]
        student = copy.deepcopy(current[1])
        quantize(
            student,
            **{k: ({LAYERS: v} if k == "weights" else v) for k, v in qargs(bits).items()},
            include=[LAYERS],
            progress=False,
        )
        calibrate(student, calib, progress=False)
        if use_gptq:
            gptq(student, calib, progress=False)
        qbits = bits_per_weight(student, names)
        cos, r10 = judge(student, held_out, reference, ref_knn)
        row = (
            label,
            round(qbits, 3),
            round(cos, 4),
            round(r10, 3),
            round(fbits, 2),
            round(fc, 4),
            round(fr, 3),
            round(time.perf_counter() - t0, 1),
        )
        fac_table.append(row)
        print(row, flush=True)
    total = time.perf_counter() - t_start

    md_dense = markdown_table(header, dense_table)
    md_fac = markdown_table(
        ("model", "bits/w", "cos", "R@10", "float bits/w", "float cos", "float R@10", "row s"),
        fac_table,
    )
    print(md_dense)
    print(md_fac)
    text = (
        f"# PTQ of the pretrained MiniLM-L6 encoder (no fine-tuning)\n\n"
        f"command: `{command}`\n\nmachine: {machine()}\n\n"
        f"{'QUICK run: ' if args.quick else ''}{n_calib} calibration / {n_test} held-out "
        f"sentences (`split_corpus` seed 0, each split sorted by token length, batches of "
        f"{BATCH}, max_length {MAX_LENGTH}). Compressed: the {len(names)} Linear layers of "
        f"`{LAYERS}` ({n_weights} weights); embeddings, LayerNorms and pooler stay float32 "
        f"and are not counted.\n\n"
        f"bits/w = `size_report` size_bits of the {len(names)} modules replacing those Linear "
        f"layers (packed codes + float32 scales + zero points + float32 biases; all cores of "
        f"a factorized layer) / {n_weights} original weights. cos = mean cosine to the "
        f"original embeddings; R@10 = mean overlap of each held-out sentence's 10 nearest "
        f"neighbours (cosine, self excluded) under original vs compressed embeddings. Weight "
        f"quantizers are symmetric, min-max scales unless 'mse' (the `observer='mse'` "
        f"clipping search); `calibrate` with no activation quantizers only freezes the "
        f"weight scales, except with bias correction (one pass over 2 of the calibration batches, "
        f"{BATCH * len(calib[1::4])} sentences of short and long lengths, per layer). "
        f"Reference embeddings: {how}.\n\n"
        f"## Dense weights\n\n{md_dense}\n\n"
        f"## Data-aware factorization + per-core quantization\n\n"
        f"`factorize(model, {{'{LAYERS}': spec}}, data=calib_batches)` then per-channel "
        f"min-max cores: LowRank `U (out,r)` axis 0, `V (r,in)` axis 0; Tucker "
        f"`U_out (out,r)`, `G (r,r)`, `U_in (in,r)` all axis 0; TT order 2 cores "
        f"`(1,o1,i1,r)` axis 3 and `(r,o2,i2,1)` axis 0. float = the factorized float32 "
        f"model before quantization.\n\n{md_fac}\n\n"
        + "".join(f"- {line}\n" for line in fac_log)
        + f"\nTotal wall time: {total:.0f}s.\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"total {total:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
