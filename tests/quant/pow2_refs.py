"""numpy references for the power-of-two Binary/Ternary tests (no tnquant arithmetic)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tnquant import Binary, Ternary

BINARY = [
    Binary(scale="pow2"),
    Binary(scale="pow2", granularity="channel"),
    Binary(scale="pow2", granularity="channel", axis=1),
]
TERNARY = [
    Ternary(scale="pow2"),
    Ternary(scale="pow2", granularity="channel"),
    Ternary(scale="pow2", threshold=0.5, granularity="channel", axis=-1),
    Ternary(scale="pow2", method="ttq", granularity="channel"),
]
SHAPES = [(6, 5), (4, 3, 2, 2)]


# --------------------------------------------------------------------------- #
# numpy references
# --------------------------------------------------------------------------- #


def np_blocks(w: np.ndarray, spec: Any) -> tuple[list[tuple], tuple[int, ...]]:
    """Index tuples of the blocks and the qparam (keepdims) shape."""
    if spec.granularity == "tensor":
        return [(slice(None),) * w.ndim], (1,) * w.ndim
    ax = spec.axis % w.ndim
    blocks = [
        tuple(c if d == ax else slice(None) for d in range(w.ndim)) for c in range(w.shape[ax])
    ]
    return blocks, tuple(w.shape[ax] if d == ax else 1 for d in range(w.ndim))


def np_binary_alpha(w: np.ndarray, spec: Binary) -> np.ndarray:
    blocks, shape = np_blocks(w, spec)
    return np.reshape([np.abs(w[b]).mean() for b in blocks], shape)


def np_twn(w: np.ndarray, spec: Ternary) -> tuple[np.ndarray, np.ndarray]:
    """delta = t * mean|w|; alpha = mean(|w| > delta), else max|w| (TWN)."""
    blocks, shape = np_blocks(w, spec)
    deltas, alphas = [], []
    for b in blocks:
        a = np.abs(w[b]).ravel()
        delta = spec.threshold * a.mean()
        big = a[a > delta]
        deltas.append(delta)
        alphas.append(big.mean() if big.size else a.max())
    return np.reshape(deltas, shape), np.reshape(alphas, shape)


def np_pow2(alpha: np.ndarray) -> np.ndarray:
    """2**round(log2 alpha); 0 stays 0 (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(alpha > 0, 2.0 ** np.round(np.log2(np.where(alpha > 0, alpha, 1))), 0.0)


def weights(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * rng.uniform(0.05, 3.0)
