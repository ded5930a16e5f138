"""Post-training quantization: fold BatchNorm, calibrate ranges, correct biases, GPTQ, rotations.

Before :func:`~tnquant.quantize`, :func:`fold_batchnorm` folds every eval-mode
BatchNorm1d/2d into the layer that feeds it (dense, Conv, low-rank, Tucker,
CP), so the quantizers see the weights the deployed model runs; ``quantize``
warns about a BatchNorm left after a layer it quantizes.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import QuantSpec
>>> from tnquant.ptq import calibrate, fold_batchnorm
>>> from tnquant.quant import Quantizer
>>> model = nn.Sequential(nn.Linear(3, 3), Quantizer(QuantSpec(bits=4)))
>>> calibrate(model, [torch.randn(4, 3)], progress=False).rows[0]["kind"]
'activation'
>>> model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
>>> fold_batchnorm(model, progress=False).rows[0]["into"]
'0'
"""

from tnquant.ptq.batchnorm import fold_batchnorm
from tnquant.ptq.bias_correction import bias_targets, correct_biases
from tnquant.ptq.calibrate import QuantizerRole, calibrate, find_quantizers
from tnquant.ptq.codebook_fit import fit_codebooks
from tnquant.ptq.gptq import gptq, gptq_targets
from tnquant.ptq.rotate import HadamardRotation, RotatedLinear, rotate

__all__ = [
    "fold_batchnorm",
    "calibrate",
    "correct_biases",
    "bias_targets",
    "gptq",
    "gptq_targets",
    "fit_codebooks",
    "rotate",
    "RotatedLinear",
    "HadamardRotation",
    "find_quantizers",
    "QuantizerRole",
]
