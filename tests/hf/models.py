"""Tiny random transformers models, compressed, and their folders (shared by tests/hf)."""

from __future__ import annotations

from pathlib import Path

import torch

from tnquant import LowRank, QuantSpec, convert, factorize, quantize
from tnquant.hf import save_pretrained

VOCAB = 64


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def bert(vocab: int = VOCAB) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertModel(config).eval()


BUILDERS = {"gpt2": gpt2, "llama": llama, "bert": bert}


def compressed(name: str, vocab: int = VOCAB) -> torch.nn.Module:
    """``name``, seeded, compressed: Llama's MLP and GPT-2's c_fc LowRank, all 4-bit, converted."""
    torch.manual_seed(0)
    model = bert(vocab) if name == "bert" else BUILDERS[name]()
    if name == "llama":
        factorize(model, {"model.layers.*.mlp.*": LowRank(rank=4)}, progress=False)
    if name == "gpt2":  # a transformers Conv1D, factorized
        factorize(model, {"transformer.h.*.mlp.c_fc": LowRank(rank=4)}, progress=False)
    quantize(model, weights=QuantSpec(bits=4), progress=False)
    convert(model, progress=False)
    return model


def inputs(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def saved(name: str, folder: Path, tokenizer: object = None, vocab: int = VOCAB) -> torch.nn.Module:
    model = compressed(name, vocab)
    save_pretrained(model, folder, tokenizer=tokenizer)
    return model
