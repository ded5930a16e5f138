"""Which parameters ``finetune`` trains, and the optimizer groups they form.

Every parameter of a model falls in exactly one set:

- ``'cores'``: the cores of every :class:`~tnquant.layers.FactorizedLayer`
  (``layer.cores``), and the weight of every quantized dense layer (a
  module with a ``weight_quantizer`` and a ``weight`` parameter, e.g.
  ``QuantLinear``, ``QuantConv2d``);
- ``'scales'``: the parameters inside :class:`~tnquant.quant.Quantizer`
  modules (LSQ scales and zero points, learnable binary ``alpha``, TTQ
  ``alpha_p``/``alpha_n``);
- ``'other'``: everything else (biases, LayerNorm, dense layers left
  unquantized, embeddings...).

``train='all'`` takes all three, ``'cores'``, ``'scales'`` and
``'cores+scales'`` what they name. Parameters the caller froze
(``requires_grad=False``) and parameters still empty (a learnable quantizer
that never ran) are never trained.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant.layers import LowRankLinear
>>> model = nn.Sequential(LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)]), nn.LayerNorm(4))
>>> {k: [n for n, _ in v] for k, v in parameter_sets(model).items()}
{'cores': ['0.cores.0', '0.cores.1'], 'scales': [], 'other': ['1.weight', '1.bias']}
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tnquant.layers.base import FactorizedLayer
from tnquant.quant.quantizer import Quantizer

__all__ = ["TRAIN_CHOICES", "parameter_sets", "select_parameters", "param_groups", "layer_rows"]

#: The values of ``finetune(train=...)`` and the sets each one takes.
TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "all": ("cores", "scales", "other"),
    "cores": ("cores",),
    "scales": ("scales",),
    "cores+scales": ("cores", "scales"),
}

Named = list[tuple[str, nn.Parameter]]


def _is_quantized_dense(module: nn.Module) -> bool:
    # _parameters: a converted layer's weight reads as the dequantized tensor
    return isinstance(getattr(module, "weight_quantizer", None), nn.Module) and isinstance(
        module._parameters.get("weight"), nn.Parameter
    )


def parameter_sets(model: nn.Module) -> dict[str, Named]:
    """``{'cores': [...], 'scales': [...], 'other': [...]}`` of ``(name, parameter)``.

    A parameter shared under several names appears once, under its first
    name (``named_parameters`` order, which each list keeps).

    Examples
    --------
    >>> from torch import nn
    >>> [len(v) for v in parameter_sets(nn.Linear(2, 2)).values()]
    [0, 0, 2]
    """
    cores: set[int] = set()
    scales: set[int] = set()
    for module in model.modules():
        if isinstance(module, FactorizedLayer):
            cores.update(id(p) for p in module.cores)
        elif _is_quantized_dense(module):
            cores.add(id(module._parameters["weight"]))
        if isinstance(module, Quantizer):
            scales.update(id(p) for p in module.parameters())
    sets: dict[str, Named] = {"cores": [], "scales": [], "other": []}
    for name, p in model.named_parameters():
        key = "cores" if id(p) in cores else "scales" if id(p) in scales else "other"
        sets[key].append((name, p))
    return sets


def select_parameters(model: nn.Module, train: str) -> dict[str, Named]:
    """The sets ``train`` takes, without frozen or empty parameters.

    Raises ``ValueError`` for an unknown ``train`` and when nothing is left.

    Examples
    --------
    >>> from torch import nn
    >>> sorted(select_parameters(nn.Linear(2, 2), "all"))
    ['other']
    """
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {list(TRAIN_CHOICES)}, got {train!r}")
    sets = parameter_sets(model)
    chosen = {
        key: [(n, p) for n, p in sets[key] if p.requires_grad and p.numel() > 0]
        for key in TRAIN_CHOICES[train]
    }
    chosen = {key: v for key, v in chosen.items() if v}
    if not chosen:
        counts = {key: len(v) for key, v in sets.items()}
        raise ValueError(
            f"train={train!r} selects no trainable parameter; the model holds {counts} "
            "parameters per set (cores: FactorizedLayer cores and quantized dense weights; "
            "scales: learnable Quantizer parameters, e.g. QuantSpec(learnable=True) or "
            "Ternary(method='ttq'); frozen and empty parameters are skipped)"
        )
    return chosen


def param_groups(
    chosen: dict[str, Named], lr: float, scale_lr: float | None, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer groups: ``cores`` and dense weights decay, scales and 1-d tensors do not.

    Groups (empty ones left out): ``'cores'`` (``lr``, ``weight_decay``),
    ``'scales'`` (``scale_lr`` or ``lr``, no decay), ``'other'`` (the 2-d and
    larger remaining weights: ``lr``, ``weight_decay``), ``'no_decay'``
    (biases, norms: ``lr``, no decay). Each group carries its ``'name'``.

    Examples
    --------
    >>> from torch import nn
    >>> groups = param_groups(select_parameters(nn.Linear(2, 2), "all"), 1e-3, None, 0.01)
    >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in groups]
    [('other', 1, 0.01), ('no_decay', 1, 0.0)]
    """
    lists: dict[str, list[nn.Parameter]] = {"cores": [], "scales": [], "other": [], "no_decay": []}
    for key, named in chosen.items():
        for _, p in named:
            if key == "other":
                lists["other" if p.ndim >= 2 else "no_decay"].append(p)
            else:
                lists[key].append(p)
    rates = {
        "cores": (lr, weight_decay),
        "scales": (lr if scale_lr is None else scale_lr, 0.0),
        "other": (lr, weight_decay),
        "no_decay": (lr, 0.0),
    }
    return [
        {"params": params, "name": key, "lr": rates[key][0], "weight_decay": rates[key][1]}
        for key, params in lists.items()
        if params
    ]


def layer_rows(model: nn.Module, chosen: dict[str, Named]) -> list[dict[str, Any]]:
    """Per layer, the number of trained elements in each set (rows of the report).

    A layer is a ``FactorizedLayer`` or a quantized dense layer with all
    its quantizers; any other parameter counts for the module that holds it.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> layer_rows(model, select_parameters(model, "all"))
    [{'name': '0', 'kind': 'Linear', 'cores': 0, 'scales': 0, 'other': 6}]
    """
    owner: dict[str, str] = {}
    kinds: dict[str, str] = {}
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, FactorizedLayer) or _is_quantized_dense(m)
    ]
    for name, module in model.named_modules():
        kinds[name] = type(module).__name__
    for pname, _ in model.named_parameters():
        mod = pname.rpartition(".")[0]
        owner[pname] = mod
        for lname, _ in layers:
            if lname == "" or pname.startswith(lname + "."):
                owner[pname] = lname
                break
    rows: dict[str, dict[str, Any]] = {}
    for key, named in chosen.items():
        for pname, p in named:
            lname = owner.get(pname, pname.rpartition(".")[0])
            row = rows.setdefault(
                lname,
                {"name": lname, "kind": kinds.get(lname, ""), "cores": 0, "scales": 0, "other": 0},
            )
            row[key] += p.numel()
    return list(rows.values())
