"""``IntegerModel.load`` on export directories forged by someone who recomputes every checksum.

The checksums of an export are unkeyed SHA-256, so a forger recomputes them:
every forgery below rewrites ``manifest.json`` canonically with its own
checksum, and the array and ``cores.npz`` checksums recomputed too (unless
the forgery is a missing or wrong checksum). The loader must refuse each with
a ``ValueError`` (``IntegrityError``) or load exactly what is there, never
crash inside numpy, never allocate more than ``PEAK`` bytes (measured with
tracemalloc, which sees numpy's buffers) and never write a file.

The canonical JSON and the zip layout are written here from their
specifications (``json.dumps`` options, PKWARE APPNOTE headers), not with
the code under test.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import struct
import tempfile
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy_format
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point
from tnquant.layers import TTLinear

PEAK = 64 * 2**20  # bytes: the most any refused load may allocate
IN_T = FixedPoint(8, 3)


# --------------------------------------------------------------------------- #
# forging helpers (independent of tnquant.export.manifest)
# --------------------------------------------------------------------------- #


def _canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(d: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    man = json.loads((d / "manifest.json").read_text())
    with np.load(d / "cores.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return man, arrays


def _resum(sums: dict[str, Any], npz: bytes) -> None:
    """Recompute the checksums of the int64 arrays a forger's numpy reads from ``npz``."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(npz))
        infos = zf.infolist()
    except Exception:  # noqa: BLE001 - not a zip to numpy either: nothing to recompute
        return
    for info in infos:
        key = info.filename.removesuffix(".npy")
        try:
            with zf.open(info) as f:
                a = npy_format.read_array(f, allow_pickle=False)
        except Exception:  # noqa: BLE001 - unreadable to numpy too: the old sum stays
            continue
        if key in sums and a.dtype == np.int64:
            sums[key] = _sha(np.ascontiguousarray(a).tobytes())


def _seal(d: Path, man: Any, npz: bytes | None = None, resum: bool = True) -> None:
    """Write ``man`` (and ``npz`` as cores.npz) with every checksum a forger can recompute."""
    man = copy.deepcopy(man)
    sums = man.get("checksums") if isinstance(man, dict) else None
    if npz is not None:
        (d / "cores.npz").write_bytes(npz)
        if isinstance(sums, dict):
            if resum:
                _resum(sums, npz)
            if "cores.npz" in sums:
                sums["cores.npz"] = _sha(npz)
    if isinstance(man, dict):
        man.pop("checksum", None)
        man["checksum"] = _sha(_canonical(man))
    (d / "manifest.json").write_bytes(_canonical(man))


def _members(arrays: dict[str, np.ndarray]) -> list[tuple[str, bytes, int, int, int]]:
    return [_stored(f"{k}.npy", _npy(a.shape, a.tobytes())) for k, a in arrays.items()]


