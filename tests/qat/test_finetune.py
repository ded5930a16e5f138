"""finetune: QAT recovers PTQ's loss gap, distillation, objectives, NaN guard, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.qat.models import batches, compressed, mlp
from tnquant import Binary, QuantSpec, Ternary
from tnquant.qat import finetune
from tnquant.quantization import quantize

#: fraction of the PTQ-vs-float loss gap that QAT must close
RECOVERY = 0.9


def _target(x):
    return torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] - 0.5 * x[:, 3:4] ** 2


def _mse(model, x, y):
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def test_qat_recovers_most_of_the_ptq_gap():
    torch.manual_seed(0)
    x, x_test = torch.randn(2048, 8), torch.randn(1024, 8)
    y, y_test = _target(x), _target(x_test)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(1000):  # the float model, trained here
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    float_loss = _mse(model, x_test, y_test)
    qmodel = copy.deepcopy(model)
    quantize(qmodel, weights=QuantSpec(bits=3, learnable=True), progress=False)
    ptq_loss = _mse(qmodel, x_test, y_test)  # min-max scales, as initialised
    assert ptq_loss > 5 * float_loss
    data = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 2048, 128)]
    finetune(
        qmodel,
        data,
        task_loss=nn.functional.mse_loss,
        epochs=40,
        lr=1e-2,
        shuffle=True,
        progress=False,
    )
    qat_loss = _mse(qmodel, x_test, y_test)
    assert (ptq_loss - qat_loss) / (ptq_loss - float_loss) >= RECOVERY


def _gap(student, teacher, x, kind):
    with torch.no_grad():
        s, t = student(x), teacher(x)
    if kind == "kl":
        return nn.functional.kl_div(
            s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"
        ).item()
    if kind == "cosine":
        return 1 - nn.functional.cosine_similarity(s, t, dim=-1).mean().item()
    return (s - t).pow(2).mean().item()


@pytest.mark.parametrize("loss", ["mse", "cosine", "kl"])
@pytest.mark.parametrize("bits", [None, 4])
def test_distillation_brings_a_low_rank_student_to_its_teacher(loss, bits):
    teacher = mlp(seed=0)
    student = compressed(teacher, rank=2, bits=bits)
    held_out = batches(99, 1, size=256)[0]
    before = _gap(student, teacher, held_out, loss)
    report = finetune(
        student, batches(1, 16, size=32), teacher, loss=loss, epochs=8, lr=3e-2, progress=False
    )
    h = report.history
    assert len(h.loss) == 128 and h.distill == h.loss
    assert sum(h.loss[-16:]) < 0.5 * sum(h.loss[:16])
    assert _gap(student, teacher, held_out, loss) < 0.5 * before
    assert student.training and teacher.training  # modes restored (both were training)


def test_hidden_state_distillation():
    teacher = mlp(seed=0)
    student = compressed(teacher, rank=2, bits=4)
    x = batches(99, 1, size=256)[0]

    def hidden_gap():
        with torch.no_grad():
            return (student[:3](x) - teacher[:3](x)).pow(2).mean().item()

    before = hidden_gap()
    report = finetune(
        student, batches(1, 16, size=32), teacher, hidden=["2"], epochs=8, lr=3e-2, progress=False
    )
    assert hidden_gap() < 0.5 * before
    assert report.history.loss[-1] < report.history.loss[0]
    assert not student[2]._forward_hooks and not teacher[2]._forward_hooks


def test_task_and_distillation_terms_are_weighted_by_alpha():
    teacher = mlp(seed=0)
    student = compressed(teacher, rank=2, bits=4)
    data = [(x, torch.randint(0, 4, (x.shape[0],))) for x in batches(1, 4)]
    h = finetune(
        student,
        data,
        teacher,
        loss="kl",
        temperature=2.0,
        task_loss=nn.functional.cross_entropy,
        alpha=0.3,
        progress=False,
    ).history
    assert len(h.task) == len(h.distill) == len(h.loss) == 4
    for total, task, distill in zip(h.loss, h.task, h.distill, strict=True):
        assert total == pytest.approx(0.3 * task + 0.7 * distill, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(inputs, target\) pair, got a Tensor"):
        finetune(student, batches(1, 2), teacher, task_loss=nn.functional.mse_loss, progress=False)


class _LossModel(nn.Module):
    """Hugging Face style: keyword inputs, returns a dict with 'loss' when given labels."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, inputs, labels):
        out = self.fc(inputs)
        return {"logits": out, "loss": nn.functional.mse_loss(out, labels)}


