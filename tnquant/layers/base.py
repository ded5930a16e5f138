"""The common base of every factorized layer: cores, spec, counts, hooks.

:class:`FactorizedLayer` holds what every layer shares:

- ``cores``: an ``nn.ParameterList`` in the layout of its format (see each
  layer), and ``bias`` (dense, an ``nn.Parameter`` or ``None``);
- ``spec`` (the factorization spec it came from) and ``decomposition_info``
  (``ranks``, ``rel_error``, ``capped``, as the decomposition reported);
- the counts ``n_params``, ``dense_params``, ``compression_ratio``;
- the hooks the quantization stage fills in: ``core_quantizers`` (an
  ``nn.ModuleList``, one quantizer per core, applied by
  :meth:`~FactorizedLayer.effective_cores`, which every forward goes through)
  and ``act_quantizers`` (an ``nn.ModuleDict`` keyed ``'input'``,
  ``'output'`` and the names of :meth:`~FactorizedLayer.intermediate_names`);
- ``implementation``: ``'auto'`` (cheapest by FLOP count for the input at
  hand), ``'factorized'`` (contract the input with the cores) or
  ``'reconstructed'`` (rebuild the dense weight, then one dense op);
- the drop-in view: a read-only ``weight`` (see :attr:`FactorizedLayer.weight`),
  and each subclass keeps the replaced layer's sizes (``in_features``, ...).

Fused kernels: torch's fused ``nn.TransformerEncoderLayer`` path (eval, no
grad) reads ``linear1.weight`` / ``.bias`` and calls one kernel, bypassing
``forward``. A layer whose forward does more than its ``weight`` and ``bias``
say (attached activation quantizers) carries the no-op forward pre-hook
:func:`~tnquant.layers.dropin.declines_fused_kernels`, which that path checks for and then takes
the module-by-module road; the encoder may then hand it a nested tensor,
which :func:`~tnquant.layers.dropin.per_sequence` runs sequence by sequence.

Examples
--------
>>> import torch
>>> from tnquant.layers import LowRankLinear
>>> layer = LowRankLinear([torch.randn(64, 4), torch.randn(4, 32)])
>>> layer.n_params, layer.dense_params, round(layer.compression_ratio, 2)
(384, 2048, 5.33)
>>> layer.intermediate_names()
('inter_0',)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.layers.contract import IMPLEMENTATIONS
from tnquant.layers.dropin import quantizer_key, sync_fused_guard, tensor_key
from tnquant.quant.frozen import FrozenTensor

#: cached plans (one per input shape) kept before the cache starts over
MAX_PLANS = 256

__all__ = [
    "FactorizedLayer",
    "as_parameter",
    "check_bias",
    "check_cores",
    "check_match",
    "decomposition_fields",
]


def as_parameter(tensor: Any, name: str) -> nn.Parameter:
    """``tensor`` as an ``nn.Parameter`` (kept as is when it already is one).

    Examples
    --------
    >>> import torch
    >>> as_parameter(torch.zeros(2), "bias").shape
    torch.Size([2])
    """
    if isinstance(tensor, nn.Parameter):
        return tensor
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return nn.Parameter(tensor)


def check_bias(bias: Any, size: int) -> nn.Parameter | None:
    """Validate a bias of length ``size`` (or ``None``) and wrap it as a parameter.

    Examples
    --------
    >>> check_bias(None, 3) is None
    True
    """
    if bias is None:
        return None
    bias = as_parameter(bias, "bias")
    if bias.shape != (size,):
        raise ValueError(f"bias must have shape ({size},), got {tuple(bias.shape)}")
    return bias


class FactorizedLayer(nn.Module):
    """Base class of the factorized layers (not used directly).

    Subclasses set ``format`` and implement ``forward``, :meth:`dense_weight`,
    :meth:`to_dense`, :meth:`intermediate_names` and the dense parameter
    count ``_dense_weight_numel``.

    Parameters
    ----------
    cores
        The factors, in the layout of the subclass's format; wrapped as
        parameters (tensors already ``nn.Parameter`` are kept as they are).
    bias
        Dense bias or ``None``.
    spec
        The factorization spec the layer stands for.
    decomposition_info
        ``{'ranks': ..., 'rel_error': ..., 'capped': ...}`` from the
        decomposition; ``rel_error`` and ``capped`` are ``None`` for a layer
        built from cores directly.

    Examples
    --------
    >>> import torch
    >>> from tnquant.layers import LowRankLinear
    >>> layer = LowRankLinear([torch.randn(8, 2), torch.randn(2, 8)])
    >>> isinstance(layer, FactorizedLayer), layer.format
    (True, 'lowrank')
    """

    format: str = ""
    #: implementations this layer accepts for ``implementation``
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    #: keep input-independent results (``weight`` in eval mode among them)
    inference_cache: bool = True

    cores: nn.ParameterList
    bias: nn.Parameter | None
    core_quantizers: nn.ModuleList | None
    act_quantizers: nn.ModuleDict | None

    def __init__(
        self,
        cores: Sequence[Tensor],
        *,
        bias: nn.Parameter | None,
        spec: Any,
        decomposition_info: dict[str, Any] | None,
        ranks: tuple[int, ...],
    ) -> None:
        super().__init__()
        if isinstance(cores, Tensor) or not isinstance(cores, (list, tuple, nn.ParameterList)):
            raise TypeError(f"cores must be a list of tensors, got {type(cores).__name__}")
        params = [as_parameter(c, f"cores[{k}]") for k, c in enumerate(cores)]
        if not params:
            raise ValueError("cores must hold at least one tensor, got an empty list")
        ref = params[0]
        for k, p in enumerate(params):
            if p.dtype != ref.dtype or p.device != ref.device:
                raise ValueError(
                    f"all cores must share dtype and device; cores[0] is {ref.dtype} on "
                    f"{ref.device}, cores[{k}] is {p.dtype} on {p.device}"
                )
        if bias is not None and (bias.dtype != ref.dtype or bias.device != ref.device):
            raise ValueError(
                f"bias must match the cores' dtype and device ({ref.dtype} on "
                f"{ref.device}), got {bias.dtype} on {bias.device}"
            )
        self.cores = nn.ParameterList(params)
        # plans (compiled contraction orders) depend on shapes only, never on
        # dtype or device, so they survive .to(); keyed by batch and flags
        self.register_parameter("bias", bias)
        self.spec = spec
        info: dict[str, Any] = {"ranks": tuple(ranks), "rel_error": None, "capped": None}
        if decomposition_info:
            info.update(decomposition_info)
        self.decomposition_info = info
        # plain None until quantize() assigns modules (nn.Module then registers
        # them); read through self._modules.get(...) on the hot path
        self.core_quantizers = None
        self.act_quantizers = None
        self._implementation = "auto"
        self._plans: dict[Any, Any] = {}

    # ------------------------------------------------------------------ #
    # implementation switch and quantization hooks
    # ------------------------------------------------------------------ #
    @property
    def implementation(self) -> str:
        """``'auto'``, ``'factorized'`` or ``'reconstructed'`` (see the module doc)."""
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in self.implementations:
            raise ValueError(
                f"implementation must be one of {list(self.implementations)}, got {value!r}"
            )
        self._implementation = value

    def effective_cores(self) -> list[Tensor]:
        """The cores the forward pass uses: quantized when quantizers are attached.

        Returns ``[q(c) for q, c in zip(self.core_quantizers, self.cores)]``
        when ``core_quantizers`` is set, else the raw cores.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from tnquant.layers import LowRankLinear
        >>> layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
        >>> layer.core_quantizers = nn.ModuleList([nn.Identity(), nn.Identity()])
        >>> [tuple(c.shape) for c in layer.effective_cores()]
        [(4, 2), (2, 3)]
        """
        # straight to the dicts: nn.Module.__getattr__ costs ~0.5 us per lookup
        cores = cast(list[Tensor], list(self._modules["cores"]._parameters.values()))  # type: ignore[union-attr]
        quantizers = cast("nn.ModuleList | None", self._modules.get("core_quantizers"))
        if quantizers is None:
            return cores
        if len(quantizers) != len(cores):
            raise ValueError(
                f"core_quantizers must hold one module per core ({len(cores)}), "
                f"got {len(quantizers)}"
            )
        return [q(c) for q, c in zip(quantizers, cores, strict=True)]

    def intermediate_names(self) -> tuple[str, ...]:
        """Names of the intermediate results ``act_quantizers`` may quantize.

        ``'inter_k'`` is the result of the ``k``-th contraction step of the
        layer's sequential chain (described in each layer's docstring).
        When any ``'inter_*'`` quantizer is attached, the forward always
        runs that chain (``'auto'`` picks it; ``'reconstructed'`` raises).

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import TuckerLinear
        >>> TuckerLinear([torch.randn(6, 3), torch.randn(3, 2), torch.randn(5, 2)]
        ...              ).intermediate_names()
        ('inter_0', 'inter_1')
        """
        raise NotImplementedError

    def _act(self, name: str, x: Tensor) -> Tensor:
        quantizers = cast("nn.ModuleDict | None", self._modules.get("act_quantizers"))
        if quantizers is not None and name in quantizers:
            return cast(Tensor, quantizers[name](x))
        return x

    def _inter_hooks(self) -> list[Any] | None:
        """Per-step hooks when any intermediate quantizer is attached, else None."""
        quantizers = cast("nn.ModuleDict | None", self._modules.get("act_quantizers"))
        if quantizers is None:
            return None
        names = self.intermediate_names()
        hooks = [quantizers[n] if n in quantizers else None for n in names]
        unknown = [k for k in quantizers.keys() if k.startswith("inter_") and k not in names]
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has intermediates {list(names)}, got act_quantizers "
                f"for {unknown}"
            )
        if all(h is None for h in hooks):
            return None
        if self._implementation == "reconstructed":
            raise ValueError(
                "implementation='reconstructed' has no intermediate results, but "
                "act_quantizers holds 'inter_*' quantizers; use 'auto' or 'factorized'"
            )
        return hooks

    # ------------------------------------------------------------------ #
    # counts
    # ------------------------------------------------------------------ #
    @property
    def _dense_weight_numel(self) -> int:
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        """Stored parameters: every core element plus the bias."""
        n = sum(math.prod(s) for s in self._core_shapes())
        return n + (self.bias.numel() if self.bias is not None else 0)

    @property
    def dense_params(self) -> int:
        """Parameters of the equivalent dense layer (weight plus bias)."""
        return self._dense_weight_numel + (self.bias.numel() if self.bias is not None else 0)

    @property
    def compression_ratio(self) -> float:
        """``dense_params / n_params``: 10.0 means ten times fewer parameters."""
        return self.dense_params / self.n_params

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks of the factorization (as in ``decomposition_info``)."""
        return tuple(self.decomposition_info["ranks"])

    # ------------------------------------------------------------------ #
    # dense view
    # ------------------------------------------------------------------ #
    def dense_weight(self) -> Tensor:
        """The weight the layer stands for, in the dense layer's shape (differentiable)."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """A plain torch layer with the reconstructed weight (see subclasses)."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The dense weight, read-only: :meth:`dense_weight`, in the replaced layer's layout.

        Dtype and device follow the cores (quantized cores when
        ``core_quantizers`` are attached; the dequantized ones after
        ``convert``). In training mode it is the differentiable
        reconstruction, rebuilt at every read. In eval mode it is rebuilt
        without autograd and kept while the cores, the core quantizers
        (their tensors' version counters and data pointers, their mode, spec
        and qparam shape), dtype, device and the training flag stay the same
        (``inference_cache = False`` keeps nothing; a write into
        ``core.data`` needs :meth:`clear_weight_cache`). Use
        :meth:`dense_weight` for a differentiable weight in eval mode.

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import LowRankLinear
        >>> u, v = torch.randn(3, 1), torch.randn(1, 2)
        >>> layer = LowRankLinear([u, v]).eval()
        >>> torch.allclose(layer.weight, u @ v), layer.weight is layer.weight
        (True, True)
        """
        try:
            if self.training or torch.jit.is_tracing() or torch.compiler.is_compiling():
                return self.dense_weight()
            if not self.inference_cache:
                self.__dict__.pop("_weight_cache", None)
                with torch.inference_mode(False), torch.no_grad():
                    return self.dense_weight()
            key = self._weight_key()
            entry = self.__dict__.get("_weight_cache")
            if entry is not None and entry[1] == key:
                return cast(Tensor, entry[2])
            with torch.inference_mode(False), torch.no_grad():
                weight = self.dense_weight()
        except AttributeError as err:  # else nn.Module.__getattr__ would hide it
            raise RuntimeError(f"{type(self).__name__}.weight failed: {err}") from err
        quantizers = cast("nn.ModuleList | None", self._modules.get("core_quantizers"))
        refs = [*self.cores, *(quantizers if quantizers is not None else ())]
        # the entry holds what it keys by id, so no other object takes those ids
        self.__dict__["_weight_cache"] = (refs, key, weight)
        return weight

    def _weight_key(self) -> tuple[Any, ...]:
        cores = self._modules["cores"]._parameters.values()  # type: ignore[union-attr]
        quantizers = cast("nn.ModuleList | None", self._modules.get("core_quantizers"))
        return (
            self.training,
            tuple(tensor_key(c) for c in cores),
            None if quantizers is None else tuple(quantizer_key(q) for q in quantizers),
        )

    def clear_weight_cache(self) -> None:
        """Drop the kept eval-mode :attr:`weight` (after a write into ``core.data``).

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import LowRankLinear
        >>> layer = LowRankLinear([torch.ones(2, 1), torch.ones(1, 2)]).eval()
        >>> _ = layer.weight
        >>> _ = layer.cores[0].data.mul_(2)  # bypasses the version counter
        >>> layer.clear_weight_cache(); float(layer.weight.sum())
        8.0
        """
        self.__dict__.pop("_weight_cache", None)

    def __getstate__(self) -> dict[str, Any]:
        # the kept eval-mode weight is dense and derived: neither pickled nor deep-copied
        state = self.__dict__.copy()
        state.pop("_weight_cache", None)
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}.weight is read-only: it is rebuilt from the "
                f"{self.format} cores; change layer.cores (or the core quantizers), or "
                "replace the layer by layer.to_dense() to hold a dense weight"
            )
        super().__setattr__(name, value)
        if name == "act_quantizers":
            sync_fused_guard(self, value is not None)

    def _info_repr(self) -> str:
        return f"ranks={self.ranks}, compression={self.compression_ratio:.2f}x"

    def _remember(self, key: Any, plan: Any) -> Any:
        """Cache ``plan`` under ``key``; past ``MAX_PLANS`` input shapes start over.

        Inputs whose leading dims vary (sequence lengths) would otherwise grow
        the cache without end; a plan costs 0.2-1 ms to rebuild.
        """
        if len(self._plans) >= MAX_PLANS:
            self._plans = {k: v for k, v in self._plans.items() if k == "weight"}
        self._plans[key] = plan
        return plan

    def _core_shapes(self) -> list[tuple[int, ...]]:
        shapes = [tuple(c.shape) for c in self.cores]
        # -- tnquant.convert: a converted core is an empty placeholder; its
        # shape lives in the FrozenTensor that stores it
        quantizers = cast("nn.ModuleList | None", self._modules.get("core_quantizers"))
        if quantizers is not None:
            shapes = [
                q.shape if isinstance(q, FrozenTensor) else s
                for q, s in zip(quantizers, shapes, strict=False)
            ]
        return shapes


def decomposition_fields(dec: Any) -> dict[str, Any]:
    """``ranks``, ``rel_error``, ``capped`` (and ``out_rel_error``) of a decomposition.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> decomposition_fields(SimpleNamespace(ranks=(2,), rel_error=0.1, capped=None))
    {'ranks': (2,), 'rel_error': 0.1, 'capped': None}
    """
    info = {"ranks": tuple(dec.ranks), "rel_error": float(dec.rel_error), "capped": dec.capped}
    out_err = getattr(dec, "out_rel_error", None)
    if out_err is not None:
        info["out_rel_error"] = float(out_err)
    return info


def check_cores(cores: Any, ndims: Sequence[int], owner: str) -> list[tuple[int, ...]]:
    """Check ``cores`` is a list of tensors with the given numbers of dims; return shapes.

    Examples
    --------
    >>> import torch
    >>> check_cores([torch.zeros(2, 3), torch.zeros(3, 4)], [2, 2], "LowRankLinear")
    [(2, 3), (3, 4)]
    """
    if isinstance(cores, Tensor) or not isinstance(cores, (list, tuple, nn.ParameterList)):
        raise TypeError(f"{owner} cores must be a list of tensors, got {type(cores).__name__}")
    if len(cores) != len(ndims):
        raise ValueError(f"{owner} takes {len(ndims)} cores, got {len(cores)}")
    shapes = []
    for k, (core, nd) in enumerate(zip(cores, ndims, strict=True)):
        if not isinstance(core, Tensor):
            raise TypeError(f"{owner} cores[{k}] must be a tensor, got {type(core).__name__}")
        if core.ndim != nd:
            raise ValueError(f"{owner} cores[{k}] must be {nd}-d, got shape {tuple(core.shape)}")
        shapes.append(tuple(core.shape))
    return shapes


def check_match(owner: str, what: str, expected: int, got: int) -> None:
    """Raise ``ValueError`` when two sizes that must agree do not.

    Examples
    --------
    >>> check_match("TTLinear", "cores[1].shape[0]", 3, 3)
    """
    if expected != got:
        raise ValueError(f"{owner}: {what} must be {expected}, got {got}")
