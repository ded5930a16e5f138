"""The real data and model that ship inside installed packages."""

import os

import pytest
import torch

from tnquant.cli.datasets import digits, load_minilm, minilm_path, sentence_corpus, split_corpus


def test_corpus_is_deterministic_and_english():
    a = sentence_corpus(100, seed=3)
    assert a == sentence_corpus(100, seed=3)
    assert a != sentence_corpus(100, seed=4)
    assert len(set(a)) == 100
    assert all(s[0].isupper() and s.endswith((".", "!", "?")) for s in a)


def test_splits_are_disjoint():
    train, test = split_corpus(300, 200, seed=0)
    assert len(train) == 300 and len(test) == 200
    assert not set(train) & set(test)


def test_corpus_size_error():
    with pytest.raises(ValueError, match="asked for"):
        sentence_corpus(10**7)


def test_digits_split():
    x_train, y_train, x_test, y_test = digits()
    assert x_train.shape[1:] == (1, 8, 8) and x_train.dtype == torch.float32
    assert 0 <= float(x_train.min()) and float(x_train.max()) <= 1
    assert len(x_train) + len(x_test) == 1797
    assert set(y_test.tolist()) == set(range(10))


def test_minilm_loads_offline_and_embeds():
    os.environ["HF_HUB_OFFLINE"] = "1"
    assert (minilm_path() / "model.safetensors").exists()
    model, tokenizer = load_minilm()
    batch = tokenizer(["A small test sentence.", "Another one."], return_tensors="pt", padding=True)
    with torch.no_grad():
        emb = model(**batch)
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 37
