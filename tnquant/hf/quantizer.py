"""transformers' quantizer plug-in: ``from_pretrained`` on a tnquant folder, compressed.

Importing this module imports transformers and defines two classes; it
registers nothing. :func:`tnquant.hf.register` (an explicit call) puts them
into transformers' tables with ``register_quantization_config("tnquant")``
and ``register_quantizer("tnquant")`` (transformers.quantizers.auto), as
optimum-quanto and torchao are plugged in.

Then ``AutoModelForCausalLM.from_pretrained(folder)`` (or any auto class or
model class) on a folder :func:`tnquant.hf.save_pretrained` wrote reads
``config.json``'s ``quantization_config`` (``quant_method="tnquant"``),
builds the model on the meta device as always and, before any weight is
read, hands it to :meth:`TnquantHfQuantizer._process_model_before_weight_loading`:
the folder is checked as :func:`tnquant.load` checks it (``model.json``, the
safetensors header, the architecture, the tensor file's ``sha256``) and the
saved tnquant modules (factorized layers, :class:`~tnquant.quant.FrozenTensor`
packed codes) are swapped in, unfilled (:func:`tnquant.io.skeleton.load_skeleton`).
transformers then reads ``tensors.safetensors`` (``config.json``'s
``transformers_weights``) into them, key for key, and
``_process_model_after_weight_loading`` checks that every tensor was loaded
and every quantizer state is well formed.

Examples
--------
>>> cfg = TnquantConfig()
>>> cfg.quant_method, cfg.to_dict()["version"]
('tnquant', 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from tnquant.io import FORMAT, TENSORS_FILE, VERSION
from tnquant.io.skeleton import check_loaded, load_skeleton

__all__ = ["TnquantConfig", "TnquantHfQuantizer"]

QUANT_METHOD = "tnquant"


class TnquantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a folder tnquant wrote: format and version only.

    Everything else (which layer is factorized or quantized, ranks, bits,
    scales) is in the folder's ``model.json``, checked on load.

    Parameters
    ----------
    quant_method
        Must be ``"tnquant"``.
    format
        Must be ``"tnquant"``.
    version
        The save format version; this tnquant reads only its own.

    Examples
    --------
    >>> TnquantConfig(version=2)
    Traceback (most recent call last):
    ...
    ValueError: quantization_config field 'version' must be 1, got 2
    """

    def __init__(
        self,
        quant_method: str = QUANT_METHOD,
        format: str = FORMAT,
        version: int = VERSION,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(
                f"quantization_config has unknown fields {sorted(kwargs)}; "
                "expected quant_method, format, version"
            )
        for field, value, expected in (
            ("quant_method", quant_method, QUANT_METHOD),
            ("format", format, FORMAT),
            ("version", version, VERSION),
        ):
            if value != expected or type(value) is not type(expected):
                raise ValueError(
                    f"quantization_config field {field!r} must be {expected!r}, got {value!r}"
                )
        self.quant_method = quant_method  # type: ignore[assignment]
        self.format = format
        self.version = version


class TnquantHfQuantizer(HfQuantizer):
    """Loads a tnquant folder's compressed modules into the model ``from_pretrained`` builds.

    Only pre-quantized folders (``requires_calibration``): tnquant compresses
    with its own verbs, not during ``from_pretrained``. Saving goes through
    :func:`tnquant.hf.save_pretrained` (``is_serializable`` is ``False``, so
    ``model.save_pretrained`` refuses instead of writing a folder without
    ``model.json``).

    Examples
    --------
    >>> q = TnquantHfQuantizer(TnquantConfig(), pre_quantized=True)
    >>> q.is_trainable, q.is_serializable()
    (False, False)
    """

    requires_calibration = True

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._names: list[str] = []
        self._hook: Any = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Refuse a ``device_map`` that spreads the model over devices or offloads it."""
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            devices = {str(v) for v in device_map.values()}
            if len(devices) > 1 or devices & {"disk", "meta"}:
                raise ValueError(
                    f"a tnquant model loads onto one device, got device_map={device_map!r}"
                )

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        files = kwargs.get("checkpoint_files") or []
        if len(files) != 1 or Path(files[0]).name != TENSORS_FILE:
            raise ValueError(
                f"a tnquant folder has one weight file, {TENSORS_FILE} (config.json's "
                f"transformers_weights), got {files!r}"
            )
        self._folder = Path(files[0]).parent
        self._skeleton = load_skeleton(self._folder, model)
        self._names = self._skeleton.names
        # transformers must not tie what tnquant replaced: a converted layer's weight is
        # no Parameter; the saved ties (model.json's tied) are restored after loading
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            for target, source in list(tied.items()):
                if self.param_needs_quantization(model, target) or self.param_needs_quantization(
                    model, source
                ):
                    del tied[target]
        # keys tnquant stores once (aliases of tied tensors) are not in the file: hidden
        # from transformers' key matching while it loads, tied again afterwards
        aliases = set(self._skeleton.aliases)

        def hide_aliases(module: Any, state: dict, prefix: str, local_metadata: Any) -> None:
            for key in aliases:
                state.pop(prefix + key, None)

        self._hook = model.register_state_dict_post_hook(hide_aliases) if aliases else None
        return model

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        """``True`` for the tensors of the swapped-in tnquant modules: they load as stored.

        transformers compares a checkpoint tensor's shape with
        ``getattr(module, name)``; a converted layer's ``weight`` reads as the
        dequantized (drop-in) weight, while its state holds the empty
        placeholder that the file stores. Every such shape was checked
        against the file before loading (:func:`~tnquant.io.skeleton.load_skeleton`).
        """
        return any(param_name.startswith(f"{name}.") for name in self._names)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self._hook is not None:
            self._hook.remove()
        check_loaded(model, self._skeleton, str(self._folder))
        return model

    def is_serializable(self) -> bool:
        """``False``: save with :func:`tnquant.hf.save_pretrained`."""
        return False

    @property
    def is_trainable(self) -> bool:
        """``False``: fine-tune with :func:`tnquant.finetune` before converting."""
        return False
