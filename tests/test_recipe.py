"""Recipes: parsing into specs built independently here, and every bad key named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tnquant import CP, TT, Binary, FixedPoint, LowRank, QuantSpec, Ternary, Tucker
from tnquant.cli.recipe import Recipe, load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WEIGHTS = '[quantize.weights]\n"*" = {bits = 8}\n'


@pytest.mark.parametrize("name", ["minilm.toml", "digits.toml"])
def test_shipped_recipes_parse(name):
    recipe = load_recipe(RECIPES / name)
    assert isinstance(recipe, Recipe)
    assert recipe.factorize is not None and recipe.quantize is not None
    assert recipe.export is not None
    # MiniLM exports its layer 0 feed-forward block; digits the whole CNN (no layers)
    assert bool(recipe.export.layers) == (name == "minilm.toml")
    assert recipe.path == str(RECIPES / name)


def test_export_without_layers_is_the_whole_model():
    r = parse_recipe('[export]\ninput = "auto"\n' + WEIGHTS)
    assert r.export is not None and r.export.layers == () and r.export.input == "auto"


def test_defaults():
    r = parse_recipe(WEIGHTS)
    assert r.factorize is None and r.finetune is None and r.export is None
    assert (r.data.batch_size, r.data.max_length) == (32, 64)
    assert r.calibrate.num_batches is None and r.calibrate.bias_correction is False
    assert r.quantize is not None and r.quantize.convert is True
    assert r.quantize.kwargs()["weights"] == {"*": QuantSpec(bits=8)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.data = None  # type: ignore[misc]


def test_factorize_specs_in_file_order():
    r = parse_recipe("""
[factorize]
data_aware = false
"b.*" = {format = "tt", ratio = 0.25, order = 2}
"a" = {format = "tucker", rank = [4, 3]}
"c" = {format = "cp", rank = 5, n_iter_max = 10}
"d" = {format = "lowrank", tol = 0.1, svd = "randomized"}
"e" = {format = "none"}
""")
    assert r.factorize is not None and r.factorize.data_aware is False
    assert list(r.factorize.mapping().items()) == [
        ("b.*", TT(ratio=0.25, order=2)),
        ("a", Tucker(rank=(4, 3))),
        ("c", CP(rank=5, n_iter_max=10)),
        ("d", LowRank(tol=0.1, svd="randomized")),
        ("e", None),
    ]


def test_quant_specs():
    r = parse_recipe("""
[quantize]
exclude = ["head"]
convert = false
[quantize.cores]
"0" = {bits = 4, granularity = "channel", axis = 3, learnable = true}
"-1" = {kind = "binary", granularity = "channel"}
"*.cores.1" = {bits = 3, granularity = ["group", 8], axis = 1, scale = "pow2"}
[quantize.weights]
"fc" = {kind = "fixed", type = "ap_fixed<8,2,RND,SAT>"}
"fc2" = {kind = "fixed", width = 6, integer = 1}
"t" = {kind = "ternary", method = "ttq"}
"x" = {kind = "none"}
[quantize.activations]
"*.input" = {bits = 8, symmetric = false}
""")
    q = r.quantize
    assert q is not None and q.exclude == ("head",) and q.include is None and not q.convert
    kw = q.kwargs()
    assert kw["cores"] == {
        0: QuantSpec(bits=4, granularity="channel", axis=3, learnable=True),
        -1: Binary(granularity="channel"),
        "*.cores.1": QuantSpec(bits=3, granularity=("group", 8), axis=1, scale="pow2"),
    }
    assert kw["weights"] == {
        "fc": FixedPoint(8, 2, rounding="RND", overflow="SAT"),
        "fc2": FixedPoint(6, 1),
        "t": Ternary(method="ttq"),
        "x": None,
    }
    assert kw["activations"] == {"*.input": QuantSpec(bits=8, symmetric=False)}


def test_other_sections():
    r = parse_recipe(
        WEIGHTS
        + """
