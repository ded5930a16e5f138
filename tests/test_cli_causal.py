"""Causal LMs in ``tnquant compress``, and the kinds of Hugging Face model it refuses.

The models are tiny random GPT-2 and Llama models written into tmp folders
(``save_pretrained``) with a tokenizer trained here on a few sentences
(``tokenizers``), so nothing is downloaded. The perplexities and the top-1
agreement of the report are checked against a plain-torch computation, one
sentence at a time, without padding, on the saved model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tnquant import load  # noqa: E402
from tnquant.cli import main  # noqa: E402
from tnquant.cli.causal import compare_lm, lm_recipe, lm_tokenizer, next_token_targets  # noqa: E402
from tnquant.cli.checks import UsageError  # noqa: E402
from tnquant.cli.datasets import sentence_corpus  # noqa: E402
from tnquant.cli.hf_task import HANDLED, causal_lm_class, hf_task  # noqa: E402
from tnquant.cli.inputs import rebuild_base  # noqa: E402
from tnquant.cli.recipe import parse_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 24
#: perplexities from padded batches vs one unpadded sentence at a time (float32 attention)
PPL_RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread (several threads only wait on each other); restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- #
# next-token metrics against a hand computation
# --------------------------------------------------------------------------- #


class TableLM(nn.Module):
    """Logits that depend on the current token only: an embedding table (a toy causal LM)."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.table.weight.copy_(
                torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


def _hand_nll(model: TableLM, sentences: list[list[int]]) -> tuple[float, int]:
    """Summed next-token cross-entropy, one unpadded sentence at a time."""
    total, count = 0.0, 0
    for ids in sentences:
        x = torch.tensor([ids])
        logits = model(x, torch.ones_like(x))[0]
        for t in range(len(ids) - 1):  # position t predicts token t + 1
            total += F.cross_entropy(logits[t : t + 1].double(), x[0, t + 1 : t + 2]).item()
            count += 1
    return total, count


@pytest.mark.parametrize("side", ["right", "left"])
def test_perplexity_and_top1_match_a_hand_computation(side):
    vocab, pad = 11, 0
    sentences = [[3, 5, 7, 2], [4, 9], [1, 2, 3, 4, 5, 6], [8]]  # [8]: nothing to predict
    width = max(map(len, sentences))
    rows, masks = [], []
    for ids in sentences:
        fill = [pad] * (width - len(ids))
        rows.append(ids + fill if side == "right" else fill + ids)
        masks.append(
            [1] * len(ids) + [0] * len(fill)
            if side == "right"
            else [0] * len(fill) + [1] * len(ids)
        )
    batches = [
        {"input_ids": torch.tensor(rows[:2]), "attention_mask": torch.tensor(masks[:2])},
        {"input_ids": torch.tensor(rows[2:]), "attention_mask": torch.tensor(masks[2:])},
    ]
    original, student = TableLM(vocab, 0), TableLM(vocab, 1)
    cmp = compare_lm(original, student, batches)

    nll0, n = _hand_nll(original, sentences)
    nll1, _ = _hand_nll(student, sentences)
    assert n == 3 + 1 + 5 and cmp["tokens"] == n and cmp["samples"] == 4
    ppl0, ppl1 = math.exp(nll0 / n), math.exp(nll1 / n)
    assert cmp["rows"][0]["perplexity"] == pytest.approx(ppl0, rel=1e-6)
    assert cmp["rows"][1]["perplexity"] == pytest.approx(ppl1, rel=1e-6)
    assert cmp["perplexity_ratio"] == pytest.approx(ppl1 / ppl0, rel=1e-6)
    # top-1: the argmax rows of the two tables, at every predicting token
    a0, a1 = original.table.weight.argmax(1), student.table.weight.argmax(1)
    agree = sum(int(a0[ids[t]] == a1[ids[t]]) for ids in sentences for t in range(len(ids) - 1))
    assert cmp["top1_agreement"] == pytest.approx(agree / n) and 0 < agree < n


