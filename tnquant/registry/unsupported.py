"""Why tnquant leaves a module float: the layer kinds it knows it cannot handle, and the rule.

The verbs (``factorize``, ``quantize``) ask :func:`unsupported` about every
module they meet that has no registry entry, and list the answer as a
``skipped`` row of their report, so that no weight stays float silently:

- a class of :data:`UNSUPPORTED` (``Conv3d``, the transposed convolutions,
  the recurrent layers, ``MultiheadAttention``) gets its written reason;
- a subclass of a registered dense class (``nn.MultiheadAttention``'s
  ``out_proj``, say) is another kind: it may use its weight outside
  ``forward``;
- any other module holding a weight of its own (a parameter whose name has
  ``weight`` in it, of two or more dimensions) gets
  ``'no registry entry for <Class>'``.

One-dimensional weights (the scales of ``LayerNorm``, ``BatchNorm``,
``RMSNorm``) are left float on purpose and not reported, and so are
containers (their children are asked in turn).

Examples
--------
>>> from torch import nn
>>> unsupported(nn.Conv3d(2, 2, 3))
'Conv3d is not supported: tnquant has no 3-D kernel decomposition or quantized Conv3d'
>>> unsupported(nn.Linear(2, 2)) is None, unsupported(nn.LayerNorm(4)) is None
(True, True)
"""

from __future__ import annotations

from torch import nn

from tnquant.registry.table import kinds, lookup

__all__ = ["UNSUPPORTED", "unsupported", "holds_weight"]

_TRANSPOSED = (
    "{name} is not supported: a transposed convolution's weight is (in, out/groups, *k), "
    "which neither the Conv decompositions nor the quantized Conv layers read"
)
_RECURRENT = (
    "{name} is not supported: its weights (weight_ih_l*, weight_hh_l*) are read "
    "by the fused recurrent kernel, not through a layer tnquant can replace"
)

#: class -> why tnquant cannot factorize or quantize it (``{name}`` is the class name)
UNSUPPORTED: dict[type[nn.Module], str] = {
    nn.Conv3d: (
        "{name} is not supported: tnquant has no 3-D kernel decomposition or quantized {name}"
    ),
    nn.ConvTranspose1d: _TRANSPOSED,
    nn.ConvTranspose2d: _TRANSPOSED,
    nn.ConvTranspose3d: _TRANSPOSED,
    nn.LSTM: _RECURRENT,
    nn.GRU: _RECURRENT,
    nn.RNN: _RECURRENT,
    nn.LSTMCell: _RECURRENT,
    nn.GRUCell: _RECURRENT,
    nn.RNNCell: _RECURRENT,
    nn.MultiheadAttention: (
        "{name} is not supported: F.multi_head_attention_forward reads its packed "
        "in_proj_weight (and out_proj.weight) directly"
    ),
}


def holds_weight(module: nn.Module) -> bool:
    """Whether ``module`` itself (not a child) holds a weight of two or more dimensions.

    A weight is a parameter whose name contains ``'weight'`` (``weight``,
    ``in_proj_weight``, ``weight_ih_l0``, ...).

    Examples
    --------
    >>> from torch import nn
    >>> holds_weight(nn.GRU(2, 3)), holds_weight(nn.LayerNorm(3)), holds_weight(nn.Sequential())
    (True, False, False)
    """
    return any(
        p is not None and "weight" in name and p.ndim >= 2 for name, p in module._parameters.items()
    )


def _dense_base(cls: type) -> type | None:
    """The registered dense class ``cls`` derives from (``None``: none)."""
    for kind in kinds():
        if kind.role == "dense" and issubclass(cls, kind.cls):
            return kind.cls
    return None


def unsupported(module: nn.Module) -> str | None:
    """Why tnquant leaves ``module`` float, or ``None`` (it has an entry, or holds no weight).

    See the module docs for the rules. A module with a registry entry gets
    ``None`` even when a verb refuses it for another reason (a grouped
    convolution is quantized but not factorized: :func:`tnquant.registry.refusal`).

    Parameters
    ----------
    module
        Any module.

    Returns
    -------
    str or None
        The reason, for a ``skipped`` row.

    Examples
    --------
    >>> from torch import nn
    >>> unsupported(nn.LSTM(4, 8))  # doctest: +ELLIPSIS
    'LSTM is not supported: its weights (weight_ih_l*, weight_hh_l*) are read by the fused ...'
    >>> unsupported(nn.MultiheadAttention(8, 2).out_proj)  # doctest: +ELLIPSIS
    'NonDynamicallyQuantizableLinear is a subclass of Linear, not a Linear: ...'
    >>> import torch
    >>> class Gate(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.eye(2))
    >>> unsupported(Gate())
    'no registry entry for Gate'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if lookup(module) is not None:
        return None
    cls = type(module)
    name = cls.__name__
    reason = UNSUPPORTED.get(cls)
    if reason is not None:
        return reason.format(name=name)
    if not holds_weight(module):
        return None
    base = _dense_base(cls)
    if base is not None:
        return (
            f"{name} is a subclass of {base.__name__}, not a {base.__name__}: its weight "
            f"may be used outside forward (nn.MultiheadAttention reads out_proj.weight "
            f"directly), so only the exact class is replaced"
        )
    return f"no registry entry for {name}"
