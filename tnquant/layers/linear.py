"""Shared forward pass of the factorized Linear layers (TT, Tucker, low-rank).

Each layer describes itself by two einsum equations over letters it picks:

- ``x_eq``: the (padded, tensorized) input ``(B, i_1..i_d)`` with the cores
  gives the output ``(B, o_1..o_d)``;
- ``w_eq``: the cores alone give the padded weight ``(o_1..o_d, i_1..i_d)``.

For a batch of ``B`` rows the layer compiles (once per ``B``) the fastest of

- ``'factorized'``: among opt_einsum's fewest-FLOP order for ``x_eq``, the
  layer's sequential chains (core by core) and its other candidate orders
  (a Tucker layer merges adjacent modes' factors first, for instance), the
  one with the lowest :meth:`~tnquant.layers.contract.Program.estimate`:
  FLOPs plus the memory traffic, permute copies and calls of every step;
- ``'reconstructed'``: the cheapest order for ``w_eq``, then ``F.linear``;

as estimated by the same model (``implementation='auto'``; a tie goes to the
reconstruction), or as forced. Plans are cached per batch size (at most
``base.MAX_PLANS``); each costs 0.2-20 ms to build. When ``act_quantizers``
holds ``'inter_*'`` quantizers the canonical chain (``chains[0]``) runs
instead, so that every intermediate exists.

Inference cache: when no autograd graph is recorded (``torch.no_grad()`` or
``torch.inference_mode()``), no ``core_quantizers`` are attached and
``inference_cache`` is true (the default), whatever does not depend on the
input is computed once and kept: the rebuilt dense weight for
``'reconstructed'``, or for ``'factorized'`` the products among cores and the
cores laid out as their matmuls want them. ``'auto'`` then counts the
reconstruction as free, so at large batches it runs the dense ``F.linear``
of ``nn.Linear`` itself. The cache is keyed by the core parameters'
identities, autograd version counters (bumped by every in-place change:
optimizer steps, ``copy_``, ``load_state_dict``) and data pointers (changed
by ``.to()``, ``.data =``); a change through a path that bypasses the version
counter (writing into ``p.data`` in place) needs :meth:`clear_cache`. It costs
memory: a dense weight, while 'auto' picks the reconstruction; set
``layer.inference_cache = False`` to keep only the cores.

Examples
--------
>>> import torch
>>> from tnquant.layers import LowRankLinear
>>> layer = LowRankLinear([torch.randn(256, 8), torch.randn(8, 256)])
>>> layer.flops(1)["chosen"], layer.flops(4096)["chosen"]
('factorized', 'factorized')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnquant.layers.base import FactorizedLayer, decomposition_fields
from tnquant.layers.contract import CALL_COST, ELEMENT_COST, Path, Program, chain_path, plan_einsum
from tnquant.layers.dropin import per_sequence

__all__ = ["FactorizedLinearBase"]


class FactorizedLinearBase(FactorizedLayer):
    """Base of :class:`TTLinear`, :class:`TuckerLinear`, :class:`LowRankLinear`.

    Inputs are ``(..., in_features)``; the last dim is zero-padded to
    ``prod(in_shape)`` when the tensorized shape is larger (padding never
    changes outputs) and the output is sliced back to ``out_features``.

    Examples
    --------
    >>> import torch
    >>> from tnquant.layers import LowRankLinear
    >>> layer = LowRankLinear([torch.randn(5, 2), torch.randn(2, 3)])
    >>> layer(torch.randn(7, 4, 3)).shape
    torch.Size([7, 4, 5])
    """

    in_features: int
    out_features: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    spec_type: type[Any] = type(None)
    #: keep input-independent work between calls without autograd (module doc)
    inference_cache: bool = True

    @classmethod
    def from_dense(
        cls, module: nn.Linear, spec: Any, *, gram: Tensor | None = None, name: str = "weight"
    ) -> FactorizedLinearBase:
        """Factorize a pretrained ``nn.Linear`` into this layer's format.

        Parameters
        ----------
        module
            The dense layer; its weight is decomposed by
            :func:`tnquant.decompose.decompose_linear`, its bias copied.
        spec
            The factorization spec of this layer's format.
        gram
            Optional ``(in, in)`` Gram matrix ``X^T X`` of the layer's inputs,
            for a data-aware decomposition that minimises the output error.
        name
            What to call the weight in error messages (the module's name in
            its model, say).

        Returns
        -------
        FactorizedLinearBase
            The factorized layer, on the module's device and dtype, with
            ``spec`` and ``decomposition_info`` filled in.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from tnquant import TT, LowRank
        >>> from tnquant.layers import LowRankLinear, TTLinear
        >>> dense = nn.Linear(64, 48)
        >>> layer = TTLinear.from_dense(dense, TT(ratio=0.2, order=2))
        >>> layer.in_shape, layer.out_shape, layer.compression_ratio > 2
        ((8, 8), (8, 6), True)
        >>> exact = LowRankLinear.from_dense(dense, LowRank(rank="full"))
        >>> exact.decomposition_info["rel_error"] < 1e-5
        True
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"{cls.__name__}.from_dense expects an nn.Linear, got {type(module).__name__}"
            )
        if not isinstance(spec, cls.spec_type):
            raise TypeError(
                f"{cls.__name__}.from_dense expects a {cls.spec_type.__name__} "
                f"spec, got {type(spec).__name__}"
            )
        from tnquant.decompose import decompose_linear

        weight = module.weight.detach()
        dec = decompose_linear(weight, spec, gram=gram, name=name)
        if dec.format != cls.format:
            raise ValueError(
                f"{cls.__name__} needs a {cls.format!r} decomposition, got {dec.format!r}"
            )
        cores = [c.detach().to(device=weight.device, dtype=weight.dtype) for c in dec.cores]
        bias = None if module.bias is None else module.bias.detach().clone()
        build: Any = cls  # subclasses take their own keywords
        return build(
            cores,
            in_features=module.in_features,
            out_features=module.out_features,
            bias=bias,
            spec=spec,
            decomposition_info=decomposition_fields(dec),
        )

    def _setup_linear(
        self,
        *,
        in_features: int,
        out_features: int,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        x_term: str,
        core_terms: Sequence[str],
        out_term: str,
        w_term: str,
        chains: Sequence[Sequence[int]],
        extra_paths: Sequence[Path] = (),
    ) -> None:
        """Store shapes and equations; ``chains[0]`` is the canonical chain.

        A chain lists the operand indices (``1..n_cores``) contracted in turn
        with the input (operand 0); ``extra_paths`` are more candidate orders
        (opt_einsum paths over ``x_eq``).
        """
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        for name, feat, shape in (("in", in_features, in_shape), ("out", out_features, out_shape)):
            if isinstance(feat, bool) or not isinstance(feat, int) or feat < 1:
                raise ValueError(f"{name}_features must be a positive int, got {feat!r}")
            if math.prod(shape) < feat:
                raise ValueError(
                    f"prod({name}_shape) must be >= {name}_features; got {name}_shape={shape} "
                    f"(product {math.prod(shape)}) and {name}_features={feat}"
                )
        self.in_features, self.out_features = in_features, out_features
        self.in_shape, self.out_shape = in_shape, out_shape
        self._in_pad = math.prod(in_shape) - in_features
        self._out_padded = math.prod(out_shape)
        self._x_eq = f"{x_term},{','.join(core_terms)}->{out_term}"
        self._w_eq = f"{','.join(core_terms)}->{w_term}"
        n_ops = len(core_terms) + 1
        self._chain_paths = [chain_path(n_ops, list(c)) for c in chains]
        self._candidates = self._chain_paths + [list(p) for p in extra_paths]
        self._n_chain_steps = len(chains[0])
        self._prepared_cache: dict[Program, tuple[Any, ...]] = {}

    # ------------------------------------------------------------------ #
    # planning
    # ------------------------------------------------------------------ #
    def intermediate_names(self) -> tuple[str, ...]:
        return tuple(f"inter_{k}" for k in range(self._n_chain_steps - 1))

    @property
    def _dense_weight_numel(self) -> int:
        return self.in_features * self.out_features

    def _weight_program(self) -> Program:
        prog = self._plans.get("weight")
        if prog is None:
            prog = self._plans["weight"] = plan_einsum(self._w_eq, self._core_shapes())
        return prog

    def _x_shapes(self, batch: int) -> list[tuple[int, ...]]:
        return [(batch, *self.in_shape), *self._core_shapes()]

    def _dense_estimate(self, batch: int) -> int:
        """Time-model cost of the dense ``F.linear`` (see ``Program.estimate``)."""
        n, i, o = max(batch, 1), self.in_features, self.out_features
        return 2 * n * i * o + ELEMENT_COST * (n * i + i * o + n * o) + CALL_COST

    def _make_plan(
        self, batch: int, chain: bool, implementation: str, prepared: bool
    ) -> tuple[str, Program]:
        shapes = self._x_shapes(batch)
        if chain:
            return "factorized", plan_einsum(
                self._x_eq, shapes, candidates=self._chain_paths[:1], search=False, variable=0
            )
        if implementation == "reconstructed":
            return "reconstructed", self._weight_program()
        fact = plan_einsum(
            self._x_eq,
            shapes,
            candidates=self._candidates,
            variable=0,
            objective="time",
            prepared=prepared,
        )
        if implementation == "factorized":
            return "factorized", fact
        recon = self._dense_estimate(batch)
        if not prepared:
            recon += self._weight_program().estimate()
        if recon <= fact.estimate(prepared):
            return "reconstructed", self._weight_program()
        return "factorized", fact

    def _plan(self, batch: int, chain: bool, prepared: bool) -> tuple[str, Program]:
        key = (batch, self._implementation, chain, prepared)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._remember(
                key, self._make_plan(batch, chain, self._implementation, prepared)
            )
        return plan

    def _cache_usable(self) -> bool:
        """Whether this call may use the inference cache (see the module doc)."""
        return (
            not torch.is_grad_enabled()
            and self.inference_cache
            and self._modules.get("core_quantizers") is None
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )

    def clear_cache(self) -> None:
        """Drop the inference cache (rebuilt at the next call that may use it).

        Needed only after changing cores in a way autograd's version counter
        does not see (writing into ``core.data`` in place).

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import LowRankLinear
        >>> layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
        >>> with torch.no_grad():
        ...     _ = layer(torch.randn(5, 3))
        >>> layer.clear_cache()
        """
        self._prepared_cache = {}

    def _prepared(self, kind: str, prog: Program) -> Any:
        """The cached input-independent operands of ``prog`` (rebuilt when a core changed)."""
        params = list(self._modules["cores"]._parameters.values())  # type: ignore[union-attr]
        # ids are safe: the entry holds the parameters, so no other object takes their id
        key = [(id(p), p._version, p.data_ptr()) for p in params]  # type: ignore[union-attr]
        entry = self._prepared_cache.get(prog)
        if entry is not None and entry[1] == key:
            return entry[2]
        cores = cast(list[Tensor], params)
        if kind == "reconstructed":
            value: Any = self._weight_from(prog, cores).contiguous()
        else:
            value = prog.prepare(cores)
        if len(self._prepared_cache) >= 8:
            self._prepared_cache = {}
        self._prepared_cache[prog] = (params, key, value)
        return value

    def flops(self, batch_size: int) -> dict[str, Any]:
        """FLOPs of one forward for ``batch_size`` rows, per implementation.

        Returns ``{'factorized': ..., 'reconstructed': ..., 'dense': ...,
        'chosen': ..., 'path': ..., 'cached': ..., 'cheapest': ...,
        'calls': ...}``: the fewest-FLOP factorized order (over opt_einsum's
        and the layer's candidate orders), the reconstruction plus the dense
        matmul, the dense layer's ``2 * B * out * in``, the implementation
        ``'auto'`` picks in the current mode, the path of the factorized
        order it would run (the fastest by the time model, not always the
        fewest FLOPs), whether the inference cache applies now, the fewest
        FLOPs of anything the layer can run now (with the cache, the dense
        matmul alone counts, the weight being rebuilt once), and the matmul
        calls per forward of what ``'auto'`` runs. Bias adds are not counted.

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import LowRankLinear
        >>> LowRankLinear([torch.randn(6, 2), torch.randn(2, 4)]).flops(1)["factorized"]
        40
        """
        shapes = self._x_shapes(batch_size)
        fact = plan_einsum(self._x_eq, shapes, candidates=self._candidates, variable=0)
        cached = self._cache_usable() and self._inter_hooks() is None
        kind, prog = self._make_plan(batch_size, False, "auto", cached)
        fastest = (
            prog
            if kind == "factorized"
            else plan_einsum(
                self._x_eq,
                shapes,
                candidates=self._candidates,
                variable=0,
                objective="time",
                prepared=cached,
            )
        )
        dense = 2 * batch_size * self.in_features * self.out_features
        recon = self._weight_program().cost + dense
        calls = len(prog._run_steps) if cached and kind == "factorized" else len(prog.steps)
        return {
            "factorized": fact.cost,
            "reconstructed": recon,
            "dense": dense,
            "chosen": kind,
            "path": fastest.path,
            "cached": cached,
            "cheapest": min(fact.cost, dense if cached else recon),
            "calls": 1 if cached and kind == "reconstructed" else calls,
        }

    # ------------------------------------------------------------------ #
    # forward
    # ------------------------------------------------------------------ #
    def _odd_input(self, x: Any) -> Tensor:
        if isinstance(x, Tensor) and x.is_nested:  # from nn.TransformerEncoder
            return per_sequence(self.forward, x)
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        raise ValueError(
            f"{type(self).__name__} expects input of shape (..., {self.in_features}), "
            f"got {tuple(x.shape)}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.is_nested or x.shape[-1:] != (self.in_features,):
            return self._odd_input(x)
        quantizers = self._modules.get("act_quantizers")
        hooks = None
        if quantizers is not None:
            x = self._act("input", x)
            hooks = self._inter_hooks()
        lead = x.shape[:-1] if x.ndim != 2 else None
        x2 = x.reshape(-1, self.in_features) if lead is not None else x
        bias = self._parameters["bias"]
        if (
            hooks is None
            and not torch.is_grad_enabled()
            and self.inference_cache
            and self._modules.get("core_quantizers") is None
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            # the inference cache (see _cache_usable, written out: this is the hot path)
            kind, prog = self._plan(x2.shape[0], False, True)
            if kind == "reconstructed":
                y = F.linear(x2, self._prepared(kind, prog), bias)
            else:
                y = self._factorized(prog, x2, self._prepared(kind, prog), bias, None, True)
        else:
            cores = self.effective_cores()
            kind, prog = self._plan(x2.shape[0], hooks is not None, False)
            if kind == "reconstructed":
                y = F.linear(x2, self._weight_from(prog, cores), bias)
            else:
                y = self._factorized(prog, x2, cores, bias, hooks, False)
        if lead is not None:
            y = y.reshape(*lead, self.out_features)
        if quantizers is not None:
            y = self._act("output", y)
        return y

    def _factorized(
        self,
        prog: Program,
        x2: Tensor,
        operands: list[Any],
        bias: Tensor | None,
        hooks: list[Any] | None,
        prepared: bool,
    ) -> Tensor:
        n = x2.shape[0]
        if self._in_pad:
            x2 = F.pad(x2, (0, self._in_pad))
        if len(self.in_shape) > 1:
            x2 = x2.reshape(n, *self.in_shape)
        sliced = self._out_padded != self.out_features
        fuse = bias is not None and not sliced and prog.fusable and len(self.out_shape) == 1
        add = bias if fuse else None
        if prepared:
            y = prog.run(x2, operands, hooks, add)
        else:
            y = prog([x2, *operands], hooks, add)
        if len(self.out_shape) > 1:
            y = y.reshape(n, self._out_padded)
        if sliced:
            y = y[:, : self.out_features]
        if bias is not None and not fuse:
            # in place without autograd: no new (B, out) buffer to allocate and fault in
            y = y.add_(bias) if prepared else y + bias
        return y

    def _weight_from(self, prog: Program, cores: list[Tensor]) -> Tensor:
        w = prog(cores).reshape(self._out_padded, -1)
        if self._out_padded != self.out_features or self._in_pad:
            w = w[: self.out_features, : self.in_features]
        return w

    # ------------------------------------------------------------------ #
    # dense view
    # ------------------------------------------------------------------ #
    def dense_weight(self) -> Tensor:
        """The ``(out_features, in_features)`` weight, rebuilt from the effective cores.

        Differentiable with respect to the cores; padding rows/columns are
        cut off.

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import LowRankLinear
        >>> u, v = torch.randn(3, 1), torch.randn(1, 2)
        >>> torch.allclose(LowRankLinear([u, v]).dense_weight(), u @ v)
        True
        """
        return self._weight_from(self._weight_program(), self.effective_cores())

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the reconstructed weight and a copy of the bias.

        The weight is rebuilt from :meth:`effective_cores` (so quantized
        cores when quantizers are attached); same dtype and device.

        Examples
        --------
        >>> import torch
        >>> from tnquant.layers import LowRankLinear
        >>> LowRankLinear([torch.randn(3, 1), torch.randn(1, 2)]).to_dense()
        Linear(in_features=2, out_features=3, bias=False)
        """
        ref = self.cores[0]
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None and dense.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        shapes = ""
        if len(self.in_shape) > 1:
            shapes = f", in_shape={self.in_shape}, out_shape={self.out_shape}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}{shapes}, "
            f"bias={self.bias is not None}, {self._info_repr()}"
        )