def test_next_token_targets_shift_and_mask():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    x, y = next_token_targets(logits, ids, mask)
    assert y.tolist() == [6, 7, 9]
    assert torch.equal(x, torch.stack([logits[0, 0], logits[0, 1], logits[1, 2]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        next_token_targets(logits, ids, mask[:, :3])


def test_lm_tokenizer_pads_with_eos_and_refuses_neither():
    class Tok:
        pad_token, eos_token, padding_side = None, "</s>", "left"

    t = Tok()
    assert "eos token '</s>'" in lm_tokenizer(t)
    assert (t.pad_token, t.padding_side) == ("</s>", "right")
    assert lm_tokenizer(t) is None  # it has a pad token now
    t2 = Tok()
    t2.eos_token = None
    with pytest.raises(UsageError, match="neither a pad token nor an eos token"):
        lm_tokenizer(t2)


def test_lm_recipe_distils_with_kl_unless_a_loss_is_named():
    base = '[quantize.weights]\n"*" = {bits = 8}\n'
    r, note = lm_recipe(parse_recipe(base + "[finetune]\ntemperature = 2.0\n"))
    assert r.finetune.loss == "kl" and r.finetune.temperature == 2.0 and "kl" in note
    r, note = lm_recipe(parse_recipe(base + '[finetune]\nloss = "mse"\n'))
    assert r.finetune.loss == "mse" and note is None
    r, note = lm_recipe(parse_recipe(base))
    assert r.finetune is None and note is None


# --------------------------------------------------------------------------- #
# model kinds from config.json
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "config, task",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "causal-lm"),
        ({"model_type": "llama"}, "causal-lm"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "causal-lm"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, "encoder"),
        ({"model_type": "bert"}, "encoder"),
        ({"model_type": "bert", "architectures": ["os.system"]}, "encoder"),  # never imported
        ({"model_type": "roberta", "architectures": ["RobertaForMaskedLM"]}, "encoder"),
    ],
)
def test_hf_task_handled_kinds(config, task):
    assert hf_task(config) == task


@pytest.mark.parametrize(
    "config, why",
    [
        ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "encoder-decoder"),
        ({"model_type": "bart"}, "encoder-decoder"),
        ({"model_type": "whisper"}, "encoder-decoder"),
        ({"model_type": "vit", "architectures": ["ViTForImageClassification"]}, "vision"),
        ({"model_type": "wav2vec2"}, "audio"),
        ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, "task head"),
        ({"model_type": "no-such-type"}, "model type transformers knows"),
        ({}, "model type transformers knows"),
    ],
)
def test_hf_task_refuses_other_kinds_in_one_line(config, why):
    with pytest.raises(UsageError) as e:
        hf_task(config)
    assert why in str(e.value) and HANDLED in str(e.value) and "\n" not in str(e.value)


def test_causal_lm_class_comes_from_the_mapping():
    assert causal_lm_class({"model_type": "llama", "architectures": ["Evil"]}) == "LlamaForCausalLM"
    assert causal_lm_class({"model_type": "gpt2"}) == "GPT2LMHeadModel"


# --------------------------------------------------------------------------- #
# tiny GPT-2 and Llama folders, with tokenizers trained here
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def sentences():
    return sentence_corpus(48, seed=0)


def _word_tokenizer(text):
    """A word-level tokenizer with Llama's specials (``<s>`` prepended), no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _bpe_tokenizer(text):
    """A byte-level BPE tokenizer wrapped as GPT-2's (``<|endoftext|>``, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    end = "<|endoftext|>"
    return transformers.GPT2TokenizerFast(
        tokenizer_object=tok, bos_token=end, eos_token=end, unk_token=end
    )


