"""DATA arguments of ``tnquant compress``, read into batches (and label batches).

DATA is ``corpus`` (:func:`tnquant.cli.datasets.split_corpus`), ``digits``
(images and labels), a text file (one sentence a line, tokenized by the
model's tokenizer) or a ``.npy``/``.pt`` tensor (a ``.pt`` may hold an
``(inputs, targets)`` pair or a dict with ``'inputs'`` and ``'targets'``;
loaded with ``weights_only=True``, a ``.npy`` never unpickled).
:func:`_data_kind` says what a DATA argument holds before it is read, for
:func:`tnquant.cli.inputs.check_compress`; :func:`load_data` reads it.

Examples
--------
>>> _data_kind("corpus", "--calib")
('text', False)
>>> [b.shape for b in _chunks(torch.zeros(5, 2), 2)]
[torch.Size([2, 2]), torch.Size([2, 2]), torch.Size([1, 2])]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tnquant.cli.causal import LM_INPUTS
from tnquant.cli.checks import UsageError
from tnquant.cli.recipe import Recipe

__all__ = ["load_data"]


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


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
    raise UsageError(
        f"{path} must hold a tensor, an (inputs, targets) pair or a dict with "
        f"'inputs' (and 'targets'), got {type(obj).__name__}"
    )


def _text_batches(
    text: list[str], tokenizer: Any, size: int, max_length: int, causal: bool
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of ``size`` sentences, padded to the longest of each batch.

    For a causal LM the sentences are ordered by token count first (so a
    batch holds little padding, which the distillation loss would otherwise
    see) and a batch keeps ``input_ids`` and ``attention_mask`` only.
    """
    if causal:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        text = [text[i] for i in sorted(range(len(text)), key=lambda i: (len(ids[i]), i))]
    batches = []
    for i in range(0, len(text), size):
        batch = dict(
            tokenizer(
                text[i : i + size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
        )
        batches.append({k: batch[k] for k in LM_INPUTS} if causal else batch)
    return batches


def load_data(
    arg: str,
    role: str,
    recipe: Recipe,
    tokenizer: Any = None,
    seed: int = 0,
    *,
    causal: bool = False,
) -> tuple[list[Any], list[torch.Tensor] | None]:
    """Batches (and label batches, or ``None``) from a DATA argument.

    ``role`` is ``'calib'`` or ``'eval'``: the ``corpus`` and ``digits``
    shortcuts give their training or held-out split. ``causal``: text for a
    causal LM (:func:`_text_batches`; the tokenizer pads on the right, see
    :func:`tnquant.cli.causal.lm_tokenizer`).

    Examples
    --------
    >>> from tnquant.cli.recipe import parse_recipe
    >>> r = parse_recipe('[data]\\nbatch_size = 4\\n[quantize.weights]\\n"*" = {bits = 8}')
    >>> batches, labels = load_data("digits", "eval", r)  # doctest: +SKIP
    >>> batches[0].shape, labels[0].shape  # doctest: +SKIP
    (torch.Size([4, 1, 8, 8]), torch.Size([4]))
    """
    size, text = recipe.data.batch_size, None
    labels: torch.Tensor | None = None
    if arg == "corpus":
        from tnquant.cli.datasets import split_corpus

        train, test = split_corpus(recipe.data.num_sentences, recipe.data.num_eval, seed=seed)
        text = train if role == "calib" else test
    elif arg == "digits":
        from tnquant.cli.datasets import digits

        x_tr, y_tr, x_te, y_te = digits(seed=0)
        x, labels = (x_tr, y_tr) if role == "calib" else (x_te, y_te)
    else:
        path = Path(arg)
        if not path.is_file():
            raise UsageError(f"data file {arg!r} not found (or use 'corpus' or 'digits')")
        if path.suffix in (".npy", ".pt", ".pth"):
            x, labels = _tensor_file(path)
        else:
            try:
                text = [s.strip() for s in path.read_text("utf-8").splitlines() if s.strip()]
            except UnicodeDecodeError as e:
                raise UsageError(f"data file {arg!r} is not UTF-8 text: {e}") from None
    if text is not None:
        if tokenizer is None:
            raise UsageError(f"{arg!r} is text data; the model takes tensors (.npy/.pt)")
        if not text:
            raise UsageError(f"{arg!r} holds no sentences")
        return _text_batches(text, tokenizer, size, recipe.data.max_length, causal), None
    if tokenizer is not None:
        raise UsageError(f"{arg!r} holds tensors; a text model needs a text file or 'corpus'")
    x = x.float() if x.is_floating_point() else x
    return _chunks(x, size), None if labels is None else _chunks(labels, size)


def _data_kind(arg: str, flag: str) -> tuple[str, bool | None]:
    """``('text' or 'tensor', labelled)`` of a DATA argument; ``None``: known once read."""
    if arg in ("corpus", "digits"):
        return ("text", False) if arg == "corpus" else ("tensor", True)
    path = Path(arg)
    if not path.is_file():
        raise UsageError(f"{flag} data file {arg!r} not found (or use 'corpus' or 'digits')")
    tensor = path.suffix in (".npy", ".pt", ".pth")
    return ("tensor", None if path.suffix != ".npy" else False) if tensor else ("text", False)
