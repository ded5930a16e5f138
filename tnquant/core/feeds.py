"""Which module's output a module reads: the rule ``fold_batchnorm`` and ``quantize`` share.

A module ``m`` is *fed* by a module ``p`` when ``m``'s one input is ``p``'s
output and nothing else reads that output, so that a change of ``p``'s
output map (folding a BatchNorm into it) is seen by ``m`` alone. Two ways
to find ``p``:

- chains (:func:`chain_links`): an exact ``nn.Sequential`` (nested exact
  ones flattened into one chain) passes each module's output to the next
  module and to nothing else;
- the traced graph (:func:`traced_feeds`): ``torch.fx`` traces the model,
  with the modules ``leaf`` names kept whole; ``m`` is fed by ``p`` when
  ``m`` is called once, on one argument, the output of ``p``, which is
  called once and read by ``m`` alone.

:func:`feeds` picks the rule: chains for an ``nn.Sequential`` model, the
traced graph for any other (chains again when tracing fails, with the
reason). A module reachable under several names (one object called from
several places) feeds nothing and is fed by nothing.

Examples
--------
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))
>>> chain_links(model)
[('0', '1.0'), ('1.0', '1.1')]
>>> feeds(model, ["1.0"])["1.0"]
Feed(name='0', reason=None, rule='chain')
>>> batchnorms_after(model, {"0"})
[('1.0', 'BatchNorm1d', '0')]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tnquant.core.modules import find_module, join

__all__ = ["Feed", "BATCHNORMS", "chain_links", "traced_feeds", "feeds", "batchnorms_after"]

#: the BatchNorm classes a layer's output map can absorb (exact types)
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Feed:
    """Where a module's input comes from.

    Attributes
    ----------
    name
        The module whose output is the input and is read by nothing else, or
        ``None``.
    reason
        Why there is no such module (``None`` when ``name`` is set).
    rule
        ``'chain'`` (an ``nn.Sequential``) or ``'fx'`` (the traced graph).
    """

    name: str | None
    reason: str | None
    rule: str


def _chain(seq: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for key, child in seq._modules.items():  # with repeats: a module may sit twice
        if child is None:
            continue
        name = join(prefix, key)
        out += _chain(child, name) if type(child) is nn.Sequential else [(name, child)]
    return out


def _chains(model: nn.Module) -> list[list[str]]:
    """The leaf names of every chain: each exact ``nn.Sequential`` not inside another one."""
    chains = []
    for name, module in model.named_modules():
        parent = find_module(model, name.rpartition(".")[0]) if name else None
        if type(module) is nn.Sequential and type(parent) is not nn.Sequential:
            chains.append([n for n, _ in _chain(module, name)])
    return chains


def chain_links(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, consumer)`` names of the neighbours in every ``nn.Sequential`` chain.

    Only exact ``nn.Sequential`` containers count (a subclass may have its
    own ``forward``); a nested one is part of its parent's chain.

    Examples
    --------
    >>> from torch import nn
    >>> chain_links(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    [('0', '1'), ('1', '2')]
    """
    return [link for leaves in _chains(model) for link in zip(leaves[:-1], leaves[1:], strict=True)]


def _chain_feeds(model: nn.Module, names: Iterable[str], why_not: str) -> dict[str, Feed]:
    chains = _chains(model)
    before = {b: a for leaves in chains for a, b in zip(leaves[:-1], leaves[1:], strict=True)}
    starts = {leaves[0] for leaves in chains if leaves}
    ids = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def count(name: str) -> int:
        return ids[id(find_module(model, name))]

    out: dict[str, Feed] = {}
    for name in names:
        producer = before.get(name)
        if producer is None:
            what = "the first module of its nn.Sequential" if name in starts else why_not
            out[name] = Feed(None, f"it is {what}", "chain")
            continue
        shared = [n for n in (producer, name) if count(n) > 1]
        reason = None
        if shared:
            reason = (
                f"'{shared[0]}' is reachable under {count(shared[0])} names (one module "
                f"called from several places)"
            )
        out[name] = Feed(None if reason else producer, reason, "chain")
    return out


