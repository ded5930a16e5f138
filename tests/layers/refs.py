"""Independent references for the layer tests: numpy loops and TensorLy.

Nothing here imports tnquant; every dense weight is rebuilt from the raw
core tensors with numpy (or TensorLy's own reconstruction functions).
"""

from __future__ import annotations

import math

import numpy as np
import tensorly as tl
import torch
from tensorly.cp_tensor import cp_to_tensor
from tensorly.tt_matrix import tt_matrix_to_tensor
from tensorly.tucker_tensor import tucker_to_tensor

# named tolerances
F64_RTOL = 1e-9  # float64 forward vs reference
EXACT_RTOL = 1e-5  # full-rank from_dense vs the dense layer (float64)
F32_ATOL = 1e-4


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a))


def tt_weight_np(cores, out_features: int, in_features: int) -> np.ndarray:
    """TT-matrix cores (r, o, i, r') -> (out_features, in_features), by a numpy loop."""
    cs = [np64(c) for c in cores]
    t = cs[0][0]  # (o1, i1, r1)
    for c in cs[1:]:
        t = np.tensordot(t, c, axes=([-1], [0]))  # (..., o_k, i_k, r_k)
    t = t[..., 0]  # (o1, i1, o2, i2, ..., od, id)
    d = len(cs)
    t = t.transpose([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    outs = math.prod(c.shape[1] for c in cs)
    ins = math.prod(c.shape[2] for c in cs)
    return t.reshape(outs, ins)[:out_features, :in_features]


def tt_weight_tl(cores, out_features: int, in_features: int) -> torch.Tensor:
    with tl.backend_context("pytorch"):
        full = tt_matrix_to_tensor([c.detach() for c in cores])
    d = len(cores)
    outs = math.prod(full.shape[:d])
    return full.reshape(outs, -1)[:out_features, :in_features]


def tucker_weight_np(
    cores, out_features: int | None = None, in_features: int | None = None
) -> np.ndarray:
    """Tucker Linear weight; order-1 ``[U_out, G, U_in]`` or ``[G, U_1..U_2d]``."""
    cs = [np64(c) for c in cores]
    if len(cs) == 3 and all(c.ndim == 2 for c in cs):
        return cs[0] @ cs[1] @ cs[2].T
    g, us = cs[0], cs[1:]
    t = g
    for k, u in enumerate(us):  # mode-k product, written out
        t = np.moveaxis(np.tensordot(u, t, axes=([1], [k])), 0, k)
    d = len(us) // 2
    outs = math.prod(u.shape[0] for u in us[:d])
    w = t.reshape(outs, -1)
    return w[:out_features, :in_features]


def tucker_weight_tl(cores, out_features: int, in_features: int) -> torch.Tensor:
    cs = [c.detach() for c in cores]
    with tl.backend_context("pytorch"):
        if len(cs) == 3 and all(c.ndim == 2 for c in cs):
            return tucker_to_tensor((cs[1], [cs[0], cs[2]]))
        full = tucker_to_tensor((cs[0], cs[1:]))
    d = (len(cs) - 1) // 2
    return full.reshape(math.prod(full.shape[:d]), -1)[:out_features, :in_features]


def tucker_kernel_np(cores) -> np.ndarray:
    u_out, g, u_in = (np64(c) for c in cores)
    k = np.tensordot(u_out, g, axes=([1], [0]))  # (O, r_in, kh, kw)
    return np.moveaxis(np.tensordot(u_in, k, axes=([1], [1])), 0, 1)  # (O, I, kh, kw)


def tucker_kernel_tl(cores) -> torch.Tensor:
    """Tucker-2 kernel via tucker_to_tensor, identity factors on the spatial modes."""
    u_out, g, u_in = (c.detach() for c in cores)
    eye_h = torch.eye(g.shape[2], dtype=g.dtype)
    eye_w = torch.eye(g.shape[3], dtype=g.dtype)
    with tl.backend_context("pytorch"):
        return tucker_to_tensor((g, [u_out, u_in, eye_h, eye_w]))


def cp_kernel_np(cores) -> np.ndarray:
    a_out, a_in, a_h, a_w = (np64(c) for c in cores)
    rank = a_out.shape[1]
    k = np.zeros((a_out.shape[0], a_in.shape[0], a_h.shape[0], a_w.shape[0]))
    for r in range(rank):
        k += np.multiply.outer(
            np.multiply.outer(a_out[:, r], a_in[:, r]), np.multiply.outer(a_h[:, r], a_w[:, r])
        )
    return k


def cp_kernel_tl(cores) -> torch.Tensor:
    cs = [c.detach() for c in cores]
    with tl.backend_context("pytorch"):
        weights = torch.ones(cs[0].shape[1], dtype=cs[0].dtype)
        return cp_to_tensor((weights, cs))


def random_cores(shapes, seed: int, dtype=torch.float64, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
