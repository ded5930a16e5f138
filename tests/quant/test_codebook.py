"""Codebook spec, fake quantization and k-means against independent numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tnquant
from tnquant import Codebook
from tnquant.quant import Quantizer, dequantize, fake_quantize, quantize
from tnquant.quant.codebook import codebook_qparams, kmeans_codebook
from tnquant.specs import FP4_TABLE, NF4_TABLE, spec_from_dict, spec_to_dict

# QLoRA (arXiv:2305.14314) appendix E / bitsandbytes' create_normal_map, typed in by hand
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# bitsandbytes' dDequantizeFP4Tree magnitudes, for codes 0b0000..0b0111
FP4_MAGNITUDES = [0.0, 5.208333333e-03, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25]


def test_published_tables():
    assert list(NF4_TABLE) == NF4_PUBLISHED
    assert sorted(FP4_TABLE) == sorted(FP4_MAGNITUDES + [-m for m in FP4_MAGNITUDES])


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"kind": "nf5"}, ValueError, "kind must be one of ['nf4', 'fp4', 'kmeans'], got 'nf5'"),
        ({"kind": "fp4", "bits": 3}, ValueError, "bits must be 4 for kind='fp4', got 3"),
        ({"kind": "kmeans", "bits": 9}, ValueError, "bits must be in 1..8, got 9"),
        ({"bits": 4.0}, TypeError, "bits must be an int, got 4.0 (float)"),
        ({"granularity": "row"}, ValueError, "granularity must be"),
        ({"learnable": 1}, TypeError, "learnable must be a bool, got 1 (int)"),
        ({"scale_dtype": "float8"}, ValueError, "scale_dtype must be one of"),
        ({"centroids": "row"}, ValueError, "centroids must be one of ['tensor', 'block']"),
        ({"iters": 0}, ValueError, "iters must be in 1..1000, got 0"),
        ({"axis": "1"}, TypeError, "axis must be an int or None, got '1' (str)"),
    ],
)
def test_spec_checks_name_the_field(kwargs, error, text):
    with pytest.raises(error) as err:
        Codebook(**kwargs)
    assert text in str(err.value)


def test_spec_round_trips_through_dicts():
    spec = Codebook(kind="kmeans", bits=3, granularity=("group", 32), axis=0, centroids="block")
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert "Codebook" in tnquant.__all__


def _np_reference(x: np.ndarray, table: np.ndarray, group: int, sdtype: type) -> tuple:
    """Per-row groups along axis 1: absmax scale (rounded to sdtype), argmin |x/s - c|."""
    out, n = x.shape[0], x.shape[1] // group
    blocks = x.reshape(out, n, group)
    scale = np.abs(blocks).max(axis=2, keepdims=True).astype(sdtype).astype(np.float32)
    xn = np.where(scale > 0, blocks / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    idx = np.abs(xn[..., None] - table.astype(np.float32)).argmin(axis=-1)
    values = table.astype(np.float32)[idx] * scale
    return idx.reshape(x.shape), values.reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("sdtype", ["float16", "float32"])
def test_fake_quant_equals_numpy_nearest_entry(kind, sdtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 128, generator=gen) * 0.05
    x[2, :32] = 0.0  # an all-zero group dequantizes to zeros
    spec = Codebook(kind=kind, granularity=("group", 32), scale_dtype=sdtype)
    table = np.array(NF4_PUBLISHED if kind == "nf4" else sorted(FP4_TABLE))
    idx_ref, val_ref = _np_reference(x.numpy(), table, 32, np.dtype(sdtype).type)
    codes, qp = quantize(x, spec)
    got_values = qp.codebook.numpy()[codes.numpy().astype(np.int64)]
    np.testing.assert_array_equal(got_values, table.astype(np.float32)[idx_ref])
    np.testing.assert_array_equal(fake_quantize(x, spec).numpy(), val_ref)
    np.testing.assert_array_equal(dequantize(codes, qp).numpy(), val_ref)
    assert bool((fake_quantize(x, spec)[2, :32] == 0).all())


def _np_lloyd(x: np.ndarray, k: int, iters: int, w: np.ndarray | None = None) -> np.ndarray:
    """Textbook weighted Lloyd in 1-d (argmin assignment), quantile start."""
    n = x.size
    c = np.sort(x)[np.minimum(((np.arange(k) + 0.5) * n / k).astype(int), n - 1)].astype(np.float64)
    w = np.ones_like(x, dtype=np.float64) if w is None else w.astype(np.float64)
    for _ in range(iters):
        idx = np.abs(x[:, None] - c[None]).argmin(axis=1)
        mass = np.bincount(idx, w, minlength=k)
        sums = np.bincount(idx, w * x, minlength=k)
        c = np.sort(np.where(mass > 0, sums / np.maximum(mass, 1e-300), c))
    return c


@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_matches_numpy_lloyd(weighted):
    rng = np.random.default_rng(0)
    x = rng.standard_t(4, size=3000).astype(np.float32)
    w = rng.uniform(0.1, 2.0, size=3000).astype(np.float32) if weighted else None
    ref = _np_lloyd(x.astype(np.float64), 8, 15, w)
    got = kmeans_codebook(
        torch.from_numpy(x)[None], 8, 15, None if w is None else torch.from_numpy(w)[None]
    )
    np.testing.assert_allclose(got[0].numpy(), ref, rtol=0, atol=1e-5)


def test_kmeans_beats_uniform_at_three_bits():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    err = lambda spec: float((fake_quantize(w, spec) - w).square().mean())  # noqa: E731
    uniform = err(tnquant.QuantSpec(bits=3, granularity=("group", 64)))
    kmeans = err(Codebook(kind="kmeans", bits=3, granularity=("group", 64)))
    assert kmeans < 0.8 * uniform, (kmeans, uniform)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    st.integers(1, 4),
    st.sampled_from(["tensor", "block"]),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_values_are_entries_times_block_scale(bits, centroids, magnitude, seed):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)) * magnitude
    spec = Codebook(kind="kmeans", bits=bits, granularity="channel", centroids=centroids)
    qp = codebook_qparams(x, spec)
    y = fake_quantize(x, spec, qp)
    cb = qp.codebook.reshape(-1 if centroids == "tensor" else 4, spec.entries)
    for r in range(4):
        allowed = (cb[0 if centroids == "tensor" else r] * qp.scale[r]).tolist()
        assert set(y[r].tolist()) <= set(allowed)
    # nearest entry: no other entry is closer than the chosen one
    dist = (
        x[..., None]
        - cb.reshape(-1 if centroids == "tensor" else 4, 1, spec.entries)[
            0 if centroids == "tensor" else slice(None)
        ]
        * qp.scale[..., None]
    ).abs()
    chosen = (x - y).abs()
    assert bool((chosen <= dist.min(dim=-1).values * (1 + 1e-6) + 1e-12).all())


def test_ste_gradients():
    x = torch.randn(3, 64, requires_grad=True)
    spec = Codebook(kind="kmeans", bits=2, learnable=True)
    q = Quantizer(spec)
    y = q(x)
    (y * torch.arange(64.0)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.broadcast_to(np.arange(64.0), (3, 64)))
    assert q.codebook.grad is not None and float(q.codebook.grad.abs().sum()) > 0
    assert q.scale.grad is not None and float(q.scale.grad.abs().sum()) > 0


def test_qat_moves_centroids_and_lowers_the_loss():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    student = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    student.load_state_dict(teacher.state_dict())
    tnquant.quantize(
        student, weights=Codebook(kind="kmeans", bits=2, granularity=("group", 32), learnable=True)
    )
    data = [torch.randn(32, 32) for _ in range(8)]
    q = student[0].weight_quantizer
    loss = lambda: float(  # noqa: E731
        sum(nn.functional.mse_loss(student(b), teacher(b)) for b in data)
    )
    with torch.no_grad():
        student(data[0])  # initialises the learnable codebook from the weights
        before, start = loss(), q.codebook.detach().clone()
    report = tnquant.finetune(student, data, teacher, epochs=6, lr=3e-3, loss="mse")
    with torch.no_grad():
        after = loss()
    assert not torch.equal(q.codebook.detach(), start)
    assert after < 0.7 * before, (before, after, report)


def test_gram_weighted_kmeans_matches_numpy_and_lowers_the_weighted_error():
    from tnquant.ptq import fit_codebooks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    tnquant.quantize(model, weights=Codebook(kind="kmeans", bits=2, granularity=("group", 32)))
    scales = torch.linspace(0.1, 3.0, 64)  # inputs of very different energy per feature
    data = [torch.randn(256, 64) * scales for _ in range(2)]
    tnquant.calibrate(model, data, progress=False)
    report = fit_codebooks(model, data, progress=False)
    (row,) = report.rows
    assert row["error"] < row["error_before"]
    # independent: weighted Lloyd on the absmax-normalized weights, w = H_ii * s^2
    w = model[0].weight.detach().double().numpy()
    x = torch.cat(data).double().numpy()
    h = (x * x).sum(axis=0)
    blocks = w.reshape(16, 2, 32)
    s = np.abs(blocks).max(axis=2, keepdims=True).astype(np.float16).astype(np.float64)
    xn = (blocks / s).reshape(-1)
    imp = (np.broadcast_to(h.reshape(1, 2, 32), blocks.shape) * s**2).reshape(-1)
    ref = _np_lloyd(xn, 4, 25, imp)
    got = model[0].weight_quantizer.codebook.detach().double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
