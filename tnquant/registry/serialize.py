"""How each layer kind is described in JSON and rebuilt: its save/load :class:`Handler`.

A handler gives the class, the dense module it stands for (checked against
the base model on load), ``describe`` (module -> JSON-safe constructor
configuration), ``build`` (configuration -> module with empty tensors of the
saved shapes and dtypes; the state is loaded afterwards), ``expect`` (the
attributes the replaced dense module must have), the children its
constructor creates itself, the config ``schema`` (:mod:`tnquant.registry.fields`)
and the child ``slots``. The builders below make the handler of a new kind
in one call (``linear_handler(MyFactorizedLinear)``); every entry of the
registry carries its handler, and :mod:`tnquant.io` reads them there.

Examples
--------
>>> import torch
>>> from tnquant.layers import LowRankLinear
>>> handler = linear_handler(LowRankLinear)
>>> config = handler.describe(LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)]))
>>> config["in_features"], config["core_shapes"], handler.replaces.__name__
(3, [[4, 2], [2, 3]], 'Linear')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tnquant.layers.base import FactorizedLayer
from tnquant.layers.embedding import TTEmbedding
from tnquant.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.observers import MSEObserver
from tnquant.quant.quantizer import Quantizer
from tnquant.registry.fields import (
    CONV_FIELDS,
    DENSE_SLOTS,
    EMBEDDING_FIELDS,
    FACTORIZED_SLOTS,
    FROZEN_FIELDS,
    LINEAR_FIELDS,
    QCONV_FIELDS,
    QEMBEDDING_FIELDS,
    QLINEAR_FIELDS,
    QUANT_SPECS,
    QUANTIZER_FIELDS,
    Field,
    factorized_fields,
    parse_spec,
)
from tnquant.specs import spec_to_dict

__all__ = [
    "Handler",
    "BuildContext",
    "linear_handler",
    "conv_handler",
    "embedding_handler",
    "quant_linear_handler",
    "quant_conv_handler",
    "quant_embedding_handler",
    "FROZEN_HANDLER",
    "QUANTIZER_HANDLER",
    "IDENTITY_HANDLER",
]

Build = Callable[[dict[str, Any], str, "BuildContext"], nn.Module]


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
    build: Build
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


def _padding(config: dict[str, Any]) -> Any:
    padding = config["padding"]
    return padding if isinstance(padding, str) else tuple(padding)


# --------------------------------------------------------------------------- #
# factorized layers
# --------------------------------------------------------------------------- #


def _factorized_common(layer: FactorizedLayer) -> dict[str, Any]:
    return {
        "spec": spec_to_dict(layer.spec),
        "core_shapes": [list(s) for s in layer._core_shapes()],
        "bias": layer.bias is not None,
        "implementation": layer.implementation,
        "decomposition_info": _jsonable(layer.decomposition_info),
    }


def _factorized_kwargs(
    config: dict[str, Any], name: str, ctx: BuildContext, cls: Any
) -> tuple[list[Tensor], dict[str, Any]]:
    owner = f"{cls.__name__} {name!r}"
    cores = [
        ctx.empty(f"{_prefix(name)}cores.{k}", owner, shape)
        for k, shape in enumerate(config["core_shapes"])
    ]
    info = dict(config["decomposition_info"])
    info.pop("ranks", None)  # the layer derives them from the cores; _finish compares
    kwargs: dict[str, Any] = {
        "spec": parse_spec(config["spec"], (cls.spec_type,)),
        "decomposition_info": info,
    }
    if config["bias"]:
        kwargs["bias"] = ctx.empty(f"{_prefix(name)}bias", owner)
    return cores, kwargs


def _finish(layer: FactorizedLayer, config: dict[str, Any]) -> FactorizedLayer:
    saved = config["decomposition_info"].get("ranks")
    if saved is not None and tuple(saved) != layer.ranks:
        raise ValueError(
            f"decomposition_info ranks {saved} do not match the cores' ranks {list(layer.ranks)}"
        )
    layer.implementation = config["implementation"]
    return layer


def _describe_linear(layer: Any) -> dict[str, Any]:
    return {
        **_factorized_common(layer),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
    }


def _expect_linear(config: dict[str, Any]) -> dict[str, Any]:
    return {"in_features": config["in_features"], "out_features": config["out_features"]}


def _conv_geometry(layer: Any) -> dict[str, Any]:
    """The constructor sizes a Conv2d-like layer shares with ``nn.Conv2d`` (JSON-safe)."""
    padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": list(layer.kernel_size),
        "stride": list(layer.stride),
        "padding": padding,
        "dilation": list(layer.dilation),
        "padding_mode": layer.padding_mode,
    }


def _describe_conv(layer: Any) -> dict[str, Any]:
    return {**_factorized_common(layer), **_conv_geometry(layer)}


def _expect_conv(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "kernel_size": tuple(config["kernel_size"]),
        "stride": tuple(config["stride"]),
        "padding": _padding(config),
        "dilation": tuple(config["dilation"]),
        "padding_mode": config["padding_mode"],
        "groups": 1,
    }


def _describe_embedding(layer: Any) -> dict[str, Any]:
    return {
        **_factorized_common(layer),
        "num_embeddings": layer.num_embeddings,
        "embedding_dim": layer.embedding_dim,
        "padding_idx": layer.padding_idx,
    }


def _expect_embedding(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_embeddings": config["num_embeddings"],
        "embedding_dim": config["embedding_dim"],
        "padding_idx": config["padding_idx"],
    }


def _factorized(
    cls: Any, replaces: Any, describe: Any, build: Build, expect: Any, sizes: dict[str, Field]
) -> Handler:
    return Handler(
        cls,
        replaces,
        describe,
        build,
        expect,
        ("cores",),
        placeholders=True,
        schema=factorized_fields(cls.spec_type, sizes),
        slots=FACTORIZED_SLOTS,
    )


def linear_handler(cls: Any, replaces: type[nn.Module] = nn.Linear) -> Handler:
    """The handler of a factorized Linear class built as ``cls(cores, in_features=, ...)``."""

    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        cores, kwargs = _factorized_kwargs(config, name, ctx, cls)
        return _finish(
            cls(
                cores,
                in_features=config["in_features"],
                out_features=config["out_features"],
                **kwargs,
            ),
            config,
        )

    return _factorized(cls, replaces, _describe_linear, build, _expect_linear, LINEAR_FIELDS)


def _conv_build(cls: Any) -> Callable[[dict[str, Any], str, BuildContext], nn.Module]:
    """``build`` of a factorized conv class made as ``cls(cores, stride=, padding=, ...)``."""

    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        cores, kwargs = _factorized_kwargs(config, name, ctx, cls)
        return _finish(
            cls(
                cores,
                stride=tuple(config["stride"]),
                padding=_padding(config),
                dilation=tuple(config["dilation"]),
                padding_mode=config["padding_mode"],
                **kwargs,
            ),
            config,
        )

    return build


def conv_handler(cls: Any, replaces: type[nn.Module] = nn.Conv2d) -> Handler:
    """The handler of a factorized Conv2d class built as ``cls(cores, stride=, ...)``."""
    return _factorized(cls, replaces, _describe_conv, _conv_build(cls), _expect_conv, CONV_FIELDS)


def embedding_handler(cls: Any = TTEmbedding, replaces: type[nn.Module] = nn.Embedding) -> Handler:
    """The handler of a factorized Embedding class (no bias)."""

    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        if config["bias"]:
            raise ValueError(f"a {cls.__name__} has no bias")
        cores, kwargs = _factorized_kwargs(config, name, ctx, cls)
        return _finish(
            cls(
                cores,
                num_embeddings=config["num_embeddings"],
                embedding_dim=config["embedding_dim"],
                padding_idx=config["padding_idx"],
                **kwargs,
            ),
            config,
        )

    return _factorized(
        cls, replaces, _describe_embedding, build, _expect_embedding, EMBEDDING_FIELDS
    )


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


def _build_frozen(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
    return FrozenTensor.from_metadata(config, device=ctx.device)


FROZEN_HANDLER = Handler(
    FrozenTensor, None, lambda f: dict(f.metadata()), _build_frozen, schema=FROZEN_FIELDS
)
QUANTIZER_HANDLER = Handler(
    Quantizer,
    None,
    _describe_quantizer,
    _build_quantizer,
    own_children=("observer",),
    schema=QUANTIZER_FIELDS,
)
IDENTITY_HANDLER = Handler(nn.Identity, None, lambda m: {}, lambda c, n, ctx: nn.Identity())


# --------------------------------------------------------------------------- #
# quantized dense layers
# --------------------------------------------------------------------------- #


def _dtype(cls: Any, name: str, ctx: BuildContext) -> torch.dtype:
    return ctx.saved(f"{_prefix(name)}weight", f"{cls.__name__} {name!r}").dtype


def _dense(
    cls: Any, replaces: Any, describe: Any, build: Build, expect: Any, schema: dict[str, Field]
) -> Handler:
    return Handler(
        cls, replaces, describe, build, expect, placeholders=True, schema=schema, slots=DENSE_SLOTS
    )


def quant_linear_handler(cls: Any = QuantLinear, replaces: type[nn.Module] = nn.Linear) -> Handler:
    """The handler of a quantized Linear class built as ``cls(in, out, bias=, device=, dtype=)``."""

    def describe(layer: Any) -> dict[str, Any]:
        return {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        }

    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        return cls(
            config["in_features"],
            config["out_features"],
            bias=config["bias"],
            device="meta",
            dtype=_dtype(cls, name, ctx),
        ).to_empty(device=ctx.device)

    return _dense(cls, replaces, describe, build, _expect_linear, QLINEAR_FIELDS)


def quant_conv_handler(cls: Any = QuantConv2d, replaces: type[nn.Module] = nn.Conv2d) -> Handler:
    """The handler of a quantized Conv2d class (``nn.Conv2d``'s constructor)."""

    def describe(layer: Any) -> dict[str, Any]:
        return {**_conv_geometry(layer), "groups": layer.groups, "bias": layer.bias is not None}

    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        return cls(
            config["in_channels"],
            config["out_channels"],
            tuple(config["kernel_size"]),
            stride=tuple(config["stride"]),
            padding=_padding(config),
            dilation=tuple(config["dilation"]),
            groups=config["groups"],
            bias=config["bias"],
            padding_mode=config["padding_mode"],
            device="meta",
            dtype=_dtype(cls, name, ctx),
        ).to_empty(device=ctx.device)

    def expect(config: dict[str, Any]) -> dict[str, Any]:
        return {**_expect_conv(config), "groups": config["groups"]}

    return _dense(cls, replaces, describe, build, expect, QCONV_FIELDS)


def quant_embedding_handler(
    cls: Any = QuantEmbedding, replaces: type[nn.Module] = nn.Embedding
) -> Handler:
    """The handler of a quantized Embedding class (``nn.Embedding``'s constructor)."""

    def describe(layer: Any) -> dict[str, Any]:
        return {
            "num_embeddings": layer.num_embeddings,
            "embedding_dim": layer.embedding_dim,
            "padding_idx": layer.padding_idx,
            "norm_type": layer.norm_type,
            "scale_grad_by_freq": layer.scale_grad_by_freq,
            "sparse": layer.sparse,
        }

    def build(config: dict[str, Any], name: str, ctx: BuildContext) -> nn.Module:
        dtype = _dtype(cls, name, ctx)
        num, idx = config["num_embeddings"], config["padding_idx"]
        if idx is not None and not -num <= idx < num:  # nn.Embedding would assert
            raise ValueError(f"padding_idx must be in [{-num}, {num - 1}], got {idx}")
        return cls(
            num,
            config["embedding_dim"],
            idx,
            norm_type=config["norm_type"],
            scale_grad_by_freq=config["scale_grad_by_freq"],
            sparse=config["sparse"],
            device="meta",
            dtype=dtype,
        ).to_empty(device=ctx.device)

    return _dense(cls, replaces, describe, build, _expect_embedding, QEMBEDDING_FIELDS)
