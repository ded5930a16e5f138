"""finetune(amp=...): bf16 / fp16 autocast, GradScaler, float32 master weights, fp16 refusal."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from tests.qat.models import batches, compressed, mlp, params_equal
from tnquant import Binary, QuantSpec, Ternary
from tnquant.qat import FinetuneConfig, finetune
from tnquant.qat.checkpoint import load_checkpoint
from tnquant.quant.quantizer import Quantizer
from tnquant.quantization import quantize

#: relative gap allowed between the bf16 / fp16 and the float32 loss over the first steps
#: (bf16 keeps 8 significant bits in the matmuls: ~0.4 % per product, a few % after training)
LOSS_RTOL = {"bf16": 0.03, "fp16": 0.005}
#: first steps compared with the float32 run
FIRST_STEPS = 4

HAS_CPU_SCALER = hasattr(torch.amp, "GradScaler")
NO_CPU_SCALER = "torch.amp.GradScaler('cpu') needs torch >= 2.3"


def _regression(seed: int, n: int, offset: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xs = batches(seed, n)
    return [(x, offset + torch.sin(x[:, :4]) + 0.5 * x[:, 4:]) for x in xs]


def _run(model: nn.Module, amp: str | None, **options) -> list[float]:
    settings = {
        "task_loss": nn.functional.mse_loss,
        "epochs": 4,
        "lr": 1e-2,
        "schedule": "constant",
        "progress": False,
        **options,
    }
    return finetune(model, _regression(1, 4), amp=amp, **settings).history.loss


def _counting(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    model.register_forward_pre_hook(hook)
    return calls


# ----------------------------------------------------------------- training
@pytest.mark.parametrize(
    "amp",
    [
        "bf16",
        pytest.param("fp16", marks=pytest.mark.skipif(not HAS_CPU_SCALER, reason=NO_CPU_SCALER)),
    ],
)
def test_quantized_model_trains_under_amp_close_to_float32(amp):
    teacher = mlp()
    reference, student = compressed(teacher), compressed(teacher)
    assert any(isinstance(m, Quantizer) and m.learnable for m in student.modules())
    ref_loss = _run(reference, None)
    loss = _run(student, amp)
    assert all(math.isfinite(v) for v in loss)
    assert sum(loss[-4:]) < 0.7 * sum(loss[:4])  # it learns
    for ours, ref in zip(loss[:FIRST_STEPS], ref_loss[:FIRST_STEPS], strict=True):
        assert ours == pytest.approx(ref, rel=LOSS_RTOL[amp])
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert not params_equal(student, compressed(teacher))


@pytest.mark.skipif(not HAS_CPU_SCALER, reason=NO_CPU_SCALER)
def test_fp16_scaler_skips_overflowed_steps_and_resumes_its_scale(tmp_path):
    # targets of 300: d loss / d output ~ 600 / 32 per element, times the initial
    # scale 2**16 overflows float16 (max 65504) until the scale has halved enough
    teacher = mlp()
    initial = compressed(teacher)
    data = _regression(1, 4, offset=300.0)
    with torch.no_grad():
        initial(data[0][0])  # the learnable scales take their values, as finetune's first pass
    options = {
        "task_loss": nn.functional.mse_loss,
        "epochs": None,
        "lr": 1e-2,
        "clip_grad_norm": None,
        "progress": False,
        "amp": "fp16",
    }
    full = copy.deepcopy(initial)
    history = finetune(full, data, max_steps=12, **options).history
    skipped = history.skipped
    assert skipped and skipped == list(range(1, len(skipped) + 1)) and len(skipped) < 12
    # a skipped step leaves the parameters as they were
    part = copy.deepcopy(initial)
    finetune(part, data, max_steps=len(skipped), **options)
    assert params_equal(part, initial)
    # the scaler's state travels with the checkpoint: a resumed run skips no step twice
    ckpt = tmp_path / "ckpt"
    first = copy.deepcopy(initial)
    finetune(
        first,
        data,
        max_steps=12,
        checkpoint_dir=ckpt,
        checkpoint_every=2,
        keep_checkpoints=None,
        **options,
    )
    state = load_checkpoint(ckpt / "step_00000002.pt")
    assert state["scaler"]["scale"] == 2.0**16 / 4
    resumed = copy.deepcopy(initial)
    again = finetune(
        resumed, data, max_steps=12, resume_from=ckpt / "step_00000002.pt", **options
    ).history
    assert again.skipped == skipped
    assert params_equal(resumed, full)


def test_float16_model_without_amp_is_refused_before_any_step():
    teacher = mlp(dtype=torch.float16)
    student = compressed(teacher)
    calls, teacher_calls = _counting(student), _counting(teacher)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match=r"float16 .*amp='fp16' \(or 'bf16'\).*model\.float\(\)"):
        finetune(student, batches(0, 4, dtype=torch.float16), teacher, progress=False)
    assert calls == [0] and teacher_calls == [0]
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not HAS_CPU_SCALER, reason=NO_CPU_SCALER)
def test_float16_model_trains_with_fp16_amp_without_nan():
    teacher = mlp(dtype=torch.float16)
    student = compressed(teacher)
    start = copy.deepcopy(student)
    data = batches(0, 4, dtype=torch.float16)
    report = finetune(student, data, teacher, epochs=5, lr=1e-2, amp="fp16", progress=False)
    loss = report.history.loss
    assert all(math.isfinite(v) for v in loss) and sum(loss[-4:]) < sum(loss[:4])
    for (name, p), (_, p0) in zip(
        student.named_parameters(), start.named_parameters(), strict=True
    ):
        assert p.dtype == p0.dtype, name  # cast back on return
        assert p.dtype == torch.float16 or p0.numel() == 0, name  # (lazy LSQ scales: float32)
        assert torch.isfinite(p).all(), name
    assert not params_equal(student, start)


def test_frozen_float16_parameters_and_a_float16_teacher_are_allowed_without_amp():
    teacher = mlp(dtype=torch.float16)
    frozen = mlp(dtype=torch.float16)[0].requires_grad_(False)  # never stepped
    student = nn.Sequential(frozen, _Float(), *mlp(seed=1)[1:])
    report = finetune(student, batches(0, 2, dtype=torch.float16), teacher, progress=False)
    assert len(report.history.loss) == 2 and all(math.isfinite(v) for v in report.history.loss)
    assert frozen.weight.dtype == torch.float16


class _Float(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def test_bfloat16_parameters_without_amp_train_with_a_warning():
    teacher = mlp()
    student = compressed(teacher).to(torch.bfloat16)
    data = _regression(1, 4)
    data = [(x.to(torch.bfloat16), y) for x, y in data]
    dtypes = {n: p.dtype for n, p in student.named_parameters() if p.numel()}  # not lazy ones
    assert set(dtypes.values()) == {torch.bfloat16}
    with pytest.warns(UserWarning, match=r"bfloat16 .*amp='bf16'"):
        report = finetune(
            student, data, task_loss=nn.functional.mse_loss, epochs=2, lr=1e-2, progress=False
        )
    assert all(math.isfinite(v) for v in report.history.loss)
    assert {n: p.dtype for n, p in student.named_parameters() if n in dtypes} == dtypes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with amp: float32 master weights, no warning
        finetune(student, data, task_loss=nn.functional.mse_loss, amp="bf16", progress=False)
    assert {n: p.dtype for n, p in student.named_parameters() if n in dtypes} == dtypes


# ------------------------------------------------------------ fake quant
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, learnable=True),
        QuantSpec(bits=8, granularity="channel", axis=0),
        QuantSpec(bits=3, symmetric=False, learnable=True),
        Ternary(),
        Binary(),
    ],
    ids=["lsq4", "int8-channel", "lsq3-affine", "ternary", "binary"],
)
def test_fake_quant_codes_under_bf16_autocast_are_the_float32_codes(spec):
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(16, 32, generator=gen) * 0.1)
    quantizer = Quantizer(spec)
    quantizer(weight.detach())  # learnable: the scales take their initial values
    codes, qp = quantizer.quantize_codes(weight.detach())  # the float32 run, no autocast
    with torch.no_grad():
        plain = quantizer(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = quantizer(weight)
        y = nn.functional.linear(torch.randn(4, 32, generator=gen), under)
    assert under.dtype == torch.float32 and y.dtype == torch.bfloat16  # only the matmul is bf16
    assert torch.equal(under.detach(), plain)
    if isinstance(spec, QuantSpec):
        # the codes of the autocast run, and an independent float64 reference of them
        scale = qp.scale.double()
        zp = qp.zero_point.double() if qp.zero_point is not None else 0.0
        assert torch.equal(torch.round(under.detach().double() / scale + zp), codes.double())
        # plain float32 arithmetic (float64 would round the rare x / s within 2**-24 of a tie
        # differently from any float32 run)
        reference = torch.round(weight.detach() / qp.scale).double() + zp
        reference = reference.clamp(qp.qmin, qp.qmax)
        assert torch.equal(codes.double(), reference)
    else:  # the levels {-a, (0,) a} of the float32 run
        assert torch.equal(under.detach().sign(), codes.to(torch.float32))
        assert torch.unique(under.detach().abs()[codes != 0]).numel() == 1
    # the STE gradients reach the weight and the learnable scale under autocast
    y.float().pow(2).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    for p in quantizer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_activation_quantizer_codes_of_a_bf16_input_are_exact():
    gen = torch.Generator().manual_seed(1)
    quantizer = Quantizer(QuantSpec(bits=8, learnable=True))
    x = (torch.randn(64, 16, generator=gen) * 3).to(torch.bfloat16)  # a bf16 matmul output
    quantizer(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = quantizer(x)
    scale = quantizer.scale.detach()
    # plain float32 arithmetic on the upcast input: the codes of a float32 run
    codes = torch.round(x.float() / scale).clamp(-128, 127)
    assert under.dtype == torch.bfloat16
    # bf16 holds an 8-bit code times a scale to 2**-9 relative: the codes are recoverable
    assert torch.equal(torch.round(under.double() / scale.double()), codes.double())


# --------------------------------------------------------------- options
@pytest.mark.parametrize("value", ["float16", "BF16", 16, True, torch.float16])
def test_bad_amp_is_refused(value):
    with pytest.raises(ValueError, match=r"amp must be one of \['bf16', 'fp16'\] or None, got"):
        FinetuneConfig(amp=value)
    teacher = mlp()
    with pytest.raises(ValueError, match=r"amp must be one of"):
        finetune(compressed(teacher), batches(0, 2), teacher, amp=value, progress=False)


def test_amp_is_a_resume_option(tmp_path):
    teacher = mlp()
    student = compressed(teacher)
    data = batches(0, 2)
    finetune(student, data, teacher, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"written with amp=None, this run has amp='bf16'"):
        finetune(
            compressed(teacher), data, teacher, resume_from=tmp_path, amp="bf16", progress=False
        )


def test_amp_in_the_recipe_finetune_table():
    from tnquant.cli.recipe import parse_recipe

    weights = '[quantize.weights]\n"*" = {bits = 8}\n'
    assert parse_recipe("[finetune]\n" + weights).finetune.amp is None
    assert parse_recipe('[finetune]\namp = "bf16"\n' + weights).finetune.amp == "bf16"
    assert parse_recipe('[finetune]\namp = "none"\n' + weights).finetune.amp is None
    with pytest.raises(ValueError, match=r"'finetune.amp' must be one of \['bf16', 'fp16'\]"):
        parse_recipe('[finetune]\namp = "fp8"\n' + weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda(amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device has no bfloat16")
    teacher = mlp().cuda()
    reference, student = compressed(teacher), compressed(teacher)
    ref_loss = _run(reference, None)
    loss = _run(student, amp)
    assert all(math.isfinite(v) for v in loss) and sum(loss[-4:]) < 0.7 * sum(loss[:4])
    for ours, ref in zip(loss[:FIRST_STEPS], ref_loss[:FIRST_STEPS], strict=True):
        assert ours == pytest.approx(ref, rel=LOSS_RTOL[amp])
    half = compressed(teacher).half()
    data = [(x.cuda().half(), y.cuda()) for x, y in _regression(1, 4)]
    report = finetune(
        half, data, task_loss=nn.functional.mse_loss, amp=amp, lr=1e-2, epochs=3, progress=False
    )
    assert all(math.isfinite(v) for v in report.history.loss)
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in half.parameters())


def test_a_float16_llama_is_refused_without_amp_and_trains_with_fp16():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).half()
    quantize(model, weights={"model.layers.*": QuantSpec(bits=4, learnable=True)}, progress=False)
    ids = torch.randint(0, 256, (4, 16))
    data = [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in (0, 2)]
    calls = _counting(model)
    with pytest.raises(ValueError, match=r"trainable parameters are float16"):
        finetune(model, data, progress=False)
    assert calls == [0]
    if not HAS_CPU_SCALER:
        pytest.skip(NO_CPU_SCALER)
    report = finetune(model, data, amp="fp16", epochs=3, lr=1e-3, progress=False)
    loss = report.history.loss
    assert all(math.isfinite(v) for v in loss) and loss[-2] + loss[-1] < loss[0] + loss[1]
    embedding = model.model.embed_tokens.weight
    assert embedding.dtype == torch.float16 and torch.isfinite(embedding).all()
