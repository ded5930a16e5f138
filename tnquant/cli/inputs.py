"""What the CLI reads and builds: MODEL and DATA of ``compress``, the base model of ``export``.

MODEL: ``minilm`` (the packaged MiniLM-L6, :func:`tnquant.cli.datasets.load_minilm`),
``digits-cnn`` (:func:`digits_cnn` trained on scikit-learn's digits in a few
seconds), a Hugging Face model directory (offline, never ``trust_remote_code``:
a causal LM with its LM head, or a text encoder wrapped in
:class:`~tnquant.cli.datasets.MeanPooledEncoder`; :func:`hf_kind` decides
from ``config.json`` and refuses any other kind at once) or a state-dict
checkpoint (``.pt``/``.pth``/``.bin``/``.safetensors``) of the recipe's
``[model] class``. DATA: ``corpus`` (:func:`tnquant.cli.datasets.split_corpus`),
``digits`` (images and labels), a text file (one sentence a line) or a
``.npy``/``.pt`` tensor (a ``.pt`` may hold an ``(inputs, targets)`` pair or
a dict with ``'inputs'`` and ``'targets'``). :func:`check_compress` and
:func:`prepare_compress` check all of it before any work;
:func:`rebuild_base` imports nothing a compressed directory names. DATA is
read by :mod:`tnquant.cli.data` (:func:`load_data`, importable from here).

Examples
--------
>>> digits_cnn()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tnquant.cli.causal import lm_tokenizer
from tnquant.cli.checks import (
    UsageError,
    check_hf_dir,
    check_name,
    check_out_dir,
    import_class,
    read_json,
)
from tnquant.cli.data import _chunks as _chunks
from tnquant.cli.data import _data_kind, load_data
from tnquant.cli.data import _tensor_file as _tensor_file
from tnquant.cli.datasets import MeanPooledEncoder, load_minilm, minilm_path
from tnquant.cli.export_cmd import check_model_batch, whole_model
from tnquant.cli.hf_task import causal_lm_class, hf_task
from tnquant.cli.recipe import Recipe
from tnquant.core import matches, run
from tnquant.io import TENSORS_FILE
from tnquant.io.hf_base import build_hf_base, hf_size_bound

__all__ = [
    "UsageError",
    "digits_cnn",
    "build_model",
    "rebuild_base",
    "model_kind",
    "hf_kind",
    "import_class",
    "check_hf_dir",
    "check_compress",
    "prepare_compress",
    "load_data",
    "export_names",
    "Inputs",
    "CHECKPOINTS",
]

CHECKPOINTS = (".pt", ".pth", ".bin", ".safetensors")


def digits_cnn() -> nn.Module:
    """The untrained digits CNN: ``features`` (two 3x3 convs, max-pool) and ``classifier``.

    ``classifier`` is ``Linear(512, 64), ReLU, Linear(64, 10)``: a chain the
    fixed-point export takes.

    Examples
    --------
    >>> digits_cnn()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    features = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    classifier = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


def _train_digits(model: nn.Module, epochs: int, seed: int, progress: bool) -> nn.Module:
    from tqdm.auto import tqdm

    from tnquant.cli.datasets import digits

    torch.manual_seed(seed)
    x, y, _, _ = digits(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="train digits-cnn", disable=not progress):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[perm[i : i + 64]]), y[perm[i : i + 64]]).backward()
            opt.step()
    return model.eval()


def hf_kind(path: Path) -> str:
    """``'causal-lm'`` or ``'encoder'``: what the folder's ``config.json`` describes.

    The folder is checked first (:func:`~tnquant.cli.checks.check_hf_dir`);
    any other kind of model is refused (:func:`tnquant.cli.hf_task.hf_task`).

    Examples
    --------
    >>> import json, tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    >>> hf_kind(d)
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: .../config.json: model_type 'vit' is a vision model; ...
    """
    check_hf_dir(path)
    return hf_task(read_json(path / "config.json"), str(path / "config.json"))


