"""Random Hadamard rotation of Linear inputs: the same function, easier weights to quantize.

For an orthogonal ``R``, ``W x = (W R)(R^T x)``: a Linear layer keeps its
output exactly when its weight is replaced by ``W R`` and its input is
rotated by ``R`` on the way in. A random ``R`` spreads every weight row's
few large entries over many columns (the rows become "incoherent",
nearly Gaussian), so a per-channel grid of a few levels fits them with a
smaller step and rounds them with a smaller error (QuIP, Chee et al. 2023;
QuIP#, Tseng et al. 2024; QuaRot, Ashkboos et al. 2024). On the
pretrained MiniLM-L6, per-channel int3 ('mse' ranges) re-rounded by GPTQ
keeps a mean embedding cosine of 0.950 unrotated and 0.962 rotated (see
``BENCHMARKS.md``).

Here ``R = diag(signs) · blockdiag(H_b, ..., H_b)``: random signs (from
a seed, so a layer stores the seed, not the signs) times Sylvester
Hadamard blocks of ``b`` columns, normalised (``H_b H_b = I``). ``b`` is
the largest power of two dividing ``in_features``, at most ``block``
(default 128): the rotation of one input row costs ``b`` multiply-adds
per feature, a fraction ``b / out_features`` of the layer's own.

:func:`rotate` replaces each matched ``nn.Linear`` (or float
:class:`~tnquant.layers.LowRankLinear`, whose ``V`` core absorbs ``R``)
by a :class:`RotatedLinear` holding a :class:`HadamardRotation` and the
layer with the rotated weight, under the names ``<name>.rotation`` and
``<name>.layer``. Run it before :func:`~tnquant.quantize` (and before
:func:`~tnquant.ptq.gptq`, which then rounds the rotated weights on the
rotated inputs, as it should); quantizing, calibrating, fine-tuning and
:func:`~tnquant.search` see the inner layer like any other.
Fixed-point export does not implement the rotation (it raises on a
:class:`RotatedLinear`).

Examples
--------
>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(256, 8))
>>> x = torch.randn(4, 256)
>>> before = model(x)
>>> rotate(model, progress=False).rows[0]["block"]
128
>>> torch.allclose(model(x), before, atol=1e-5), type(model[0]).__name__
(True, 'RotatedLinear')
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.core.globs import matches, selected
from tnquant.core.modules import replace_module
from tnquant.layers.lowrank import LowRankLinear
from tnquant.report import Report

__all__ = ["HadamardRotation", "RotatedLinear", "rotate", "hadamard", "rotation_block"]

#: Default largest Hadamard block.
BLOCK = 128


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The normalised ``n x n`` Sylvester Hadamard matrix (``n`` a power of two).

    Symmetric and orthogonal: ``H @ H == I``.

    Examples
    --------
    >>> hadamard(4).mul(2).tolist()[1]
    [1.0, -1.0, 1.0, -1.0]
    >>> bool(torch.allclose(hadamard(8) @ hadamard(8), torch.eye(8), atol=1e-6))
    True
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def rotation_block(features: int, block: int = BLOCK) -> int:
    """The Hadamard block for ``features`` inputs: the largest power of two dividing it, <= block.

    Examples
    --------
    >>> rotation_block(384), rotation_block(1536), rotation_block(1536, 512), rotation_block(10)
    (128, 128, 512, 2)
    """
    if features < 1 or block < 1:
        raise ValueError(f"features and block must be >= 1, got {features} and {block}")
    b = features & -features  # lowest set bit: the largest power of two dividing features
    while b > block:
        b //= 2
    return b


class HadamardRotation(nn.Module):
    """``x -> x @ R`` over the last dimension, ``R = diag(signs) · blockdiag(H_b, ...)``.

    Parameters
    ----------
    features
        Size of the rotated (last) dimension.
    block
        Largest Hadamard block (see :func:`rotation_block`).
    seed
        Seed of the random signs. Only the seed is stored (a persistent
        buffer); the signs are rebuilt from it, also on load.

    Examples
    --------
    >>> import torch
    >>> rot = HadamardRotation(12, seed=3)
    >>> rot.block
    4
    >>> r = rot.matrix()
    >>> bool(torch.allclose(r @ r.T, torch.eye(12), atol=1e-6))
    True
    >>> x = torch.randn(5, 12)
    >>> bool(torch.allclose(rot(x), x @ r, atol=1e-6))
    True
    """

    seed: Tensor
    signs: Tensor
    h: Tensor

    def __init__(self, features: int, block: int = BLOCK, seed: int = 0) -> None:
        super().__init__()
        self.features = int(features)
        self.block = rotation_block(self.features, block)
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        self.register_buffer("signs", self._signs(int(seed)), persistent=False)
        self.register_buffer("h", hadamard(self.block), persistent=False)

    def _signs(self, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 2, (self.features,), generator=g).to(torch.float32) * 2 - 1

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        signs = self._signs(int(self.seed))
        self.signs = signs.to(device=self.signs.device, dtype=self.signs.dtype)

    def forward(self, x: Tensor) -> Tensor:
        signs = self.signs if self.signs.dtype == x.dtype else self.signs.to(x.dtype)
        h = self.h if self.h.dtype == x.dtype else self.h.to(x.dtype)
        y = (x * signs).unflatten(-1, (self.features // self.block, self.block)) @ h
        return y.flatten(-2)

    def matrix(self) -> Tensor:
        """The dense ``features x features`` orthogonal matrix ``R``."""
        return self(torch.eye(self.features, dtype=self.h.dtype, device=self.h.device))

    def extra_repr(self) -> str:
        return f"features={self.features}, block={self.block}, seed={int(self.seed)}"


class RotatedLinear(nn.Module):
    """``layer(rotation(x))``: a Linear layer whose weight holds ``W R``.

    Attributes ``in_features`` / ``out_features`` are the layer's.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> layer = RotatedLinear.from_linear(nn.Linear(8, 3), seed=1)
    >>> layer.layer.weight.shape, layer.rotation.block
    (torch.Size([3, 8]), 8)
    """

    rotation: HadamardRotation
    layer: nn.Module

    def __init__(self, rotation: HadamardRotation, layer: nn.Module) -> None:
        super().__init__()
        n_in = getattr(layer, "in_features", None)
        if rotation.features != n_in:
            raise ValueError(
                f"rotation of {rotation.features} features for a layer of {n_in} inputs"
            )
        self.rotation = rotation
        self.layer = layer

    @property
    def in_features(self) -> int:
        return cast(int, self.layer.in_features)

    @property
    def out_features(self) -> int:
        return cast(int, self.layer.out_features)

    @classmethod
    def from_linear(cls, module: nn.Module, block: int = BLOCK, seed: int = 0) -> RotatedLinear:
        """Rotate a float ``nn.Linear`` or ``LowRankLinear`` (changed in place and wrapped)."""
        reason = _reason(module)
        if reason is not None:
            raise TypeError(f"cannot rotate a {type(module).__name__}: {reason}")
        rotation = HadamardRotation(cast(int, module.in_features), block, seed)
        weight = cast(
            Tensor, module.cores[1] if isinstance(module, LowRankLinear) else module.weight
        )
        rotation.to(device=weight.device)
        with torch.no_grad():
            rotated = (
                rotation(weight.to(torch.float64))
                if weight.dtype != torch.float64
                else rotation(weight)
            )
            weight.copy_(rotated.to(weight.dtype))
        if isinstance(module, LowRankLinear):
            module.clear_cache()
        return cls(rotation, module)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.rotation(x))


def _reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be rotated, or None."""
    if isinstance(module, LowRankLinear):
        if (
            module._modules.get("core_quantizers") is not None
            or module._modules.get("act_quantizers") is not None
        ):
            return "it is quantized already: rotate before quantize"
        return None
    if hasattr(module, "weight_quantizer"):
        return "it is quantized already: rotate before quantize"
    if type(module) is not nn.Linear:
        if isinstance(module, nn.Linear):
            # e.g. nn.MultiheadAttention's out_proj, whose owner reads .weight directly
            return (
                f"a subclass of nn.Linear ({type(module).__name__}) may be used without its forward"
            )
        return "not an nn.Linear or a float LowRankLinear"
    return None


