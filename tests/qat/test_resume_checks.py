"""Resume refuses a different run, survives a truncated checkpoint, trusts no file."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch

from tests.qat.models import batches, compressed, mlp, params_equal
from tnquant.qat import finetune, load_checkpoint

STEPS = 6  # batches per epoch; two epochs


@pytest.fixture(scope="module")
def setup():
    teacher = mlp(seed=0)
    return compressed(teacher, rank=2, bits=4), teacher


def _run(start, teacher, **kwargs):
    student = copy.deepcopy(start)
    options = dict(epochs=2, lr=1e-2, progress=False)
    options.update(kwargs)
    report = finetune(student, batches(5, STEPS), teacher, **options)
    return student, report.history


@pytest.fixture(scope="module")
def written(setup, tmp_path_factory):
    """An uninterrupted run and its checkpoints at steps 2, 4, ..., 12."""
    start, teacher = setup
    ckpt = tmp_path_factory.mktemp("ckpt")
    full, history = _run(
        start, teacher, checkpoint_dir=ckpt, checkpoint_every=2, keep_checkpoints=None
    )
    return full, history, ckpt


def _copy(src: Path, dst: Path, steps) -> Path:
    dst.mkdir(exist_ok=True)
    for s in steps:
        name = f"step_{s:08d}.pt"
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _no_forward(model):
    """A list that a forward pre-hook on ``model`` appends to (nothing ran while empty)."""
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


# ----------------------------------------------------------- what must match
def test_changed_options_are_refused_with_every_difference_before_any_work(setup, written):
    start, teacher = setup
    _, _, ckpt = written
    student = copy.deepcopy(start)
    calls = _no_forward(student)
    with pytest.raises(ValueError) as info:
        finetune(
            student,
            batches(5, STEPS),
            teacher,
            epochs=2,
            lr=1e-3,
            optimizer="sgd",
            progress=False,
            resume_from=ckpt / "step_00000004.pt",
        )
    message = str(info.value)
    assert (
        "step_00000004.pt was written with lr=0.01, this run has lr=0.001; written with "
        "optimizer='adamw', this run has optimizer='sgd'; resume with the same" in message
    )
    assert "may change progress, eval_fn" in message
    assert calls == []  # refused before the lazy initialisation forward


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"epochs": 3},
            "written with total_steps=12, this run has total_steps=18; written with "
            "epochs=2, this run has epochs=3",
        ),
        ({"warmup": 1}, "written with warmup=0.05, this run has warmup=1"),
        (
            {"schedule": "linear", "weight_decay": 0.1},
            "written with weight_decay=0.0, .*=0.1; written with schedule='cosine', .*='linear'",
        ),
        ({"loss": "cosine", "dropout": True}, "loss='mse', .*loss='cosine'; .*dropout=True"),
        (
            {"teacher": None, "task_loss": torch.nn.functional.mse_loss},
            "teacher='<Sequential>', this run has teacher=None; .*task_loss='<callable mse_loss>'",
        ),
    ],
)
def test_each_recorded_option_is_compared(setup, written, kwargs, match):
    start, teacher = setup
    _, _, ckpt = written
    teacher = kwargs.pop("teacher", teacher)
    data = batches(5, STEPS)
    if "task_loss" in kwargs:
        data = [(x, x[:, :4]) for x in data]
    with pytest.raises(ValueError, match=match):
        finetune(
            copy.deepcopy(start),
            data,
            teacher,
            lr=1e-2,
            progress=False,
            resume_from=ckpt,
            **{"epochs": 2, **kwargs},
        )


def test_a_callable_optimizer_is_compared_by_name(setup, tmp_path):
    start, teacher = setup

    def sgd_momentum(groups):
        return torch.optim.SGD(groups, momentum=0.5)

    def adam_plain(groups):
        return torch.optim.Adam(groups)

    _run(
        start,
        teacher,
        optimizer=sgd_momentum,
        checkpoint_dir=tmp_path,
        checkpoint_every=3,
        keep_checkpoints=None,
    )
    with pytest.raises(
        ValueError,
        match=r"optimizer='<callable .*sgd_momentum>', this run "
        r"has optimizer='<callable .*adam_plain>'",
    ):
        _run(start, teacher, optimizer=adam_plain, resume_from=tmp_path / "step_00000006.pt")
    full, _ = _run(start, teacher, optimizer=sgd_momentum)
    resumed, _ = _run(
        start, teacher, optimizer=sgd_momentum, resume_from=tmp_path / "step_00000006.pt"
    )
    assert params_equal(full, resumed)


def test_options_that_may_change_do_not_change_the_result(setup, written, tmp_path):
    start, teacher = setup
    full, h_full, ckpt = written
    seen = []
    resumed, h_res = _run(
        start,
        teacher,
        resume_from=ckpt / "step_00000006.pt",
        progress=True,
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        keep_checkpoints=1,
        fused=False,
        ddp=False,
        eval_fn=lambda m: seen.append(1) or {},
        eval_every=3,
    )
    assert params_equal(full, resumed) and h_res.loss == h_full.loss
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000012.pt"] and len(seen) == 2


def test_checkpoints_record_the_options(written):
    state = load_checkpoint(written[2] / "step_00000002.pt")
    assert state["options"]["lr"] == 0.01 and state["options"]["optimizer"] == "adamw"
    assert state["options"]["teacher"] == "<Sequential>" and state["options"]["dropout"] is False
    assert state["optimizer_class"] == "torch.optim.adamw.AdamW"


def _old_format(src: Path, dst: Path) -> Path:
    """``src`` as written before the options were recorded."""
    state = torch.load(src, weights_only=True)
    del state["options"], state["optimizer_class"]
    torch.save(state, dst)
    return dst


def test_an_old_checkpoint_warns_resumes_and_records_the_options(setup, written, tmp_path):
    start, teacher = setup
    full, _, ckpt = written
    old = _old_format(ckpt / "step_00000008.pt", tmp_path / "step_00000008.pt")
    with pytest.warns(
        UserWarning,
        match=r"did not record the options of its run; epochs, "
        r"max_steps, lr, .* cannot be compared",
    ):
        resumed, _ = _run(
            start, teacher, resume_from=old, checkpoint_dir=tmp_path / "new", checkpoint_every=2
        )
    assert params_equal(full, resumed)
    assert load_checkpoint(tmp_path / "new")["options"]["lr"] == 0.01  # stored from now on


def test_an_old_adamw_checkpoint_resumed_with_sgd_is_refused_not_a_key_error(
    setup, written, tmp_path
):
    start, teacher = setup
    old = _old_format(written[2] / "step_00000008.pt", tmp_path / "step_00000008.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ValueError,
            match=r"its optimizer has settings \['amsgrad', 'betas'"
            r".*that this run's SGD does not know",
        ):
            _run(start, teacher, optimizer="sgd", resume_from=old)


# ------------------------------------------------------ unreadable checkpoints
def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) + keep])


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(setup, written, tmp_path):
    start, teacher = setup
    full, h_full, ckpt = written
    d = _copy(ckpt, tmp_path, (8, 10, 12))
    _truncate(d / "step_00000012.pt", -10)  # torch.load: OSError [Errno 22]
    with pytest.warns(
        UserWarning,
        match=r"skipping checkpoint .*step_00000012\.pt, which "
        r"cannot be read: OSError",
    ):
        resumed, h_res = _run(start, teacher, resume_from=d)
    assert params_equal(full, resumed) and h_res.resumed_from == 10
    assert h_res.loss == h_full.loss


def test_no_readable_checkpoint_names_the_directory_and_the_files(setup, written, tmp_path):
    start, teacher = setup
    d = _copy(written[2], tmp_path, (10, 12))
    _truncate(d / "step_00000012.pt", 100)
    _truncate(d / "step_00000010.pt", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ValueError,
            match=rf"no readable checkpoint in directory "
            rf"{re.escape(str(d))}; tried, newest first: "
            r"step_00000012\.pt \(RuntimeError.*; "
            r"step_00000010\.pt \(EOFError",
        ):
            _run(start, teacher, resume_from=d)


@pytest.mark.parametrize("keep", [0, 10, 3000, -10])
def test_a_corrupt_checkpoint_file_given_explicitly_names_its_path(setup, written, tmp_path, keep):
    start, teacher = setup
    d = _copy(written[2], tmp_path, (10, 12))
    _truncate(d / "step_00000012.pt", keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to step 10 either
        with pytest.raises(
            ValueError,
            match=rf"cannot read checkpoint "
            rf"{re.escape(str(d / 'step_00000012.pt'))}: ",
        ):
            _run(start, teacher, resume_from=d / "step_00000012.pt")


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark, ())


def _mark():
    _Payload.ran = True
    return "ran"


def test_a_checkpoint_holding_code_is_refused_without_running_it(setup, written, tmp_path):
    start, teacher = setup
    state = torch.load(written[2] / "step_00000012.pt", weights_only=True)
    state["history"]["evals"] = [{"step": 12, "x": _Payload()}]
    torch.save(state, tmp_path / "step_00000012.pt")
    with pytest.raises(
        ValueError, match="cannot read checkpoint .*step_00000012.pt: UnpicklingError"
    ):
        _run(start, teacher, resume_from=tmp_path / "step_00000012.pt")
    assert _Payload.ran is False


def _edit(src: Path, dst: Path, change) -> Path:
    state = torch.load(src, weights_only=True)
    change(state)
    torch.save(state, dst)
    return dst


def _moment(state):
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["exp_avg"] = torch.zeros(1)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.update(step=7), r"'step' 7, 'epoch' 0 and 'epoch_steps' 4 do not fit"),
        (lambda s: s.update(ranks=[]), "'ranks' must hold the random states of the 1 processes"),
        (lambda s: s["ranks"][0]["rng"].update(cpu=torch.zeros(3)), "'ranks' must hold"),
        (lambda s: s["history"].update(loss=["x"]), "history entry 'loss' must be a list of num"),
        (lambda s: s.update(format="other/2"), "expected a checkpoint of format"),
        (_moment, r"optimizer moment 'exp_avg' of parameter \d+ has shape \(1,\), the parameter"),
        (
            lambda s: s["scheduler"].update(lr_lambdas=[{"x": 1}]),
            r"entry 'lr_lambdas' of its scheduler state is \[\{'x': 1\}\]",
        ),
        (
            lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")),
            "setting 'lr' of its optimizer is nan",
        ),
        (lambda s: s["model"].popitem(), "its model state does not fit this model"),
    ],
)
def test_an_inconsistent_checkpoint_is_refused_naming_it(setup, written, tmp_path, change, match):
    start, teacher = setup
    bad = _edit(written[2] / "step_00000004.pt", tmp_path / "step_00000004.pt", change)
    student = copy.deepcopy(start)
    with pytest.raises(ValueError, match=match) as info:
        finetune(
            student, batches(5, STEPS), teacher, epochs=2, lr=1e-2, progress=False, resume_from=bad
        )
    assert str(bad) in str(info.value)


def test_an_inconsistent_newest_checkpoint_in_a_directory_falls_back(setup, written, tmp_path):
    start, teacher = setup
    full, _, ckpt = written
    d = _copy(ckpt, tmp_path, (10,))
    _edit(ckpt / "step_00000012.pt", d / "step_00000012.pt", lambda s: s.update(ranks=[]))
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000012\.pt.*'ranks'"):
        resumed, _ = _run(start, teacher, resume_from=d)
    assert params_equal(full, resumed)


# --------------------------------------------------------- the checkpoint dir
STALE = [".step_00000004.pt.k2j_x9aq.tmp", ".step_123456789.pt.________.tmp"]
KEPT = [
    ".step_00000004.pt.short.tmp",
    ".step_00000004.pt.UPPERCAS.tmp",
    "step_x.tmp",
    "notes.tmp",
    ".step_00000004.pt.k2j_x9aq.tmp.bak",
    "x.step_00000004.pt.k2j_x9aq.tmp",
]


def test_stale_temporaries_are_removed_at_the_start_of_a_run_that_writes_there(setup, tmp_path):
    start, teacher = setup
    for name in STALE + KEPT:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / ".step_00000006.pt.abcdefgh.tmp").mkdir()  # not a file: left alone
    target = tmp_path / "elsewhere.pt"
    target.write_bytes(b"keep me")
    (tmp_path / ".step_00000008.pt.abcdefgh.tmp").symlink_to(target)
    seen = []

    def look(model):  # runs after the first step, before any checkpoint is written
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return {}

    _run(start, teacher, max_steps=1, checkpoint_dir=tmp_path, eval_fn=look)
    assert not any(name in seen[0] for name in STALE)
    assert all(name in seen[0] for name in KEPT)
    assert (tmp_path / ".step_00000006.pt.abcdefgh.tmp").is_dir()
    assert (tmp_path / ".step_00000008.pt.abcdefgh.tmp").is_symlink()
    assert target.read_bytes() == b"keep me"


def test_a_run_that_only_reads_a_directory_leaves_its_temporaries(setup, written, tmp_path):
    start, teacher = setup
    d = _copy(written[2], tmp_path, (12,))
    (d / STALE[0]).write_bytes(b"partial")
    _run(start, teacher, resume_from=d)
    assert (d / STALE[0]).exists()


def test_a_checkpoint_dir_that_is_a_file_is_refused_up_front(setup, tmp_path):
    start, teacher = setup
    f = tmp_path / "file"
    f.write_text("x")
    student = copy.deepcopy(start)
    calls = _no_forward(student)
    with pytest.raises(
        ValueError,
        match=rf"checkpoint_dir must be a directory .*got the file "
        rf"{re.escape(str(f))}",
    ):
        finetune(student, batches(5, STEPS), teacher, checkpoint_dir=f, progress=False)
    assert calls == []
