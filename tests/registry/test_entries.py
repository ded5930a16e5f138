"""The registry is consistent, and every entry's claims hold (save/load, factorize, export)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnquant import CP, TT, LowRank, QuantSpec, Tucker, convert, load, quantize, save
from tnquant.decompose.api import DECOMPOSERS
from tnquant.export.conv1d_routes import CONV1D_ROUTES
from tnquant.export.conv_routes import CONV_ROUTES
from tnquant.export.graph import ROUTES
from tnquant.factorization import LAYER_TABLE
from tnquant.io.nodes import HANDLERS
from tnquant.layers import (
    CPConv2d,
    LowRankLinear,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    TTEmbedding,
    TTLinear,
    TuckerConv1d,
    TuckerConv2d,
    TuckerLinear,
)
from tnquant.registry import (
    BUILTIN,
    LAZY,
    LayerKind,
    kind_of,
    kinds,
    lookup,
    refusal,
    register,
    unregister,
)
from tnquant.registry.serialize import linear_handler

DENSE = [k for k in kinds() if k.role == "dense"]


def _not_lazy(cls: type) -> bool:
    """Not of a lazy family (registered once transformers is loaded: test_hf_conv1d)."""
    members = {m for family in LAZY for m in family.members}
    return cls not in members and cls.__module__.startswith(("torch.", "tnquant."))


def test_the_builtin_kinds_and_tables():
    assert kinds()[: len(BUILTIN)] == BUILTIN
    assert {k: v for k, v in LAYER_TABLE.items() if _not_lazy(k[0])} == {
        (nn.Linear, TT): TTLinear,
        (nn.Linear, Tucker): TuckerLinear,
        (nn.Linear, LowRank): LowRankLinear,
        (nn.Conv2d, Tucker): TuckerConv2d,
        (nn.Conv2d, CP): CPConv2d,
        (nn.Conv1d, Tucker): TuckerConv1d,
        (nn.Embedding, TT): TTEmbedding,
    }
    assert {k.cls: k.quantized for k in DENSE if _not_lazy(k.cls)} == {
        nn.Linear: QuantLinear,
        nn.Conv2d: QuantConv2d,
        nn.Conv1d: QuantConv1d,
        nn.Embedding: QuantEmbedding,
    }
    assert sorted(n for n, h in HANDLERS.items() if _not_lazy(h.cls)) == sorted(
        [
            "LowRankLinear",
            "TTLinear",
            "TuckerLinear",
            "TuckerConv2d",
            "CPConv2d",
            "TuckerConv1d",
            "TTEmbedding",
            "QuantLinear",
            "QuantConv2d",
            "QuantConv1d",
            "QuantEmbedding",
            "FrozenTensor",
            "Quantizer",
            "Identity",
        ]
    )


@pytest.mark.parametrize("dense", DENSE, ids=lambda k: k.cls.__name__)
def test_every_class_a_dense_kind_names_has_an_entry_naming_it_back(dense):
    for spec_type, cls in dense.factorize.items():
        kind = kind_of(cls)
        assert kind is not None and kind.role == "factorized" and kind.dense is dense.cls
        assert spec_type in DECOMPOSERS[dense.weight_kind]
        assert cls.spec_type is spec_type
    kind = kind_of(dense.quantized)
    assert kind is not None and kind.role == "quantized" and kind.dense is dense.cls


@pytest.mark.parametrize(
    "kind",
    [k for k in kinds() if k.role in ("factorized", "quantized")],
    ids=lambda k: k.cls.__name__,
)
def test_every_layer_kind_stands_for_a_dense_kind_that_names_it(kind):
    dense = kind_of(kind.dense)
    assert dense is not None and dense.role == "dense"
    assert kind.cls in (*dense.factorize.values(), dense.quantized)
    assert kind.handler is not None and kind.sites == dense.sites


def test_every_class_save_and_load_know_has_an_entry():
    for name, handler in HANDLERS.items():
        kind = kind_of(handler.cls)
        assert kind is not None and kind.handler is handler and handler.cls.__name__ == name
        assert handler.replaces is (kind.dense if kind.role != "part" else None)


def test_every_export_route_is_one_the_export_knows():
    known = set(ROUTES) | set(CONV_ROUTES) | set(CONV1D_ROUTES)
    assert {k.export for k in kinds()} - {None, "skip"} <= known


def _quantized(dense: nn.Module, x: torch.Tensor) -> nn.Sequential:
    model = nn.Sequential(dense)
    quantize(
        model,
        weights=QuantSpec(bits=4, granularity="channel"),
        activations={"0.output": QuantSpec(8)} if not isinstance(dense, nn.Embedding) else None,
        progress=False,
    )
    if not isinstance(dense, nn.Embedding):
        from tnquant.ptq import calibrate

        calibrate(model, [x], progress=False)
    return model


CASES = [
    (lambda: nn.Linear(6, 4), lambda: torch.randn(3, 6)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, groups=1), lambda: torch.randn(2, 3, 7, 7)),
    (lambda: nn.Conv2d(4, 4, 3, groups=2), lambda: torch.randn(2, 4, 5, 5)),
    (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 9)),
    (lambda: nn.Conv1d(4, 4, 3, groups=4, padding="same"), lambda: torch.randn(2, 4, 9)),
    (lambda: nn.Embedding(9, 5, padding_idx=0), lambda: torch.tensor([[1, 0, 8]])),
]


@pytest.mark.parametrize("converted", [False, True])
@pytest.mark.parametrize(("make", "data"), CASES)
def test_every_quantized_class_round_trips_through_save_and_load(tmp_path, make, data, converted):
    torch.manual_seed(0)
    dense, x = make(), data()
    model = _quantized(dense, x)
    assert lookup(model[0]).role == "quantized"
    if converted:
        convert(model, progress=False)
    save(model, tmp_path)
    torch.manual_seed(1)
    loaded = load(tmp_path, model=nn.Sequential(make()))
    assert type(loaded[0]) is type(model[0]) and torch.equal(loaded(x), model(x))


def test_what_a_kind_refuses_is_written_once():
    assert refusal(nn.Conv2d(4, 4, 3, groups=4)) == (
        "groups=4 is not supported: a depthwise convolution is quantized, not factorized "
        "(the cores hold one dense channel map)"
    )
    assert refusal(nn.Conv1d(4, 8, 3, groups=2)).startswith(
        "groups=2 is not supported: a grouped convolution"
    )
    assert refusal(nn.Conv2d(4, 4, 3)) is None and refusal(nn.Linear(2, 2)) is None
    assert refusal(nn.Conv1d(4, 4, 3)) is None


def test_register_refuses_clashes_and_entries_are_checked():
    class Linear(nn.Module):  # the name save/load would give nn.Linear's QuantLinear twin
        pass

    with pytest.raises(ValueError, match="a layer kind named Linear is already registered"):
        register(LayerKind(Linear, "other"))
    with pytest.raises(ValueError, match="a layer kind named QuantLinear"):
        register(kind_of(QuantLinear))
    with pytest.raises(TypeError, match="takes a LayerKind"):
        register(nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="has no registry entry"):
        unregister(Linear)
    with pytest.raises(ValueError, match="role must be one of"):
        LayerKind(Linear, "layer")
    with pytest.raises(ValueError, match="a dense kind is its own dense class"):
        LayerKind(Linear, "dense", nn.Linear)
    with pytest.raises(ValueError, match="names the dense class it stands for"):
        LayerKind(Linear, "factorized")
    with pytest.raises(ValueError, match="has no CP decomposition of a linear weight"):
        LayerKind(Linear, "dense", Linear, weight_kind="linear", factorize={CP: CPConv2d})
    with pytest.raises(ValueError, match="weight_kind must be one of"):
        LayerKind(Linear, "dense", Linear, factorize={TT: TTLinear})
    with pytest.raises(ValueError, match="its handler is for a LowRankLinear"):
        LayerKind(Linear, "factorized", nn.Linear, handler=linear_handler(LowRankLinear))
    with pytest.raises(ValueError, match="only a dense kind takes"):
        LayerKind(Linear, "quantized", nn.Linear, quantized=QuantLinear)


def test_the_registry_anatomy_agrees_with_the_layers_own_for_builtin_kinds():
    from tnquant.layers import anatomy as layer_anatomy
    from tnquant.registry import activation_sites, quant_state, weight_pairs

    modules = [
        nn.Linear(4, 3),
        nn.Conv2d(2, 3, 3),
        nn.Embedding(5, 2),
        nn.ReLU(),
        LowRankLinear([torch.randn(3, 2), torch.randn(2, 4)]),
        TTEmbedding([torch.randn(1, 2, 2, 2), torch.randn(2, 3, 2, 1)]),
        QuantLinear(4, 3),
        QuantEmbedding(5, 2),
    ]
    quantize(nn.Sequential(*modules[4:6]), cores=QuantSpec(4), progress=False)
    for m in modules:
        assert [
            (n, t is t2, q is q2)
            for (n, t, q), (_, t2, q2) in zip(
                weight_pairs(m), layer_anatomy.weight_pairs(m), strict=True
            )
        ] == [(n, True, True) for n, _, _ in layer_anatomy.weight_pairs(m)]
        assert activation_sites(m) == layer_anatomy.activation_sites(m)
        assert quant_state(m) == layer_anatomy.quant_state(m)