[model]
class = "torch.nn:Linear"
kwargs = {in_features = 4, out_features = 2}
[data]
batch_size = 8
[calibrate]
num_batches = 2
bias_correction = true
[finetune]
epochs = 3
lr = 0.001
loss = "kl"
task_loss = "cross_entropy"
clip_grad_norm = false
[export]
layers = ["a", "b.*"]
input = "ap_fixed<12,4>"
accum = "ap_fixed<32,12>"
"""
    )
    assert r.model.cls == "torch.nn:Linear" and dict(r.model.kwargs) == {
        "in_features": 4,
        "out_features": 2,
    }
    assert r.data.batch_size == 8 and r.calibrate.num_batches == 2
    ft = r.finetune
    assert ft is not None and (ft.epochs, ft.lr, ft.loss, ft.task_loss) == (
        3,
        1e-3,
        "kl",
        "cross_entropy",
    )
    assert ft.clip_grad_norm is None and ft.distill is True
    ex = r.export
    assert ex is not None and ex.layers == ("a", "b.*") and ex.input == "ap_fixed<12,4>"
    assert ex.accum == FixedPoint(32, 12) and ex.result is None


BAD = [
    ('[quantize.cores]\n"*" = {bitz = 4}', "'quantize.cores.*.bitz' is not known"),
    ('[quantize.cores]\n"*" = {bits = 0}', "'quantize.cores.*.bits'"),
    ('[quantize.cores]\n"*" = {bits = 4, granularity = "row"}', "'quantize.cores.*.granularity'"),
    ('[quantize.weights]\n"*" = {kind = "int5"}', "'quantize.weights.*.kind'"),
    (
        '[quantize.weights]\n"*" = {kind = "ternary", threshold = 5}',
        "'quantize.weights.*.threshold'",
    ),
    (
        '[quantize.weights]\n"*" = {kind = "fixed", type = "ap_fixd<8,2>"}',
        "'quantize.weights.*.type'",
    ),
    ('[quantize.weights]\n"*" = 8', "'quantize.weights.*' must be a table"),
    ("[quantize]\nweight = {}", "'quantize.weight' is not known"),
    ('[quantize]\nconvert = "yes"\n[quantize.weights]\n"*" = {bits = 8}', "'quantize.convert'"),
    ('[factorize]\n"fc" = {format = "ttt", rank = 2}', "'factorize.fc.format'"),
    ('[factorize]\n"fc" = {rank = 2}', "'factorize.fc.format' is missing"),
    ('[factorize]\n"fc" = {format = "tt", ratio = 2.0}', "'factorize.fc.ratio'"),
    ('[factorize]\n"fc" = {format = "tt"}', "'factorize.fc': TT takes exactly one"),
    ('[factorize]\n"fc" = {format = "tt", rank = 2, rnak = 3}', "'factorize.fc.rnak'"),
    ("[factorize]\nfoo = 3", "'factorize.foo' is not known"),
    ('[factorize]\nencoder.layer = {format = "tt", rank = 2}', "quote layer globs"),
    ("[finetune]\nlr = -1\n" + WEIGHTS, "'finetune.lr'"),
    ('[finetune]\nloss = "l1"\n' + WEIGHTS, "'finetune.loss'"),
    ("[finetune]\nepohcs = 1\n" + WEIGHTS, "'finetune.epohcs' is not known"),
    ("[finetune]\nepochs = true\n" + WEIGHTS, "'finetune.epochs'"),
    ("[calibrate]\nnum_batches = 0\n" + WEIGHTS, "'calibrate.num_batches'"),
    ('[data]\nbatch_size = "x"\n' + WEIGHTS, "'data.batch_size'"),
    ("[export]\nlayers = 3\n" + WEIGHTS, "'export.layers'"),
    ('[export]\nlayers = "a"\ninput = "ap_fixd<8,2>"\n' + WEIGHTS, "'export.input'"),
    ('[export]\nlayers = "a"\ntolerance = 0\n' + WEIGHTS, "'export.tolerance'"),
    ('[model]\nclass = "nocolon"\n' + WEIGHTS, "'model.class'"),
    ('[model]\nclas = "a:B"\n' + WEIGHTS, "'model.clas' is not known"),
    ("[modle]\n" + WEIGHTS, "'modle' is not known"),
    ("[data]\nbatch_size = 8\n", "nothing to do"),
    ("[quantize\n", "not valid TOML"),
]


@pytest.mark.parametrize("text, expected", BAD, ids=[b[1] for b in BAD])
def test_bad_recipes_name_the_key(text, expected):
    with pytest.raises(ValueError) as info:
        parse_recipe(text)
    assert expected in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"expected one of \[.*'bits'.*'granularity'"):
        parse_recipe('[quantize.cores]\n"*" = {bitz = 4}')


def test_load_recipe_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recipe(tmp_path / "nope.toml")


@pytest.mark.parametrize("value, expected", [("10", 10), ("0", 0), ("0.1", 0.1), ("0.0", 0.0)])
def test_warmup_is_steps_or_a_fraction(value, expected):
    ft = parse_recipe(f"[finetune]\nwarmup = {value}\n" + WEIGHTS).finetune
    assert ft is not None and ft.warmup == expected and type(ft.warmup) is type(expected)


@pytest.mark.parametrize("value", ["true", "-1", "-0.5", "1.0", "10.0", '"5%"'])
def test_bad_warmup_is_refused_by_name(value):
    with pytest.raises(
        ValueError,
        match=r"recipe key 'finetune.warmup' must be an integer "
        r"number of steps >= 0 or a float fraction",
    ):
        parse_recipe(f"[finetune]\nwarmup = {value}\n" + WEIGHTS)


def test_warmup_steps_go_to_the_optimizer_schedule():
    from tnquant.qat.optim import warmup_steps

    # the recipe's value is what finetune's schedule takes: an int as steps, a float as fraction
    assert (
        warmup_steps(parse_recipe("[finetune]\nwarmup = 10\n" + WEIGHTS).finetune.warmup, 200) == 10
    )
    assert (
        warmup_steps(parse_recipe("[finetune]\nwarmup = 0.25\n" + WEIGHTS).finetune.warmup, 200)
        == 50
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "[finetune]\ndistill = false\n" + WEIGHTS,
            "'finetune' needs distill = true or a task_loss",
        ),
        (
            '[export]\nlayers = "a"\ninput_width = 65\n' + WEIGHTS,
            "'export.input_width' must be an integer in 2..64",
        ),
    ],
)
def test_recipe_errors_found_at_parse_time(text, expected):
    with pytest.raises(ValueError, match=expected):
        parse_recipe(text)


def test_load_recipe_refuses_huge_and_binary_files(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text(WEIGHTS + "#" * (2 << 20))
    with pytest.raises(ValueError, match=r"recipe file .* bytes; a recipe is at most"):
        load_recipe(big)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe" + WEIGHTS.encode())
    with pytest.raises(ValueError, match="recipe file .* is not UTF-8"):
        load_recipe(binary)


def test_finetune_table_is_derived_from_finetune_config():
    from tnquant.qat.config import FinetuneConfig
    from tnquant.qat.losses import LOSSES
    from tnquant.qat.optim import OPTIMIZERS, SCHEDULES
    from tnquant.qat.params import TRAIN_CHOICES

    ft = parse_recipe("[finetune]\n" + WEIGHTS).finetune
    assert ft is not None and ft.distill is True
    defaults = FinetuneConfig()
    for name in FinetuneConfig.__dataclass_fields__:
        assert getattr(ft, name) == getattr(defaults, name), name
    for key, choices in (
        ("loss", LOSSES),
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("train", TRAIN_CHOICES),
    ):
        for choice in choices:
            value = parse_recipe(f'[finetune]\n{key} = "{choice}"\n' + WEIGHTS).finetune
            assert getattr(value, key) == choice
        with pytest.raises(ValueError, match=rf"'finetune.{key}' must be one of"):
            parse_recipe(f'[finetune]\n{key} = "nope"\n' + WEIGHTS)


def test_finetune_values_the_config_refuses_are_recipe_errors():
    with pytest.raises(ValueError, match=r"recipe table 'finetune': temperature must be a finite"):
        parse_recipe("[finetune]\ntemperature = inf\n" + WEIGHTS)
