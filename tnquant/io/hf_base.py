"""The untrained Hugging Face base model of a folder's ``config.json``, built safely.

:func:`tnquant.load` (without ``model=``) and the CLI's ``export`` rebuild the
base model a compressed folder was made from with these functions; the
folder is untrusted, so nothing in it is imported or run:

- :func:`check_hf_dir`: ``config.json`` is there, a JSON object of at most
  :data:`MAX_CONFIG_BYTES`; neither it nor ``tokenizer_config.json`` has an
  ``auto_map`` (code of the folder) or a ``trust_remote_code`` key;
- :func:`hf_model_class`: the class named by ``architectures[0]`` is taken
  only when transformers' own auto mappings (``MODEL_*_MAPPING_NAMES`` of
  ``transformers.models.auto.modeling_auto``) list it for the config's
  ``model_type``, and only from the ``transformers`` package; any other name
  is refused;
- :func:`build_hf_base`: the config is read by ``AutoConfig`` with
  ``trust_remote_code=False``, the model is built on the meta device first
  and its size compared with ``max_bytes``; only then is it allocated.

transformers is imported only when one of them is called.

Examples
--------
>>> import tempfile
>>> from transformers import GPT2Config
>>> d = tempfile.mkdtemp()
>>> config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, bos_token_id=0)
>>> config.architectures = ["GPT2LMHeadModel"]
>>> config.save_pretrained(d)
>>> type(build_hf_base(d)).__name__
'GPT2LMHeadModel'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "MAX_CONFIG_BYTES",
    "CODE_KEYS",
    "check_hf_dir",
    "hf_model_class",
    "build_hf_base",
    "hf_size_bound",
]

MAX_CONFIG_BYTES = 1 << 20
"""The largest ``config.json`` (or ``tokenizer_config.json``) read, in bytes."""

CODE_KEYS = ("auto_map", "trust_remote_code")
"""Keys that ask for the folder's own Python code; a folder with one is refused."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} is missing (or not a regular file)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size} bytes; at most {MAX_CONFIG_BYTES} are read")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def check_hf_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Refuse a folder whose ``config.json`` is missing or asks for its own code.

    tnquant never sets ``trust_remote_code``: a config (or tokenizer config)
    with ``auto_map`` or ``trust_remote_code`` names Python files of the
    folder, which are never run.

    Parameters
    ----------
    path
        The Hugging Face model folder.

    Returns
    -------
    dict
        ``config.json``, parsed.

    Raises
    ------
    ValueError
        ``config.json`` is missing, too large, not a JSON object, or one of
        the two files has a key of :data:`CODE_KEYS`.

    Examples
    --------
    >>> import json, tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "m.M"}}))
    >>> check_hf_dir(d)
    Traceback (most recent call last):
    ...
    ValueError: .../config.json has 'auto_map': ...
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is a directory without config.json: not a Hugging Face model directory"
        )
    config = _read_json(path / "config.json")
    for name in ("config.json", "tokenizer_config.json"):
        if name == "config.json" or (path / name).is_file():
            obj = config if name == "config.json" else _read_json(path / name)
            for key in CODE_KEYS:
                if key in obj:
                    raise ValueError(
                        f"{path / name} has {key!r}: the model needs its own Python "
                        "code (trust_remote_code), which tnquant never runs"
                    )
    return config