def _folder(path, model, tokenizer, sentences, steps=8):
    """Train ``model`` a few steps on ``sentences`` (a model better than uniform), save both."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [tokenizer(s, truncation=True, max_length=MAX_LENGTH)["input_ids"] for s in sentences]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, sentences):
    tokenizer = _word_tokenizer(sentences)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    return _folder(tmp_path_factory.mktemp("llama"), model, tokenizer, sentences[:32])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, sentences):
    tokenizer = _bpe_tokenizer(sentences)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    return _folder(tmp_path_factory.mktemp("gpt2"), model, tokenizer, sentences[:32])


@pytest.fixture(scope="module")
def texts(tmp_path_factory, sentences):
    d = tmp_path_factory.mktemp("text")
    (d / "calib.txt").write_text("\n".join(sentences[:32]) + "\n")
    (d / "eval.txt").write_text("\n".join(sentences[32:]) + "\n")
    return d


LLAMA_RECIPE = f"""
[data]
batch_size = 8
max_length = {MAX_LENGTH}
[factorize]
"model.layers.*.mlp.gate_proj" = {{format = "lowrank", rank = 4}}
[quantize.weights]
"model.layers.*" = {{bits = 4, granularity = "channel"}}
"lm_head" = {{bits = 8, granularity = "channel"}}
[finetune]
max_steps = 2
lr = 1e-3
"""

GPT2_RECIPE = f"""
[data]
batch_size = 8
max_length = {MAX_LENGTH}
[factorize]
"transformer.h.*.mlp.c_fc" = {{format = "lowrank", rank = 4}}
[quantize.weights]
"transformer.h.*" = {{bits = 4, granularity = "channel"}}
"transformer.wpe" = {{bits = 4, granularity = "channel", axis = 0}}
[finetune]
max_steps = 2
lr = 1e-3
"""


def _independent(model, tokenizer, sentences):
    """Summed next-token NLL, predicted-token count and argmax rows: one sentence at a time."""
    nll, count, tops = 0.0, 0, []
    with torch.no_grad():
        for s in sentences:
            ids = tokenizer(s, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")[
                "input_ids"
            ]
            logits = model(input_ids=ids).logits[0]
            nll += F.cross_entropy(logits[:-1].double(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
            tops.append(logits[:-1].argmax(-1))
    return nll, count, torch.cat(tops)


def _check_against_saved(folder, out, sentences, arch):
    """The report's perplexities and top-1 agreement, recomputed from the saved model."""
    report = json.loads((out / "report.json").read_text())
    cmp = report["compare"]
    assert cmp["metric"] == "perplexity"
    config = transformers.AutoConfig.from_pretrained(folder)
    base = getattr(transformers, arch)._from_config(config)
    student = load(out, model=base).eval()
    assert hasattr(student, "lm_head")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    original = getattr(transformers, arch).from_pretrained(folder).eval()
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, config.vocab_size)  # the LM head: next-token logits
    nll0, n, top0 = _independent(original, tokenizer, sentences)
    nll1, n1, top1 = _independent(student, tokenizer, sentences)
    assert n == n1 == cmp["tokens"] and cmp["samples"] == len(sentences)
    ppl0, ppl1 = math.exp(nll0 / n), math.exp(nll1 / n)
    assert cmp["rows"][0]["perplexity"] == pytest.approx(ppl0, rel=PPL_RTOL)
    assert cmp["rows"][1]["perplexity"] == pytest.approx(ppl1, rel=PPL_RTOL)
    assert cmp["perplexity_ratio"] == pytest.approx(ppl1 / ppl0, rel=2 * PPL_RTOL)
    assert cmp["top1_agreement"] == pytest.approx((top0 == top1).double().mean().item(), abs=1 / n)
    assert 1 < ppl0 < config.vocab_size / 2  # trained: far better than uniform
    assert 0 < cmp["top1_agreement"] <= 1
    # the CLI's own base rebuild (export) is the causal LM too, and takes the saved tensors
    base = rebuild_base(json.loads((out / "source.json").read_text()), out)
    assert type(base).__name__ == arch
    return report


def test_llama_compress_subprocess_keeps_the_lm_head(llama_dir, texts, tmp_path, sentences):
    (tmp_path / "r.toml").write_text(LLAMA_RECIPE)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "tnquant", "compress", str(llama_dir), "--recipe"]
    cmd += [str(tmp_path / "r.toml"), "--calib", str(texts / "calib.txt")]
    cmd += ["--eval", str(texts / "eval.txt"), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finetune.loss = 'kl'" in proc.stdout  # next-token distributions distilled
    assert "perplexity ratio (compressed / original)" in proc.stdout
    assert "top-1 next-token agreement" in proc.stdout
    report = _check_against_saved(llama_dir, out, sentences[32:], "LlamaForCausalLM")
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["model.layers.0.mlp.gate_proj"]["format"] == "LowRank"
    assert rows["lm_head"]["bits"] == "8"
    assert report["totals"]["model_compression"] > 1


def test_gpt2_compress_pads_with_eos_and_keeps_the_lm_head(
    gpt2_dir, texts, tmp_path, sentences, capsys
):
    (tmp_path / "r.toml").write_text(GPT2_RECIPE)
    out = tmp_path / "out"
    args = ["compress", str(gpt2_dir), "--recipe", str(tmp_path / "r.toml")]
    args += ["--calib", str(texts / "calib.txt"), "--eval", str(texts / "eval.txt")]
    code = main([*args, "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no pad token: batches are padded with its eos token '<|endoftext|>'" in captured.out
    report = _check_against_saved(gpt2_dir, out, sentences[32:], "GPT2LMHeadModel")
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["transformer.h.0.mlp.c_fc"]["format"] == "LowRank"  # a Conv1D, factorized
    assert rows["transformer.h.1.attn.c_attn"]["bits"] == "4"
    assert main(["report", str(out)]) == 0
    assert "perplexity ratio" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config, why",
    [
        (
            lambda: transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2),
            "encoder-decoder",
        ),
        (
            lambda: transformers.ViTConfig(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=8,
                patch_size=4,
            ),
            "vision",
        ),
    ],
)
def test_t5_and_vit_folders_are_refused_at_once(config, why, texts, tmp_path, capsys):
    folder = tmp_path / "hf"
    config().save_pretrained(folder)  # a config only: loading any weights would fail otherwise
    (tmp_path / "r.toml").write_text(LLAMA_RECIPE)
    t0 = time.perf_counter()
    code = main(
        [
            "compress",
            str(folder),
            "--recipe",
            str(tmp_path / "r.toml"),
            "--calib",
            str(texts / "calib.txt"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tnquant: error:")
    assert why in err and "causal language models" in err and "text encoders" in err
    assert not (tmp_path / "out").exists() and seconds < 5