def test_without_teacher_or_task_loss_the_models_own_loss_is_minimised():
    torch.manual_seed(0)
    model = _LossModel()
    quantize(model, weights=QuantSpec(bits=4, learnable=True), progress=False)
    data = [{"inputs": x, "labels": x.sum(1, keepdim=True)} for x in batches(1, 4)]
    h = finetune(model, data, epochs=20, lr=3e-2, progress=False).history
    assert sum(h.loss[-4:]) < 0.2 * sum(h.loss[:4])
    with pytest.raises(ValueError, match="minimises the loss the model returns"):
        finetune(mlp(), batches(1, 2), progress=False)
    with pytest.raises(ValueError, match="need a teacher; got teacher=None"):
        finetune(mlp(), batches(1, 2), loss="kl", progress=False)


@pytest.mark.parametrize("spec", [Ternary(method="ttq"), Binary(learnable=True)])
def test_binary_and_ternary_cores_learn_their_scales(spec):
    teacher = mlp(seed=0)
    student = compressed(teacher, rank=3, bits=None)
    quantize(student, weights=spec, progress=False)
    with torch.no_grad():
        student(batches(0, 1)[0])
    scales = {n: p.detach().clone() for n, p in student.named_parameters() if "quantizer" in n}
    assert scales and all(p.numel() > 0 for p in scales.values())
    held_out = batches(99, 1, size=256)[0]
    before = _gap(student, teacher, held_out, "mse")
    finetune(student, batches(1, 16, size=32), teacher, epochs=4, lr=1e-2, progress=False)
    after = dict(student.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in scales.items())
    assert _gap(student, teacher, held_out, "mse") < before