def rotate(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    *,
    block: int = BLOCK,
    seed: int = 0,
    progress: bool = True,
) -> Report:
    """Replace the matched float Linear layers by :class:`RotatedLinear`, in place.

    The model computes the same function afterwards (to float rounding).

    Parameters
    ----------
    model
        The float model (before :func:`~tnquant.quantize`).
    include, exclude
        ``fnmatch`` globs on module names (``*`` crosses dots); by default
        every ``nn.Linear`` and ``LowRankLinear``.
    block
        Largest Hadamard block (see :func:`rotation_block`).
    seed
        Layer ``k`` (in ``named_modules`` order) gets signs from ``seed + k``.
    progress
        Show a progress bar over layers.

    Returns
    -------
    Report
        One row per rotated layer (``name``, ``kind='rotate'``, ``layer``,
        ``features``, ``block``, ``seed``); matched layers that cannot be
        rotated (quantized already, not a Linear) as skipped with the reason,
        and an ``include`` pattern that reached no Linear layer (kind
        ``'pattern'``).
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    report = Report("rotate", columns=("name", "kind", "layer", "features", "block", "seed"))
    targets: list[tuple[str, nn.Module]] = []
    parents: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in parents):
            continue
        if not selected(name, include, exclude):
            continue
        if isinstance(module, RotatedLinear):
            parents.add(name)
            report.skip(name, type(module).__name__, "rotated already")
            continue
        if not isinstance(module, (nn.Linear, LowRankLinear)):
            continue
        reason = _reason(module)
        if reason is not None:
            report.skip(name, type(module).__name__, reason)
            continue
        parents.add(name)
        targets.append((name, module))
    reached = [*(n for n, _ in targets), *(s["name"] for s in report.skipped)]
    for pattern in include or ():  # a pattern that reached no Linear is reported
        if not any(matches(n, pattern) for n in reached):
            report.skip(f"include[{pattern!r}]", "pattern", "matched no Linear layer")
    for k, (name, module) in enumerate(tqdm(targets, desc="rotate", disable=not progress)):
        rotated = RotatedLinear.from_linear(module, block, seed + k)
        replace_module(model, name, rotated)
        report.add(
            name=name,
            kind="rotate",
            layer=type(module).__name__,
            features=rotated.in_features,
            block=rotated.rotation.block,
            seed=seed + k,
        )
    return report


def _patterns(value: Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    patterns = list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what} must be glob strings, got {patterns!r}")
    return patterns
