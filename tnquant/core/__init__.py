"""The plumbing every verb shares, written once (see ``docs/architecture.md``).

- :mod:`~tnquant.core.modules`: ``join``, ``find_module``, ``replace_module``;
- :mod:`~tnquant.core.globs`: the one glob table (``GlobTable``, ``selected``);
- :mod:`~tnquant.core.capture`: hooked passes over data with train/eval restored;
- :mod:`~tnquant.core.feeds`: which module's output a module reads (chains, ``torch.fx``);
- :mod:`~tnquant.core.output`: the one rule for "the model's output".
"""

from tnquant.core.capture import (
    Gram,
    capture_grams,
    capture_inputs,
    capture_outputs,
    evaluating,
    hooks,
    outputs,
    run,
)
from tnquant.core.feeds import BATCHNORMS, Feed, batchnorms_after, chain_links, feeds, traced_feeds
from tnquant.core.globs import GlobTable, matches, selected
from tnquant.core.modules import find_module, join, replace_module
from tnquant.core.output import model_output

__all__ = [
    "Gram",
    "capture_grams",
    "capture_inputs",
    "capture_outputs",
    "evaluating",
    "hooks",
    "outputs",
    "run",
    "Feed",
    "BATCHNORMS",
    "feeds",
    "traced_feeds",
    "chain_links",
    "batchnorms_after",
    "GlobTable",
    "matches",
    "selected",
    "find_module",
    "join",
    "replace_module",
    "model_output",
]
