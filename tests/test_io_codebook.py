"""save/load of Codebook weights (converted and fake-quant), and forged codebook fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tnquant
from tests.test_io_adversarial import _grow, copy_dir, forge, read_json, refused, resync
from tnquant import Codebook
from tnquant.io import load, save

SPECS = {
    "0": Codebook(kind="nf4", granularity=("group", 16)),
    "2": Codebook(kind="kmeans", bits=3, granularity=("group", 8), centroids="block"),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


def _saved(tmp_path: Path, converted: bool, learnable: bool = False) -> tuple[Path, torch.Tensor]:
    model = _model()
    specs = {k: Codebook(**{**s.__dict__, "learnable": learnable}) for k, s in SPECS.items()}
    tnquant.quantize(model, weights=specs)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)  # a learnable quantizer stores its codebook on the first call
    if converted:
        tnquant.convert(model)
    with torch.no_grad():
        y = model(x)
    save(model, tmp_path / "m")
    load(tmp_path / "m", model=_model())  # warm: lazy imports stay out of refused()'s bound
    return tmp_path / "m", y


@pytest.mark.parametrize(("converted", "learnable"), [(True, False), (False, True)])
def test_round_trip_is_exact(tmp_path, converted, learnable):
    path, y = _saved(tmp_path, converted, learnable)
    loaded = load(path, model=_model())
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    spec = loaded[2].weight_quantizer.spec
    assert spec == Codebook(**{**SPECS["2"].__dict__, "learnable": learnable})


def _spec_nodes(meta: dict) -> list[dict]:
    out = []

    def walk(obj):
        if isinstance(obj, dict):
            if obj.get("type") == "Codebook":
                out.append(obj)
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(meta)
    return out


@pytest.mark.parametrize(
    "edit",
    [
        {"bits": 3},  # nf4 is 4 bits only
        {"kind": "lut"},
        {"centroids": "tensor"},  # the saved table is per block: shapes no longer match
        {"scale_dtype": "float64"},
        {"iters": -1},
        {"granularity": ["group", 5]},
    ],
    ids=str,
)
@pytest.mark.parametrize("converted", [True, False])
def test_forged_codebook_fields_are_refused(tmp_path, edit, converted):
    path, _ = _saved(tmp_path, converted, learnable=not converted)

    def change(meta):
        nodes = _spec_nodes(meta)
        assert nodes
        target = nodes[-1] if "centroids" in edit else nodes[0]
        target.update(edit)

    forged = forge(path, tmp_path / "forged", change)
    refused(forged, _model())


@pytest.mark.parametrize("converted", [True, False])
def test_oversized_codebook_tensor_is_refused(tmp_path, converted):
    path, _ = _saved(tmp_path, converted, learnable=not converted)
    keys = [k for k in read_json(path)["tensors"]["entries"] if k.endswith("codebook")]
    assert keys
    for i, (shape, pad) in enumerate([([1 << 20, 1 << 20], False), ([4, 16], True)]):
        work = copy_dir(path, tmp_path / f"grow{i}")
        _grow(work, keys[0], shape, pad)
        resync(work)
        refused(work, _model())


def test_non_finite_learned_codebook_is_refused(tmp_path):
    import struct

    from tests.test_io_adversarial import read_safetensors, write_safetensors
    from tnquant.io import TENSORS_FILE

    path, _ = _saved(tmp_path, converted=False, learnable=True)
    work = copy_dir(path, tmp_path / "nan")
    header, data = read_safetensors(work / TENSORS_FILE)
    key = next(k for k in header if k.endswith("0.weight_quantizer.codebook"))
    start, end = header[key]["data_offsets"]
    nan = struct.pack("<f", float("nan")) * ((end - start) // 4)
    write_safetensors(work / TENSORS_FILE, header, data[:start] + nan + data[end:])
    resync(work)
    err = refused(work, _model())
    assert "codebook holds non-finite values" in str(err)
