"""tnquant: tensor-network compression and quantization of PyTorch models."""

from tnquant import export
from tnquant._version import __version__ as __version__
from tnquant.factorization import factorize
from tnquant.hf import load_pretrained, save_pretrained
from tnquant.io import load, save
from tnquant.planning import Plan, apply, pareto, search
from tnquant.ptq import calibrate
from tnquant.qat import finetune
from tnquant.quantization import convert, model_size_bits, quantize, size_report
from tnquant.report import Report
from tnquant.specs import CP, TT, Binary, Codebook, FixedPoint, LowRank, QuantSpec, Ternary, Tucker

__all__ = [
    "TT",
    "Tucker",
    "CP",
    "LowRank",
    "QuantSpec",
    "Binary",
    "Ternary",
    "FixedPoint",
    "Codebook",
    "factorize",
    "quantize",
    "calibrate",
    "finetune",
    "convert",
    "save",
    "load",
    "save_pretrained",
    "load_pretrained",
    "model_size_bits",
    "size_report",
    "Report",
    "search",
    "apply",
    "Plan",
    "pareto",
    "export",
]