def _zip(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of ``(name, payload as stored, method, crc, uncompressed size)`` (no zip64)."""
    out, central = bytearray(), bytearray()
    for name, payload, method, crc, size in members:
        raw = name.encode()
        offset = len(out)
        out += (
            struct.pack(
                "<4s5H3L2H",
                b"PK\x03\x04",
                20,
                0,
                method,
                0,
                0x21,
                crc,
                len(payload),
                size,
                len(raw),
                0,
            )
            + raw
            + payload
        )
        central += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0,
                method,
                0,
                0x21,
                crc,
                len(payload),
                size,
                len(raw),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + raw
        )
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0
    )
    return bytes(out + central + end)


def _npy(
    shape: tuple[int, ...], data: bytes = b"", descr: str = "<i8", fortran: bool = False
) -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": fortran, "shape": shape}
    )
    return buf.getvalue() + data


def _stored(name: str, content: bytes) -> tuple[str, bytes, int, int, int]:
    return name, content, 0, zlib.crc32(content), len(content)


@contextmanager
def _watch() -> Iterator[dict[str, int]]:
    out: dict[str, int] = {}
    tracemalloc.start()
    try:
        yield out
    finally:
        out["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _refused(d: Path, match: str | None = None) -> str:
    """Load ``d``: it must raise a ValueError, within PEAK bytes, writing nothing."""
    before = sorted(p.name for p in d.iterdir())
    with _watch() as mem, pytest.raises(ValueError, match=match) as info:
        IntegerModel.load(d)
    assert mem["peak"] < PEAK, f"peak {mem['peak']} bytes"
    assert sorted(p.name for p in d.iterdir()) == before
    return str(info.value)


# --------------------------------------------------------------------------- #
# the exported models
# --------------------------------------------------------------------------- #


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    quantize(
        model,
        weights={"0": FixedPoint(6, 2), "2": QuantSpec(5, scale="pow2", granularity="channel")},
        progress=False,
    )
    return model


def _tt() -> nn.Module:
    torch.manual_seed(1)
    cores = [torch.randn(1, 3, 2, 2), torch.randn(2, 2, 3, 1)]
    model = nn.Sequential(TTLinear(cores, in_features=5, out_features=6, bias=torch.randn(6)))
    quantize(model, cores=FixedPoint(6, 2), progress=False)
    return model


def _acts() -> nn.Module:
    """A clip (ReLU6), a no-op Flatten and a LeakyReLU whose alpha is rounded (0.01)."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(6, 5), nn.ReLU6(), nn.Flatten(), nn.Linear(5, 4), nn.LeakyReLU(0.01),
        nn.Linear(4, 3),
    )  # fmt: skip
    quantize(model, weights=FixedPoint(6, 2), progress=False)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory: Any) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    out = {}
    for name, make in (("mlp", _mlp), ("tt", _tt), ("acts", _acts)):
        d = tmp_path_factory.mktemp(name)
        em = fixed_point(make(), d, IN_T, hls4ml=False)
        x = np.random.default_rng(0).integers(IN_T.qmin, IN_T.qmax + 1, size=(16, em.in_features))
        out[name] = (d, x, em.run(x))
    return out


