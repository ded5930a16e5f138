"""``save_pretrained`` / ``load_pretrained``: a compressed Hugging Face model as one folder.

:func:`save_pretrained` writes :func:`tnquant.save`'s two files
(``model.json``, ``tensors.safetensors``) plus ``config.json`` (with
``architectures``, a ``quantization_config`` of ``quant_method="tnquant"``
and ``transformers_weights = "tensors.safetensors"``), the generation config
and the tokenizer's files. Such a folder loads back:

- with :func:`tnquant.load` (``load(folder)``, no ``model=``): the base is
  rebuilt from ``config.json`` by :func:`tnquant.io.hf_base.build_hf_base`
  (no code of the folder runs; the class must be one of transformers' own);
- with :func:`load_pretrained`, which also loads the tokenizer;
- with transformers' ``AutoModel*.from_pretrained(folder)`` once
  :func:`tnquant.hf.register` was called (:mod:`tnquant.hf.quantizer`).

Examples
--------
>>> import tempfile, torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> from tnquant import QuantSpec, convert, quantize
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0)
>>> model = GPT2LMHeadModel(config).eval()
>>> _ = quantize(model, weights=QuantSpec(bits=4), progress=False)
>>> _ = convert(model, progress=False)
>>> with tempfile.TemporaryDirectory() as d:
...     _ = save_pretrained(model, d)
...     loaded, tokenizer = load_pretrained(d)
>>> x = torch.tensor([[1, 2, 3]])
>>> torch.equal(loaded(x).logits, model(x).logits), tokenizer
(True, None)
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from tnquant.io import FORMAT, TENSORS_FILE, VERSION, load, save
from tnquant.io.hf_base import check_hf_dir, hf_model_class

__all__ = ["QUANT_METHOD", "save_pretrained", "load_pretrained", "quantization_config_dict"]

QUANT_METHOD = "tnquant"
"""The ``quant_method`` of the ``quantization_config`` tnquant writes to ``config.json``."""


def quantization_config_dict() -> dict[str, Any]:
    """The ``quantization_config`` entry of a ``config.json`` tnquant writes.

    Examples
    --------
    >>> quantization_config_dict()
    {'quant_method': 'tnquant', 'format': 'tnquant', 'version': 1}
    """
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "version": VERSION}


def save_pretrained(
    model: nn.Module, folder: str | os.PathLike[str], tokenizer: Any | None = None
) -> Path:
    """Write a (compressed) transformers model, its config and tokenizer to ``folder``.

    Parameters
    ----------
    model
        A ``transformers.PreTrainedModel`` of one of transformers' own
        classes, factorized/quantized/converted by tnquant (or not).
    folder
        The folder to write (created if needed).
    tokenizer
        A tokenizer with ``save_pretrained``, or ``None``.

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    TypeError
        ``model`` is not a transformers model, or ``tokenizer`` has no
        ``save_pretrained``.
    ValueError
        The model's class is not one transformers' auto mappings list for
        its config (it could not be rebuilt from the folder).

    Examples
    --------
    >>> import os, tempfile
    >>> from transformers import BertConfig, BertModel
    >>> m = BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
    ...               num_attention_heads=2, intermediate_size=8))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     sorted(os.listdir(save_pretrained(m, d)))
    ['config.json', 'model.json', 'tensors.safetensors']
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"model must be a transformers PreTrainedModel, got {type(model).__name__}; "
            "for any other nn.Module use tnquant.save(model, path)"
        )
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(
            "tokenizer must have a save_pretrained method or be None, got "
            f"{type(tokenizer).__name__}"
        )
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if hf_model_class(config) is not type(model):
        raise ValueError(
            f"model is a {type(model).__name__}, which transformers' auto mappings do not "
            f"build from a {type(config).__name__}"
        )
    config.quantization_config = quantization_config_dict()
    folder = Path(folder)
    save(model, folder)
    config.save_pretrained(str(folder))
    # config.save_pretrained drops transformers_weights (it names the weight file to load)
    path = folder / "config.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    written["transformers_weights"] = TENSORS_FILE
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def load_pretrained(folder: str | os.PathLike[str]) -> tuple[nn.Module, Any | None]:
    """The model and tokenizer :func:`save_pretrained` wrote (the folder is untrusted).

    The model comes from :func:`tnquant.load` (its base rebuilt from
    ``config.json``; see :mod:`tnquant.io`), the tokenizer from
    ``AutoTokenizer`` (``trust_remote_code=False``; a ``tokenizer_config.json``
    with ``auto_map`` is refused first) when the folder has one.

    Parameters
    ----------
    folder
        A folder :func:`save_pretrained` wrote.

    Returns
    -------
    tuple
        ``(model, tokenizer or None)``.

    Examples
    --------
    >>> load_pretrained("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: /nonexistent is a directory without config.json: ...
    """
    folder = Path(folder)
    check_hf_dir(folder)
    model = load(folder)
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    return model, tokenizer
