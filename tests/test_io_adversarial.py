"""Forged saved directories: refused up front, nothing allocated unchecked, base untouched.

Every forgery is written back with *recomputed* checksums (the canonical JSON +
sha256 rule of ``save``, re-implemented here): the checksums are unkeyed, so only
the loader's own checks stand in the way. A forged load must raise
``IntegrityError`` or ``ValueError``, leave the base model's module objects and
tensor values as they were, write no file, and keep to a memory bound:
``tracemalloc`` (Python, numpy) peaks under ``PY_PEAK`` in-process; torch's CPU
allocations, which it does not see, are bounded in a subprocess whose address
space is capped at its size + ``AS_MARGIN`` (where a 2 GiB ``torch.zeros`` fails;
:mod:`tests.test_io_allocations`).

Random edits (hypothesis, derandomized) come from two pools. Structural fields
(sizes, shapes, classes, names, ``replaces``, dtypes, the tensor listing, the
file name, versions; deletions; wrong types) must be refused. Descriptive fields
(``model_class``, ``decomposition_info``, specs, ``implementation``, the MSE
observer grid, ``QuantEmbedding``'s ``norm_type``/``sparse``/``scale_grad_by_freq``,
``tied`` groups) may be edited harmlessly: a forged directory that loads must
hold the original state (keys, values, module types) and, for the INERT fields
(all but specs and ``implementation``, which change what a quantizer or layer
computes), give the output of a fresh load of the unforged directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tnquant import CP, TT, Binary, FixedPoint, LowRank, QuantSpec, Ternary, Tucker, factorize
from tnquant.io import JSON_FILE, TENSORS_FILE, IntegrityError, load, save
from tnquant.io.nodes import HANDLERS
from tnquant.ptq import calibrate
from tnquant.quantization import convert, quantize

ROOT = Path(__file__).resolve().parents[1]
PY_PEAK = 32 << 20  # bytes of Python/numpy allocations during one forged load
AS_MARGIN = 512 << 20  # address space a forged load may add in the capped subprocess


class Small(nn.Module):
    """Conv, Embedding tied to the head, two Linears and an Identity."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 8)
        self.skip = nn.Identity()
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, img: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(torch.relu(self.conv(img)), 2).flatten(1)
        return self.head(self.skip(self.fc2(torch.relu(self.fc1(x)))) + self.emb(idx).mean(1))


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 4, 4, generator=gen), torch.randint(0, 12, (3, 5), generator=gen)


def factorized() -> nn.Module:
    model = Small()
    factorize(
        model,
        {"conv": Tucker(rank=(2, 2)), "fc1": TT(rank=2, order=2), "fc2": LowRank(rank=2)},
        progress=False,
    )
    return model


def converted() -> nn.Module:
    model = Small()
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())  # factorize refuses ties
    factorize(
        model,
        {"conv": CP(rank=2), "fc1": Tucker(rank=(2, 2)), "emb": TT(rank=2, order=2)},
        progress=False,
    )
    quantize(
        model,
        weights={"fc2": QuantSpec(bits=4, granularity="channel"), "head": Ternary()},
        cores={
            "conv.cores.*": QuantSpec(bits=3, symmetric=False),
            "fc1.cores.0": Binary(),
            "fc1.cores.1": FixedPoint(8, 3),
            "emb.cores.*": QuantSpec(bits=5),
        },
        activations={"*": QuantSpec(bits=8, symmetric=False)},
        progress=False,
    )
    calibrate(model, [inputs(0)], progress=False)
    convert(model, progress=False)
    return model


def fake_quant() -> nn.Module:
    """Tied QuantEmbedding/QuantLinear weights, an MSE observer."""
    model = Small()
    quantize(
        model,
        weights={
            "emb": QuantSpec(bits=4),
            "head": QuantSpec(bits=4),
            "fc1": QuantSpec(bits=8, observer="mse"),
        },
        progress=False,
    )
    calibrate(model, [inputs(0)], progress=False)
    return model


