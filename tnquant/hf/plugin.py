"""``register``: plug tnquant into transformers' quantizer tables, on an explicit call.

Examples
--------
>>> register()  # once or many times
>>> from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
>>> AUTO_QUANTIZER_MAPPING["tnquant"].__name__
'TnquantHfQuantizer'
"""

from __future__ import annotations

__all__ = ["register", "is_registered"]


def is_registered() -> bool:
    """Whether transformers' tables hold tnquant's config and quantizer.

    Examples
    --------
    >>> register(); is_registered()
    True
    """
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    from tnquant.hf.quantizer import QUANT_METHOD, TnquantConfig, TnquantHfQuantizer

    config = AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
    quantizer = AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
    return config is TnquantConfig and quantizer is TnquantHfQuantizer


def register() -> None:
    """Register ``quant_method="tnquant"`` with transformers (idempotent).

    Afterwards ``AutoModelForCausalLM.from_pretrained(folder)`` (any auto or
    model class) on a folder :func:`tnquant.hf.save_pretrained` wrote gives
    the compressed model (see :mod:`tnquant.hf.quantizer`). ``import
    tnquant`` and ``import tnquant.hf`` never register.

    Raises
    ------
    ValueError
        Another package registered a different ``"tnquant"`` method.

    Examples
    --------
    >>> register()
    """
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from tnquant.hf.quantizer import QUANT_METHOD, TnquantConfig, TnquantHfQuantizer

    if is_registered():
        return
    for table, ours in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, TnquantConfig),
        (AUTO_QUANTIZER_MAPPING, TnquantHfQuantizer),
    ):
        if table.get(QUANT_METHOD, ours) is not ours:
            raise ValueError(
                f"transformers already has a quant_method {QUANT_METHOD!r}: "
                f"{table[QUANT_METHOD].__module__}.{table[QUANT_METHOD].__name__}"
            )
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TnquantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TnquantHfQuantizer)
