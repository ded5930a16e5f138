"""Checks of a model every verb makes before any work starts (one helper, shared).

:func:`check_model` refuses, with a ``ValueError`` that names the tensor:

- a model with a parameter or buffer on the ``meta`` device (a shape without
  values, e.g. built under ``torch.device('meta')`` or by
  ``accelerate.init_empty_weights``), for the verbs that need values
  (``factorize``, ``calibrate``, ``convert``, ``search``); ``quantize``,
  ``model_size_bits`` and ``size_report`` need only shapes and work on it;
- with ``finite=True``, a floating parameter holding NaN or inf (buffers may
  hold ``-inf`` on purpose, e.g. attention masks, and are not checked).

:func:`count_non_finite` is the count both use, and the data checks of
:mod:`tnquant.batches` too.

Examples
--------
>>> import torch
>>> from torch import nn
>>> check_model(nn.Linear(2, 2), "factorize")
>>> with torch.device("meta"):
...     model = nn.Sequential(nn.Linear(2, 2))
>>> check_model(model, "factorize")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: factorize needs the model's values, but parameter '0.weight' is on the meta device...
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["check_model", "count_non_finite"]


def count_non_finite(t: Tensor) -> int:
    """How many entries of ``t`` are NaN or +-inf (0 for integer and bool tensors).

    Examples
    --------
    >>> import torch
    >>> count_non_finite(torch.tensor([1.0, float("nan"), float("-inf")]))
    2
    >>> count_non_finite(torch.tensor([1, 2]))
    0
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0
    with torch.no_grad():
        finite = torch.isfinite(t)
        if bool(finite.all()):
            return 0
        return int(finite.numel() - int(finite.sum()))


def check_model(model: nn.Module, what: str, *, finite: bool = False) -> None:
    """Raise ``ValueError`` when ``model`` cannot give ``what`` the values it needs.

    Parameters
    ----------
    model
        The model a verb is about to use.
    what
        The verb, for the message (``'factorize'``, ``'search'``, ...).
    finite
        Also refuse a floating parameter holding NaN or inf.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        Naming the first parameter or buffer on the meta device (and how to
        materialize the model), or with ``finite=True`` the first parameter
        holding non-finite values and how many.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(3, 2)
    >>> with torch.no_grad():
    ...     layer.weight[0, :2] = float("nan")
    >>> check_model(layer, "search")
    >>> check_model(layer, "search", finite=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: search: parameter 'weight' holds 2 non-finite values (NaN or inf) of 6; ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta:
                raise ValueError(
                    f"{what} needs the model's values, but {kind} {name!r} is on the meta device "
                    f"(a shape without data); materialize the model first: "
                    f"model.to_empty(device='cpu') (or 'cuda'), then load its weights with "
                    f"model.load_state_dict(state_dict)"
                )
    if not finite:
        return
    for name, p in model.named_parameters():
        bad = count_non_finite(p)
        if bad:
            raise ValueError(
                f"{what}: parameter {name!r} holds {bad} non-finite "
                f"value{'s' if bad > 1 else ''} (NaN or inf) of {p.numel()}; the "
                f"model's weights must be finite"
            )
