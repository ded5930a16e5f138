"""Hugging Face round trip: ``save_pretrained``, ``load_pretrained``, ``from_pretrained``.

- :func:`save_pretrained` ``(model, folder, tokenizer=None)``: tnquant's
  lossless files plus ``config.json`` and the tokenizer;
- :func:`load_pretrained` ``(folder) -> (model, tokenizer)`` and
  :func:`tnquant.load` ``(folder)``: the base is rebuilt from the (untrusted)
  ``config.json`` safely (:mod:`tnquant.io.hf_base`), then loaded;
- :func:`register`: plugs ``quant_method="tnquant"`` into transformers
  (:mod:`tnquant.hf.quantizer`), so ``AutoModelForCausalLM.from_pretrained(folder)``
  gives the compressed model with its packed codes.

Importing this package imports neither transformers nor registers anything;
each function imports transformers when called.

Examples
--------
>>> sorted(__all__)
['QUANT_METHOD', 'is_registered', 'load_pretrained', 'register', 'save_pretrained']
"""

from tnquant.hf.plugin import is_registered, register
from tnquant.hf.saving import QUANT_METHOD, load_pretrained, save_pretrained

__all__ = ["save_pretrained", "load_pretrained", "register", "is_registered", "QUANT_METHOD"]
