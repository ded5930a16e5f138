"""Factorized layers: TT, Tucker, CP and low-rank Linear/Conv2d/Conv1d/Embedding.

Every layer is an ``nn.Module`` built from its cores (or from a dense layer
with ``from_dense(module, spec)``), with ``to_dense()``, ``.cores`` (an
``nn.ParameterList``), ``n_params``, ``dense_params``,
``compression_ratio`` (dense / factorized), ``spec`` and
``decomposition_info``.

=================  ===========  ==========================================
layer              spec         cores
=================  ===========  ==========================================
``LowRankLinear``  ``LowRank``  ``[U (out, r), V (r, in)]``
``TuckerLinear``   ``Tucker``   ``[U_out, G, U_in]`` or ``[G, U_1..U_2d]``
``TTLinear``       ``TT``       ``(r_{k-1}, out_k, in_k, r_k)`` each
``TuckerConv2d``   ``Tucker``   ``[U_out (O, r), G (r, r', kh, kw), U_in]``
``CPConv2d``       ``CP``       ``[A_out, A_in, A_h, A_w]``, each ``(., R)``
``TuckerConv1d``   ``Tucker``   ``[U_out, G (r_out, r_in, k), U_in]``
``TTEmbedding``    ``TT``       ``(r_{k-1}, num_k, dim_k, r_k)`` each
=================  ===========  ==========================================

``LowRankHFConv1D``, ``TTHFConv1D``, ``TuckerHFConv1D`` and ``QuantHFConv1D``
stand for Hugging Face's ``Conv1D`` (GPT-2; :mod:`tnquant.layers.hf_conv1d`):
the Linear layers' cores, read in ``Conv1D``'s ``(in, out)`` layout.

Examples
--------
>>> import torch
>>> from tnquant.layers import LowRankLinear
>>> LowRankLinear([torch.randn(8, 2), torch.randn(2, 8)]).compression_ratio
2.0
"""

from tnquant.layers.base import FactorizedLayer
from tnquant.layers.conv import FactorizedConv2dBase
from tnquant.layers.conv1d import QuantConv1d, TuckerConv1d
from tnquant.layers.cp import CPConv2d
from tnquant.layers.embedding import TTEmbedding
from tnquant.layers.hf_conv1d import LowRankHFConv1D, QuantHFConv1D, TTHFConv1D, TuckerHFConv1D
from tnquant.layers.linear import FactorizedLinearBase
from tnquant.layers.lowrank import LowRankLinear
from tnquant.layers.quantized import QuantConv2d, QuantEmbedding, QuantLinear
from tnquant.layers.tt import TTLinear
from tnquant.layers.tucker import TuckerConv2d, TuckerLinear

__all__ = [
    "FactorizedLayer",
    "FactorizedLinearBase",
    "FactorizedConv2dBase",
    "LowRankLinear",
    "TTLinear",
    "TuckerLinear",
    "TuckerConv2d",
    "CPConv2d",
    "TuckerConv1d",
    "TTEmbedding",
    "LowRankHFConv1D",
    "TTHFConv1D",
    "TuckerHFConv1D",
    "QuantHFConv1D",
    "QuantLinear",
    "QuantConv2d",
    "QuantConv1d",
    "QuantEmbedding",
]
