"""save/load: bit-exact round trips, integrity checks, architecture mismatches."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from functools import reduce
from operator import getitem
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tnquant import CP, TT, Binary, FixedPoint, LowRank, QuantSpec, Ternary, Tucker, factorize
from tnquant.io import JSON_FILE, TENSORS_FILE, IntegrityError, load, save
from tnquant.layers import FactorizedLayer, TTLinear
from tnquant.layers.quantized import QuantEmbedding, QuantLinear
from tnquant.ptq import calibrate
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.quantization import convert, quantize


class Net(nn.Module):
    """Conv, Conv, Embedding, Linears, and one Linear shared under two names."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.emb = nn.Embedding(24, 16, padding_idx=0)
        self.fc1 = nn.Linear(8 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 16)
        self.shared = nn.Linear(16, 16)
        self.alias = self.shared
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, img, idx):
        x = torch.relu(self.conv(img))
        x = F.avg_pool2d(torch.relu(self.conv2(x)), 2)
        h = self.fc2(torch.relu(self.fc1(x.flatten(1)))) + self.emb(idx).mean(1)
        return self.head(self.norm(self.alias(torch.relu(self.shared(h)))))


FACTORIZE = {
    "conv": Tucker(rank=(4, 2)),
    "conv2": CP(rank=3),
    "emb": TT(rank=3, order=2),
    "fc1": TT(rank=4, order=2),
    "fc2": Tucker(rank=(4, 4)),
    "shared": LowRank(rank=4),
}

WEIGHT_SPECS = [
    QuantSpec(bits=4, granularity="channel"),
    QuantSpec(bits=3, symmetric=False),
    QuantSpec(bits=8, observer="mse"),
    Binary(),
    Ternary(method="ttq"),
    FixedPoint(8, 3, rounding="RND", overflow="SAT"),
    QuantSpec(dtype="float8_e4m3fn"),
    QuantSpec(bits=5, learnable=True),
    Ternary(),
    QuantSpec(bits=12, symmetric=False, granularity="channel"),
]
ACT_SPECS = [
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=8, observer="percentile", percentile=99.0),
]


def _inputs(seed: int = 0, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 24, (n, 5), generator=gen))


def _net(hidden: int = 64) -> Net:
    torch.manual_seed(0)
    return Net(hidden)


def _quantize(model: nn.Module) -> None:
    """Every core and dense weight its own spec; input/output/inter activations."""
    names = [n for n, m in model.named_modules() if isinstance(m, FactorizedLayer)]
    cores: dict[str, object] = {}
    k = 0
    for name in names:
        for i in range(len(model.get_submodule(name).cores)):
            cores[f"{name}.cores.{i}"] = WEIGHT_SPECS[k % len(WEIGHT_SPECS)]
            k += 1
    dense = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.Embedding)]
    weights = {n: WEIGHT_SPECS[(k + i) % len(WEIGHT_SPECS)] for i, n in enumerate(dense)}
    quantize(
        model,
        weights=weights or None,
        cores=cores or None,
        activations={"*.inter_*": ACT_SPECS[0], "*.input": ACT_SPECS[1], "*": ACT_SPECS[0]},
        progress=False,
    )


def _factorized() -> Net:
    model = _net()
    factorize(model, FACTORIZE, progress=False)
    return model


def _fake_quant() -> Net:
    model = _factorized()
    _quantize(model)
    calibrate(model, [_inputs(s) for s in range(2)], progress=False)
    return model


def _converted() -> Net:
    model = _fake_quant()
    convert(model, progress=False)
    return model


def _dense_quant() -> Net:
    model = _net()
    _quantize(model)
    calibrate(model, [_inputs(s) for s in range(2)], bias_correction=True, progress=False)
    return model


def _dense_converted() -> Net:
    model = _dense_quant()
    convert(model, progress=False)
    return model


def _uncalibrated() -> Net:
    model = _factorized()
    _quantize(model)  # dynamic qparams, observers empty
    return model


def _partly_quantized() -> Net:
    model = _factorized()
    quantize(model, cores={0: QuantSpec(bits=4)}, weights={"head": Ternary()}, progress=False)
    calibrate(model, [_inputs(0)], progress=False)
    convert(model, progress=False)
    return model


SCENARIOS = {
    "factorized": _factorized,
    "fake-quant": _fake_quant,
    "converted": _converted,
    "dense-quant": _dense_quant,
    "dense-converted": _dense_converted,
    "uncalibrated": _uncalibrated,
    "partly-quantized": _partly_quantized,
}


