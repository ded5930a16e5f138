"""How :mod:`tnquant.io` describes tnquant modules in JSON and rebuilds them.

One table, :data:`HANDLERS`, from class name to a :class:`Handler`: the
class, the dense module it stands for (checked against the base model on
load), ``describe`` (module -> JSON-safe constructor configuration),
``build`` (configuration -> module with empty tensors of the saved shapes
and dtypes; the state is loaded afterwards), ``expect`` (the attributes the
replaced dense module must have) and the children its constructor creates
itself. Any other child (``core_quantizers``, ``act_quantizers``,
``weight_quantizer``, ...) is described recursively, in registration order
(``children`` is a list of ``[name, description]`` pairs): an
``nn.ModuleList`` as ``{"list": [...]}``, an ``nn.ModuleDict`` as
``{"dict": [[key, node], ...]}``, a module as ``{"module": node}``.

Examples
--------
>>> import torch
>>> from tnquant.layers import LowRankLinear
>>> node = describe_node(LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)]), "fc")
>>> node["class"], node["config"]["in_features"], node["config"]["core_shapes"]
('LowRankLinear', 3, [[4, 2], [2, 3]])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tnquant.io_checks import finish_layer
from tnquant.io_fields import (
    BOOL,
    CONV_FIELDS,
    DENSE_SLOTS,
    EMBEDDING_FIELDS,
    FACTORIZATION_SPECS,
    FACTORIZED_SLOTS,
    FROZEN_FIELDS,
    LINEAR_FIELDS,
    QCONV_FIELDS,
    QEMBEDDING_FIELDS,
    QUANT_SPECS,
    QUANTIZER_FIELDS,
    Field,
    factorized_fields,
    parse_spec,
)
from tnquant.layers import (
    CPConv2d,
    FactorizedLayer,
    LowRankLinear,
    TTEmbedding,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)
from tnquant.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.observers import MSEObserver, Observer
from tnquant.quant.quantizer import Quantizer
from tnquant.specs import spec_to_dict

__all__ = ["Handler", "HANDLERS", "BuildContext", "describe_node", "describe_entries",
           "build_node"]


@dataclass
class BuildContext:
    """What builders need: the saved tensors (for shapes and dtypes) and the device.

    :func:`tnquant.load` passes meta-device stand-ins of the saved tensors
    (their dtypes and shapes, from the checked header) and builds on the
    meta device: nothing is allocated until every size has been compared
    with the tensor file.
    """

    tensors: dict[str, Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("meta"))

    def saved(self, key: str, owner: str) -> Tensor:
        """The saved tensor ``key`` (``ValueError`` naming ``owner`` when absent)."""
        saved = self.tensors.get(key)
        if saved is None:
            raise ValueError(f"the saved tensors lack {key!r}, which the {owner} needs")
        return saved

    def empty(self, key: str, owner: str, shape: Any = None) -> Tensor:
        """An uninitialised tensor of the saved ``key``'s dtype (and shape unless given)."""
        saved = self.saved(key, owner)
        size = saved.shape if shape is None else tuple(shape)
        return torch.empty(size, dtype=saved.dtype, device=self.device)


@dataclass(frozen=True)
class Handler:
    """How one tnquant class is described and rebuilt (see the module docs).

    ``schema`` types every config field (checked before anything is built)
    and ``slots`` names the children it may have.
    """

    cls: type[nn.Module]
    replaces: type[nn.Module] | None
    describe: Callable[[Any], dict[str, Any]]
    build: Callable[[dict[str, Any], str, BuildContext], nn.Module]
    expect: Callable[[dict[str, Any]], dict[str, Any]] = lambda config: {}
    own_children: tuple[str, ...] = ()
    #: whether converted (empty) weights/cores may stand in its parameters
    placeholders: bool = False
    schema: dict[str, Field] = field(default_factory=dict)
    slots: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


# --------------------------------------------------------------------------- #
# factorized layers
# --------------------------------------------------------------------------- #


def _factorized_common(layer: FactorizedLayer) -> dict[str, Any]:
    return {"spec": spec_to_dict(layer.spec),
            "core_shapes": [list(s) for s in layer._core_shapes()],
            "bias": layer.bias is not None, "implementation": layer.implementation,
            "decomposition_info": _jsonable(layer.decomposition_info)}


