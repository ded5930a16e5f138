"""Causal language models in ``tnquant compress``: padding, distillation, next-token metrics.

A causal LM (``'causal-lm'`` of :func:`tnquant.cli.hf_task.hf_task`: GPT-2,
Llama, ...) keeps its LM head; its output is the next-token logits
``(batch, tokens, vocab)``.

- :func:`lm_tokenizer`: batches are padded on the right; a tokenizer without
  a pad token (GPT-2's, Llama's) pads with its end-of-sequence token, as is
  conventional; the attention mask keeps padding out of every measurement.
- :func:`lm_recipe`: a ``[finetune]`` table that names no ``loss`` distils the
  next-token distributions (``loss = "kl"`` on the logits, softened by
  ``temperature``).
- :func:`next_token_targets`: the logits and targets of every predicted
  token (logits shifted by one against the tokens; a position counts when it
  and the token it predicts are both real tokens of the attention mask).
- :func:`compare_lm`: perplexity of the original and the compressed model on
  held-out text, their ratio, and how often the compressed model's top-1
  next token is the original's.

Examples
--------
>>> import torch
>>> logits = torch.zeros(1, 3, 5)
>>> x, y = next_token_targets(logits, torch.tensor([[4, 2, 0]]), torch.tensor([[1, 1, 0]]))
>>> x.shape, y.tolist()
(torch.Size([1, 5]), [2])
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.batches import call_model, move_batch
from tnquant.cli.checks import UsageError
from tnquant.cli.recipe import Recipe
from tnquant.core import evaluating, model_output
from tnquant.quantization import model_size_bits

__all__ = ["lm_tokenizer", "lm_recipe", "next_token_targets", "compare_lm", "format_lm"]

#: The inputs a causal LM batch keeps (``token_type_ids`` would shift GPT-2's embeddings).
LM_INPUTS = ("input_ids", "attention_mask")


def lm_tokenizer(tokenizer: Any) -> str | None:
    """Make ``tokenizer`` pad on the right, with its eos token when it has no pad token.

    Returns
    -------
    str or None
        A note saying that padding uses the eos token, or ``None`` when the
        tokenizer has its own pad token.

    Raises
    ------
    tnquant.cli.checks.UsageError
        The tokenizer has neither a pad nor an eos token.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> t = SimpleNamespace(pad_token=None, eos_token="</s>", padding_side="left")
    >>> lm_tokenizer(t)
    "the tokenizer has no pad token: batches are padded with its eos token '</s>' ..."
    >>> t.pad_token, t.padding_side
    ('</s>', 'right')
    """
    tokenizer.padding_side = "right"
    if getattr(tokenizer, "pad_token", None) is not None:
        return None
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise UsageError(
            "the model's tokenizer has neither a pad token nor an eos token to pad "
            "batches of sentences with; add one to tokenizer_config.json"
        )
    tokenizer.pad_token = eos
    return (
        f"the tokenizer has no pad token: batches are padded with its eos token {eos!r} "
        "(as is conventional), and the attention mask keeps padding out of the metrics"
    )


def _finetune_table(text: str) -> dict[str, Any]:
    """The ``[finetune]`` table as the recipe file wrote it (which keys it names)."""
    if not text:
        return {}
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10: tomli, a dependency there
        import tomli as tomllib  # type: ignore[no-redef]
    table = tomllib.loads(text).get("finetune", {})
    return table if isinstance(table, dict) else {}


def lm_recipe(recipe: Recipe) -> tuple[Recipe, str | None]:
    """``recipe`` with ``finetune.loss = 'kl'`` when its ``[finetune]`` table names no loss.

    A causal LM is distilled on its next-token distributions; a loss the
    recipe names is kept as it is.

    Returns
    -------
    recipe, note
        The recipe to run and a note saying what was chosen (``None``: nothing
        changed).

    Examples
    --------
    >>> from tnquant.cli.recipe import parse_recipe
    >>> r, note = lm_recipe(parse_recipe('[quantize.weights]\\n"*" = {bits = 8}\\n[finetune]'))
    >>> r.finetune.loss, note
    ('kl', "causal LM: distilling next-token distributions (finetune.loss = 'kl', ...")
    """
    ft = recipe.finetune
    if ft is None or not ft.distill:
        return recipe, None
    if "loss" in _finetune_table(recipe.text):
        return recipe, None
    ft = dataclasses.replace(ft, loss="kl")
    note = (
        "causal LM: distilling next-token distributions (finetune.loss = 'kl', "
        f"temperature {ft.temperature:g}; set finetune.loss to choose another)"
    )
    return dataclasses.replace(recipe, finetune=ft), note


def next_token_targets(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """``(logits, targets)`` of every predicted token: ``(n, vocab)`` and ``(n,)``.

    The logits at position ``t`` predict token ``t + 1``; the pair counts when
    both positions are real tokens (``attention_mask`` 1), so padding on
    either side is left out.

    Examples
    --------
    >>> import torch
    >>> x, y = next_token_targets(
    ...     torch.randn(2, 3, 7), torch.tensor([[1, 2, 3], [0, 5, 6]]),
    ...     torch.tensor([[1, 1, 1], [0, 1, 1]]))
    >>> x.shape, y.tolist()
    (torch.Size([3, 7]), [2, 3, 6])
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits must be (batch, tokens, vocab) with input_ids (batch, tokens), got "
            f"{tuple(logits.shape)} and {tuple(input_ids.shape)}"
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(torch.bool)
    valid = (mask[:, 1:] & mask[:, :-1]).to(logits.device)
    return logits[:, :-1][valid], input_ids[:, 1:].to(logits.device)[valid]


