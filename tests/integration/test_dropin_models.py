"""Host models read factorized and quantized layers like the dense ones they replaced.

``nn.TransformerEncoder`` (whose fused eval path reads ``linear1.weight`` and
skips ``forward``), and tiny randomly initialised T5, BERT, Llama and GPT-2
models (T5 reads ``wo.weight.dtype`` in its forward; the language models'
``get_output_embeddings().weight``). Each model is factorized and quantized,
run forward and backward, and converted. References: the slow
(module-by-module) encoder path, and a dense twin of the compressed model in
which every tnquant layer is a plain torch layer holding its weight.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from tnquant import TT, LowRank, QuantSpec
from tnquant.conversion import convert
from tnquant.factorization import factorize
from tnquant.layers import FactorizedLayer, QuantEmbedding, QuantLinear
from tnquant.layers.dropin import sync_fused_guard
from tnquant.layers.hf_conv1d import QuantHFConv1D
from tnquant.ptq import calibrate
from tnquant.quantization import quantize

ATOL = 1e-5  # float32, the same arithmetic in another order (fused kernels, nested tensors)
W4 = QuantSpec(bits=4, granularity="channel")
A8 = QuantSpec(bits=8)


def _encoder(seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor's prototype warning
        return nn.TransformerEncoder(layer, 2)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=gen)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True  # left-aligned padding: the encoder may nest the batch
    return x, pad


LINEARS = ["layers.*.linear1", "layers.*.linear2"]
ENCODER_CASES = {
    "lowrank-w4a8": (LowRank(rank=4), A8),
    "lowrank-w4": (LowRank(rank=4), None),
    "dense-w4": (None, None),
    "dense-w4a8": (None, A8),
}


def _compressed_encoder(case: str) -> nn.TransformerEncoder:
    spec, acts = ENCODER_CASES[case]
    enc = _encoder()
    if spec is not None:
        factorize(enc, {p: spec for p in LINEARS}, progress=False)
    quantize(enc, weights=W4, activations=acts, include=LINEARS, progress=False)
    if acts is not None:
        calibrate(enc, [_batch()[0]], progress=False)
    return enc


def _outputs(enc: nn.Module) -> dict[str, torch.Tensor]:
    """Eval outputs: the slow path (grad on, parameters need grad) and the fast path."""
    x, pad = _batch()
    enc.eval()
    out = {"slow": enc(x).detach(), "slow_pad": enc(x, src_key_padding_mask=pad).detach()}
    with torch.no_grad():
        out["fast"] = enc(x)
        out["fast_pad"] = enc(x, src_key_padding_mask=pad)
    return out


def _agree(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    keep = ~_batch()[1]  # padded positions are zeros on the nested road (torch's own)
    torch.testing.assert_close(out["fast"], ref["slow"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["fast_pad"][keep], ref["slow_pad"][keep], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_transformer_encoder_fast_path_equals_slow_path(case):
    enc = _compressed_encoder(case)
    x, pad = _batch()
    out = _outputs(enc)
    _agree(out, out)
    enc.train()  # forward and backward
    enc(x, src_key_padding_mask=pad)[~pad].pow(2).mean().backward()
    for name, p in enc.named_parameters():
        if "linear" in name and p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    convert(enc, progress=False)
    _agree(_outputs(enc), out)


def test_fused_path_would_use_the_float_weight_without_the_guard():
    """The guard is what keeps the fast path right (this test would fail without it)."""
    enc = _compressed_encoder("dense-w4")
    ref = _outputs(enc)
    for m in enc.modules():
        if isinstance(m, QuantLinear):
            sync_fused_guard(m, False)
    with torch.no_grad():
        fused = enc(_batch()[0])
    assert (fused - ref["slow"]).abs().max() > 100 * ATOL  # the float weights, not int4


def test_fused_path_reads_the_factorized_weight():
    """No activation quantizers: the fused kernel runs on ``linear1.weight`` itself."""
    enc = _compressed_encoder("lowrank-w4")
    ref = _outputs(enc)
    calls = []
    lin = enc.layers[0].linear1
    forward = lin.forward
    lin.forward = lambda x: calls.append(1) or forward(x)  # an instance attribute, no hook
    with torch.no_grad():
        out = enc(_batch()[0])
    assert calls == []  # forward skipped: the kernel took the reconstructed weight
    torch.testing.assert_close(out, ref["slow"], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- #
# tiny Hugging Face models
# --------------------------------------------------------------------------- #

VOCAB = 64


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg), {"*.DenseReluDense.w*": LowRank(rank=4)}


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    specs = {"*.intermediate.dense": TT(rank=2, order=2), "*.output.dense": LowRank(rank=4)}
    return BertForMaskedLM(cfg), specs


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    specs = {"*.mlp.*_proj": LowRank(rank=4), "lm_head": LowRank(rank=4)}
    return LlamaForCausalLM(cfg), specs


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,  # factorize refuses half of a tied pair
    )
    # the blocks are transformers Conv1D layers ((in, out) weights); head and embeddings dense
    specs = {
        "*.attn.c_attn": LowRank(rank=4),
        "*.mlp.c_fc": TT(rank=2, order=2),
        "*.mlp.c_proj": LowRank(rank=4),
        "lm_head": LowRank(rank=4),
        "transformer.wte": TT(rank=4, order=2),
    }
    return GPT2LMHeadModel(cfg), specs


HF_MODELS = {"t5": _t5, "bert": _bert, "llama": _llama, "gpt2": _gpt2}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "decoder_input_ids": ids} if name == "t5" else {"input_ids": ids}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def _dense_twin(model: nn.Module) -> nn.Module:
    """A copy in which every tnquant layer is the plain torch layer holding its weight."""
    from tnquant.core.modules import replace_module

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, FactorizedLayer):
            replace_module(twin, name, m.to_dense())
        elif isinstance(m, (QuantLinear, QuantEmbedding, QuantHFConv1D)):
            plain = m.to_float()
            weight = m.effective_weight().detach().clone()  # (out, in) for F.linear
            if isinstance(m, QuantHFConv1D):
                weight = weight.mT  # a Conv1D holds (in, out)
            plain.weight = nn.Parameter(weight)
            replace_module(twin, name, plain)
    return twin


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_tiny_transformers_models_run_factorized_and_quantized(name):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, specs = HF_MODELS[name]()
    model.eval()
    batch = _inputs(name)
    report = factorize(model, specs, progress=False)
    factorized = [n for n, m in model.named_modules() if isinstance(m, FactorizedLayer)]
    assert factorized and not report.skipped, report
    head = model.get_output_embeddings()
    assert tuple(head.weight.shape) == (VOCAB, model.config.hidden_size)
    assert model.get_input_embeddings().weight.shape == head.weight.shape
    quantize(model, weights=W4, exclude=["shared"], progress=False)  # T5's shared is unused
    with torch.no_grad():
        ref = _logits(_dense_twin(model), batch)
        fake = _logits(model, batch)
    torch.testing.assert_close(fake, ref, atol=ATOL, rtol=1e-4)
    model.train()  # forward and backward through the factorized, fake-quantized layers
    _logits(model, batch).float().pow(2).mean().backward()
    for n in factorized:
        cores = model.get_submodule(n).cores
        assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores), n
    model.eval()
    convert(model, progress=False)
    with torch.no_grad():
        converted = _logits(model, batch)
        twin = _logits(_dense_twin(model), batch)
    torch.testing.assert_close(converted, fake, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(twin, ref, atol=ATOL, rtol=1e-4)
    assert model.get_output_embeddings().weight.shape == head.weight.shape


@pytest.mark.parametrize("name", ["llama"])
def test_tiny_transformers_models_with_activation_quantizers(name):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, specs = HF_MODELS[name]()
    model.eval()
    batch = _inputs(name)
    factorize(model, specs, progress=False)
    quantize(model, weights=W4, activations=A8, exclude=["shared"], progress=False)
    calibrate(model, [batch], progress=False)
    with torch.no_grad():
        fake = _logits(model, batch)
    model.train()
    loss = _logits(model, batch).float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    convert(model, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, batch), fake, atol=ATOL, rtol=1e-4)
