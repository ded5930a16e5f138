"""How :mod:`tnquant.io` describes a model's tnquant modules in JSON and rebuilds them.

The classes and their handlers come from the layer registry:
:data:`HANDLERS` is a live view, class name -> :class:`~tnquant.registry.Handler`,
of every registry entry that has one (:mod:`tnquant.registry.serialize`).
Any child a handler's constructor does not create itself
(``core_quantizers``, ``act_quantizers``, ``weight_quantizer``, ...) is
described recursively, in registration order (``children`` is a list of
``[name, description]`` pairs): an ``nn.ModuleList`` as ``{"list": [...]}``,
an ``nn.ModuleDict`` as ``{"dict": [[key, node], ...]}``, a module as
``{"module": node}``.

Examples
--------
>>> import torch
>>> from tnquant.layers import LowRankLinear
>>> node = describe_node(LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)]), "fc")
>>> node["class"], node["config"]["in_features"], node["config"]["core_shapes"]
('LowRankLinear', 3, [[4, 2], [2, 3]])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tnquant.io.checks import finish_layer
from tnquant.layers.base import FactorizedLayer
from tnquant.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.observers import Observer
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import BuildContext, Handler, HandlerTable, lookup

__all__ = ["HANDLERS", "Handler", "BuildContext", "describe_node", "describe_entries", "build_node"]

#: class name -> Handler: the one (closed) table of what save/load can rebuild.
HANDLERS = HandlerTable()


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _handler_of(module: nn.Module) -> Handler | None:
    kind = lookup(module)
    return None if kind is None else kind.handler


def describe_node(module: nn.Module, name: str) -> dict[str, Any]:
    """``{"class", "config", "children"}`` of a module :data:`HANDLERS` knows.

    Raises ``TypeError`` for a module (or attached child) it cannot rebuild.
    """
    handler = _handler_of(module)
    if handler is None:
        raise TypeError(
            f"cannot save {type(module).__name__} at {name!r}: tnquant.io rebuilds "
            f"{sorted(HANDLERS)} (and keeps every other module of the base model)"
        )
    children: list[list[Any]] = []
    for child_name, child in module.named_children():
        if child_name in handler.own_children:
            continue
        where = f"{_prefix(name)}{child_name}"
        if isinstance(child, nn.ModuleList):
            desc: dict[str, Any] = {
                "list": [describe_node(c, f"{where}.{k}") for k, c in enumerate(child)]
            }
        elif isinstance(child, nn.ModuleDict):
            desc = {"dict": [[k, describe_node(c, f"{where}.{k}")] for k, c in child.items()]}
        else:
            desc = {"module": describe_node(child, where)}
        children.append([child_name, desc])
    return {
        "class": type(module).__name__,
        "config": handler.describe(module),
        "children": children,
    }


def _must_describe(module: nn.Module) -> bool:
    if _handler_of(module) is not None:
        return True
    kind = lookup(module)
    if (kind is not None and kind.role in ("factorized", "quantized")) or isinstance(
        module,
        (
            FactorizedLayer,
            Quantizer,
            Observer,
            FrozenTensor,
            QuantLinear,
            QuantConv2d,
            QuantEmbedding,
        ),
    ):
        raise TypeError(
            f"cannot save a {type(module).__name__}: tnquant.io has no handler for "
            f"it (known: {sorted(HANDLERS)})"
        )
    return False


def describe_entries(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per outermost tnquant module of ``model``: names, what it replaces, node.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant.layers import LowRankLinear
    >>> fc = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    >>> [(e["names"], e["replaces"]) for e in describe_entries(nn.Sequential(fc, fc))]
    [(['0', '1'], 'Linear')]
    """
    found: dict[int, dict[str, Any]] = {}
    tops: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(t == "" or name.startswith(t + ".") for t in tops):
            continue
        if not _must_describe(module):
            continue
        tops.append(name)
        if id(module) in found:
            found[id(module)]["names"].append(name)
            continue
        handler = HANDLERS[type(module).__name__]
        found[id(module)] = {
            "names": [name],
            "replaces": None if handler.replaces is None else handler.replaces.__name__,
            "node": describe_node(module, name),
        }
    return list(found.values())


def build_node(node: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    """Rebuild a module described by :func:`describe_node` (empty tensors, saved shapes).

    ``node`` must have passed :func:`tnquant.io.fields.check_node`; build on
    the meta device (the default of :class:`BuildContext`) and compare with
    the tensor file before allocating.

    Examples
    --------
    >>> import torch
    >>> from tnquant.layers import LowRankLinear
    >>> fc = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    >>> ctx = BuildContext({k: v.to("meta") for k, v in fc.state_dict().items()})
    >>> built = build_node(describe_node(fc, ""), "", ctx)
    >>> type(built).__name__, built.cores[0].device.type
    ('LowRankLinear', 'meta')
    """
    handler = HANDLERS[node["class"]]
    module = handler.build(node["config"], name, ctx)
    for child_name, child in node["children"]:
        where = f"{_prefix(name)}{child_name}"
        built: nn.Module
        if "list" in child:
            built = nn.ModuleList(
                [build_node(c, f"{where}.{k}", ctx) for k, c in enumerate(child["list"])]
            )
        elif "dict" in child:
            built = nn.ModuleDict({k: build_node(c, f"{where}.{k}", ctx) for k, c in child["dict"]})
        else:
            built = build_node(child["module"], where, ctx)
        setattr(module, child_name, built)
    if handler.placeholders:
        finish_layer(module, name, ctx.tensors, ctx.device)
    return module