@contextmanager
def _copy(src: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "export"
        shutil.copytree(src, d)
        yield d


def test_untouched_exports_load_bit_exact(exports: Any) -> None:
    for d, x, y in exports.values():
        assert np.array_equal(IntegerModel.load(d).run(x), y)
        man = json.loads((d / "manifest.json").read_text())
        assert man["version"] == 2 and (d / "manifest.json").read_bytes() == _canonical(man)


# --------------------------------------------------------------------------- #
# regressions of the issue, one by one
# --------------------------------------------------------------------------- #


def test_weight_type_edited_with_recomputed_checksums_is_refused(exports: Any) -> None:
    with _copy(exports["mlp"][0]) as d:
        man, _ = _read(d)
        assert man["ops"][0]["weight_types"] == ["ap_fixed<6,2>"]
        man["ops"][0]["weight_types"] = ["ap_fixed<7,5>"]
        _seal(d, man)
        _refused(d, r"ops\[0\]\.scale_exponents")
        man["ops"][0]["scale_exponents"] = [[-2]]  # the forger keeps them consistent too
        _seal(d, man)
        _refused(d, r"ops\[0\]\.bias_type must be .* products' 7 fractional bits")
        man["ops"][0]["derived"]["bias"] = False  # and says the bias type was given
        _seal(d, man)
        _refused(d, r"ops\[0\]\.accum_types\[0\] must be ap_fixed<")


def test_deleted_checksum_entry_is_refused(exports: Any) -> None:
    for key in ("0.w0", "2.bias", "cores.npz"):
        with _copy(exports["mlp"][0]) as d:
            man, _ = _read(d)
            del man["checksums"][key]
            _seal(d, man)
            _refused(d, rf"checksums has missing \['{key}'\]")


def test_manifest_without_its_own_checksum_or_edited_by_hand_is_refused(exports: Any) -> None:
    with _copy(exports["mlp"][0]) as d:
        man, _ = _read(d)
        man["ops"][0]["layer"] = "other"
        (d / "manifest.json").write_bytes(_canonical(man))  # checksum left as it was
        _refused(d, "checksum does not match")
        man.pop("checksum")
        (d / "manifest.json").write_text(json.dumps(man, indent=1))
        _refused(d, "canonical form")
        man["version"] = 1
        (d / "manifest.json").write_text(json.dumps(man, indent=1))
        _refused(d, "version must be 2, got 1; .*export again")


@pytest.mark.parametrize(
    "body",
    [
        "[" + ",".join(["{}"] * 349000) + "]",  # 1 MiB of objects: parsed, then refused
        "[" * 100000,  # nested past the recursion limit
        " " * (1 << 20) + "{}",  # past MAX_MANIFEST_BYTES: never parsed
        '{"format": "tnquant-fixed-point", "version": 2, "x": NaN}',
    ],
)
def test_pathological_manifest_json_is_refused_within_the_bound(exports: Any, body: str) -> None:
    with _copy(exports["mlp"][0]) as d:
        (d / "manifest.json").write_text(body)
        _refused(d)


def test_corrupted_cores_with_array_checksums_intact_is_refused(exports: Any) -> None:
    with _copy(exports["mlp"][0]) as d:
        data = bytearray((d / "cores.npz").read_bytes())
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
            offset = zf.infolist()[0].header_offset
        data[offset + 10] ^= 0x01  # the first member's modification time: arrays unchanged
        (d / "cores.npz").write_bytes(bytes(data))
        _, arrays = _read(d)
        man, _ = _read(exports["mlp"][0])
        assert all(_sha(a.tobytes()) == man["checksums"][k] for k, a in arrays.items())
        _refused(d, "cores.npz: its SHA-256 does not match")


def test_zip_bomb_is_refused_before_decompression(
    exports: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 GiB of int64 zeros behind a valid .npy header, deflated to about 2 MB
    n = 1 << 28
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(_npy((n,))) + comp.flush(zlib.Z_FULL_FLUSH)
    mib = bytes(1 << 20)
    block = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)
    assert block == comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)  # repeatable
    stream = head + block * ((8 * n >> 20) - 1) + comp.compress(mib) + comp.flush()
    size = len(_npy((n,))) + 8 * n
    assert len(stream) < 3 * 2**20 and zlib.decompressobj(-15).decompress(stream, 1 << 24) == _npy(
        (n,)
    ) + bytes((1 << 24) - len(_npy((n,))))
    # the CRC is left 0: an unchecked loader decompresses all 2 GiB before it checks it
    calls: list[int] = []
    real = zipfile._get_decompressor  # type: ignore[attr-defined]

    def spy(method: int) -> Any:
        if method != zipfile.ZIP_STORED:
            calls.append(method)
        return real(method)

    monkeypatch.setattr(zipfile, "_get_decompressor", spy)
    with _copy(exports["mlp"][0]) as d:
        man, arrays = _read(d)
        members = _members(arrays)
        members[0] = ("0.w0.npy", stream, zipfile.ZIP_DEFLATED, 0, size)
        _seal(d, man, npz=_zip(members), resum=False)  # numpy would inflate the bomb
        _refused(d, "cores.npz holds .* bytes; the arrays expected in it need at most")
        # the forger also declares the bomb's shape: a single dense op of 2**14 x 2**14
        op = man["ops"][0]
        op.update(
            in_features=1 << 14,
            out_features=1 << 14,
            weight_shapes=[[1 << 14] * 2],
            bias=None,
            bias_type=None,
            derived={"accum": [False], "result": [False], "bias": False},
        )
        man.update(
            ops=[op],
            in_features=1 << 14,
            out_features=1 << 14,
            output_type=op["result_type"],
            routes={"0": "hls4ml"},
            checksums={"0.w0": "0" * 64, "cores.npz": "0" * 64},
        )
        _seal(d, man, npz=_zip([("0.w0.npy", stream, zipfile.ZIP_DEFLATED, 0, size)]), resum=False)
        _refused(d, "must be stored uncompressed")
    assert calls == []  # nothing was ever decompressed


def test_npy_header_declaring_a_huge_shape_is_refused(exports: Any) -> None:
    with _copy(exports["mlp"][0]) as d:
        man, arrays = _read(d)
        members = _members(arrays)
        members[0] = _stored("0.w0.npy", _npy((1 << 40,), arrays["0.w0"].tobytes()))
        _seal(d, man, npz=_zip(members))
        _refused(d, r"'0\.w0\.npy'\]: its \.npy header declares int64 of shape \(1099511627776")
        # the manifest agrees with the header, and the zip header lies about the size
        man["ops"][0]["weight_shapes"] = [[1 << 20, 1 << 20]]
        _seal(d, man, npz=_zip(members))
        _refused(d, "weight_shapes|at most")


