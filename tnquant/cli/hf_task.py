"""What a Hugging Face model folder holds, decided from its ``config.json`` alone.

``tnquant compress`` handles two kinds of Hugging Face models:

- ``'causal-lm'``: a causal language model (GPT-2, Llama, Mistral, Qwen2, ...),
  built with ``AutoModelForCausalLM`` (the LM head kept) and distilled on its
  next-token distributions;
- ``'encoder'``: a text encoder (BERT, MiniLM, RoBERTa, ...), built with
  ``AutoModel`` and mean pooled (:class:`~tnquant.cli.datasets.MeanPooledEncoder`).

:func:`hf_task` decides which from the ``model_type`` and ``architectures``
fields, looked up in transformers' own auto mappings
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ``MODEL_FOR_MASKED_LM_MAPPING_NAMES``,
``MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES``, ...); no name in the file is
ever imported. Every other kind (encoder-decoders such as T5 and BART,
vision, audio and multimodal models) is refused with one line that names
the kinds handled, before any weight or data is read.

Examples
--------
>>> hf_task({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
'causal-lm'
>>> hf_task({"model_type": "bert"})
'encoder'
>>> hf_task({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})
Traceback (most recent call last):
...
tnquant.cli.checks.UsageError: config.json: model_type 't5' (T5ForConditionalGeneration) is ...
"""

from __future__ import annotations

from typing import Any

from tnquant.cli.checks import UsageError

__all__ = ["TASKS", "HANDLED", "hf_task", "causal_lm_class"]

#: The Hugging Face model kinds ``tnquant compress`` handles.
TASKS = ("causal-lm", "encoder")

#: What the refusal says the CLI handles.
HANDLED = (
    "tnquant compress handles Hugging Face causal language models (GPT-2, Llama, ...: "
    "a model_type with a causal-LM class in transformers' auto mappings; the LM head is kept) "
    "and text encoders (BERT, MiniLM, ...: a model_type with a masked-LM or text-encoding "
    "class; mean pooled)"
)

#: Mappings whose model types are encoder-decoders (refused whatever the architecture).
_SEQ2SEQ = (
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
)
#: Words in the mapping names of vision, audio and multimodal tasks (the reason given).
_OTHER = (
    ("MULTIMODAL", "a multimodal"),
    ("IMAGE_TEXT", "a multimodal"),
    ("VISUAL_QUESTION", "a multimodal"),
    ("IMAGE", "a vision"),
    ("VIDEO", "a vision"),
    ("DEPTH", "a vision"),
    ("OBJECT_DETECTION", "a vision"),
    ("SEGMENTATION", "a vision"),
    ("AUDIO", "an audio"),
    ("CTC", "an audio"),
    ("SPECTROGRAM", "an audio"),
    ("WAVEFORM", "an audio"),
    ("TIME_SERIES", "a time-series"),
)


def _names(mapping: Any, model_type: str) -> set[str]:
    """The class names one auto mapping lists for ``model_type`` (a name or a tuple of them)."""
    value = mapping.get(model_type)
    if isinstance(value, str):
        return {value}
    if isinstance(value, (tuple, list)):
        return {v for v in value if isinstance(v, str)}
    return set()


def _mappings() -> dict[str, Any]:
    from transformers.models.auto import modeling_auto

    return {
        a: getattr(modeling_auto, a)
        for a in sorted(dir(modeling_auto))
        if a.startswith("MODEL") and a.endswith("_MAPPING_NAMES")
    }


def _architecture(config: dict[str, Any], where: str) -> str | None:
    archs = config.get("architectures")
    if archs is None or archs == []:
        return None
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UsageError(
            f"{where}: field 'architectures' must be a list of class names, got {archs!r}"
        )
    return str(archs[0])


def _refuse(where: str, model_type: str, arch: str | None, why: str) -> UsageError:
    named = f" ({arch})" if arch else ""
    return UsageError(f"{where}: model_type {model_type!r}{named} is {why}; {HANDLED}")


def hf_task(config: dict[str, Any], where: str = "config.json") -> str:
    """``'causal-lm'`` or ``'encoder'``: the kind of model a parsed ``config.json`` describes.

    Parameters
    ----------
    config
        The JSON object of the folder's ``config.json``.
    where
        How messages name the file.

    Returns
    -------
    str
        ``'causal-lm'`` when ``architectures[0]`` is the causal-LM class
        transformers maps ``model_type`` to (or, without ``architectures``,
        when the type has a causal-LM class and no masked-LM one);
        ``'encoder'`` for a type with a masked-LM or text-encoding class.

    Raises
    ------
    tnquant.cli.checks.UsageError
        For any other model (encoder-decoder, vision, audio, a classifier
        head of a causal LM, an unknown ``model_type``), with one line that
        names the kinds handled (:data:`HANDLED`).

    Examples
    --------
    >>> hf_task({"model_type": "gpt2"})
    'causal-lm'
    >>> hf_task({"model_type": "vit"})
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: config.json: model_type 'vit' is a vision model; ...
    """
    model_type = config.get("model_type")
    maps = _mappings()
    if not isinstance(model_type, str) or model_type not in maps["MODEL_MAPPING_NAMES"]:
        raise UsageError(
            f"{where}: field 'model_type' must name a model type transformers knows, got "
            f"{model_type!r}; {HANDLED}"
        )
    arch = _architecture(config, where)
    if any(model_type in maps[m] for m in _SEQ2SEQ):
        raise _refuse(where, model_type, arch, "an encoder-decoder model")
    causal = _names(maps["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"], model_type)
    encoding = {
        m
        for m in ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES")
        if model_type in maps[m]
    }
    if arch in causal or (arch is None and causal and not encoding):
        return "causal-lm"
    others = [why for word, why in _OTHER for m in maps if word in m and model_type in maps[m]]
    if others:
        raise _refuse(where, model_type, arch, f"{others[0]} model")
    if encoding:
        return "encoder"
    if causal:
        raise _refuse(
            where,
            model_type,
            arch,
            f"a task head other than its causal-LM class {sorted(causal)[0]}",
        )
    raise _refuse(where, model_type, arch, "neither a causal language model nor a text encoder")


def causal_lm_class(config: dict[str, Any]) -> str:
    """The name of the causal-LM class transformers maps a ``'causal-lm'`` config to.

    ``architectures[0]`` when it is that class, else the mapping's first
    class for ``model_type`` (a name transformers itself lists: nothing from
    the file is imported).

    Examples
    --------
    >>> causal_lm_class({"model_type": "gpt2"})
    'GPT2LMHeadModel'
    """
    model_type = str(config.get("model_type"))
    causal = _names(_mappings()["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"], model_type)
    if not causal:
        raise UsageError(f"model_type {model_type!r} has no causal-LM class; {HANDLED}")
    arch = _architecture(config, "config.json")
    return arch if arch in causal else sorted(causal)[0]
