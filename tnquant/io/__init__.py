"""``save`` / ``load``: a lossless, pickle-free round trip of compressed models.

Format (version 1): ``save(model, path)`` writes the directory ``path/``:

- ``tensors.safetensors``: every entry of ``model.state_dict()`` (parameters
  and persistent buffers: cores, biases, scales, zero points, observer
  ranges, quantizer modes, packed integer codes), under its state-dict key;
  the keys of a ``tied`` group (one tensor) once, under the group's first
  key (:mod:`tnquant.io.ties`);
- ``model.json``: ``format`` (``"tnquant"``), ``version``, the tensor file's
  name, byte size and ``sha256``, the ``dtype``/``shape`` of every tensor,
  and ``modules``: one entry per tnquant module standing in the model
  (factorized layers, quantized dense layers, quantizers, frozen tensors),
  with every name it is reachable under, what dense module it replaces,
  and a recursive description: class, constructor configuration (specs via
  :func:`~tnquant.specs.spec_to_dict`, sizes, conv hyper-parameters, bias
  presence, ``decomposition_info``, ``implementation``), and its attached
  children (``core_quantizers``, ``act_quantizers``, ``weight_quantizer``,
  ...). The JSON is written canonically (sorted keys, fixed indentation)
  and its ``checksum`` field is the ``sha256`` of that canonical text
  without the field.

``load(path, model=base)`` treats the directory as untrusted: it imports no
code (classes come from the closed table of the layer registry, :mod:`tnquant.registry`),
unpickles nothing, and checks everything before it allocates a tensor,
reads tensor data or touches ``base`` (a freshly constructed model of the
original architecture):

1. ``model.json``: at most 64 MiB, canonical, its checksum, format and
   version, then every field's type (:mod:`tnquant.io.fields`); the tensor
   file must be ``tensors.safetensors`` in the directory itself;
2. the safetensors header, read on its own (length against the file size,
   each tensor's byte range against its dtype and shape), equal to the
   listing in ``model.json``, and the ``tied`` groups;
3. the architecture: each entry's class replaces what the class table says
   (never what the file says) and stands where ``base`` has that dense layer
   with the same sizes (a class that replaces nothing, such as ``Identity``,
   only where ``base`` has one); each module is rebuilt on the meta device,
   every tensor compared with the header, and so are ``base``'s own;
4. only then the ``sha256``, the data (tied tensors must be equal), each
   rebuilt module's state (before it is attached), the swap into ``base``
   and a strict ``load_state_dict`` (undone if it raises).

A refusal raises :class:`IntegrityError` (a ``ValueError``) naming the file
and the entry or field, or ``ValueError`` for a base model of another
architecture; ``base`` is left untouched. ``load(path)`` without a model
works when the saved model is one tnquant module, or when ``path`` also
holds a Hugging Face ``config.json`` (:func:`tnquant.hf.save_pretrained`
writes one): after steps 1 and 2, the base is rebuilt from it by
:func:`tnquant.io.hf_base.build_hf_base`, which runs no code of the folder
(``auto_map`` and ``trust_remote_code`` keys are refused), takes the class
``architectures[0]`` names only when transformers' own auto mappings list
it, and sizes the model on the meta device before allocating it (at most
1000 times the saved tensors, or 1 GiB). The checksums are plain
``sha256``: they detect corruption, not forgery; a forged but
self-consistent directory loads as the model it describes. The docs page
"Saving and loading" says what is and is not promised, also for
``IntegerModel.load`` and the ``report``/``export`` commands, which treat
their directories the same way. Rebuilt modules go to the device of the
module they replace and keep the saved dtypes; the other tensors are copied
into the base model's own (pass it in the saved dtype for a bit-exact trip).

Examples
--------
>>> import tempfile, torch
>>> from torch import nn
>>> from tnquant import LowRank, factorize
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> _ = factorize(model, {"0": LowRank(rank=2)}, progress=False)
>>> with tempfile.TemporaryDirectory() as d:
...     save(model, d)
...     fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
...     loaded = load(d, model=fresh)
>>> x = torch.randn(3, 16)
>>> type(loaded[0]).__name__, torch.equal(loaded(x), model(x))
('LowRankLinear', True)
"""

from tnquant.io.fields import IntegrityError
from tnquant.io.files import FORMAT, JSON_FILE, TENSORS_FILE, VERSION
from tnquant.io.loading import load
from tnquant.io.saving import save

__all__ = ["save", "load", "IntegrityError", "FORMAT", "VERSION", "TENSORS_FILE", "JSON_FILE"]