def _assert_same(model: nn.Module, loaded: nn.Module) -> None:
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    mods_a, mods_b = dict(model.named_modules()), dict(loaded.named_modules())
    assert {n: type(m) for n, m in mods_a.items()} == {n: type(m) for n, m in mods_b.items()}
    for name, m in mods_a.items():
        if isinstance(m, (Quantizer, FrozenTensor)):
            assert m.spec == mods_b[name].spec and getattr(m, "mode", None) == getattr(
                mods_b[name], "mode", None
            ), name
        if isinstance(m, FactorizedLayer):
            assert m.spec == mods_b[name].spec and m.ranks == mods_b[name].ranks
            assert m.decomposition_info == mods_b[name].decomposition_info
    model.eval()
    loaded.eval()
    with torch.no_grad():
        for seed in (5, 6):
            assert torch.equal(model(*_inputs(seed)), loaded(*_inputs(seed)))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_round_trip_is_bit_exact(scenario, tmp_path):
    model = SCENARIOS[scenario]()
    save(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [JSON_FILE, TENSORS_FILE]
    loaded = load(tmp_path / "m", model=_net())
    _assert_same(model, loaded)
    assert model.alias is model.shared
    assert loaded.alias is loaded.shared  # a shared module stays one module


def test_converted_stores_codes_not_floats(tmp_path):
    model = _converted()
    save(model, tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / TENSORS_FILE))
    assert tensors["fc1.cores.0"].numel() == 0
    packed = [k for k in tensors if k.endswith(".packed")]
    # every core and dense weight once: 17 ('alias', the second name of 'shared', is
    # a tied key, stored once under 'shared')
    assert len(packed) == 17 and not any(k.startswith("alias.") for k in tensors)
    assert all(not tensors[k].is_floating_point() for k in packed)
    assert any(tensors[k].dtype == torch.uint8 for k in packed)
    meta = json.loads((tmp_path / "m" / JSON_FILE).read_text())
    entries = {e["names"][0]: e for e in meta["modules"]}
    children = dict(entries["fc1"]["node"]["children"])
    frozen = children["core_quantizers"]["list"][0]
    assert frozen["class"] == "FrozenTensor" and frozen["config"]["shape"] == list(
        model.fc1.core_quantizers[0].shape
    )
    assert entries["shared"]["names"] == ["shared", "alias"]
    assert entries["conv"]["replaces"] == "Conv2d" and entries["fc1"]["node"]["class"] == "TTLinear"


def test_single_layer_loads_without_a_model(tmp_path):
    layer = TTLinear.from_dense(nn.Linear(12, 8), TT(rank=2, order=2))
    layer.core_quantizers = nn.ModuleList([Quantizer(QuantSpec(bits=4)) for _ in layer.cores])
    save(layer, tmp_path / "m")
    loaded = load(tmp_path / "m")
    x = torch.randn(3, 12)
    assert isinstance(loaded, TTLinear) and torch.equal(loaded(x), layer(x))
    again = load(tmp_path / "m", model=nn.Linear(12, 8))  # the root is replaced: returned
    assert isinstance(again, TTLinear) and torch.equal(again(x), layer(x))
    with pytest.raises(ValueError, match="in_features=6"):
        load(tmp_path / "m", model=nn.Linear(6, 8))


def test_float64_round_trip(tmp_path):
    def make():
        return _net().double()

    model = make()
    factorize(model, FACTORIZE, progress=False)
    _quantize(model)
    img, idx = _inputs(3)
    calibrate(model, [(img.double(), idx)], progress=False)
    convert(model, progress=False)
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", model=make())
    a, b = model.state_dict(), loaded.state_dict()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert loaded.fc1.core_quantizers[0].dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(model(img.double(), idx), loaded(img.double(), idx))


def test_tied_weights_stay_tied(tmp_path):
    def make():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
        m[1].weight = m[0].weight
        return m

    model = make()
    for i in (0, 1):
        model[i] = {0: QuantEmbedding, 1: QuantLinear}[i].from_float(model[i])
        model[i].weight_quantizer = Quantizer(QuantSpec(bits=4))
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", model=make())
    assert loaded[1].weight is loaded[0].weight
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(idx), model(idx))


