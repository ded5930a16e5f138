import json

import pytest

from tnquant.report import Report


def test_totals_and_table():
    r = Report("factorize", columns=("name", "params_before", "params_after"))
    r.add(name="a", params_before=100, params_after=10, rel_error=0.25)
    r.add(name="b", params_before=50, params_after=40)
    r.skip("c", "GRU", "not supported")
    assert r.totals() == {"params_before": 150, "params_after": 50, "compression": 3.0}
    text = str(r)
    assert "skipped c (GRU): not supported" in text
    assert "compression 3.00x" in text
    assert r["a"]["rel_error"] == 0.25
    with pytest.raises(KeyError, match="no row named 'z'"):
        r["z"]


def test_to_dict_is_json_safe():
    import torch

    r = Report("x")
    r.add(name="a", ranks=(1, 4, 1), err=torch.tensor(0.5))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["rows"][0]["ranks"] == [1, 4, 1]
    assert d["rows"][0]["err"] == 0.5


# --------------------------------------------------------------------------- #
# whole-model and compressed-layer sizes, hand-computed on a tiny model
# --------------------------------------------------------------------------- #

# Embedding(256, 64) -> Linear(64, 64) -> ReLU -> LayerNorm(64) (stays float) -> Linear(64, 16)
EMB, FC1, FC2, LN = 256 * 64 * 32, (64 * 64 + 64) * 32, (16 * 64 + 16) * 32, 2 * 64 * 32
WHOLE_FLOAT = EMB + FC1 + FC2 + LN  # 694,784 bits
# int4 per row / per output channel: 4-bit codes, one float32 scale per row, float32 biases
EMB4 = 256 * 64 * 4 + 256 * 32  # 73,728
FC1_4 = 64 * 64 * 4 + 64 * 32 + 64 * 32  # 20,480
FC2_4 = 16 * 64 * 4 + 16 * 32 + 16 * 32  # 5,120
WHOLE_4 = EMB4 + FC1_4 + FC2_4 + LN  # 103,424


def _tiny():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(256, 64)
            self.fc1 = nn.Linear(64, 64)
            self.ln = nn.LayerNorm(64)
            self.fc2 = nn.Linear(64, 16)

        def forward(self, ids):
            return self.fc2(self.ln(torch.relu(self.fc1(self.emb(ids)))))

    return Tiny().eval()


def _int4():
    from tnquant import QuantSpec

    return QuantSpec(bits=4, granularity="channel", axis=0)


def test_sizes_line_formats_both_ratios():
    from tnquant.report import Sizes

    s = Sizes(726_800_000, 90_100_000, 21_300_000, 681_600_000, 45_000_000)
    assert s.line() == (
        "whole model 726.8 Mbit -> 90.1 Mbit (8.07x); "
        "compressed layers 21.3M params 681.6 Mbit -> 45.0 Mbit (15.15x)"
    )
    assert "params" not in Sizes(10, 5, None, 8, 3).line()
    assert Sizes(10, 0, None, 8, 0).model_ratio == float("inf")


def test_quantize_and_convert_reports_give_whole_model_and_layer_ratios():
    from tnquant import convert, model_size_bits, quantize

    model = _tiny()
    assert model_size_bits(model) == WHOLE_FLOAT
    report = quantize(model, weights={"emb": _int4(), "fc*": _int4()}, progress=False)
    t = report.totals()
    assert (t["model_bits_before"], t["model_bits_after"]) == (WHOLE_FLOAT, WHOLE_4)
    assert model_size_bits(model) == WHOLE_4
    assert t["layers_bits_before"] == EMB + FC1 + FC2
    assert t["layers_bits_after"] == EMB4 + FC1_4 + FC2_4
    assert t["layers_params"] == 256 * 64 + 64 * 64 + 64 + 16 * 64 + 16
    assert t["model_compression"] == WHOLE_FLOAT / WHOLE_4  # 6.72x
    assert t["layers_compression"] == (EMB + FC1 + FC2) / (EMB4 + FC1_4 + FC2_4)  # 6.95x
    last = str(report).splitlines()[-1]
    assert last == (
        "whole model 694.8 kbit -> 103.4 kbit (6.72x); "
        "compressed layers 21.6k params 690.7 kbit -> 99.3 kbit (6.95x)"
    )
    assert report.to_dict()["totals"]["model_bits_after"] == WHOLE_4

    conv = convert(model, progress=False)
    c = conv.sizes
    assert c is not None and c.model_after == model_size_bits(model) == WHOLE_4
    # convert's layers: the weight tensors alone, float32 before, codes + scales after
    weights_float = (256 * 64 + 64 * 64 + 16 * 64) * 32
    assert (c.layers_before, c.params) == (weights_float, 256 * 64 + 64 * 64 + 16 * 64)
    assert c.layers_after == EMB4 + (FC1_4 - 64 * 32) + (FC2_4 - 16 * 32)
    assert c.model_before == WHOLE_FLOAT  # the same model with those weights float