def test_member_outside_the_directory_is_refused_and_nothing_is_written(exports: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = root / "a" / "b" / "export"
        shutil.copytree(exports["mlp"][0], d)
        man, arrays = _read(d)
        for bad in ("../../x.npy", "/tmp/x.npy", "0.w0.npy/../../x.npy"):
            members = _members(arrays)
            members[0] = _stored(bad, members[0][1])
            _seal(d, man, npz=_zip(members))
            _refused(d, "unexpected")
            assert (
                sorted(
                    str(p.relative_to(root))
                    for p in root.rglob("*")
                    if p.is_file() and "export" not in p.parts
                )
                == []
            )


@pytest.mark.parametrize(
    "forge",
    [
        "extra member",
        "duplicate member",
        "float64",
        "object",
        "fortran",
        "int32",
        "truncated",
        "appended",
        "out of range",
        "missing member",
        "bias without type",
        "chain broken",
        "tt ranks",
        "unknown key",
        "old extra",
    ],
)
def test_forged_directory_is_refused(exports: Any, forge: str) -> None:
    with _copy(exports["tt" if forge == "tt ranks" else "mlp"][0]) as d:
        man, arrays = _read(d)
        members = _members(arrays)
        w = arrays["0.w0"]
        edits: dict[str, Callable[[], None]] = {
            "extra member": lambda: members.append(_stored("x.npy", _npy((1,), bytes(8)))),
            "duplicate member": lambda: members.append(members[0]),
            "float64": lambda: members.__setitem__(
                0, _stored("0.w0.npy", _npy(w.shape, w.astype(np.float64).tobytes(), "<f8"))
            ),
            "object": lambda: members.__setitem__(
                0, _stored("0.w0.npy", _npy(w.shape, bytes(8 * w.size), "|O"))
            ),
            "fortran": lambda: members.__setitem__(
                0, _stored("0.w0.npy", _npy(w.shape, w.tobytes(), fortran=True))
            ),
            "int32": lambda: members.__setitem__(
                0, _stored("0.w0.npy", _npy(w.shape, w.astype(np.int32).tobytes() * 2, "<i4"))
            ),
            "truncated": lambda: members.__setitem__(
                0, _stored("0.w0.npy", _npy(w.shape, w.tobytes()[:-8]))
            ),
            "appended": lambda: members.__setitem__(
                0, _stored("0.w0.npy", _npy(w.shape, w.tobytes() + bytes(8)))
            ),
            "out of range": lambda: members.__setitem__(
                0, _stored("0.w0.npy", _npy(w.shape, (w * 0 + 40).tobytes()))
            ),  # ap_fixed<6,2> holds -32..31
            "missing member": lambda: members.pop(),
            "bias without type": lambda: man["ops"][2].update(bias_type=None),
            "chain broken": lambda: man["ops"][2].update(in_features=4),
            "tt ranks": lambda: man["ops"][0].update(weight_shapes=[[1, 3, 2, 2], [3, 2, 3, 1]]),
            "unknown key": lambda: man["ops"][1].update(note="x"),
            "old extra": lambda: man.update(note="x"),
        }
        edits[forge]()
        _seal(d, man, npz=_zip(members))
        _refused(d)


def _set(arrays: dict[str, np.ndarray], key: str, values: list[int]) -> None:
    arrays[key] = np.array(values, dtype=np.int64)


#: forgeries of the clip op (ops[1], '1': ReLU6 bounds) and the leaky_relu op (ops[3], '4':
#: alpha 655 of ap_fixed<17,1>), every checksum recomputed; each must be refused by name
ACT_FORGERIES: dict[str, tuple[Callable[[dict[str, Any], dict[str, np.ndarray]], None], str]] = {
    "clip bounds swapped": (
        lambda man, a: _set(a, "1.w0", a["1.w0"][::-1].tolist()),
        r"array '1\.w0' \(ops\[1\]\) holds the clip bounds \[\d+, 0\]; lo must be <= hi",
    ),
    "clip bound past its type": (
        lambda man, a: _set(a, "1.w0", [0, 1 << 40]),
        r"array '1\.w0' \(ops\[1\]\) holds mantissas in \[0, 1099511627776\], outside",
    ),
    "clip bound type": (
        lambda man, a: man["ops"][1].update(weight_types=["ap_fixed<40,12>"]),
        r"ops\[1\]\.weight_types\[0\] must be the input type ap_fixed<.*> \(a clip's bounds",
    ),
    "clip bounds shape": (
        lambda man, a: man["ops"][1].update(weight_shapes=[[3]]),
        r"ops\[1\]\.weight_shapes\[0\] must be \[2\] \(\[lo, hi\]\), got \[3\]",
    ),
    "clip with a bias": (
        lambda man, a: man["ops"][1].update(bias="1.bias", bias_type="ap_fixed<8,3>"),
        r"ops\[1\]\.bias/bias_type must be both null or \(not for an elementwise op",
    ),
    "clip result type": (
        lambda man, a: man["ops"][1].update(
            result_type="ap_fixed<12,4>", step_types=["ap_fixed<12,4>"]
        ),
        r"ops\[1\]\.result_type must be the input type .* \(derived\)",
    ),
    "alpha even": (
        lambda man, a: _set(a, "4.w0", [654]),
        r"ops\[3\]\.weight_types\[0\] must be ap_fixed<16,1> \(the type of alpha '4\.w0' = "
        r"654 \* 2\^-16 on its fewest fractional bits, derived\), got 'ap_fixed<17,1>'",
    ),
    "alpha past its type": (
        lambda man, a: _set(a, "4.w0", [70001]),
        r"array '4\.w0' \(ops\[3\]\) holds mantissas in \[70001, 70001\], outside "
        r"ap_fixed<17,1>",
    ),
    "alpha type": (
        lambda man, a: man["ops"][3].update(weight_types=["ap_fixed<18,2>"]),
        r"ops\[3\]\.result_type must be the product type ap_fixed<.*> \(derived\)",
    ),
    "alpha type, result said given": (
        lambda man, a: (
            man["ops"][3].update(weight_types=["ap_fixed<18,2>"]),
            man["ops"][3]["derived"].update(result=[False]),
        ),
        r"ops\[3\]\.weight_types\[0\] must be ap_fixed<17,1> \(the type of alpha",
    ),
    "alpha with 20 fractional bits": (
        lambda man, a: (
            man["ops"][3].update(weight_types=["ap_fixed<21,1>"]),
            man["ops"][3]["derived"].update(result=[False]),
        ),
        r"ops\[3\]\.weight_types\[0\] must be an alpha type with 0\.\.16 fractional bits",
    ),
    "alpha scale exponents": (
        lambda man, a: man["ops"][3].update(scale_exponents=[[-16]]),
        r"ops\[3\]\.scale_exponents must be \[\] for a leaky_relu op",
    ),
    "leaky said relu": (
        lambda man, a: man["ops"][3].update(kind="relu"),
        r"ops\[3\]\.weights must be a list of 0 entries",
    ),
}


@pytest.mark.parametrize("forge", list(ACT_FORGERIES))
def test_forged_clip_and_leaky_fields_are_refused_by_name(exports: Any, forge: str) -> None:
    edit, message = ACT_FORGERIES[forge]
    with _copy(exports["acts"][0]) as d:
        man, arrays = _read(d)
        assert [op["kind"] for op in man["ops"]] == [
            "dense", "clip", "dense", "leaky_relu", "dense",
        ]  # fmt: skip
        assert arrays["4.w0"].tolist() == [655] and man["ops"][3]["weight_types"] == [
            "ap_fixed<17,1>"
        ]
        edit(man, arrays)
        _seal(d, man, npz=_zip(_members(arrays)))
        _refused(d, message)


def test_clip_bounds_edited_without_their_checksum_are_refused(exports: Any) -> None:
    with _copy(exports["acts"][0]) as d:
        man, arrays = _read(d)
        _set(arrays, "1.w0", [1, 2])
        _seal(d, man, npz=_zip(_members(arrays)), resum=False)
        _refused(d, r"array '1\.w0': its SHA-256 does not match")


# --------------------------------------------------------------------------- #
# random forgeries (bounded, derandomized)
# --------------------------------------------------------------------------- #


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k != "checksum":
                out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    7,
    2**31,
    2**62,
    10**30,
    1.5,
    "",
    "x",
    "0.w0",
    "../../x",
    "ap_fixed<7,5>",
    "ap_fixed<64,2>",
    "ap_fixed<62,2>",
    "ap_ufixed<8,8>",
    "ap_fixed<8,3,RND,SAT>",
    "ap_fixed<1000,2>",
    "ap_fixed<8,3000>",
    "dense",
    "tt",
    "relu",
    [],
    [1],
    [[1, 2]],
    [[1 << 20, 1 << 20]],
    {},
    {"a": 1},
    "0" * 64,
]