def _mapped_names(model_type: str) -> set[str]:
    """Every model class name transformers' auto mappings list for ``model_type``."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if attr.startswith("MODEL") and attr.endswith("_MAPPING_NAMES"):
            value = getattr(modeling_auto, attr).get(model_type)
            if isinstance(value, str):
                names.add(value)
            elif isinstance(value, (tuple, list)):
                names.update(v for v in value if isinstance(v, str))
    return names


def hf_model_class(config: Any, architecture: str | None = None) -> Any:
    """The transformers model class for ``config``, from transformers' own auto mappings.

    Parameters
    ----------
    config
        A ``transformers.PretrainedConfig``.
    architecture
        The class name; default ``config.architectures[0]``, or the base
        model when the config names none; ``"AutoModel"``: the base model
        (``AutoModel``'s class for the config) whatever the config names.

    Returns
    -------
    type
        A ``transformers.PreTrainedModel`` subclass whose ``config_class``
        ``config`` is an instance of.

    Raises
    ------
    ValueError
        The name is not one transformers' auto mappings list for the
        config's ``model_type`` (the message lists those that are).
    TypeError
        ``architectures`` is not a list of strings.

    Examples
    --------
    >>> from transformers import BertConfig
    >>> hf_model_class(BertConfig(architectures=["BertForMaskedLM"])).__name__
    'BertForMaskedLM'
    >>> hf_model_class(BertConfig(architectures=["os.system"]))
    Traceback (most recent call last):
    ...
    ValueError: config.json field 'architectures[0]' must be a transformers class ...
    """
    import transformers
    from transformers import AutoModel, PreTrainedModel

    if architecture is None:
        archs = getattr(config, "architectures", None)
        if archs is None or archs == []:
            architecture = "AutoModel"
        elif not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
            raise TypeError(
                f"config.json field 'architectures' must be a list of class names, got {archs!r}"
            )
        else:
            architecture = archs[0]
    if architecture == "AutoModel":
        try:
            return AutoModel._model_mapping[type(config)]
        except KeyError:
            raise ValueError(
                f"transformers has no base model class for {type(config).__name__}"
            ) from None
    model_type = getattr(type(config), "model_type", None)
    allowed = _mapped_names(model_type) if isinstance(model_type, str) else set()
    if architecture not in allowed:
        raise ValueError(
            f"config.json field 'architectures[0]' must be a transformers class of model_type "
            f"{model_type!r} (one of {sorted(allowed)}), got {architecture!r}"
        )
    cls = getattr(transformers, architecture, None)
    config_class = getattr(cls, "config_class", None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)) or not (
        isinstance(config_class, type) and isinstance(config, config_class)
    ):
        raise ValueError(
            f"config.json field 'architectures[0]': {architecture!r} is not a transformers "
            f"model class for {type(config).__name__}"
        )
    return cls


def _build(cls: Any, config: Any, path: Path) -> nn.Module:
    try:
        return cast(nn.Module, cls._from_config(config))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: transformers cannot build this model: {e}") from None


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def build_hf_base(
    path: str | os.PathLike[str], *, max_bytes: int | None = None, architecture: str | None = None
) -> nn.Module:
    """The untrained model ``path/config.json`` describes, checked before it is allocated.

    Parameters
    ----------
    path
        A folder with ``config.json`` (checked by :func:`check_hf_dir`).
    max_bytes
        The largest state (every parameter and buffer) allowed, in bytes,
        measured on the meta device before anything is allocated; ``None``
        for no bound.
    architecture
        The model class name (see :func:`hf_model_class`); ``"AutoModel"``
        for the base model whatever the config names.

    Returns
    -------
    nn.Module
        The model in eval mode, in the config's ``dtype``, randomly
        initialised, with its config (``quantization_config`` and
        ``transformers_weights`` that tnquant wrote removed).

    Raises
    ------
    ValueError
        The folder asks for its own code, names a class outside
        transformers' mappings, the config is not one transformers reads,
        or the model is larger than ``max_bytes``.

    Examples
    --------
    >>> import tempfile
    >>> from transformers import BertConfig
    >>> d = tempfile.mkdtemp()
    >>> BertConfig(vocab_size=10**9, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...            intermediate_size=8).save_pretrained(d)
    >>> build_hf_base(d, max_bytes=1 << 20)
    Traceback (most recent call last):
    ...
    ValueError: .../config.json describes a model of 32000... bytes; at most 1048576 are allowed
    """
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
        raise TypeError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    path = Path(path)
    raw = check_hf_dir(path)
    from transformers import AutoConfig  # a local folder: nothing is fetched

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path / 'config.json'}: transformers cannot read this config: {e}"
        ) from None
    qc = raw.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "tnquant":
        for attr in ("quantization_config", "transformers_weights"):
            if hasattr(config, attr):
                delattr(config, attr)
    cls: Any = hf_model_class(config, architecture)
    if max_bytes is not None:
        with torch.device("meta"):  # sizes only, no storage
            size = _state_bytes(_build(cls, config, path))
        if size > max_bytes:
            raise ValueError(
                f"{path / 'config.json'} describes a model of {size} bytes;"
                f" at most {max_bytes} are allowed"
            )
    return _build(cls, config, path).eval()


def hf_size_bound(saved_bytes: int) -> int:
    """The largest base model rebuilt for a folder whose tensors take ``saved_bytes``.

    1000 times the saved tensors (a compression well beyond what tnquant
    reaches), at least 1 GiB.

    Examples
    --------
    >>> hf_size_bound(0) == 1 << 30
    True
    """
    return max(1 << 30, 1000 * saved_bytes)
