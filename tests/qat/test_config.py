"""Every option of ``finetune`` is checked before any work, naming the field."""

from __future__ import annotations

import pytest
import torch

from tests.qat.models import batches, compressed, mlp
from tnquant.qat import finetune
from tnquant.qat.config import FinetuneConfig
from tnquant.qat.data import EpochPlan


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": True}, "epochs must be an int > 0 or None, got True"),
        ({"max_steps": True}, "max_steps must be an int > 0 or None, got True"),
        ({"epochs": 2.0}, "epochs must be an int > 0 or None, got 2.0"),
        ({"lr": True}, "lr must be a number > 0, got True"),
        ({"lr": float("nan")}, "lr must be a number > 0, got nan"),
        ({"scale_lr": False}, "scale_lr must be a number > 0 or None, got False"),
        ({"weight_decay": True}, "weight_decay must be a number >= 0, got True"),
        ({"clip_grad_norm": True}, "clip_grad_norm must be a number > 0 or None, got True"),
        ({"warmup": True}, "warmup must be an int"),
        ({"warmup": 1.5}, r"a float warmup is a fraction of the steps in \[0, 1\], got 1.5"),
        ({"seed": True}, "seed must be an int, got bool"),
        ({"seed": 1.0}, "seed must be an int, got float"),
        ({"shuffle": 1}, "shuffle must be a bool, got int"),
        ({"keep_checkpoints": True, "checkpoint_dir": "d"}, "keep_checkpoints must be an int"),
        ({"checkpoint_every": 0, "checkpoint_dir": "d"}, "checkpoint_every must be an int > 0"),
        ({"eval_every": True, "eval_fn": dict}, "eval_every must be an int > 0 or None, got True"),
        ({"optimizer": ["adamw"]}, r"optimizer must be one of .* got \['adamw'\]"),
        ({"optimizer": None}, "optimizer must be one of"),
        ({"schedule": ["cosine"]}, r"schedule must be one of .* got \['cosine'\]"),
        ({"train": ["all"]}, r"train must be one of .* got \['all'\]"),
        ({"ddp": 1}, "ddp must be True, False or 'auto', got 1"),
        ({"ddp": 0.0}, "ddp must be True, False or 'auto', got 0.0"),
        ({"fused": 1}, "fused must be True, False or 'auto', got 1"),
        ({"fused": "yes"}, "fused must be True, False or 'auto', got 'yes'"),
        ({"progress": 1}, "progress must be a bool, got int"),
        (
            {"checkpoint_dir": 5},
            r"checkpoint_dir must be a path \(str or os.PathLike\) or None, "
            "got int",
        ),
        ({"resume_from": ["ckpt"]}, "resume_from must be a path .* got list"),
        ({"checkpoint_dir": ""}, "checkpoint_dir must name a directory or file, got an empty path"),
        ({"ddp_kwargs": [1]}, "ddp_kwargs must be a dict or None, got list"),
        ({"eval_fn": 3}, "eval_fn must be a callable"),
    ],
)
def test_config_names_the_field_and_what_came(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FinetuneConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fused": 1}, "fused must be True, False or 'auto', got 1"),
        ({"optimizer": ["sgd"]}, "optimizer must be one of"),
        ({"temperature": "2"}, "temperature must be a finite number > 0, got '2'"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0, got inf"),
        ({"temperature": True}, "temperature must be a finite number > 0, got True"),
        ({"hidden": [0]}, r"hidden must be submodule names \(str\), got \[0\]"),
    ],
)
def test_finetune_refuses_before_any_forward(kwargs, match):
    teacher = mlp()
    student = compressed(teacher)
    calls = []
    student.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises((ValueError, TypeError), match=match):
        finetune(student, batches(0, 2), teacher, progress=False, **kwargs)
    assert calls == []


class _SizedIterator:
    """A one-shot iterator that reports a length (as some streaming readers do)."""

    def __init__(self, items):
        self.items = list(items)
        self._it = iter(self.items)

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)


@pytest.mark.parametrize("make", [lambda xs: (x for x in xs), lambda xs: iter(xs), _SizedIterator])
def test_a_one_shot_iterator_is_refused(make):
    teacher = mlp()
    with pytest.raises(TypeError, match=r"data must be re-iterable|wrap an iterator"):
        finetune(compressed(teacher), make(batches(0, 3)), teacher, epochs=2, progress=False)


def test_a_sized_one_shot_iterator_names_itself():
    teacher = mlp()
    with pytest.raises(TypeError, match="got a one-shot _SizedIterator"):
        finetune(
            compressed(teacher), _SizedIterator(batches(0, 3)), teacher, epochs=2, progress=False
        )


def test_a_dataloader_is_not_iterated_by_the_check():
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4, shuffle=True
    )
    torch.manual_seed(0)
    before = torch.get_rng_state()
    EpochPlan(loader)
    assert torch.equal(torch.get_rng_state(), before)  # no iter(loader): no seed drawn


def test_one_config_or_its_fields_as_keywords_give_the_same_run():
    from tests.qat.models import params_equal

    teacher = mlp()
    a, b, c = compressed(teacher), compressed(teacher), compressed(teacher)
    data = batches(1, 4)
    cfg = FinetuneConfig(epochs=2, lr=3e-2, loss="cosine", progress=False)
    ra = finetune(a, data, teacher, config=cfg)
    rb = finetune(b, data, teacher, epochs=2, lr=3e-2, loss="cosine", progress=False)
    assert params_equal(a, b) and ra.history.loss == rb.history.loss
    # with both, the keywords override the config's fields
    finetune(
        c,
        data,
        teacher,
        config=FinetuneConfig(epochs=2, lr=1.0, progress=False),
        lr=3e-2,
        loss="cosine",
    )
    assert params_equal(a, c)


def test_the_config_holds_every_option_of_finetune():
    import inspect

    from tnquant.qat import resume

    names = set(FinetuneConfig.__dataclass_fields__)
    assert set(resume.OPTIONS) - {"teacher"} <= names
    assert set(resume.MAY_CHANGE) <= names
    params = inspect.signature(finetune).parameters
    assert list(params) == ["model", "data", "teacher", "config", "options"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lrr": 1.0}, TypeError, "unexpected keyword argument 'lrr'; its options are the fields"),
        ({"config": {"lr": 1.0}}, TypeError, "config must be a FinetuneConfig or None, got dict"),
        ({"config": FinetuneConfig(), "lr": -1.0}, ValueError, "lr must be a number > 0"),
        ({"task_loss": "hinge"}, TypeError, r"task_loss must be one of \['cross_entropy'\]"),
    ],
)
def test_bad_config_or_keywords_are_refused(kwargs, error, match):
    teacher = mlp()
    with pytest.raises(error, match=match):
        finetune(compressed(teacher), batches(0, 2), teacher, progress=False, **kwargs)


def test_a_named_task_loss_is_the_function():
    from tests.qat.models import params_equal

    data = [
        (x, torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i)))
        for i, x in enumerate(batches(1, 3))
    ]
    a, b = compressed(mlp()), compressed(mlp())
    finetune(a, data, task_loss="cross_entropy", lr=1e-2, progress=False)
    finetune(b, data, task_loss=torch.nn.functional.cross_entropy, lr=1e-2, progress=False)
    assert params_equal(a, b)
