"""Write a larger distillation corpus: docstring sentences of installed packages + the stdlib split.

Lines: up to ``--extra`` (default 4000) sentences from the docstrings of numpy,
scipy, scikit-learn, torch.nn, sympy, pandas, networkx, hypothesis, setuptools
and pip (``--more``: also transformers, matplotlib, tensorly, pygments, jinja2,
huggingface_hub, hls4ml and the rest of torch) (with
``tnquant.cli.datasets``' sentence filter, none of them in the held-out split),
then the 1408 training sentences of ``sentence_corpus(seed=0)``, then its 512
held-out ones. Use with ``bench_qat_minilm.py --corpus FILE --train 5408
--test 512``: the held-out sentences are the same as with ``--train 1408``.

Run: ``.venv/bin/python benchmarks/make_corpus.py OUT.txt [--extra N] [--more]``
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import warnings

import tnquant.cli.datasets as ds

PACKAGES = [
    "numpy",
    "scipy",
    "sklearn",
    "torch.nn",
    "sympy",
    "pandas",
    "networkx",
    "hypothesis",
    "setuptools",
    "pip._internal",
]
MORE = [
    "transformers",
    "matplotlib",
    "tensorly",
    "pygments",
    "jinja2",
    "huggingface_hub",
    "hls4ml",
    "torch",
]
SKIP = ("test", "__main__", "f2py", "conftest", "setup", "distutils")


def main(out: str, extra_max: int = 4000, more: bool = False) -> None:
    warnings.simplefilter("ignore")  # importing every submodule warns about deprecations
    base = ds.sentence_corpus(seed=0)
    train_std, held = base[:1408], base[1408:1920]
    modules = []
    for pkg in PACKAGES + (MORE if more else []):
        try:
            package = importlib.import_module(pkg)
        except Exception:  # noqa: BLE001 - a package that is not installed is skipped
            continue
        modules.append(pkg)
        for m in pkgutil.walk_packages(
            getattr(package, "__path__", []), pkg + ".", onerror=lambda name: None
        ):
            if not any(t in m.name for t in SKIP):
                modules.append(m.name)
    ds._CORPUS_MODULES = modules  # the same sentence filter over other docstrings
    taken = set(held) | set(train_std)
    extra = [s for s in ds.sentence_corpus(seed=0) if s not in taken][:extra_max]
    with open(out, "w") as f:
        f.write("\n".join(extra + train_std + held) + "\n")
    print(
        f"{len(modules)} modules; wrote {len(extra)} + {len(train_std)} training and "
        f"{len(held)} held-out sentences to {out}"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="corpus_big.txt")
    ap.add_argument("--extra", type=int, default=4000, help="most extra training sentences")
    ap.add_argument("--more", action="store_true", help="also the docstrings of MORE packages")
    args = ap.parse_args()
    main(args.out, args.extra, args.more)
