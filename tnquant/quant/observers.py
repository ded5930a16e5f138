"""Range observers for calibration: min-max, EMA, percentile, MSE, HQQ.

The range estimators are pure functions (:func:`percentile_range`,
:func:`mse_range`, :func:`hqq_range`, :func:`estimate_range`, in
:mod:`tnquant.quant.estimators`, re-exported here); the observers are thin
``nn.Module`` s that run one on every batch and accumulate per-block ranges
(of the qparam shape of the spec's ``block_size``) in buffers:

- :class:`MinMaxObserver`: running minimum and maximum;
- :class:`EMAObserver`: ``r = decay * r + (1 - decay) * r_batch`` (the first
  batch sets ``r``), ``decay = spec.ema_decay``;
- :class:`PercentileObserver`: per batch, the ``spec.percentile``-th
  percentile of ``|x|`` (symmetric) or the ``(100 - p)``-th and ``p``-th
  percentiles of ``x`` (affine); the mean over batches;
- :class:`MSEObserver`: per batch, the clip ratio among ``n_grid`` ratios in
  ``[low, 1]`` minimising the quantization MSE of each block; the mean of the
  chosen ranges over batches;
- :class:`HQQObserver` (affine grids): per batch, HQQ's half-quadratic fit of
  the zero point and scale (:mod:`tnquant.quant.hqq`); the mean over batches.

``forward(x)`` updates the buffers and returns ``x``; ``compute_qparams()``
turns the range into :class:`~tnquant.quant.qparams.QParams`; ``reset()``
forgets. Buffers start empty and are resized when a state dict is loaded
into a fresh observer.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> obs = make_observer(QuantSpec(bits=8))
>>> _ = obs(torch.tensor([-1.0, 0.5])); _ = obs(torch.tensor([2.0]))
>>> obs.min_val.item(), obs.max_val.item()
(-1.0, 2.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tnquant.quant.estimators import (
    _finite_or_wide,
    estimate_qparams,
    estimate_range,
    hqq_range,
    mse_range,
    percentile_range,
)
from tnquant.quant.primitives import (
    block_minmax,
    check_finite,
    compute_dtype,
    qparams_from_range,
    spec_block_size,
)
from tnquant.quant.qparams import QParams
from tnquant.specs import QuantSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "EMAObserver",
    "PercentileObserver",
    "MSEObserver",
    "OBSERVER_TYPES",
    "make_observer",
    "percentile_range",
    "mse_range",
    "hqq_range",
    "HQQObserver",
    "estimate_range",
    "estimate_qparams",
    "resize_for_load",
]


# --------------------------------------------------------------------------- #
# Observer modules
# --------------------------------------------------------------------------- #


def resize_for_load(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, names: tuple[str, ...]
) -> None:
    """Give lazily shaped params/buffers the shape they have in ``state_dict``.

    Called from ``_load_from_state_dict`` before the default copy; keeps the
    device, takes the incoming dtype, and keeps Parameter identity (``.data``).

    Examples
    --------
    >>> import torch
    >>> obs = MinMaxObserver(QuantSpec())
    >>> resize_for_load(obs, {"min_val": torch.zeros(2, 1)}, "", ("min_val",))
    >>> obs.min_val.shape
    torch.Size([2, 1])
    """
    for name in names:
        key = prefix + name
        local = getattr(module, name, None)
        incoming = state_dict.get(key)
        if local is None or not isinstance(incoming, Tensor):
            continue
        if local.shape == incoming.shape and local.dtype == incoming.dtype:
            continue
        fresh = torch.empty(incoming.shape, dtype=incoming.dtype, device=local.device)
        if isinstance(local, nn.Parameter):
            local.data = fresh
        else:
            setattr(module, name, fresh)


class Observer(nn.Module):
    """Base observer: per-block running range in buffers ``min_val``/``max_val``.

    Subclasses define :meth:`batch_range` and :meth:`accumulate`.

    Parameters
    ----------
    spec
        A uniform :class:`~tnquant.QuantSpec` (not a float format).
    shape
        Optional tensor shape, checked against the granularity up front.
    """

    _STATE = ("min_val", "max_val", "tensor_shape", "num_batches")
    min_val: Tensor
    max_val: Tensor
    tensor_shape: Tensor
    num_batches: Tensor

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"observers take a QuantSpec, got {type(spec).__name__}")
        if spec.dtype is not None:
            raise ValueError(f"a float-format spec (dtype={spec.dtype!r}) needs no observer")
        if shape is not None:
            spec_block_size(spec, tuple(shape))
        self.spec = spec
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("tensor_shape", torch.empty(0, dtype=torch.int64))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))

    @property
    def has_data(self) -> bool:
        """Whether at least one batch was observed."""
        return self.min_val.numel() > 0

    def batch_range(self, x: Tensor, block: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Per-block range of one batch (compute dtype, qparam shape)."""
        cd = compute_dtype(x.dtype)
        lo, hi = block_minmax(x, block)
        return lo.to(cd), hi.to(cd)

    def accumulate(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Combine the running range with a batch's (after the first batch)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        check_finite(x, f"{type(self).__name__} input")
        xd = x.detach()
        block = spec_block_size(self.spec, tuple(x.shape))
        lo, hi = self.batch_range(xd, block)
        if self.has_data and self.min_val.shape != lo.shape:
            raise ValueError(
                f"{type(self).__name__} tracks ranges of shape "
                f"{tuple(self.min_val.shape)}, got a batch of shape "
                f"{tuple(x.shape)} giving {tuple(lo.shape)}"
            )
        self.num_batches += 1
        if self.has_data:
            lo, hi = self.accumulate(lo.to(self.min_val.dtype), hi.to(self.max_val.dtype))
        self.min_val, self.max_val = lo, hi
        self.tensor_shape = torch.tensor(tuple(x.shape), dtype=torch.int64, device=x.device)
        return x

    def compute_qparams(self, spec: QuantSpec | None = None) -> QParams:
        """QParams of the observed range (for ``spec``, default the observer's).

        Examples
        --------
        >>> import torch
        >>> from tnquant import QuantSpec
        >>> obs = MinMaxObserver(QuantSpec(bits=4))
        >>> _ = obs(torch.tensor([-7.0, 3.0]))
        >>> obs.compute_qparams().scale.item()
        1.0
        """
        if not self.has_data:
            raise ValueError(
                f"{type(self).__name__} has observed no data; call it on a batch "
                "before compute_qparams()"
            )
        spec = self.spec if spec is None else spec
        shape = tuple(int(s) for s in self.tensor_shape.tolist())
        return qparams_from_range(self.min_val, self.max_val, spec, shape)

    def reset(self) -> None:
        """Forget every observed batch."""
        device = self.min_val.device
        self.min_val = torch.empty(0, device=device)
        self.max_val = torch.empty(0, device=device)
        self.tensor_shape = torch.empty(0, dtype=torch.int64, device=device)
        self.num_batches.zero_()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        resize_for_load(self, state_dict, prefix, self._STATE)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, granularity={self.spec.granularity!r}"


class MinMaxObserver(Observer):
    """Running per-block minimum and maximum.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> obs = MinMaxObserver(QuantSpec(granularity="channel"))
    >>> _ = obs(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    >>> obs.max_val.flatten().tolist()
    [1.0, 3.0]
    """

    def accumulate(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)


class EMAObserver(Observer):
    """Exponential moving average of per-batch min/max, decay ``spec.ema_decay``.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> obs = EMAObserver(QuantSpec(ema_decay=0.5))
    >>> _ = obs(torch.tensor([0.0, 2.0])); _ = obs(torch.tensor([0.0, 4.0]))
    >>> obs.max_val.item()
    3.0
    """

    def accumulate(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        d = self.spec.ema_decay

        def ema(run: Tensor, new: Tensor) -> Tensor:
            return _finite_or_wide(
                d * run + (1 - d) * new, lambda: d * run.double() + (1 - d) * new.double()
            )

        return ema(self.min_val, lo), ema(self.max_val, hi)


class _MeanObserver(Observer):
    def accumulate(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        n = self.num_batches.to(lo.dtype)

        def mean(run: Tensor, new: Tensor) -> Tensor:
            return _finite_or_wide(
                run + (new - run) / n, lambda: run.double() + (new.double() - run.double()) / n
            )

        return mean(self.min_val, lo), mean(self.max_val, hi)


class PercentileObserver(_MeanObserver):
    """Per-batch percentile range (``spec.percentile``), averaged over batches.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> obs = PercentileObserver(QuantSpec(observer="percentile", percentile=50.0))
    >>> _ = obs(torch.tensor([-4.0, 1.0, 2.0]))
    >>> obs.max_val.item()
    2.0
    """

    def batch_range(self, x: Tensor, block: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        return percentile_range(x, block, self.spec.percentile, self.spec.symmetric)


class MSEObserver(_MeanObserver):
    """Per-batch MSE-optimal clipping range (:func:`mse_range`), averaged over batches.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> obs = MSEObserver(QuantSpec(bits=4, observer="mse"))
    >>> _ = obs(torch.cat([torch.linspace(-1, 1, 999), torch.tensor([20.0])]))
    >>> obs.max_val.item() < 20
    True
    """

    def __init__(
        self,
        spec: QuantSpec,
        shape: tuple[int, ...] | None = None,
        n_grid: int = 100,
        low: float = 0.3,
    ) -> None:
        super().__init__(spec, shape)
        if n_grid < 1 or not 0 < low <= 1:
            raise ValueError(f"need n_grid >= 1 and low in (0, 1], got n_grid={n_grid}, low={low}")
        self.n_grid = n_grid
        self.low = low

    def batch_range(self, x: Tensor, block: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        return mse_range(x, self.spec, self.n_grid, self.low)


class HQQObserver(_MeanObserver):
    """Per-batch HQQ fit of an affine grid (:func:`~tnquant.quant.hqq.hqq_range`), averaged.

    Meant for weights (it needs no data beyond the tensor itself).

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> obs = HQQObserver(QuantSpec(bits=4, symmetric=False, observer="hqq"))
    >>> _ = obs(torch.randn(4, 64)); obs.has_data
    True
    """

    def batch_range(self, x: Tensor, block: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        return hqq_range(x, self.spec)


#: The one table from ``QuantSpec.observer`` to observer class.
OBSERVER_TYPES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "hqq": HQQObserver,
}


def make_observer(spec: QuantSpec, shape: tuple[int, ...] | None = None) -> Observer:
    """The observer named by ``spec.observer``.

    Examples
    --------
    >>> from tnquant import QuantSpec
    >>> type(make_observer(QuantSpec(observer="mse"))).__name__
    'MSEObserver'
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"make_observer takes a QuantSpec, got {type(spec).__name__}")
    cls = OBSERVER_TYPES.get(spec.observer)
    if cls is None:
        raise ValueError(f"observer must be one of {list(OBSERVER_TYPES)}, got {spec.observer!r}")
    return cls(spec, shape)
