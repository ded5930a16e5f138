"""Tensor -> cores: TT, Tucker, CP and low-rank decompositions of layer weights.

The only place in tnquant that calls TensorLy, always inside
``tl.backend_context('pytorch')``. Pure functions: a weight and a spec in,
a :class:`Decomposition` out (see :mod:`tnquant.decompose.api` for the
dispatch table and :class:`Decomposition` for the core layouts).

Examples
--------
>>> import torch
>>> from tnquant.specs import TT
>>> dec = decompose_linear(torch.randn(64, 48), TT(ratio=0.25, order=2))
>>> dec.format, len(dec.cores)
('tt', 2)
"""

from tnquant.decompose.api import decompose_conv, decompose_embedding, decompose_linear, reconstruct
from tnquant.decompose.result import Decomposition
from tnquant.decompose.shapes import choose_shape, validate_shape

__all__ = [
    "Decomposition",
    "decompose_linear",
    "decompose_conv",
    "decompose_embedding",
    "reconstruct",
    "choose_shape",
    "validate_shape",
]