def _perturb(v: Any, k: int) -> Any:
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return [v + 1, v - 1, -v, v * 2**20, 0][k % 5]
    if isinstance(v, str) and v.startswith("ap_"):
        return [
            v.replace("<", "<1", 1),
            v.replace(",", ",1", 1),
            v.replace("ap_fixed", "ap_ufixed"),
            v.replace(">", ",RND,SAT>"),
            v.replace(">", ",RND>"),
        ][k % 5]
    if isinstance(v, str):
        return v + "x" if k % 2 else v[:-1]
    if isinstance(v, list):
        return (v + v[:1]) if k % 2 else v[:-1] if v else [v]
    return {**v, "x": 1} if isinstance(v, dict) else v


@settings(
    derandomize=True,
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_manifest_edits_are_refused_or_harmless(exports: Any, data: Any) -> None:
    name = data.draw(st.sampled_from(["mlp", "tt", "acts"]))
    src, x, y = exports[name]
    man, _ = _read(src)
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(_paths(man)))
        *parent_path, key = path
        parent = man
        for p in parent_path:
            parent = parent[p]
        how = data.draw(st.sampled_from(["delete", "replace", "perturb", "swap"]))
        if how == "delete":
            del parent[key]
        elif how == "replace":
            parent[key] = copy.deepcopy(data.draw(st.sampled_from(VALUES)))
        elif how == "perturb":
            parent[key] = _perturb(parent[key], data.draw(st.integers(0, 4)))
        elif isinstance(parent, list) and len(parent) > 1:
            j = data.draw(st.integers(0, len(parent) - 1))
            parent[key], parent[j] = parent[j], parent[key]
        if not isinstance(man, dict) or "ops" not in man or not _paths(man):
            break
    with _copy(src) as d:
        _seal(d, man)
        before = sorted(p.name for p in d.iterdir())
        with _watch() as mem:
            try:
                em = IntegerModel.load(d)
            except ValueError:
                em = None
        assert mem["peak"] < PEAK
        assert sorted(p.name for p in d.iterdir()) == before
        if em is not None:  # loaded: then it computes the same network
            assert np.array_equal(em.run(x), y)


