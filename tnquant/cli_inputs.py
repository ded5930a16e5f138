"""What ``tnquant compress`` reads: the MODEL and DATA arguments of :mod:`tnquant.cli`.

MODEL: ``minilm`` (the packaged MiniLM-L6, :func:`tnquant.datasets.load_minilm`),
``digits-cnn`` (:func:`digits_cnn` trained on scikit-learn's digits in a few
seconds), a Hugging Face model directory (loaded offline, wrapped in
:class:`~tnquant.datasets.MeanPooledEncoder`) or a state-dict checkpoint
(``.pt``/``.pth``/``.bin``/``.safetensors``) of the recipe's ``[model] class``.

DATA: ``corpus`` (:func:`tnquant.datasets.split_corpus`), ``digits`` (images
and labels), a text file (one sentence a line) or a ``.npy``/``.pt`` tensor
(a ``.pt`` may hold an ``(inputs, targets)`` pair or a dict with ``'inputs'``
and ``'targets'``).

Examples
--------
>>> digits_cnn()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tnquant.recipe import Recipe

__all__ = ["UsageError", "digits_cnn", "build_model", "load_data", "CHECKPOINTS"]

CHECKPOINTS = (".pt", ".pth", ".bin", ".safetensors")


class UsageError(Exception):
    """A bad argument, path or recipe: the CLI exits with code 2 and one line on stderr."""


def digits_cnn() -> nn.Module:
    """The untrained digits CNN: ``features`` (two 3x3 convs, max-pool) and ``classifier``.

    ``classifier`` is ``Linear(512, 64), ReLU, Linear(64, 10)``: a chain the
    fixed-point export takes.

    Examples
    --------
    >>> digits_cnn()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten())
    classifier = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


def _train_digits(epochs: int, seed: int, progress: bool) -> nn.Module:
    from tqdm.auto import tqdm

    from tnquant.datasets import digits

    torch.manual_seed(seed)
    model, (x, y, _, _) = digits_cnn(), digits(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="train digits-cnn", disable=not progress):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[perm[i:i + 64]]), y[perm[i:i + 64]]).backward()
            opt.step()
    return model.eval()


def _hf_model(path: Path, pretrained: bool) -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from tnquant.datasets import MeanPooledEncoder

    if pretrained:
        encoder = AutoModel.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        encoder, tokenizer = AutoModel.from_config(AutoConfig.from_pretrained(str(path))), None
    return MeanPooledEncoder(encoder.eval()).eval(), tokenizer


def _checkpoint_model(path: Path, recipe: Recipe, pretrained: bool) -> nn.Module:
    if recipe.model.cls is None:
        raise UsageError(f"{path} is a state-dict checkpoint: the recipe needs [model] class = "
                         "\"pkg.module:Class\"")
    module_name, _, attr = recipe.model.cls.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"recipe key 'model.class': cannot import {recipe.model.cls!r}: {e}"
                         ) from None
    model = obj(**dict(recipe.model.kwargs))
    if pretrained:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict")
        model.load_state_dict(state)
    return model.eval()


def build_model(spec: str, recipe: Recipe, *, pretrained: bool = True, seed: int = 0,
                progress: bool = False) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build the model MODEL names: ``(model, tokenizer or None, source)``.

    ``source`` is JSON-safe and rebuilds the architecture with
    ``build_model(source['model'], recipe, pretrained=False)`` (as ``report``
    and ``export`` do before :func:`tnquant.load`).

    Examples
    --------
    >>> from tnquant.recipe import parse_recipe
    >>> r = parse_recipe('[quantize.weights]\\n"*" = {bits = 8}')
    >>> model, tokenizer, source = build_model("digits-cnn", r, pretrained=False)
    >>> source, tokenizer
    ({'model': 'digits-cnn', 'kind': 'digits-cnn', 'text': False}, None)
    """
    if spec == "minilm":
        from tnquant.datasets import load_minilm, minilm_path

        if pretrained:
            model, tokenizer = load_minilm()
        else:
            model, tokenizer = _hf_model(minilm_path(), pretrained=False)
        return model, tokenizer, {"model": "minilm", "kind": "minilm", "text": True}
    if spec == "digits-cnn":
        model = (_train_digits(recipe.model.train_epochs, seed, progress) if pretrained
                 else digits_cnn().eval())
        return model, None, {"model": "digits-cnn", "kind": "digits-cnn", "text": False}
    path = Path(spec).resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{spec} is a directory without config.json: not a Hugging Face "
                             "model directory")
        model, tokenizer = _hf_model(path, pretrained)
        return model, tokenizer, {"model": str(path), "kind": "hf", "text": True}
    if path.is_file() and path.suffix in CHECKPOINTS:
        model = _checkpoint_model(path, recipe, pretrained)
        return model, None, {"model": str(path), "kind": "checkpoint", "text": False}
    raise UsageError(f"MODEL {spec!r} is not 'minilm', 'digits-cnn', a Hugging Face model "
                     f"directory or a checkpoint file ({', '.join(CHECKPOINTS)})")


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def _tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)), None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "inputs" in obj:
        obj = (obj["inputs"], obj.get("targets"))
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], torch.Tensor):
        return obj[0], obj[1]
    raise UsageError(f"{path} must hold a tensor, an (inputs, targets) pair or a dict with "
                     f"'inputs' (and 'targets'), got {type(obj).__name__}")


def load_data(arg: str, role: str, recipe: Recipe, tokenizer: Any = None,
              seed: int = 0) -> tuple[list[Any], list[torch.Tensor] | None]:
    """Batches (and label batches, or ``None``) from a DATA argument.

    ``role`` is ``'calib'`` or ``'eval'``: the ``corpus`` and ``digits``
    shortcuts give their training or held-out split.

    Examples
    --------
    >>> from tnquant.recipe import parse_recipe
    >>> r = parse_recipe('[data]\\nbatch_size = 4\\n[quantize.weights]\\n"*" = {bits = 8}')
    >>> batches, labels = load_data("digits", "eval", r)  # doctest: +SKIP
    >>> batches[0].shape, labels[0].shape  # doctest: +SKIP
    (torch.Size([4, 1, 8, 8]), torch.Size([4]))
    """
    size, text = recipe.data.batch_size, None
    labels: torch.Tensor | None = None
    if arg == "corpus":
        from tnquant.datasets import split_corpus

        train, test = split_corpus(recipe.data.num_sentences, recipe.data.num_eval, seed=seed)
        text = train if role == "calib" else test
    elif arg == "digits":
        from tnquant.datasets import digits

        x_tr, y_tr, x_te, y_te = digits(seed=0)
        x, labels = (x_tr, y_tr) if role == "calib" else (x_te, y_te)
    else:
        path = Path(arg)
        if not path.is_file():
            raise UsageError(f"data file {arg!r} not found (or use 'corpus' or 'digits')")
        if path.suffix in (".npy", ".pt", ".pth"):
            x, labels = _tensor_file(path)
        else:
            text = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if text is not None:
        if tokenizer is None:
            raise UsageError(f"{arg!r} is text data; the model takes tensors (.npy/.pt)")
        if not text:
            raise UsageError(f"{arg!r} holds no sentences")
        return [dict(tokenizer(text[i:i + size], return_tensors="pt", padding=True,
                               truncation=True, max_length=recipe.data.max_length))
                for i in range(0, len(text), size)], None
    if tokenizer is not None:
        raise UsageError(f"{arg!r} holds tensors; a text model needs a text file or 'corpus'")
    x = x.float() if x.is_floating_point() else x
    return _chunks(x, size), None if labels is None else _chunks(labels, size)