def test_factorize_report_counts_the_whole_model():
    from tnquant import LowRank, factorize, model_size_bits

    model = _tiny()
    report = factorize(model, {"fc1": LowRank(rank=8)}, progress=False)
    after = (64 * 8 + 8 * 64 + 64) * 32  # U, V, bias
    assert report["fc1"]["bits_before"] == FC1 and report["fc1"]["bits_after"] == after
    s = report.sizes
    assert s is not None
    assert (s.model_before, s.model_after) == (WHOLE_FLOAT, WHOLE_FLOAT - FC1 + after)
    assert s.model_after == model_size_bits(model)
    assert (s.layers_before, s.layers_after, s.params) == (FC1, after, 64 * 64 + 64)


def test_apply_report_and_plan_table_give_both_ratios():
    from tnquant import model_size_bits
    from tnquant.planning import Choice, Plan, apply

    model = _tiny()
    plan = Plan({"emb": Choice(None, _int4()), "fc1": Choice(None, _int4()), "fc2": Choice()})
    report = apply(model, plan, progress=False)
    s = report.sizes
    assert s is not None and s.model_after == model_size_bits(model) == WHOLE_4 + FC2 - FC2_4
    # fc2's float choice is no change: the compressed layers are emb and fc1
    assert (s.layers_before, s.layers_after) == (EMB + FC1, EMB4 + FC1_4)
    assert s.params == 256 * 64 + 64 * 64 + 64


def test_cli_report_gives_both_ratios_in_totals_and_the_before_after_table():
    import torch

    from tnquant import quantize
    from tnquant.cli.report import compare, format_report, layer_rows, totals

    original = _tiny()
    student = _tiny()
    quant = quantize(student, weights={"emb": _int4(), "fc*": _int4()}, progress=False)
    batches = [torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))]
    rows = layer_rows(original, student, None, quant, {})
    cmp = compare(original, student, batches, None, progress=False)
    t = totals(rows, cmp)
    assert (t["model_bits_before"], t["model_bits_after"]) == (WHOLE_FLOAT, WHOLE_4)
    assert (t["bits_before"], t["size_bits"]) == (EMB + FC1 + FC2, EMB4 + FC1_4 + FC2_4)
    report = {
        "tnquant_report": 1,
        "model": "tiny",
        "recipe": "r.toml",
        "seed": 0,
        "eval_data": "ids",
        "layers": rows,
        "totals": t,
        "compare": cmp,
        "stages": {"quantize": 0.1},
        "export_layers": [],
    }
    text = format_report(report)
    assert (
        "whole model 694.8 kbit -> 103.4 kbit (6.72x); "
        "compressed layers 21.6k params 690.7 kbit -> 99.3 kbit (6.95x)"
    ) in text
    head = next(line for line in text.splitlines() if "size_MiB" in line)
    assert head.split()[:5] == ["model", "size_MiB", "whole_x", "layers_x", "cosine"]
    lines = text.splitlines()
    original, compressed = lines[lines.index(head) + 1 : lines.index(head) + 3]
    assert original.split()[2:4] == ["1", "1"]
    assert compressed.split()[0] == "compressed"
    assert compressed.split()[2:4] == ["6.718", "6.954"]  # whole, layers
