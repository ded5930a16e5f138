"""Tiny models and data shared by the qat tests (built the same way in every process)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tnquant import LowRank, QuantSpec, factorize
from tnquant.quantization import quantize


def mlp(
    seed: int = 0,
    d_in: int = 8,
    hidden: int = 16,
    d_out: int = 4,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """``Linear-Tanh-[Dropout]-Linear-Tanh-Linear`` with weights drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out)]
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) / p.shape[-1] ** 0.5)
    return model


def compressed(teacher: nn.Module, rank: int = 3, bits: int | None = 4) -> nn.Module:
    """A copy of ``teacher`` with its first two Linear layers low-rank and all weights
    quantized with learnable (LSQ) scales (``bits=None``: factorized only)."""
    student = copy.deepcopy(teacher)
    linears = [n for n, m in student.named_modules() if isinstance(m, nn.Linear)]
    factorize(student, {n: LowRank(rank=rank) for n in linears[:2]}, progress=False)
    if bits is not None:
        quantize(student, weights=QuantSpec(bits=bits, learnable=True), progress=False)
    return student


def batches(
    seed: int, n: int, size: int = 8, d_in: int = 8, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """``n`` input batches of ``size`` rows drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, d_in, generator=gen, dtype=dtype) for _ in range(n)]


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    """Every parameter and buffer of ``a`` equals (bitwise) that of ``b``."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
