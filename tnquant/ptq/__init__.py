"""Post-training quantization: calibrate ranges, correct biases, GPTQ rounding, rotations.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import QuantSpec
>>> from tnquant.ptq import calibrate
>>> from tnquant.quant import Quantizer
>>> model = nn.Sequential(nn.Linear(3, 3), Quantizer(QuantSpec(bits=4)))
>>> calibrate(model, [torch.randn(4, 3)], progress=False).rows[0]["kind"]
'activation'
"""

from tnquant.ptq.bias_correction import bias_targets, correct_biases
from tnquant.ptq.calibrate import QuantizerRole, calibrate, find_quantizers
from tnquant.ptq.gptq import gptq, gptq_targets
from tnquant.ptq.rotate import HadamardRotation, RotatedLinear, rotate

__all__ = [
    "calibrate",
    "correct_biases",
    "bias_targets",
    "gptq",
    "gptq_targets",
    "rotate",
    "RotatedLinear",
    "HadamardRotation",
    "find_quantizers",
    "QuantizerRole",
]
