"""tnquant.core: module replacement, the glob table, hooked passes, the output rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnquant.core import (
    GlobTable,
    capture_grams,
    capture_inputs,
    capture_outputs,
    evaluating,
    find_module,
    model_output,
    replace_module,
    run,
)
from tnquant.report import Report


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"fc": nn.Linear(3, 4)})
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])
        self.head = nn.Linear(4, 2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.enc["fc"](input)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _net() -> nn.Module:
    return _Net()


@pytest.mark.parametrize("name", ["enc.fc", "blocks.0", "blocks.1", "head"])
def test_replace_module_every_container(name: str) -> None:
    model = _net()
    before = find_module(model, name)
    new = nn.Identity()
    assert replace_module(model, name, new) is before
    assert model.get_submodule(name) is new


def test_replace_module_refuses_root_and_missing() -> None:
    with pytest.raises(ValueError, match="root"):
        replace_module(_net(), "", nn.Identity())
    with pytest.raises(ValueError, match="no module 'enc.nope'"):
        replace_module(_net(), "enc.nope", nn.Identity())


def test_glob_table_first_match_wins_and_reports_misses() -> None:
    table = GlobTable({"blocks.*": 1, "head": 2, "typo": 3}, "factorize")
    names = [n for n, _ in _net().named_modules() if n]
    found = {n: table.lookup(n) for n in names}
    assert found["blocks.0"] == (True, 1) and found["head"] == (True, 2)
    assert found["enc.fc"] == (False, None)
    report = Report("factorize", ("name",))
    table.check(report)
    assert [(s["name"], s["reason"]) for s in report.skipped] == [
        ("factorize['typo']", "matched nothing")
    ]


def test_glob_table_refuses_shadowed_pattern() -> None:
    table = GlobTable({"*": 1, "head": 2}, "weights")
    table.lookup("head")
    with pytest.raises(ValueError, match="'head' is never used"):
        table.check()


def test_glob_table_int_keys_and_key_types() -> None:
    table = GlobTable({-1: "last", "x.cores.0": "first"}, "cores", int_keys=True)
    assert table.lookup("x.cores.2", index=2, count=3) == (True, "last")
    with pytest.raises(TypeError, match="cores keys must be"):
        GlobTable({1.5: 0}, "cores", int_keys=True)
    with pytest.raises(TypeError, match="weights keys must be glob strings"):
        GlobTable({0: 0}, "weights")


def test_capture_grams_equal_numpy_reference() -> None:
    torch.manual_seed(0)
    model = _net()
    batches = [torch.randn(5, 3), torch.randn(2, 3)]
    grams = capture_grams(model, {"enc.fc": model.enc["fc"], "head": model.head}, batches)
    x = torch.cat(batches).double().numpy()
    assert grams["enc.fc"].rows == 7
    assert torch.allclose(grams["enc.fc"].h, torch.from_numpy(x.T @ x), rtol=0, atol=1e-12)
    assert grams["head"].h.shape == (4, 4)


def test_passes_restore_every_train_flag_even_on_error() -> None:
    model = _net().train()
    model.blocks.eval()

    class Boom(Exception):
        pass

    def explode(_out: object) -> None:
        raise Boom

    with pytest.raises(Boom):
        run(model, [{"input": torch.randn(1, 3)}], each=explode)
    assert model.training and model.head.training and not model.blocks[0].training
    with evaluating(model, train=True, grad=True):
        assert torch.is_grad_enabled() and model.blocks[0].training
    assert not model.blocks[0].training


def test_capture_inputs_and_outputs() -> None:
    model = _net()
    batches = [torch.randn(3, 3) for _ in range(3)]
    ins = capture_inputs(model, {"head": model.head}, batches, rows=5)
    outs = capture_outputs(model, {"head": model.head}, batches)
    assert ins["head"].shape == (5, 4)
    ref = [model(b) for b in batches]
    assert all(torch.equal(a, b.detach()) for a, b in zip(outs["head"], ref, strict=True))


@pytest.mark.parametrize(
    "out, want",
    [
        (torch.ones(1), 1.0),
        ((torch.full((1,), 2.0), torch.zeros(1)), 2.0),
        ({"loss": torch.zeros(()), "logits": torch.full((1,), 3.0)}, 3.0),
        ({"last_hidden_state": torch.full((1,), 4.0), "pooler_output": torch.zeros(1)}, 4.0),
        ({"hidden": torch.full((1,), 5.0)}, 5.0),
    ],
)
def test_model_output_rule(out: object, want: float) -> None:
    assert model_output(out).flatten()[0].item() == want


def test_model_output_refuses_no_tensor() -> None:
    with pytest.raises(TypeError, match="cannot find a tensor"):
        model_output({"a": 1})


def test_passes_name_the_verb_in_data_errors() -> None:
    model = _net()
    bad = [torch.full((1, 3), float("nan"))]
    with pytest.raises(ValueError, match="search"):
        capture_grams(model, {"head": model.head}, bad, what="search")
    with pytest.raises(ValueError, match="calibrate"):
        run(model, bad, what="calibrate")