def _factorized_kwargs(config: dict[str, Any], name: str, ctx: BuildContext, cls: Any
                       ) -> tuple[list[Tensor], dict[str, Any]]:
    owner = f"{cls.__name__} {name!r}"
    cores = [ctx.empty(f"{_prefix(name)}cores.{k}", owner, shape)
             for k, shape in enumerate(config["core_shapes"])]
    info = dict(config["decomposition_info"])
    info.pop("ranks", None)  # the layer derives them from the cores; _finish compares
    kwargs: dict[str, Any] = {"spec": parse_spec(config["spec"], FACTORIZATION_SPECS[cls.__name__]),
                              "decomposition_info": info}
    if config["bias"]:
        kwargs["bias"] = ctx.empty(f"{_prefix(name)}bias", owner)
    return cores, kwargs


def _finish(layer: FactorizedLayer, config: dict[str, Any]) -> FactorizedLayer:
    saved = config["decomposition_info"].get("ranks")
    if saved is not None and tuple(saved) != layer.ranks:
        raise ValueError(f"decomposition_info ranks {saved} do not match the cores' ranks "
                         f"{list(layer.ranks)}")
    layer.implementation = config["implementation"]
    return layer


def _describe_linear(layer: Any) -> dict[str, Any]:
    return {**_factorized_common(layer), "in_features": layer.in_features,
            "out_features": layer.out_features}


def _build_linear(cls: Any) -> Callable[[dict[str, Any], str, BuildContext], nn.Module]:
    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        cores, kwargs = _factorized_kwargs(config, name, ctx, cls)
        return _finish(cls(cores, in_features=config["in_features"],
                           out_features=config["out_features"], **kwargs), config)
    return build


def _expect_linear(config: dict[str, Any]) -> dict[str, Any]:
    return {"in_features": config["in_features"], "out_features": config["out_features"]}


def _describe_conv(layer: Any) -> dict[str, Any]:
    padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
    return {**_factorized_common(layer), "in_channels": layer.in_channels,
            "out_channels": layer.out_channels, "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride), "padding": padding, "dilation": list(layer.dilation),
            "padding_mode": layer.padding_mode}


def _build_conv(cls: Any) -> Callable[[dict[str, Any], str, BuildContext], nn.Module]:
    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        cores, kwargs = _factorized_kwargs(config, name, ctx, cls)
        padding = config["padding"]
        return _finish(cls(cores, stride=tuple(config["stride"]),
                           padding=padding if isinstance(padding, str) else tuple(padding),
                           dilation=tuple(config["dilation"]),
                           padding_mode=config["padding_mode"], **kwargs), config)
    return build


def _expect_conv(config: dict[str, Any]) -> dict[str, Any]:
    padding = config["padding"]
    return {"in_channels": config["in_channels"], "out_channels": config["out_channels"],
            "kernel_size": tuple(config["kernel_size"]), "stride": tuple(config["stride"]),
            "padding": padding if isinstance(padding, str) else tuple(padding),
            "dilation": tuple(config["dilation"]), "padding_mode": config["padding_mode"],
            "groups": 1}


def _describe_embedding(layer: Any) -> dict[str, Any]:
    return {**_factorized_common(layer), "num_embeddings": layer.num_embeddings,
            "embedding_dim": layer.embedding_dim, "padding_idx": layer.padding_idx}


