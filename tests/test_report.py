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