def _device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


def compare_lm(
    original: nn.Module, student: nn.Module, batches: list[Any], progress: bool = False
) -> dict[str, Any]:
    """The before/after table of a causal LM on held-out text.

    Parameters
    ----------
    original, student
        The original and the compressed model (their output: logits).
    batches
        Dicts with ``input_ids`` and ``attention_mask``.
    progress
        A progress bar.

    Returns
    -------
    dict
        ``metric`` (``'perplexity'``), ``samples`` (sentences), ``tokens``
        (predicted tokens), ``perplexity_ratio`` (compressed / original),
        ``top1_agreement`` (fraction of predicted tokens where both models'
        most likely next token is the same) and ``rows`` (per model:
        ``size_bits``, ``perplexity``, ``top1_agreement``, ``eval_s``).
        Perplexity is ``exp`` of the mean cross-entropy over all predicted
        tokens of all batches.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class Uniform(nn.Module):
    ...     def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(8))
    ...     def forward(self, input_ids, attention_mask):
    ...         return self.w.expand(*input_ids.shape, 8)
    >>> b = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)}
    >>> round(compare_lm(Uniform(), Uniform(), [b])["rows"][0]["perplexity"], 6)
    8.0
    """
    nll, seconds, agree, tokens, samples = [0.0, 0.0], [0.0, 0.0], 0, 0, 0
    models = (original, student)
    with evaluating(original), evaluating(student):
        for batch in tqdm(batches, desc="eval original, compressed", disable=not progress):
            if not isinstance(batch, dict) or any(k not in batch for k in LM_INPUTS):
                raise TypeError(f"a causal LM batch must be a dict with {list(LM_INPUTS)}")
            top = []
            for i, model in enumerate(models):
                t0 = time.perf_counter()
                logits = model_output(call_model(model, move_batch(batch, _device(model))))
                seconds[i] += time.perf_counter() - t0
                x, y = next_token_targets(logits, batch["input_ids"], batch["attention_mask"])
                nll[i] += F.cross_entropy(x.float(), y, reduction="sum").item()
                top.append(x.argmax(-1).cpu())
            agree += int((top[0] == top[1]).sum())
            tokens, samples = tokens + len(top[0]), samples + len(batch["input_ids"])
    if tokens == 0:
        raise UsageError(
            "the evaluation text has no sentence of two tokens or more: no next token to predict"
        )
    ppl = [math.exp(n / tokens) for n in nll]
    names, agreement = ("original", "compressed"), (1.0, agree / tokens)
    rows = [
        {
            "model": name,
            "size_bits": model_size_bits(model),
            "perplexity": p,
            "top1_agreement": a,
            "eval_s": s,
        }
        for name, model, p, a, s in zip(names, models, ppl, agreement, seconds, strict=True)
    ]
    return {
        "metric": "perplexity",
        "samples": samples,
        "tokens": tokens,
        "perplexity_ratio": ppl[1] / ppl[0],
        "top1_agreement": agree / tokens,
        "rows": rows,
    }


def _number(value: Any) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:.4g}" if ok else "-"


def format_lm(cmp: dict[str, Any], eval_data: Any) -> list[str]:
    """The heading and the closing line of a causal LM's before/after table (``report``).

    Examples
    --------
    >>> format_lm({"samples": 2, "tokens": 9, "perplexity_ratio": 1.5, "top1_agreement": 0.5},
    ...           "corpus")[1]
    'perplexity ratio (compressed / original) 1.5, top-1 next-token agreement 0.5'
    """
    head = (
        f"before/after on {cmp['samples']} sentences ({_number(cmp.get('tokens'))} predicted "
        f"tokens) of {eval_data!r} (perplexity on held-out text; top1_agreement: the "
        "compressed model's most likely next token is the original's)"
    )
    tail = (
        f"perplexity ratio (compressed / original) {_number(cmp.get('perplexity_ratio'))}, "
        f"top-1 next-token agreement {_number(cmp.get('top1_agreement'))}"
    )
    return [head, tail]