SCENARIOS = {"factorized": factorized, "converted": converted, "fake-quant": fake_quant}


# --------------------------------------------------------------------------- #
# forging: the attacker's side (recomputes every checksum)
# --------------------------------------------------------------------------- #


def canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def read_json(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / JSON_FILE).read_text())
    meta.pop("checksum")
    return meta


def write_json(directory: Path, meta: dict[str, Any]) -> None:
    meta = dict(meta)
    meta["checksum"] = hashlib.sha256(canonical(meta)).hexdigest()
    (directory / JSON_FILE).write_bytes(canonical(meta))


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def forge(src: Path, dst: Path, change: Any) -> Path:
    """``src`` copied to ``dst``, its model.json changed in place by ``change(meta)``."""
    meta = read_json(copy_dir(src, dst))
    change(meta)
    write_json(dst, meta)
    return dst


#: safetensors dtype code -> (torch name, bytes per element)
DTYPES = {
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "I32": ("int32", 4),
    "I64": ("int64", 8),
}


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def resync(directory: Path, listing: bool = True) -> None:
    """Make model.json agree with the tensor file: size, sha256 (and listing)."""
    meta = read_json(directory)
    raw = (directory / TENSORS_FILE).read_bytes()
    meta["tensors"]["bytes"] = len(raw)
    meta["tensors"]["sha256"] = hashlib.sha256(raw).hexdigest()
    if listing:
        header, _ = read_safetensors(directory / TENSORS_FILE)
        meta["tensors"]["entries"] = {
            k: {"dtype": DTYPES[v["dtype"]][0], "shape": v["shape"]}
            for k, v in header.items()
            if k != "__metadata__"
        }
    write_json(directory, meta)


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    return ([prefix] if prefix else []) + [p for k, v in items for p in paths(v, prefix + (k,))]


def get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


#: keys under which an edit may be harmless (may load); INERT ones cannot change the output
FREE = {
    "model_class",
    "decomposition_info",
    "spec",
    "implementation",
    "observer",
    "norm_type",
    "scale_grad_by_freq",
    "sparse",
}  # not "tied": a tied group is stored once, so its keys are needed to load
INERT = FREE - {"spec", "implementation"}
NUMBERS = [2**62, 2**40 + 1, 10**30, 1 << 20, -1, 0, -(2**40), 3.5, True, "7", None]
STRINGS = [
    "",
    "../../x",
    "../../etc/passwd",
    "/etc/passwd",
    "Identity",
    "Linear",
    "x" * 300,
    "__class__",
    "fc1.weight",
    "float64",
    "int8",
]
RETYPES = [[], {}, "x", 0, None, [0, 0, 0], {"type": "TT"}]
CLASSES = sorted(HANDLERS)
REPLACES = [None, "Linear", "Conv2d", "Embedding", "Identity", "Module"]


def free(path: tuple) -> set[str]:
    return {p for p in path if isinstance(p, str)} & FREE


def mutate(meta: dict[str, Any], path: tuple, data: Any) -> dict[str, Any]:
    """A copy of ``meta`` with one edit at ``path`` (drawn with ``data``)."""
    new = copy.deepcopy(meta)
    parent, key = get(new, path[:-1]), path[-1]
    old = parent[key]
    ops = (
        ["delete", "retype"]
        + ["number"] * (type(old) in (int, float))
        + ["string"] * isinstance(old, str)
        + [key] * (key in ("class", "replaces"))
    )
    op = data.draw(st.sampled_from(ops), label="op")
    if op == "delete":
        del parent[key]
    else:
        pool = {
            "number": NUMBERS,
            "string": STRINGS,
            "retype": RETYPES,
            "class": CLASSES,
            "replaces": REPLACES,
        }[op]
        parent[key] = copy.deepcopy(data.draw(st.sampled_from(pool), label=op))
    assume(canonical(new) != canonical(meta))
    return new