# --------------------------------------------------------------------------- #
# integrity
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("io") / "m"
    save(_converted(), path)
    return path


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _assert_untouched(base: nn.Module, before: dict) -> None:
    after = base.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert type(base.fc1) is nn.Linear and type(base.conv) is nn.Conv2d


def _offsets(size: int, n: int = 24) -> list[int]:
    return sorted({0, 1, size // 2, size - 1} | {i * size // n for i in range(n)})


@pytest.mark.parametrize("filename", [TENSORS_FILE, JSON_FILE])
@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_flipped_byte_is_refused(saved, tmp_path, filename, mask):
    raw = (saved / filename).read_bytes()
    base = _net()
    before = copy.deepcopy(base.state_dict())
    for offset in _offsets(len(raw)):
        work = _copy_dir(saved, tmp_path / f"{offset}")
        bad = bytearray(raw)
        bad[offset] ^= mask
        (work / filename).write_bytes(bytes(bad))
        with pytest.raises(IntegrityError, match=filename):
            load(work, model=base)
    _assert_untouched(base, before)


@pytest.mark.parametrize("filename", [TENSORS_FILE, JSON_FILE])
def test_truncated_file_is_refused(saved, tmp_path, filename):
    raw = (saved / filename).read_bytes()
    base = _net()
    before = copy.deepcopy(base.state_dict())
    for keep in (0, len(raw) // 2, len(raw) - 1):
        work = _copy_dir(saved, tmp_path / f"{keep}")
        (work / filename).write_bytes(raw[:keep])
        with pytest.raises(IntegrityError, match=filename):
            load(work, model=base)
    _assert_untouched(base, before)


def _rewrite_json(path: Path, change) -> None:
    meta = json.loads((path / JSON_FILE).read_text())
    meta.pop("checksum")
    change(meta)
    text = lambda m: json.dumps(m, sort_keys=True, indent=1, ensure_ascii=True) + "\n"  # noqa: E731
    meta["checksum"] = hashlib.sha256(text(meta).encode()).hexdigest()
    (path / JSON_FILE).write_text(text(meta))


def test_unknown_version_and_missing_files(saved, tmp_path):
    work = _copy_dir(saved, tmp_path / "v2")
    _rewrite_json(work, lambda m: m.update(version=2))
    with pytest.raises(ValueError, match="unsupported format version 2"):
        load(work, model=_net())
    work = _copy_dir(saved, tmp_path / "reformatted")
    meta = json.loads((work / JSON_FILE).read_text())
    (work / JSON_FILE).write_text(json.dumps(meta, sort_keys=True, indent=2))  # same content
    with pytest.raises(IntegrityError, match="canonical"):
        load(work, model=_net())
    with pytest.raises(FileNotFoundError, match=JSON_FILE):
        load(tmp_path / "nowhere", model=_net())
    work = _copy_dir(saved, tmp_path / "no-tensors")
    (work / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=TENSORS_FILE):
        load(work, model=_net())


def test_full_model_needs_a_base_model(saved):
    with pytest.raises(ValueError, match="model="):
        load(saved)


class Other(Net):
    def __init__(self, variant: str):
        super().__init__()
        if variant == "no-head":
            del self.head
        elif variant == "conv-for-linear":
            self.fc2 = nn.Conv2d(64, 16, 1)
        elif variant == "extra":
            self.extra = nn.Linear(2, 2)
        elif variant == "head-size":
            self.head = nn.Linear(16, 7)
        elif variant == "norm-size":
            self.norm = nn.LayerNorm(12)


@pytest.mark.parametrize(
    "base,match",
    [
        (lambda: _net(hidden=48), "'fc1'.*out_features=48"),
        (lambda: Other("no-head"), "head"),
        (lambda: Other("conv-for-linear"), "'fc2' of the model is a Conv2d, expected a Linear"),
        (lambda: Other("extra"), "missing from the save: 'extra.bias'"),
        (lambda: Other("head-size"), "'head' of the model has out_features=7, .* expects 10"),
        (
            lambda: Other("norm-size"),
            r"shape mismatches: norm.bias \(model \(12,\), saved \(16,\)\)",
        ),
    ],
    ids=["sizes", "missing", "type", "extra", "head", "shape"],
)
def test_mismatching_architecture_is_refused_untouched(saved, base, match):
    model = base()
    before = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        load(saved, model=model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_save_refuses_unknown_tnquant_modules(tmp_path):
    class MyQuantizer(Quantizer):
        pass

    model = nn.Sequential(nn.Linear(2, 2), MyQuantizer(QuantSpec()))
    with pytest.raises(TypeError, match="MyQuantizer"):
        save(model, tmp_path / "m")
    with pytest.raises(TypeError, match="nn.Module"):
        save("model", tmp_path / "m")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_the_base_models_device(tmp_path):
    model = _converted()
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", model=_net().cuda())
    assert all(t.is_cuda for t in loaded.state_dict().values())
    img, idx = _inputs(7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(img.cuda(), idx.cuda()).cpu(), model.eval()(img, idx))


# --------------------------------------------------------------------------- #
# forged directories (checksums recomputed): refused up front, base untouched
# --------------------------------------------------------------------------- #


def _forge(saved: Path, dst: Path, change, tensors: dict | None = None) -> Path:
    """A copy of ``saved``, model.json changed (and the tensor file replaced, if given)."""
    work = _copy_dir(saved, dst)
    if tensors is not None:
        save_file(tensors, str(work / TENSORS_FILE))
        raw = (work / TENSORS_FILE).read_bytes()
        entries = {
            k: {"dtype": str(t.dtype)[6:], "shape": list(t.shape)} for k, t in tensors.items()
        }
        _rewrite_json(
            work,
            lambda m: m["tensors"].update(
                bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(), entries=entries
            ),
        )
    _rewrite_json(work, change)
    return work


def _refused(work: Path, base: nn.Module, error=ValueError, match=None) -> None:
    before = copy.deepcopy(base.state_dict())
    modules = {n: id(m) for n, m in base.named_modules(remove_duplicate=False)}
    with pytest.raises(error, match=match):
        load(work, model=base)
    assert {n: id(m) for n, m in base.named_modules(remove_duplicate=False)} == modules
    after = base.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_identity_and_replaces_come_from_the_class_table(saved, tmp_path):
    tensors = {
        k: v for k, v in load_file(str(saved / TENSORS_FILE)).items() if not k.startswith("head.")
    }
    identity = {"class": "Identity", "config": {}, "children": []}
    work = _forge(
        saved,
        tmp_path / "a",
        lambda m: next(e for e in m["modules"] if e["names"] == ["head"]).update(
            replaces=None, node=identity
        ),
        tensors,
    )
    _refused(work, _net(), match="'head' of the model is a Linear; the saved Identity replaces no")
    work = _forge(saved, tmp_path / "b", lambda m: m["modules"][0].update(replaces="Linear"))
    _refused(work, _net(), IntegrityError, "replaces 'Linear'; a TuckerConv2d replaces 'Conv2d'")
    model = nn.Sequential(nn.Linear(6, 6), nn.Identity())  # where save writes an Identity
    save(model, tmp_path / "c")
    assert load(tmp_path / "c", model=nn.Sequential(nn.Linear(6, 6), nn.Identity()))[1] is not None
    _refused(tmp_path / "c", nn.Sequential(nn.Linear(6, 6), nn.ReLU()), match="'1' of the model")


def test_forged_tied_groups_leave_the_base_untouched(saved, tmp_path):
    groups = [
        ["fc1.bias", "fc2.bias"],
        ["shared.bias", "fc2.bias"],
        ["fc2.bias", "nowhere"],
        ["fc2.bias"],
        ["fc2.bias", "fc2.bias"],
        "fc2.bias",
    ]
    for k, group in enumerate(groups):  # added to the saved groups (stored once: needed)
        work = _forge(saved, tmp_path / str(k), lambda m, g=group: m.update(tied=[*m["tied"], g]))
        _refused(work, _net(), IntegrityError, r"tied\[\d+\]")


def test_a_failing_final_load_puts_the_base_back(saved):
    class Refusing(nn.LayerNorm):
        def _load_from_state_dict(self, *args, **kwargs):
            raise RuntimeError("refused by the base")

    base = _net()
    base.norm = Refusing(16)
    _refused(saved, base, RuntimeError, "refused by the base")
    assert base.alias is base.shared and type(base.shared) is nn.Linear


def test_huge_sizes_are_refused_quickly_without_allocating(tmp_path):
    model = _factorized()
    quantize(model, cores={"fc1.cores.*": QuantSpec(bits=4)}, progress=False)
    save(model, tmp_path / "m")
    assert 8000 < (tmp_path / "m" / JSON_FILE).stat().st_size < 16000  # ~10 KB of JSON

    def grow(meta):  # every core 32x wider in every mode: the TT cores alone take 2 GiB
        for config in (e["node"]["config"] for e in meta["modules"]):
            config["core_shapes"] = [[32 * s for s in shape] for shape in config["core_shapes"]]

    start, activity = time.perf_counter(), [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activity, profile_memory=True) as prof:
        _refused(
            _forge(tmp_path / "m", tmp_path / "huge", grow),
            _net(),
            IntegrityError,
            rf"{JSON_FILE}: modules\[0\] \(TuckerConv2d",
        )
    assert time.perf_counter() - start < 30
    assert max((e.cpu_memory_usage for e in prof.events()), default=0) < 1 << 20


@pytest.mark.parametrize(
    "path,match",
    [
        (
            ("modules", 0, "node", "config", "in_channels"),
            r"modules\[0\].*lacks field 'in_channels'",
        ),
        (("modules", 0, "names"), r"modules\[0\] must be an object with 'names'"),
        (("modules", 0, "node", "children", 0, 1), r"a child must be \[name, \{kind"),
        (("tensors",), "expected the fields"),
        (("tied",), "expected the fields"),
        (("tensors", "entries"), "'tensors' must be an object"),
    ],
)
def test_a_missing_field_is_named(saved, tmp_path, path, match):
    work = _forge(saved, tmp_path / "m", lambda m: reduce(getitem, path[:-1], m).pop(path[-1]))
    _refused(work, _net(), IntegrityError, match)


@pytest.mark.parametrize(
    "where,value,error,match",
    [
        (
            "file",
            "../../etc/passwd",
            IntegrityError,
            "'tensors.file' must be 'tensors.safetensors'",
        ),
        ("file", "/etc/passwd", IntegrityError, "'tensors.file' must be"),
        ("names", ["../../x"], IntegrityError, "'../../x' is not a module name"),
        ("names", ["fc1.weight"], ValueError, "the model has no module 'fc1.weight'"),
        ("names", ["__class__"], ValueError, "the model has no module '__class__'"),
    ],
)
def test_path_traversal_is_refused(saved, tmp_path, where, value, error, match):
    work = _forge(
        saved,
        tmp_path / "m",
        lambda m: (m["tensors"] if where == "file" else m["modules"][3]).update({where: value}),
    )
    _refused(work, _net(), error, match)


@pytest.mark.parametrize(
    "spec,match",
    [
        (5, "must be a spec object"),
        ({"type": "Nope"}, "unknown spec type 'Nope'"),
        ({"type": "QuantSpec", "bits": "eight"}, "is not a valid spec"),
        (
            {"type": "TT", "rank": 2},
            "must be a QuantSpec or Binary or Ternary or FixedPoint or Codebook spec",
        ),
        ({"type": "QuantSpec", "nope": 1}, "unknown field"),
    ],
)
def test_a_bad_spec_dict_names_the_entry(saved, tmp_path, spec, match):
    change = lambda m: dict(m["modules"][0]["node"]["children"])[  # noqa: E731
        "core_quantizers"
    ]["list"][0]["config"].update(spec=spec)  # conv's first core quantizer
    _refused(
        _forge(saved, tmp_path / "m", change),
        _net(),
        IntegrityError,
        rf"modules\[0\] 'conv'\.core_quantizers\.0 \(FrozenTensor\): field 'spec' .*{match}",
    )


@pytest.mark.parametrize(
    "meta,match",
    [
        ({"shape": [2]}, "'spec', 'shape'"),
        ({"spec": {"type": "Binary"}, "shape": [-1]}, "'shape'"),
        ({"spec": {"type": "Binary"}, "shape": "22"}, "'shape'"),
        ([], "'spec'"),
        ({"spec": {"type": "Binary"}, "shape": [2], "dtype": "int8"}, "'dtype'"),
        ({"spec": {"type": "Binary"}, "shape": [2], "x": 1}, "'spec', 'shape'"),
        ({"spec": {"type": "TT", "rank": 2}, "shape": [2]}, "quantizer spec"),
        ({"spec": {"type": "QuantSpec", "bits": 99}, "shape": [2]}, "not a valid spec"),
    ],
)
def test_frozen_metadata_is_checked_field_by_field(meta, match):
    with pytest.raises(ValueError, match=match):
        FrozenTensor.from_metadata(meta)
    binary = {"spec": {"type": "Binary"}, "shape": [3, 4]}
    assert FrozenTensor.from_metadata(binary, device="meta").packed.shape == (2,)