def _build_embedding(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    if config["bias"]:
        raise ValueError("a TTEmbedding has no bias")
    cores, kwargs = _factorized_kwargs(config, name, ctx, TTEmbedding)
    return _finish(TTEmbedding(cores, num_embeddings=config["num_embeddings"],
                               embedding_dim=config["embedding_dim"],
                               padding_idx=config["padding_idx"], **kwargs), config)


def _expect_embedding(config: dict[str, Any]) -> dict[str, Any]:
    return {"num_embeddings": config["num_embeddings"], "embedding_dim": config["embedding_dim"],
            "padding_idx": config["padding_idx"]}


# --------------------------------------------------------------------------- #
# quantizers and plain containers
# --------------------------------------------------------------------------- #


def _describe_quantizer(q: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"spec": spec_to_dict(q.spec)}
    if isinstance(q.observer, MSEObserver):
        config["observer"] = {"n_grid": q.observer.n_grid, "low": q.observer.low}
    return config


def _build_quantizer(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    q = Quantizer(parse_spec(config["spec"], QUANT_SPECS))
    obs = config.get("observer")
    if obs is not None and getattr(q.spec, "observer", None) != "mse":
        raise ValueError("an 'observer' config is for a QuantSpec(observer='mse') only")
    if obs is not None:
        q.observer = MSEObserver(q.spec, n_grid=obs["n_grid"], low=obs["low"])
    return q.to(ctx.device)


def _describe_frozen(frozen: Any) -> dict[str, Any]:
    return dict(frozen.metadata())


def _build_frozen(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    return FrozenTensor.from_metadata(config, device=ctx.device)


# --------------------------------------------------------------------------- #
# quantized dense layers
# --------------------------------------------------------------------------- #


def _describe_qlinear(layer: Any) -> dict[str, Any]:
    return {"in_features": layer.in_features, "out_features": layer.out_features,
            "bias": layer.bias is not None}


def _describe_qconv(layer: Any) -> dict[str, Any]:
    padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
    return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
            "padding": padding, "dilation": list(layer.dilation), "groups": layer.groups,
            "padding_mode": layer.padding_mode, "bias": layer.bias is not None}


def _describe_qembedding(layer: Any) -> dict[str, Any]:
    return {"num_embeddings": layer.num_embeddings, "embedding_dim": layer.embedding_dim,
            "padding_idx": layer.padding_idx, "norm_type": layer.norm_type,
            "scale_grad_by_freq": layer.scale_grad_by_freq, "sparse": layer.sparse}


def _materialize(module: nn.Module, ctx: BuildContext) -> nn.Module:
    """A module built on the meta device, allocated (uninitialised) on ``ctx.device``."""
    return module.to_empty(device=ctx.device)


def _build_qlinear(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    dtype = ctx.saved(f"{_prefix(name)}weight", f"QuantLinear {name!r}").dtype
    return _materialize(QuantLinear(config["in_features"], config["out_features"],
                                    bias=config["bias"], device="meta", dtype=dtype), ctx)


def _build_qconv(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    dtype = ctx.saved(f"{_prefix(name)}weight", f"QuantConv2d {name!r}").dtype
    padding = config["padding"]
    return _materialize(QuantConv2d(
        config["in_channels"], config["out_channels"], tuple(config["kernel_size"]),
        stride=tuple(config["stride"]),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(config["dilation"]), groups=config["groups"], bias=config["bias"],
        padding_mode=config["padding_mode"], device="meta", dtype=dtype), ctx)


def _build_qembedding(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    dtype = ctx.saved(f"{_prefix(name)}weight", f"QuantEmbedding {name!r}").dtype
    num, idx = config["num_embeddings"], config["padding_idx"]
    if idx is not None and not -num <= idx < num:  # nn.Embedding would assert
        raise ValueError(f"padding_idx must be in [{-num}, {num - 1}], got {idx}")
    return _materialize(QuantEmbedding(
        config["num_embeddings"], config["embedding_dim"], config["padding_idx"],
        norm_type=config["norm_type"], scale_grad_by_freq=config["scale_grad_by_freq"],
        sparse=config["sparse"], device="meta", dtype=dtype), ctx)


def _expect_qconv(config: dict[str, Any]) -> dict[str, Any]:
    return {**_expect_conv(config), "groups": config["groups"]}


def _factorized(cls: Any, replaces: Any, describe: Any, build: Any, expect: Any,
                sizes: dict[str, Field]) -> Handler:
    return Handler(cls, replaces, describe, build, expect, ("cores",), placeholders=True,
                   schema=factorized_fields(cls.__name__, sizes), slots=FACTORIZED_SLOTS)


def _dense(cls: Any, replaces: Any, describe: Any, build: Any, expect: Any,
           schema: dict[str, Field]) -> Handler:
    return Handler(cls, replaces, describe, build, expect, placeholders=True, schema=schema,
                   slots=DENSE_SLOTS)


def _linear_handler(cls: Any) -> Handler:
    return _factorized(cls, nn.Linear, _describe_linear, _build_linear(cls), _expect_linear,
                       LINEAR_FIELDS)


def _conv_handler(cls: Any) -> Handler:
    return _factorized(cls, nn.Conv2d, _describe_conv, _build_conv(cls), _expect_conv,
                       CONV_FIELDS)


#: class name -> Handler: the one table of what save/load can rebuild.
HANDLERS: dict[str, Handler] = {
    "LowRankLinear": _linear_handler(LowRankLinear),
    "TTLinear": _linear_handler(TTLinear),
    "TuckerLinear": _linear_handler(TuckerLinear),
    "TuckerConv2d": _conv_handler(TuckerConv2d),
    "CPConv2d": _conv_handler(CPConv2d),
    "TTEmbedding": _factorized(TTEmbedding, nn.Embedding, _describe_embedding, _build_embedding,
                               _expect_embedding, EMBEDDING_FIELDS),
    "QuantLinear": _dense(QuantLinear, nn.Linear, _describe_qlinear, _build_qlinear,
                          _expect_linear, {**LINEAR_FIELDS, "bias": BOOL}),
    "QuantConv2d": _dense(QuantConv2d, nn.Conv2d, _describe_qconv, _build_qconv, _expect_qconv,
                          QCONV_FIELDS),
    "QuantEmbedding": _dense(QuantEmbedding, nn.Embedding, _describe_qembedding,
                             _build_qembedding, _expect_embedding, QEMBEDDING_FIELDS),
    "FrozenTensor": Handler(FrozenTensor, None, _describe_frozen, _build_frozen,
                            schema=FROZEN_FIELDS),
    "Quantizer": Handler(Quantizer, None, _describe_quantizer, _build_quantizer,
                         own_children=("observer",), schema=QUANTIZER_FIELDS),
    "Identity": Handler(nn.Identity, None, lambda m: {}, lambda c, n, ctx: nn.Identity()),
}


# --------------------------------------------------------------------------- #
# describe / build / check
# --------------------------------------------------------------------------- #


def _handler_of(module: nn.Module) -> Handler | None:
    handler = HANDLERS.get(type(module).__name__)
    return handler if handler is not None and type(module) is handler.cls else None


def describe_node(module: nn.Module, name: str) -> dict[str, Any]:
    """``{"class", "config", "children"}`` of a module :data:`HANDLERS` knows.

    Raises ``TypeError`` for a module (or attached child) it cannot rebuild.
    """
    handler = _handler_of(module)
    if handler is None:
        raise TypeError(f"cannot save {type(module).__name__} at {name!r}: tnquant.io rebuilds "
                        f"{sorted(HANDLERS)} (and keeps every other module of the base model)")
    children: list[list[Any]] = []
    for child_name, child in module.named_children():
        if child_name in handler.own_children:
            continue
        where = f"{_prefix(name)}{child_name}"
        if isinstance(child, nn.ModuleList):
            desc: dict[str, Any] = {"list": [describe_node(c, f"{where}.{k}")
                                             for k, c in enumerate(child)]}
        elif isinstance(child, nn.ModuleDict):
            desc = {"dict": [[k, describe_node(c, f"{where}.{k}")] for k, c in child.items()]}
        else:
            desc = {"module": describe_node(child, where)}
        children.append([child_name, desc])
    return {"class": type(module).__name__, "config": handler.describe(module),
            "children": children}


def _must_describe(module: nn.Module) -> bool:
    if _handler_of(module) is not None:
        return True
    if isinstance(module, (FactorizedLayer, Quantizer, Observer, FrozenTensor, QuantLinear,
                           QuantConv2d, QuantEmbedding)):
        raise TypeError(f"cannot save a {type(module).__name__}: tnquant.io has no handler for "
                        f"it (known: {sorted(HANDLERS)})")
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
        found[id(module)] = {"names": [name],
                             "replaces": None if handler.replaces is None
                             else handler.replaces.__name__,
                             "node": describe_node(module, name)}
    return list(found.values())


def build_node(node: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    """Rebuild a module described by :func:`describe_node` (empty tensors, saved shapes).

    ``node`` must have passed :func:`tnquant.io_fields.check_node`; build on
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
            built = nn.ModuleList([build_node(c, f"{where}.{k}", ctx)
                                   for k, c in enumerate(child["list"])])
        elif "dict" in child:
            built = nn.ModuleDict({k: build_node(c, f"{where}.{k}", ctx)
                                   for k, c in child["dict"]})
        else:
            built = build_node(child["module"], where, ctx)
        setattr(module, child_name, built)
    if handler.placeholders:
        finish_layer(module, name, ctx.tensors, ctx.device)
    return module