# --------------------------------------------------------------------------- #
# the defender's side: refused, untouched, nothing written, bounded memory
# --------------------------------------------------------------------------- #


def snapshot(model: nn.Module) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    modules = {n: id(m) for n, m in model.named_modules(remove_duplicate=False)}
    return modules, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(
    model: nn.Module, snap: tuple[dict[str, int], dict[str, torch.Tensor]]
) -> None:
    modules, state = snap
    assert {n: id(m) for n, m in model.named_modules(remove_duplicate=False)} == modules
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in state.items())


def listing(d: Path) -> list[tuple[str, int]]:
    return sorted(
        (os.path.join(r, f), os.path.getsize(os.path.join(r, f)))
        for r, _, files in os.walk(d)
        for f in files
    )


def refused(directory: Path, model: nn.Module | None) -> BaseException:
    """Load ``directory``; it must be refused (returned) within ``PY_PEAK``, writing nothing."""
    before = listing(directory.parent)
    cwd = sorted(os.listdir("."))
    tracemalloc.start()
    try:
        load(directory, model=model)
    except (IntegrityError, ValueError) as err:
        caught: BaseException = err
    else:
        raise AssertionError(f"{directory} loaded")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PY_PEAK, peak
    assert listing(directory.parent) == before and sorted(os.listdir(".")) == cwd
    return caught


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adv")
    out = {}
    for name, make in SCENARIOS.items():
        model = make().eval()
        save(model, root / name)
        fresh = load(root / name, model=Small()).eval()
        with torch.no_grad():
            expected = fresh(*inputs(7))
            assert torch.equal(expected, model(*inputs(7)))
        out[name] = {
            "dir": root / name,
            "meta": read_json(root / name),
            "expected": expected,
            "state": fresh.state_dict(),
            "types": {n: type(m) for n, m in fresh.named_modules()},
        }
    return out


def _pools(meta: dict[str, Any]) -> tuple[list[tuple], list[tuple]]:
    all_paths = paths(meta)
    # deleting an Identity's entry leaves the base's own Identity: the same model
    same = {
        ("modules", k) for k, e in enumerate(meta["modules"]) if e["node"]["class"] == "Identity"
    }
    strict = [p for p in all_paths if not free(p) and p not in same]
    return strict, [p for p in all_paths if free(p) or p in same]


SETTINGS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_structural_edits_are_refused(saved, scenario):
    info = saved[scenario]
    strict, _ = _pools(info["meta"])
    base = Small()
    snap = snapshot(base)

    @settings(SETTINGS, max_examples=25)
    @given(data=st.data())
    def check(data):
        path = data.draw(st.sampled_from(strict), label="path")
        forged = mutate(info["meta"], path, data)
        with tempfile.TemporaryDirectory() as tmp:
            work = copy_dir(info["dir"], Path(tmp) / "m")
            write_json(work, forged)
            refused(work, base)
        assert_untouched(base, snap)

    check()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_descriptive_edits_load_only_self_consistent(saved, scenario):
    info = saved[scenario]
    _, loose = _pools(info["meta"])

    @settings(SETTINGS, max_examples=10)
    @given(data=st.data())
    def check(data):
        path = data.draw(st.sampled_from(loose), label="path")
        forged = mutate(info["meta"], path, data)
        base = Small()
        snap = snapshot(base)
        with tempfile.TemporaryDirectory() as tmp:
            work = copy_dir(info["dir"], Path(tmp) / "m")
            write_json(work, forged)
            try:
                loaded = load(work, model=base)
            except (IntegrityError, ValueError):
                assert_untouched(base, snap)
                return
        state = loaded.state_dict()
        assert list(state) == list(info["state"])
        assert all(torch.equal(state[k], v) for k, v in info["state"].items())
        assert {n: type(m) for n, m in loaded.named_modules()} == info["types"]
        if free(path) <= INERT:
            with torch.no_grad():
                assert torch.equal(loaded.eval()(*inputs(7)), info["expected"])

    check()


