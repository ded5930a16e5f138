"""tnquant.export.onnx: onnxruntime runs the QDQ file and agrees with tnquant's forward.

References: onnxruntime (an independent runtime) for the outputs; numpy
requantization of the float weights for the stored codes; the initialisers'
ONNX types and the file size for the low-bit storage.

Tolerances: ``ATOL_REL`` of the output's largest magnitude (float summation
order: onnxruntime's kernels vs torch's, and tnquant's own contraction order
for factorized layers). Behind an activation quantizer that difference can
move a value across a rounding boundary, changing one element by one code
step of the quantizers after it: at most ``FLIPS`` of the elements may then
differ by up to ``FLIP_STEPS`` of the output quantizer's step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402

from tnquant import Binary, FixedPoint, QuantSpec, Ternary, calibrate, convert, quantize  # noqa: E402
from tnquant.export import onnx as export_onnx  # noqa: E402
from tnquant.export.onnx import session, standin_model  # noqa: E402
from tnquant.export.onnx_ops import register  # noqa: E402
from tnquant.layers import (  # noqa: E402
    CPConv2d,
    LowRankLinear,
    TTEmbedding,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)

ATOL_REL = 1e-5
FLIPS = 5e-3
FLIP_STEPS = 4


def _run(path, inputs, exact=True):
    sess = session(path, exact=exact)
    feeds = {i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), inputs, strict=True)}
    return sess.run(None, feeds)[0]


def _close(got, ref, step=None):
    ref = np.asarray(ref)
    tol = ATOL_REL * max(float(np.abs(ref).max()), 1e-12)
    err = np.abs(np.asarray(got) - ref)
    if step is None:
        assert err.max() <= tol, (err.max(), tol)
        return
    bad = err > tol
    assert bad.mean() <= FLIPS, bad.mean()
    assert err.max() <= FLIP_STEPS * step + tol, (err.max(), step)


def _types(path):
    m = onnx.load(str(path))
    return {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in m.graph.initializer}, m


def _codes(model_proto, name):
    init = next(i for i in model_proto.graph.initializer if i.name == name)
    return numpy_helper.to_array(init).astype(np.int64)


def _calibrated(model, shape, n=4):
    gen = torch.Generator().manual_seed(1)
    calibrate(model, [torch.randn(*shape, generator=gen) for _ in range(n)], progress=False)


def test_mlp_int8_channel_int4_group_activations(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    w0 = model[0].weight.detach().clone()
    quantize(
        model,
        weights={
            "0": QuantSpec(bits=8, granularity="channel"),
            "2": QuantSpec(bits=4, granularity=("group", 32), axis=1),
            "4": QuantSpec(bits=8, granularity="channel"),
        },
        activations=QuantSpec(bits=8, symmetric=False),
        progress=False,
    )
    _calibrated(model, (32, 128))
    x = torch.randn(16, 128)
    with torch.no_grad():
        ref = model(x).numpy()
    out = export_onnx(model, tmp_path / "mlp.onnx", x)
    onnx.checker.check_model(str(out.path))
    _close(_run(out.path, [x.numpy()]), ref, step=model[4].act_quantizers["output"].scale.item())
    types, proto = _types(out.path)
    assert types["0.weights.0.codes"] == "INT8"
    assert types["2.weights.0.codes"] == "INT4"
    assert not any("FLOAT" == t and "weight" in n and "scale" not in n for n, t in types.items())
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 6 and ops.count("DequantizeLinear") == 9
    block = next(
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] == "2.weights.0.codes"
    )
    assert {a.name: a.i for a in block.attribute}["block_size"] == 32
    # the stored codes are numpy's requantization of the float weight
    scale = np.abs(w0.numpy()).max(axis=1, keepdims=True) / 127
    np.testing.assert_array_equal(_codes(proto, "0.weights.0.codes"), np.round(w0.numpy() / scale))
    assert out.file_bytes < out.float_bytes / 3


def _factorized_mlp():
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen) / 4

    tt_rl = TTLinear([r(1, 16, 8, 8), r(8, 16, 16, 1)], in_features=120)  # 120 -> 256
    tt_lr = TTLinear([r(1, 2, 16, 4), r(4, 4, 4, 4), r(4, 8, 4, 1)])  # 256 -> 64
    assert tt_rl.chain_order[0] == 1 and tt_lr.chain_order[0] == 0
    return nn.Sequential(
        LowRankLinear([r(256, 32), r(32, 120)], bias=r(256)),  # 120 -> 256
        nn.ReLU(),
        TuckerLinear([r(120, 16), r(16, 24), r(256, 24)], bias=r(120)),  # 256 -> 120
        tt_rl,
        tt_lr,
        TuckerLinear(
            [r(2, 3, 2, 2), r(6, 2), r(6, 3), r(8, 2), r(8, 2)], in_features=64, out_features=36
        ),  # tensorized, order 2
    )


def test_factorized_int4_cores_with_intermediates(tmp_path):
    model = _factorized_mlp()
    quantize(
        model,
        weights=QuantSpec(bits=4, granularity="channel", axis=0),
        activations={
            "0.input": QuantSpec(bits=8),
            "2.inter_*": QuantSpec(bits=8),
            "3.inter_0": QuantSpec(bits=8),
            "4.inter_1": QuantSpec(bits=8),
        },
        progress=False,
    )
    _calibrated(model, (32, 120))
    x = torch.randn(8, 120)
    with torch.no_grad():
        ref = model(x).numpy()
    batch = torch.export.Dim("batch")
    out = export_onnx(model, tmp_path / "fact.onnx", x, dynamic_shapes=({0: batch},))
    _close(_run(out.path, [x.numpy()]), ref, step=1e-2 * float(np.abs(ref).max()))
    with torch.no_grad():  # another batch size through the same file
        _close(
            _run(out.path, [x[:3].numpy()]),
            model(x[:3]).numpy(),
            step=1e-2 * float(np.abs(ref).max()),
        )
    types, proto = _types(out.path)
    codes = {n: t for n, t in types.items() if n.endswith("codes")}
    assert len(codes) == 2 + 3 + 2 + 3 + 5 and set(codes.values()) == {"INT4"}
    dense = 120 * 256 * 2 + 256 * 64 + 64 * 36
    assert sum(w["bytes"] for w in out.weights) < dense / 2  # below even int4 dense weights
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMul") >= 2 + 2 + 3 and "Einsum" not in ops
    # the initialisers (codes, per-channel scales, float biases) vs the float32 cores;
    # the file adds ~13 kB of graph (176 nodes) on top, which this small model feels
    stored = sum(len(i.raw_data) for i in proto.graph.initializer)
    assert stored < out.float_bytes / 3 and out.file_bytes < out.float_bytes / 2


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # A_w is (2, R)
def test_conv_net_quant_tucker_cp(tmp_path):
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen) / 3

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        TuckerConv2d([r(32, 8), r(8, 6, 3, 3), r(16, 6)], stride=2, padding=1, bias=r(32)),
        nn.ReLU(),
        CPConv2d([r(32, 8), r(32, 8), r(3, 8), r(2, 8)], padding="same"),
        nn.ReLU(),
        nn.Conv2d(32, 8, 3, padding=1, padding_mode="reflect"),
    )
    quantize(
        model,
        weights=QuantSpec(bits=8, granularity="channel", axis=1),
        activations={"0.input": QuantSpec(bits=8), "2.inter_1": QuantSpec(bits=8)},
        progress=False,
    )
    _calibrated(model, (4, 3, 12, 12))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x).numpy()
    out = export_onnx(model, tmp_path / "conv.onnx", x)
    _close(_run(out.path, [x.numpy()]), ref, step=1e-2 * float(np.abs(ref).max()))
    types, proto = _types(out.path)
    assert [n.op_type for n in proto.graph.node].count("Conv") == 1 + 3 + 4 + 1
    assert {t for n, t in types.items() if n.endswith("codes")} == {"INT8"}


def test_converted_model_all_weight_kinds(tmp_path):
    torch.manual_seed(0)
    specs = {
        "0": QuantSpec(bits=4, symmetric=False, granularity="channel"),
        "1": Binary(granularity="channel"),
        "2": Ternary(method="ttq"),
        "3": FixedPoint(8, 2),
        "4": QuantSpec(dtype="float8_e4m3fn"),
        "5": QuantSpec(bits=12),
        "6": Ternary(),
    }
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in specs])
    acts = {
        "0.input": QuantSpec(bits=6),
        "1.input": FixedPoint(8, 3, rounding="RND_CONV", overflow="SAT"),
        "2.input": QuantSpec(dtype="float8_e4m3fn"),
        "3.input": QuantSpec(bits=16, symmetric=False),
        "4.input": QuantSpec(bits=12),
    }
    quantize(model, weights=specs, activations=acts, progress=False)
    _calibrated(model, (16, 64))
    x = torch.randn(4, 64)
    with torch.no_grad():
        fake = model(x).numpy()
    convert(model, progress=False)
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), fake)  # tnquant's own claim
    out = export_onnx(model, tmp_path / "conv.onnx", x)
    _close(_run(out.path, [x.numpy()]), fake)
    types, _ = _types(out.path)
    assert types["0.weights.0.codes"] == "UINT4" and types["0.weights.0.zero_point"] == "UINT4"
    assert types["1.weights.0.codes"] == "INT4" and types["2.weights.0.codes_neg"] == "INT4"
    assert types["3.weights.0.codes"] == "INT8" and types["4.weights.0.codes"] == "FLOAT8E4M3FN"
    assert types["5.weights.0.codes"] == "INT16"
    rows = {w["name"]: w for w in out.weights}
    assert rows["0.weight"]["layout"] == "channel"
    assert (
        types["3.acts.input.zero_point"] == "UINT16" and types["4.acts.input.zero_point"] == "INT16"
    )
    assert types["0.acts.input.zero_point"] == "UINT8"  # int6 codes shifted by 128


def test_int4_off_widens_to_int8():
    register()
    model = nn.Sequential(nn.Linear(32, 8))
    quantize(model, weights=QuantSpec(bits=4, symmetric=False), progress=False)
    w = standin_model(model, int4=False)[0].weights[0]
    assert (w.onnx_type, w.codes.dtype, w.zero_point.dtype) == ("uint8", torch.uint8, torch.uint8)
    assert standin_model(model)[0].weights[0].onnx_type == "uint4"


def test_tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    quantize(
        model,
        weights={
            "*.dense": QuantSpec(bits=4, granularity=("group", 16), axis=1),
            "*": QuantSpec(bits=8, granularity="channel"),
        },
        progress=False,
    )
    ids = torch.randint(0, 99, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state.numpy()
    out = export_onnx(model, tmp_path / "bert.onnx", {"input_ids": ids})
    _close(_run(out.path, [ids.numpy()]), ref)
    codes = {t for n, t in _types(out.path)[0].items() if n.endswith("codes")}
    assert codes == {"INT4", "INT8"}
    assert len(out.weights) == 7 + 3  # 7 Linear, 3 Embedding


def test_refusals(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4))
    quantize(model, weights=QuantSpec(bits=8), activations=QuantSpec(bits=8), progress=False)
    with pytest.raises(ValueError, match="0.act_quantizers.input: its range is computed"):
        export_onnx(model, tmp_path / "a.onnx", torch.randn(2, 8))
    emb = TTEmbedding([torch.randn(1, 4, 2, 2), torch.randn(2, 5, 3, 1)])
    with pytest.raises(ValueError, match="TTEmbedding"):
        export_onnx(nn.Sequential(emb), tmp_path / "b.onnx", torch.tensor([[1, 2]]))
    model = nn.Sequential(nn.Linear(8, 4))
    quantize(
        model,
        weights=QuantSpec(bits=8),
        activations=QuantSpec(bits=8, rounding="half_up"),
        progress=False,
    )
    _calibrated(model, (4, 8))
    with pytest.raises(ValueError, match="rounding='half_up'"):
        export_onnx(model, tmp_path / "c.onnx", torch.randn(2, 8))
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(model, tmp_path / "d.onnx", 3)
    assert not list(tmp_path.iterdir())
