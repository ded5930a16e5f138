"""C headers and the TT kernel: written, compiled with g++, bit-exact with the emulator."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point
from tnquant.export.cheaders import c_name
from tnquant.export.graph import Op
from tnquant.layers import LowRankLinear, TTLinear


def _ap_types() -> Path | None:
    try:
        import hls4ml
    except ImportError:
        return None
    path = Path(hls4ml.__file__).parent / "templates" / "vivado" / "ap_types"
    return path if (path / "ap_fixed.h").is_file() else None


def _tt_model() -> nn.Module:
    torch.manual_seed(7)
    cores = [torch.randn(1, 3, 2, 2), torch.randn(2, 2, 3, 3), torch.randn(3, 2, 2, 1)]
    model = nn.Sequential(TTLinear(cores, in_features=10, out_features=11, bias=torch.randn(11)))
    quantize(
        model,
        cores={
            0: FixedPoint(7, 2),
            1: QuantSpec(6, scale="pow2"),
            2: QuantSpec(5, scale="pow2", granularity="channel", axis=1),
        },
        progress=False,
    )
    return model


def test_files_manifest_and_reload(tmp_path: Path) -> None:
    model = nn.Sequential(
        LowRankLinear([torch.randn(5, 2), torch.randn(2, 6)]), nn.ReLU(), nn.Linear(5, 3)
    )
    quantize(model, weights=QuantSpec(6, scale="pow2"), progress=False)
    em = fixed_point(model, tmp_path, FixedPoint(9, 3), hls4ml=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "cores.npz",
        "manifest.json",
        "tnquant_weights.h",
        "tnquant_weights_int.h",
        "tt_linear.h",
    } <= names
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert [op["name"] for op in man["ops"]] == ["0.0", "0.1", "1", "2"]
    assert man["ops"][0]["weight_shapes"] == [[2, 6]] and man["input_type"] == "ap_fixed<9,3>"
    assert set(man["checksums"]) >= {"0.0.w0", "0.1.w0", "2.w0", "2.bias", "cores.npz"}
    int_h = (tmp_path / "tnquant_weights_int.h").read_text()
    w = em.ops[0].weights[0]
    assert f"{c_name('0.0')}_w0_int[{w.size}]" in int_h
    x = np.random.default_rng(1).integers(-256, 256, size=(30, 6))
    assert np.array_equal(IntegerModel.load(tmp_path).run(x), em.run(x))


def test_tampered_cores_are_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    quantize(model, weights=FixedPoint(6, 2), progress=False)
    fixed_point(model, tmp_path, FixedPoint(8, 3), hls4ml=False)
    with np.load(tmp_path / "cores.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["0.w0"] = arrays["0.w0"] + 1
    np.savez(tmp_path / "cores.npz", **arrays)
    with pytest.raises(ValueError, match="checksum"):
        IntegerModel.load(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None or _ap_types() is None,
    reason="needs g++ and the ap_types headers shipped with hls4ml",
)
def test_tt_kernel_compiled_is_bit_exact(tmp_path: Path) -> None:
    model = _tt_model()
    narrow = FixedPoint(11, 4, rounding="RND", overflow="SAT")
    em = fixed_point(
        model,
        tmp_path,
        FixedPoint(8, 3, rounding="RND_CONV", overflow="SAT"),
        accum={"0.1": narrow},
        result={"0.0": FixedPoint(10, 4, overflow="SAT")},
    )
    assert "tnquant_tt_layers.h" in {p.name for p in tmp_path.iterdir()}
    fn = c_name("0")
    main = tmp_path / "main.cpp"
    main.write_text(f"""#include <cstdio>
#include "tnquant_tt_layers.h"
#include "tnquant_weights_int.h"
int main() {{
    double v;
    {fn}_input_t x[10];
    {fn}_res2_t y[11];
    while (true) {{
        for (int i = 0; i < 10; i++) {{ if (scanf("%lf", &v) != 1) return 0; x[i] = v; }}
        {fn}(x, y);
        for (int i = 0; i < 11; i++) printf("%.17g ", y[i].to_double());
        printf("\\n");
    }}
}}
""")
    exe = tmp_path / "tt"
    subprocess.run(
        [
            "g++",
            "-O1",
            "-std=c++14",
            f"-I{_ap_types()}",
            f"-I{tmp_path}",
            str(main),
            "-o",
            str(exe),
        ],
        check=True,
        capture_output=True,
    )
    x = np.random.default_rng(2).normal(size=(200, 10)) * 3
    text = "\n".join(" ".join(repr(float(v)) for v in row) for row in x)
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
    got = np.array([[float(v) for v in line.split()] for line in out.stdout.splitlines()])
    np.testing.assert_array_equal(got, em.predict(x))


def test_export_removes_the_files_of_an_earlier_model(tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    dense = nn.Sequential(nn.Linear(3, 2))
    quantize(dense, weights=FixedPoint(6, 2), progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    fixed_point(dense, tmp_path, FixedPoint(8, 3))
    assert (tmp_path / "hls4ml_config.json").is_file()
    em = fixed_point(_tt_model(), tmp_path, FixedPoint(8, 3))  # no hls4ml route
    names = {p.name for p in tmp_path.iterdir()}
    assert "hls4ml_config.json" not in names and "tnquant_tt_layers.h" in names
    assert "notes.txt" in names
    x = np.random.default_rng(3).integers(-128, 128, size=(8, 10))
    assert np.array_equal(IntegerModel.load(tmp_path).run(x), em.run(x))
    fixed_point(dense, tmp_path, FixedPoint(8, 3), hls4ml=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & {"hls4ml_config.json", "tnquant_tt_layers.h"}
    assert names == {
        "notes.txt",
        "cores.npz",
        "manifest.json",
        "report.json",
        "report.md",
        "tnquant_weights.h",
        "tnquant_weights_int.h",
        "tt_linear.h",
    }


def test_export_replaces_links_instead_of_writing_through_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tnquant_weights.h").symlink_to(outside)
    model = nn.Sequential(nn.Linear(3, 2))
    quantize(model, weights=FixedPoint(6, 2), progress=False)
    fixed_point(model, out, FixedPoint(8, 3), hls4ml=False)
    assert outside.read_text() == "keep" and not (out / "tnquant_weights.h").is_symlink()


def test_save_refuses_unknown_extra_keys_and_inconsistent_ops(tmp_path: Path) -> None:
    t = FixedPoint(4, 2)
    relu = Op("r", "relu", "r", 2, 2, t, t)
    with pytest.raises(ValueError, match="extra keys must be among .* got 'note'"):
        IntegerModel([relu]).save(tmp_path, {"note": 1})
    dense = Op(
        "d",
        "dense",
        "d",
        2,
        1,
        t,
        t,
        weights=[np.array([[1, 2]])],
        weight_types=[t],
        accum_types=[t],
        step_types=[FixedPoint(5, 2)],
    )
    with pytest.raises(ValueError, match=r"cannot export these ops: .*step_types\[-1\]"):
        IntegerModel([dense]).save(tmp_path)
    assert list(tmp_path.iterdir()) == []
