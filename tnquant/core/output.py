"""The one rule for "the model's output": the tensor every loss and metric reads.

A tensor is itself; a tuple or list gives its first tensor; a mapping or an
object (a Hugging Face ``ModelOutput``) gives ``logits``, else
``last_hidden_state``, else (a mapping) its first tensor value. ``finetune``,
the search's sensitivities, the CLI's before/after table and the pipeline all
call :func:`model_output`, so they measure the same tensor.

Examples
--------
>>> import torch
>>> model_output((torch.ones(1), torch.zeros(1))).item()
1.0
>>> model_output({"loss": torch.zeros(()), "logits": torch.ones(2)}).tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["model_output", "OUTPUT_KEYS"]

#: named outputs, in order of preference
OUTPUT_KEYS = ("logits", "last_hidden_state")


def model_output(out: Any) -> Tensor:
    """The tensor a model output stands for (see the module docs).

    Raises
    ------
    TypeError
        If no tensor can be found; pass your own ``outputs=`` callable then.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, Tensor):
                return item
    for key in OUTPUT_KEYS:
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, Mapping):
        for value in out.values():
            if isinstance(value, Tensor):
                return value
    raise TypeError(
        f"cannot find a tensor in the model output ({type(out).__name__}): "
        f"expected a tensor, a tuple/list of tensors, or an object with "
        f"{' or '.join(OUTPUT_KEYS)}; pass outputs= (a callable) for anything else"
    )
