"""Quantization core: pure functions, straight-through estimators, observers, modules.

Examples
--------
>>> import torch
>>> from tnquant import Ternary
>>> from tnquant.quant import quantize, dequantize
>>> codes, qp = quantize(torch.tensor([-1.0, 0.1, 0.9]), Ternary())
>>> codes.tolist()
[-1, 0, 1]
"""

from tnquant.quant.fixed_point import cast_mantissa, from_mantissa, to_mantissa
from tnquant.quant.observers import (
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from tnquant.quant.packing import pack, unpack
from tnquant.quant.pow2 import Pow2Codes, pow2_codes
from tnquant.quant.primitives import (
    HANDLERS,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    round_tensor,
)
from tnquant.quant.qparams import QParams, block_size
from tnquant.quant.quantizer import Quantizer
from tnquant.quant.ste import clipped_round, lsq_fake_quantize, round_ste

__all__ = [
    "QParams",
    "HANDLERS",
    "block_size",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "round_tensor",
    "round_ste",
    "clipped_round",
    "lsq_fake_quantize",
    "to_mantissa",
    "from_mantissa",
    "cast_mantissa",
    "pack",
    "unpack",
    "MinMaxObserver",
    "EMAObserver",
    "PercentileObserver",
    "MSEObserver",
    "make_observer",
    "Quantizer",
    "pow2_codes",
    "Pow2Codes",
]
