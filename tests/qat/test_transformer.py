"""The defaults work on a pretrained transformer (MiniLM-L6) out of the box."""

from __future__ import annotations

import copy

import pytest
import torch

from tnquant import LowRank, QuantSpec, factorize
from tnquant.qat import finetune
from tnquant.quantization import quantize

pytest.importorskip("transformers")
datasets = pytest.importorskip("tnquant.cli.datasets")


@pytest.mark.slow
def test_default_finetune_distils_a_compressed_minilm():
    try:
        teacher, tokenizer = datasets.load_minilm(pooled=True)
    except (ImportError, OSError) as err:  # the hf extra is not installed
        pytest.skip(f"MiniLM not available: {err}")
    sentences = datasets.sentence_corpus(96, seed=0)

    def encode(chunk):
        return dict(
            tokenizer(chunk, padding=True, truncation=True, max_length=24, return_tensors="pt")
        )

    data = [encode(sentences[i : i + 8]) for i in range(0, 64, 8)]
    held_out = encode(sentences[64:])
    student = copy.deepcopy(teacher)
    factorize(student, {"*intermediate.dense": LowRank(ratio=0.25)}, progress=False)
    quantize(
        student, weights=QuantSpec(bits=4, learnable=True, granularity="channel"), progress=False
    )

    def similarity():
        with torch.no_grad():
            return (
                torch.nn.functional.cosine_similarity(student(**held_out), teacher(**held_out))
                .mean()
                .item()
            )

    before = similarity()
    report = finetune(student, data, teacher, progress=False)  # every default
    loss = report.history.loss
    assert len(loss) == 8 and sum(loss[-3:]) < sum(loss[:3])
    assert similarity() > before + 0.1