def _hf_model(path: Path, pretrained: bool, max_bytes: int | None = None) -> tuple[nn.Module, Any]:
    task = hf_kind(path)  # an encoder (mean pooled) or a causal LM (its LM head kept)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    code: dict[str, Any] = {"trust_remote_code": False}
    causal = task == "causal-lm"
    try:
        if pretrained:
            auto = AutoModelForCausalLM if causal else AutoModel
            encoder = auto.from_pretrained(str(path), **code)
            tokenizer = AutoTokenizer.from_pretrained(str(path), **code)
        else:  # checked, sized on the meta device, then built (tnquant.io.hf_base)
            arch = causal_lm_class(read_json(path / "config.json")) if causal else "AutoModel"
            try:
                encoder = build_hf_base(path, max_bytes=max_bytes, architecture=arch)
            except ValueError as e:
                raise UsageError(str(e)) from None
            tokenizer = None
    except (OSError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{path}: transformers cannot build this model: {e}") from None
    if causal:
        return encoder.eval(), tokenizer
    return MeanPooledEncoder(encoder.eval()).eval(), tokenizer


def _construct(cls: Any, kwargs: dict[str, Any], what: str) -> nn.Module:
    try:
        model = cls(**kwargs)
    except TypeError as e:
        raise UsageError(f"{what}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{what} built a {type(model).__name__}, not a torch nn.Module")
    return model


def _checkpoint_class(path: Path, recipe: Recipe) -> Any:
    if recipe.model.cls is None:
        raise UsageError(
            f"{path} is a state-dict checkpoint: the recipe needs [model] class = "
            '"pkg.module:Class"'
        )
    return import_class(recipe.model.cls, "recipe key 'model.class'")


def _checkpoint_model(path: Path, recipe: Recipe, pretrained: bool) -> nn.Module:
    model = _construct(
        _checkpoint_class(path, recipe), dict(recipe.model.kwargs), "recipe key 'model.class'"
    )
    if pretrained:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict")
        model.load_state_dict(state)
    return model.eval()


def model_kind(spec: str, what: str = "MODEL") -> str:
    """What MODEL names: ``'minilm'``, ``'digits-cnn'``, ``'hf'`` or ``'checkpoint'``.

    Examples
    --------
    >>> model_kind("digits-cnn")
    'digits-cnn'
    """
    if spec in ("minilm", "digits-cnn"):
        return spec
    path = Path(spec)
    if path.is_dir():
        return "hf"
    if path.is_file() and path.suffix in CHECKPOINTS:
        return "checkpoint"
    raise UsageError(
        f"{what} {spec!r} is not 'minilm', 'digits-cnn', a Hugging Face model "
        f"directory or a checkpoint file ({', '.join(CHECKPOINTS)})"
    )


def build_model(
    spec: str, recipe: Recipe, *, pretrained: bool = True, seed: int = 0, progress: bool = False
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build the model MODEL names: ``(model, tokenizer or None, source)``.

    ``source`` is JSON-safe and says what the base model was (``source.json``);
    ``export`` rebuilds it with :func:`rebuild_base`, which imports nothing
    the directory names. A checkpoint's class comes from the recipe's
    ``[model] class`` (the user's own recipe: ``compress`` only).

    Examples
    --------
    >>> from tnquant.cli.recipe import parse_recipe
    >>> r = parse_recipe('[quantize.weights]\\n"*" = {bits = 8}')
    >>> model, tokenizer, source = build_model("digits-cnn", r, pretrained=False)
    >>> source, tokenizer
    ({'model': 'digits-cnn', 'kind': 'digits-cnn', 'text': False}, None)
    """
    kind = model_kind(spec)
    if kind == "minilm":
        model, tokenizer = load_minilm() if pretrained else _hf_model(minilm_path(), False)
        return model, tokenizer, {"model": "minilm", "kind": "minilm", "text": True}
    if kind == "digits-cnn":
        torch.manual_seed(seed)
        model = digits_cnn().eval()
        if pretrained:
            _train_digits(model, recipe.model.train_epochs, seed, progress)
        return model, None, {"model": "digits-cnn", "kind": "digits-cnn", "text": False}
    path = Path(spec).resolve()
    if kind == "hf":
        task = hf_kind(path)
        model, tokenizer = _hf_model(path, pretrained)
        return model, tokenizer, {"model": str(path), "kind": "hf", "text": True, "task": task}
    model = _checkpoint_model(path, recipe, pretrained)
    return model, None, {"model": str(path), "kind": "checkpoint", "text": False}


def _kwargs_json(text: str | None) -> dict[str, Any]:
    try:
        kwargs = {} if text is None else json.loads(text)
    except ValueError as e:
        raise UsageError(f"--model-kwargs must be a JSON object, got {text!r}: {e}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--model-kwargs must be a JSON object, got {type(kwargs).__name__}")
    return kwargs


def rebuild_base(
    source: dict[str, Any],
    directory: Path,
    *,
    model: str | None = None,
    model_class: str | None = None,
    model_kwargs: str | None = None,
) -> nn.Module:
    """The untrained base model of a compressed ``directory``, for :func:`tnquant.load`.

    Nothing named inside ``directory`` is imported: the base is a built-in
    model, a Hugging Face directory rebuilt from its ``config.json`` (no
    ``trust_remote_code``, no ``auto_map``, sized on the meta device first:
    at most 1000 times the saved tensors, or 1 GiB) or
    ``model_class(**model_kwargs)`` that the user names on the command line
    (``--model-class``, needed for a checkpoint base). ``model`` (``--model``)
    overrides the base that ``source`` (``source.json``, checked) names.

    Examples
    --------
    >>> src = {"model": "digits-cnn", "kind": "digits-cnn"}
    >>> type(rebuild_base(src, Path("out"))).__name__
    'Sequential'
    >>> rebuild_base({"model": "m.pt", "kind": "checkpoint"}, Path("out"))
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: out/source.json: the base model is the checkpoint ...
    """
    if model_class is not None:
        kwargs = _kwargs_json(model_kwargs)
        return _construct(import_class(model_class, "--model-class"), kwargs, "--model-class")
    if model_kwargs is not None:
        raise UsageError("--model-kwargs needs --model-class")
    spec, kind = (
        (model, model_kind(model, "--model")) if model else (source["model"], source["kind"])
    )
    if kind == "checkpoint":
        where = "--model" if model else str(directory / "source.json")
        raise UsageError(
            f"{where}: the base model is the checkpoint {spec}; pass its class "
            "with --model-class pkg.module:Class (and --model-kwargs '{...}'): "
            "export never imports the [model] class of the directory's recipe"
        )
    if kind == "digits-cnn":
        return digits_cnn().eval()
    if kind == "minilm":
        return _hf_model(minilm_path(), pretrained=False)[0]
    path = Path(spec)
    if not path.is_dir():
        raise UsageError(
            f"the Hugging Face base directory {spec} (from source.json) is not "
            "there: pass --model PATH"
        )
    tensors = directory / TENSORS_FILE
    saved = tensors.stat().st_size if tensors.is_file() else 0
    return _hf_model(path, pretrained=False, max_bytes=hf_size_bound(saved))[0]


# --------------------------------------------------------------------------- #
# compress: every argument checked before any work
# --------------------------------------------------------------------------- #

TEXT_MODELS = ("minilm", "hf")


def check_compress(args: Any, recipe: Recipe) -> str:
    """Check every ``compress`` argument that needs no model; return MODEL's kind.

    ``--out``, ``--seed``, MODEL (and a checkpoint's class, imported from the
    user's recipe), ``--calib``/``--eval`` (found, text or tensors as the
    model takes, labelled when the recipe's ``finetune.task_loss`` needs it).

    Examples
    --------
    >>> from argparse import Namespace
    >>> from tnquant.cli.recipe import parse_recipe
    >>> r = parse_recipe('[quantize.weights]\\n"*" = {bits = 8}')
    >>> a = Namespace(model="digits-cnn", calib="corpus", eval=None, out="o", force=False, seed=0)
    >>> check_compress(a, r)
    Traceback (most recent call last):
    ...
    tnquant.cli.checks.UsageError: --calib 'corpus' is text data; MODEL 'digits-cnn' takes ...
    """
    check_out_dir(args.out, "--out", args.force)
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    kind = model_kind(args.model)
    if kind == "hf":
        hf_kind(Path(args.model))  # a kind of model compress does not handle stops here
    if kind == "checkpoint":
        _checkpoint_class(Path(args.model), recipe)  # imported now: a bad name fails first
    wants = "text" if kind in TEXT_MODELS else "tensor"
    if wants == "text" and recipe.export is not None and not recipe.export.layers:
        raise UsageError(
            f"recipe table 'export' has no 'layers', so it exports the whole model, but MODEL "
            f"{args.model!r} takes text (token ids go through an embedding, which has no "
            f"fixed-point export): name the modules to export with export.layers"
        )
    for flag, arg in (("--calib", args.calib), ("--eval", args.eval)):
        if arg is None:
            continue
        got, labelled = _data_kind(arg, flag)
        if got != wants:
            takes = (
                "text (a text file or 'corpus')"
                if wants == "text"
                else "tensors ('digits', .npy or .pt)"
            )
            raise UsageError(f"{flag} {arg!r} is {got} data; MODEL {args.model!r} takes {takes}")
        if flag == "--calib" and labelled is False:
            _need_labels(recipe, None, arg)
    return kind


def _need_labels(recipe: Recipe, labels: Any, arg: str) -> None:
    if recipe.finetune is not None and recipe.finetune.task_loss is not None and labels is None:
        raise UsageError(
            f"recipe key 'finetune.task_loss' needs labelled --calib data ('digits' "
            f"or a .pt (inputs, targets) pair), got {arg!r}"
        )


def _fits(model: nn.Module, batch: Any, flag: str) -> None:
    try:
        run(model, [batch[:2] if isinstance(batch, torch.Tensor) else batch])
    except Exception as e:  # noqa: BLE001 - any failure here is data that does not fit
        raise UsageError(f"{flag} data does not fit the model: {type(e).__name__}: {e}") from None


def export_names(model: nn.Module, recipe: Recipe) -> list[str]:
    """The outermost modules the recipe's ``export.layers`` globs match.

    ``[]`` when there is no ``[export]`` table, and when it has no
    ``layers`` (the whole model is exported then).

    Examples
    --------
    >>> from tnquant.cli.recipe import parse_recipe
    >>> r = parse_recipe('[quantize.weights]\\n"*" = {bits = 8}\\n[export]\\nlayers = "class*"')
    >>> export_names(digits_cnn(), r)
    ['classifier']
    """
    if recipe.export is None or not recipe.export.layers:
        return []
    globs = recipe.export.layers
    names: list[str] = []
    for name, _ in model.named_modules():
        if name and any(matches(name, g) for g in globs):
            if not any(name.startswith(n + ".") for n in names):
                names.append(check_name(name, f"export layer {name!r}"))
    if not names:
        raise UsageError(f"recipe key 'export.layers' {list(globs)} matches no module")
    return names


class Inputs(NamedTuple):
    """What ``compress`` works on, every part checked."""

    original: nn.Module
    source: dict[str, Any]
    calib: list[Any]
    calib_labels: list[torch.Tensor] | None
    batches: list[Any]
    labels: list[torch.Tensor] | None
    names: list[str]
    task: str = "encoder"
    notes: tuple[str, ...] = ()


def prepare_compress(args: Any, recipe: Recipe, kind: str, progress: bool) -> Inputs:
    """Build MODEL and read the data, checking all of it before ``digits-cnn`` trains.

    Examples
    --------
    >>> from argparse import Namespace
    >>> from tnquant.cli.recipe import parse_recipe
    >>> r = parse_recipe('[model]\\ntrain_epochs = 1\\n[quantize.weights]\\n"*" = {bits = 8}')
    >>> a = Namespace(model="digits-cnn", calib="digits", eval=None, seed=0)
    >>> prepare_compress(a, r, "digits-cnn", progress=False).calib[0].shape  # doctest: +SKIP
    torch.Size([32, 1, 8, 8])
    """
    eval_arg = args.eval or args.calib
    if kind in TEXT_MODELS:
        original, tokenizer, source = build_model(
            args.model, recipe, seed=args.seed, progress=progress
        )
        task = source.get("task", "encoder")
        causal = task == "causal-lm"
        note = lm_tokenizer(tokenizer) if causal else None
        calib, calib_labels = load_data(
            args.calib, "calib", recipe, tokenizer, args.seed, causal=causal
        )
        batches, labels = load_data(eval_arg, "eval", recipe, tokenizer, args.seed, causal=causal)
        names = export_names(original, recipe)
        notes = () if note is None else (note,)
        return Inputs(original, source, calib, calib_labels, batches, labels, names, task, notes)
    calib, calib_labels = load_data(args.calib, "calib", recipe, None, args.seed)
    batches, labels = load_data(eval_arg, "eval", recipe, None, args.seed)
    _need_labels(recipe, calib_labels, args.calib)
    trains = kind == "digits-cnn"
    original, _, source = build_model(args.model, recipe, pretrained=not trains, seed=args.seed)
    names = export_names(original, recipe)
    if whole_model(recipe.export):
        check_model_batch(batches[0])
    _fits(original, calib[0], "--calib")
    _fits(original, batches[0], "--eval" if args.eval else "--calib")
    if trains:
        _train_digits(original, recipe.model.train_epochs, args.seed, progress)
    return Inputs(original, source, calib, calib_labels, batches, labels, names)