def test_harmless_edits_load_and_equal_a_fresh_load(saved, tmp_path):
    """Examples of the descriptive pool that must load, with the unforged output."""
    info = saved["fake-quant"]
    edits = [
        lambda m: m.update(model_class="Anything"),
        lambda m: next(e for e in m["modules"] if e["node"]["class"] == "QuantEmbedding")["node"][
            "config"
        ].update(sparse=True, norm_type=1.0),
    ]
    for k, edit in enumerate(edits):
        loaded = load(forge(info["dir"], tmp_path / str(k), edit), model=Small()).eval()
        with torch.no_grad():
            assert torch.equal(loaded(*inputs(7)), info["expected"])


# --------------------------------------------------------------------------- #
# the tensor file: oversized shapes behind a consistent-looking header
# --------------------------------------------------------------------------- #


def _grow(directory: Path, key: str, shape: list[int], pad: bool) -> None:
    """Claim ``shape`` for ``key`` in the header (the bytes too if ``pad``), offsets shifted."""
    header, data = read_safetensors(directory / TENSORS_FILE)
    offset, chunks = 0, []
    for k in sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    ):
        start, end = header[k]["data_offsets"]
        n = end - start
        if k == key:
            header[k]["shape"] = shape
            n = DTYPES[header[k]["dtype"]][1] * math.prod(shape)
        chunks.append(data[start:end] + (b"\0" * (n - end + start) if k == key and pad else b""))
        header[k]["data_offsets"] = [offset, offset + n]
        offset += n
    write_safetensors(directory / TENSORS_FILE, header, b"".join(chunks))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_oversized_header_shapes_are_refused(saved, scenario, tmp_path):
    info = saved[scenario]
    base = Small()
    snap = snapshot(base)
    keys = [k for k, v in info["meta"]["tensors"]["entries"].items() if v["shape"]]
    for i, key in enumerate(keys[:3]):
        for j, (shape, pad) in enumerate(
            [([1 << 20, 1 << 20], False), ([1 << 40], False), ([64, 64], True)]
        ):
            work = copy_dir(info["dir"], tmp_path / f"{i}-{j}")
            _grow(work, key, shape, pad)
            resync(work)
            err = refused(work, base)
            assert TENSORS_FILE in str(err) or JSON_FILE in str(err) or "model" in str(err)
    assert_untouched(base, snap)


def test_header_is_checked_before_any_data_is_read(saved, tmp_path):
    src = saved["factorized"]["dir"]
    raw = (src / TENSORS_FILE).read_bytes()
    header, data = read_safetensors(src / TENSORS_FILE)
    keys = [k for k in header if k != "__metadata__"]
    size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys}
    a, b = next((a, b) for a in keys for b in keys if a != b and size[a] == size[b])
    overlap, bad_dtype = copy.deepcopy(header), copy.deepcopy(header)
    overlap[b]["data_offsets"] = list(header[a]["data_offsets"])  # two tensors, one range
    bad_dtype[a]["dtype"] = "F4"
    blobs = {
        "huge-length": (1 << 60).to_bytes(8, "little") + raw[8:],
        "length-past-end": len(raw).to_bytes(8, "little") + raw[8:],
        "not-json": raw[:8] + b"[" * (len(raw) - 8 - len(data)) + data,
    }
    base = Small()
    snap = snapshot(base)
    for name, blob in [*blobs.items(), ("overlap", overlap), ("dtype", bad_dtype)]:
        work = copy_dir(src, tmp_path / name)
        if isinstance(blob, dict):
            write_safetensors(work / TENSORS_FILE, blob, data)
        else:
            (work / TENSORS_FILE).write_bytes(blob)
        resync(work, listing=False)
        start = time.perf_counter()
        err = refused(work, base)
        assert isinstance(err, IntegrityError) and TENSORS_FILE in str(err), (name, err)
        assert time.perf_counter() - start < 5
    assert_untouched(base, snap)