@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_cores_corruptions_are_refused_or_read_faithfully(exports: Any, data: Any) -> None:
    src = exports[data.draw(st.sampled_from(["mlp", "tt", "acts"]))][0]
    man, _ = _read(src)
    raw = bytearray((src / "cores.npz").read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    with _copy(src) as d:
        _seal(d, man, npz=bytes(raw))
        with _watch() as mem:
            try:
                em = IntegerModel.load(d)
            except ValueError:
                em = None
        assert mem["peak"] < PEAK
        if em is not None:  # loaded: exactly the arrays numpy reads from the file
            with np.load(io.BytesIO(bytes(raw)), allow_pickle=False) as f:
                for op in em.ops:
                    for k, w in enumerate(op.weights):
                        assert np.array_equal(w, f[f"{op.name}.w{k}"])


def test_a_single_exported_module_round_trips() -> None:
    """Exporting one module (not a container) names its ops ''; save and load accept that."""
    from tnquant import LowRank, factorize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    factorize(model, LowRank(rank=2), progress=False)
    quantize(model, weights=QuantSpec(bits=4, scale="pow2"), progress=False)
    with tempfile.TemporaryDirectory() as d:
        em = fixed_point(model[0], d, FixedPoint(12, 4))
        x = np.random.default_rng(0).normal(size=(5, 8))
        assert np.array_equal(IntegerModel.load(d).predict(x), em.predict(x))