def test_nan_loss_stops_before_the_step_and_leaves_parameters_untouched():
    teacher = mlp(seed=0)
    student = compressed(teacher, rank=2, bits=4)
    data = batches(1, 5)
    data[3] = data[3].clone()
    data[3][0, 0] = float("nan")
    snapshots = []

    def snapshot(model):
        snapshots.append(copy.deepcopy(model.state_dict()))
        return {}

    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4 \(epoch 0, batch 3"):
        finetune(student, data, teacher, eval_fn=snapshot, eval_every=1, lr=1e-2, progress=False)
    assert len(snapshots) == 3  # after steps 1, 2, 3
    last = snapshots[-1]
    assert all(torch.equal(v, last[k]) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_inf_gradient_is_caught_too():
    model = nn.Linear(2, 1)
    before = copy.deepcopy(model.state_dict())
    data = [(torch.tensor([[1e30, 1.0]]), torch.tensor([[0.0]]))]
    with pytest.raises(FloatingPointError, match=r"at step 1 .*parameters are those after step 0"):
        finetune(
            model,
            data,
            task_loss=lambda out, y: (out - y).abs().mean() * 1e10,
            clip_grad_norm=None,
            progress=False,
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_eval_fn_is_logged_and_does_not_change_the_run():
    teacher = mlp(seed=0, dropout=0.2)
    start = compressed(teacher, rank=2, bits=4)
    data = batches(1, 5)
    runs = []
    for eval_fn in (None, lambda m: {"rand": torch.rand(1), "train": m.training}):
        student = copy.deepcopy(start)
        torch.manual_seed(7)
        report = finetune(
            student,
            data,
            teacher,
            epochs=1,
            eval_fn=eval_fn,
            eval_every=2 if eval_fn else None,
            progress=False,
        )
        runs.append((student, report))
    (a, _), (b, report) = runs
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    evals = report.history.evals
    assert [e["step"] for e in evals] == [2, 4, 5]
    assert all(e["train"] is False and isinstance(e["rand"], float) for e in evals)
    assert report.history.time_s > 0 and "5 steps" in str(report)


def test_dropout_false_trains_as_without_dropout_and_restores_p():
    teacher = mlp(seed=0)
    with_drop, no_drop = mlp(seed=0, dropout=0.5), mlp(seed=0)
    start_drop = compressed(with_drop, rank=2, bits=4)
    start_plain = compressed(no_drop, rank=2, bits=4)
    data = batches(1, 6)
    a, b, c = copy.deepcopy(start_drop), copy.deepcopy(start_plain), copy.deepcopy(start_drop)
    torch.manual_seed(3)
    finetune(a, data, teacher, epochs=2, dropout=False, progress=False)
    torch.manual_seed(3)
    finetune(b, data, teacher, epochs=2, progress=False)
    torch.manual_seed(3)
    finetune(c, data, teacher, epochs=2, dropout=True, progress=False)  # its own dropout
    assert a[2].p == 0.5 and c[2].p == 0.5  # restored on return
    params = list(a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(params, b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(params, c.parameters(), strict=True))
    d = copy.deepcopy(start_drop)  # default with a teacher: no dropout
    torch.manual_seed(3)
    finetune(d, data, teacher, epochs=2, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(params, d.parameters(), strict=True))


def test_without_teacher_the_default_keeps_dropout():
    x = batches(2, 4)
    data = [(b, b[:, :4]) for b in x]
    start = compressed(mlp(seed=0, dropout=0.5), rank=2, bits=4)
    runs = []
    for dropout in (None, True, False):
        m = copy.deepcopy(start)
        torch.manual_seed(5)
        finetune(
            m, data, task_loss=nn.functional.mse_loss, epochs=1, dropout=dropout, progress=False
        )
        runs.append(list(m.parameters()))
    same = [all(torch.equal(p, q) for p, q in zip(runs[0], r, strict=True)) for r in runs[1:]]
    assert same == [True, False]


def test_dropout_p_is_restored_after_an_error():
    student = compressed(mlp(seed=0, dropout=0.3), rank=2, bits=4)
    with pytest.raises(FloatingPointError):
        data = [(x, torch.zeros(8, 4)) for x in batches(0, 2)]
        finetune(
            student,
            data,
            task_loss=lambda out, y: out.sum() * float("nan"),
            dropout=False,
            progress=False,
        )
    assert student[2].p == 0.3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr must be a number > 0, got 0.0"),
        ({"alpha": 2}, r"alpha .* must be in \[0, 1\], got 2"),
        ({"checkpoint_every": 5}, "checkpoint_every is set but checkpoint_dir is None"),
        ({"eval_every": 5}, "eval_every is set but eval_fn is None"),
        ({"epochs": None}, "give epochs or max_steps"),
        ({"ddp": "yes"}, "ddp must be True, False or 'auto', got 'yes'"),
        ({"ddp": True}, "ddp=True needs torch.distributed"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"hidden": ["9"]}, r"hidden names must be submodules of the model, got \['9'\]"),
        ({"dropout": 0.0}, "dropout must be True, False or None, got 0.0"),
    ],
)
def test_bad_arguments_say_what_was_expected(kwargs, match):
    teacher = mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        finetune(compressed(teacher), batches(0, 2), teacher, progress=False, **kwargs)


def test_student_cannot_be_its_own_teacher_and_max_steps_limits_the_run():
    model = mlp()
    with pytest.raises(ValueError, match="got the student itself"):
        finetune(model, batches(0, 2), model, progress=False)
    h = finetune(
        compressed(model), batches(0, 4), model, epochs=None, max_steps=10, progress=False
    ).history
    assert h.step == list(range(1, 11)) and h.epoch == [0] * 4 + [1] * 4 + [2] * 2
    assert all(math.isfinite(v) for v in h.loss)
