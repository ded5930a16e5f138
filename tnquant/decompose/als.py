"""Data-aware refinement: least squares in the output metric of a Gram matrix.

With ``G = X^T X`` the Gram matrix of a layer's inputs, the output error of
an approximation ``What`` of ``W`` is ``||X (W - What)^T||_F^2 = tr(D G D^T)``
with ``D = W - What``. For TT and tensorized Tucker there is no closed form;
:func:`solve_block` does one alternating-least-squares step: with every
block (core or factor) but one fixed, ``What`` is linear in the free block,
``What = P(x)``, and the normal equations ``P^T(P(x) G) = P^T(W G)`` are
solved by conjugate gradients started from the current block. CG from a warm
start decreases the objective at every iteration, so a step never makes the
fit worse. ``P^T`` is the vector-Jacobian product of ``P`` (``torch.func``):
the same code serves every format.

Cost of one CG iteration: one dense reconstruction, one ``(out, in) @ (in, in)``
product and its transpose, i.e. ``O(out * in^2)``.

Examples
--------
>>> g = torch.eye(3, dtype=torch.float64)
>>> w = torch.ones(2, 3, dtype=torch.float64)
>>> output_sq_error(w, torch.zeros_like(w), g)
6.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["CG_ITERS", "SWEEPS", "STALL", "pad_gram", "output_sq_error", "solve_block"]

#: CG iterations per block update (more barely helps: the sweeps dominate).
CG_ITERS = 8
#: Most ALS sweeps (a sweep visits every block once, in both directions for TT).
SWEEPS = 8
#: A sweep that lowers the squared output error by less than this fraction stops ALS.
STALL = 1e-3

Build = Callable[[Sequence[Tensor]], Tensor]


def pad_gram(gram: Tensor, size: int, eps: float) -> Tensor:
    """``gram + eps I`` zero-padded to ``(size, size)``, ``eps`` on the padded diagonal.

    Padded inputs are zero in the layer, so their weight columns do not
    matter; the small ``eps`` keeps them near zero (the padded target).

    Examples
    --------
    >>> pad_gram(torch.ones(1, 1), 2, 0.5)
    tensor([[1.5000, 0.0000],
            [0.0000, 0.5000]])
    """
    n = gram.shape[0]
    out = torch.zeros(size, size, dtype=gram.dtype, device=gram.device)
    out[:n, :n] = (gram + gram.mT) / 2
    idx = torch.arange(size, device=gram.device)
    out[idx, idx] += eps
    return out


def output_sq_error(w: Tensor, what: Tensor, gram: Tensor) -> float:
    """``tr((W - What) G (W - What)^T)``, the squared output error.

    Examples
    --------
    >>> g = torch.diag(torch.tensor([4.0, 1.0]))
    >>> output_sq_error(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]]), g)
    4.0
    """
    diff = w - what
    return float(((diff @ gram) * diff).sum())


def solve_block(
    blocks: Sequence[Tensor],
    k: int,
    build: Build,
    target_g: Tensor,
    gram: Tensor,
    iters: int | None = None,
) -> Tensor:
    """Block ``k`` minimizing ``tr((T - build(blocks)) G (T - build(blocks))^T)``.

    Parameters
    ----------
    blocks
        Current cores/factors; ``build`` must be linear in each one.
    k
        The block to solve for; the others stay fixed.
    build
        Maps the blocks to the dense ``(out, in)`` approximation.
    target_g
        ``T @ G``, computed once by the caller.
    gram
        ``G``, symmetric positive definite ``(in, in)``.
    iters
        Conjugate-gradient iterations (default :data:`CG_ITERS`; warm
        start: every one lowers the objective).

    Returns
    -------
    Tensor
        The new block ``k``.

    Examples
    --------
    >>> a, b = torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    >>> g = torch.eye(3, dtype=torch.float64)
    >>> t = a @ torch.randn(2, 3, dtype=torch.float64)
    >>> new_b = solve_block([a, b], 1, lambda bl: bl[0] @ bl[1], t @ g, g)
    >>> bool(torch.allclose(a @ new_b, t))
    True
    """
    iters = CG_ITERS if iters is None else iters
    fixed = list(blocks)

    def linear(x: Tensor) -> Tensor:
        parts = fixed[:k] + [x] + fixed[k + 1 :]
        return build(parts)

    with torch.enable_grad():
        vjp = torch.func.vjp(linear, blocks[k])[1]

    def normal(v: Tensor) -> Tensor:
        with torch.enable_grad():
            return vjp(linear(v) @ gram)[0]

    rhs = vjp(target_g)[0]
    x = blocks[k].clone()
    res = rhs - normal(x)
    p = res.clone()
    rr = float((res * res).sum())
    stop = 1e-24 * float((rhs * rhs).sum())
    for _ in range(iters):
        if rr <= stop:
            break
        hp = normal(p)
        php = float((p * hp).sum())
        if php <= 0:
            break
        alpha = rr / php
        x = x + alpha * p
        res = res - alpha * hp
        rr_new = float((res * res).sum())
        p = res + (rr_new / rr) * p
        rr = rr_new
    return x.detach()