def _describe(node: Any) -> str:
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_function":
        return f"the result of {getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f"the result of .{node.target}()"
    return f"{node.op} {node.target!r}"


def _graph(model: nn.Module, leaf: Callable[[nn.Module], bool] | None) -> Any:
    from torch import fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (leaf is not None and leaf(m)) or super().is_leaf_module(m, qualname)

    return _Tracer().trace(model)


def traced_feeds(
    model: nn.Module, names: Iterable[str], leaf: Callable[[nn.Module], bool] | None = None
) -> dict[str, Feed]:
    """The feed of each name in the ``torch.fx`` graph of ``model`` (see the module doc).

    ``leaf(module)`` says which modules to keep whole (besides ``torch.nn``'s
    own); tracing errors propagate.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
    ...     def forward(self, x):
    ...         y = self.conv(x)
    ...         return self.bn(y) + torch.relu(self.bn(x))
    >>> traced_feeds(Net(), ["bn", "conv"])["bn"].reason
    'it is called 2 times in forward'
    """
    graph = _graph(model, leaf)
    calls: dict[str, list[Any]] = {}
    attrs: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
        elif node.op == "get_attr":
            attrs.append(node.target)
    return {name: _traced_feed(name, calls, attrs) for name in names}


def _traced_feed(name: str, calls: dict[str, list[Any]], attrs: list[str]) -> Feed:
    def no(reason: str) -> Feed:
        return Feed(None, reason, "fx")

    nodes = calls.get(name, [])
    if len(nodes) != 1:
        return no(
            "it is not called in the traced forward"
            if not nodes
            else f"it is called {len(nodes)} times in forward"
        )
    node = nodes[0]
    if len(node.args) != 1 or node.kwargs or not hasattr(node.args[0], "op"):
        return no("its input is not one tensor")
    src = node.args[0]
    if src.op != "call_module":
        return no(f"its input is {_describe(src)}, not the output of a layer")
    producer = str(src.target)
    if len(calls.get(producer, [])) > 1:
        return no(
            f"its input comes from '{producer}', which is called "
            f"{len(calls[producer])} times in forward"
        )
    others = [u.name for u in src.users if u is not node]
    if others:
        return no(f"the output of '{producer}' is also read by {', '.join(others)}")
    for who in (producer, name):
        read = [a for a in attrs if a.startswith(who + ".")]
        if read:
            return no(f"forward reads {read[0]!r} directly")
    return Feed(producer, None, "fx")


def feeds(
    model: nn.Module, names: Collection[str], leaf: Callable[[nn.Module], bool] | None = None
) -> dict[str, Feed]:
    """The feed of each name: chains for an ``nn.Sequential`` model, else the traced graph.

    When ``torch.fx`` cannot trace the model, the chains answer; a name
    outside every chain then says why the graph did not.

    Examples
    --------
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.bn = nn.Linear(2, 2), nn.BatchNorm1d(2)
    ...     def forward(self, x):
    ...         return self.bn(self.fc(x))
    >>> feeds(Net(), ["bn"])
    {'bn': Feed(name='fc', reason=None, rule='fx')}
    """
    if type(model) is nn.Sequential:
        return _chain_feeds(model, names, "not inside an nn.Sequential")
    try:
        return traced_feeds(model, names, leaf)
    except Exception as err:  # torch.fx raises many kinds; any means "no graph"
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        why = (
            f"not after a layer in an nn.Sequential, and torch.fx could not trace the "
            f"model ({type(err).__name__}: {text[:120]})"
        )
        return _chain_feeds(model, names, why)


def batchnorms_after(model: nn.Module, names: Collection[str]) -> list[tuple[str, str, str]]:
    """``(name, class name, producer)`` of each BatchNorm1d/2d that follows one of ``names``.

    The chain rule only (:func:`chain_links`): cheap enough for every
    ``quantize`` call.

    Examples
    --------
    >>> from torch import nn
    >>> batchnorms_after(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), {"0"})
    [('1', 'BatchNorm2d', '0')]
    """
    out = []
    for producer, consumer in chain_links(model):
        module = find_module(model, consumer)
        if producer in names and type(module) in BATCHNORMS:
            out.append((consumer, type(module).__name__, producer))
    return out
