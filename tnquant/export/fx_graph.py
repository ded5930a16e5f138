"""Graphs, not only chains: a model traced with ``torch.fx`` into the export's ops.

:func:`tnquant.export.graph.build_graph` walks an ``nn.Sequential`` as a
chain; any other model (a residual block, a concatenation, a forward with
``torch.flatten``) is traced here, the way hls4ml's PyTorch front end traces
it. Every module the registry routes (``QuantLinear``, ``TuckerConv2d``,
``nn.ReLU``, ...) and every childless module is a leaf; container modules are
traced through. Each node becomes:

==================================================  =========================================
node                                                ops
==================================================  =========================================
a leaf module                                       its registry route's ops (as in a chain)
``x + y``, ``torch.add(x, y)``                      ``'add'`` (:mod:`tnquant.export.merge_ops`)
``torch.cat((x, y), dim=1)``                        ``'concat'`` of flat features
``torch.relu``, ``F.relu``, ``torch.sigmoid``,      the op of ``nn.ReLU``, ``nn.Sigmoid``,
``torch.tanh``, ``x.relu()``                        ``nn.Tanh``
``torch.flatten(x, 1)``, ``x.flatten(1)``,          none (the export's tensors are flat,
``x.view(x.size(0), -1)``, ``x.reshape(n, -1)``     channels first)
==================================================  =========================================

An op reads the op its node reads (``Op.inputs`` names it when it is not the
op just before). A function, method or module with no route is refused with
its qualified name (the module it is called in and the ``fx`` node).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import FixedPoint, quantize
>>> from tnquant.export.graph import build_graph
>>> class Res(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc = nn.Linear(4, 4)
...     def forward(self, x):
...         return torch.relu(self.fc(x)) + x
>>> model = Res()
>>> _ = quantize(model, weights=FixedPoint(6, 2), progress=False)
>>> [(op.name, op.kind, op.inputs) for op in build_graph(model, FixedPoint(8, 3))]
[('fc', 'dense', ()), ('relu', 'relu', ()), ('add', 'add', ('relu', '@input'))]
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from tnquant.export.ir import INPUT, KEEPS_MAP, Op, TypeOverride, label
from tnquant.export.merge_ops import merge_op
from tnquant.registry import export_route

__all__ = ["trace_ops", "needs_trace"]

ModuleOps = Callable[[str, nn.Module, dict[str, Any], dict[str, TypeOverride], list[Op]], list[Op]]

_ADDS = {operator.add, torch.add, operator.iadd}
_CATS = {torch.cat, torch.concat}
_FLATTENS = {torch.flatten}
#: functions (and tensor methods, by name) that take the op of a module of no parameters
_FUNCTIONS: dict[Any, Callable[[], nn.Module]] = {
    torch.relu: nn.ReLU,
    F.relu: nn.ReLU,
    torch.sigmoid: nn.Sigmoid,
    F.sigmoid: nn.Sigmoid,
    torch.tanh: nn.Tanh,
    F.tanh: nn.Tanh,
}
_METHODS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
_SUPPORTED = (
    "x + y, torch.add, torch.cat(dim=1), torch.relu/sigmoid/tanh (and F.*), torch.flatten(x, 1), "
    "x.view/reshape(batch, -1), and the modules of a chain"
)


class _Tracer(fx.Tracer):
    """Leaves: every module the registry routes, and every module without children."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Sequential):
            return False
        return export_route(m) is not None or not any(True for _ in m.children())


def needs_trace(model: nn.Module, leaves: list[tuple[str, nn.Module]]) -> bool:
    """Whether ``model`` is more than a chain: a leaf of the chain walk that no route takes."""
    return any(export_route(m) is None and any(True for _ in m.children()) for _, m in leaves)


def _where(node: fx.Node) -> str:
    """The qualified name of the module whose forward made ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return str(path) if isinstance(path, str) else ""


def _qualified(node: fx.Node) -> str:
    where = _where(node)
    return f"{where}.{node.name}" if where else node.name


def _what(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    mod = getattr(target, "__module__", None) or ""
    return f"function {mod + '.' if mod else ''}{getattr(target, '__name__', str(target))}"


def _refuse(node: fx.Node, why: str = "") -> ValueError:
    where = label(_where(node))
    return ValueError(
        f"{where}: {_what(node)} (fx node {node.name!r}) has no fixed-point export"
        f"{'; ' + why if why else ''}; supported: {_SUPPORTED}"
    )


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, ... on dynamic forwards
        raise ValueError(
            f"{label('')}: {type(model).__name__} is not an nn.Sequential and torch.fx cannot "
            f"trace its forward ({type(err).__name__}: {err}); the export takes a chain or an "
            f"fx-traceable graph"
        ) from None
    return fx.GraphModule(tracer.root, graph)


def _dim(node: fx.Node) -> Any:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _is_flatten(node: fx.Node) -> bool:
    """``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(n, -1)`` / ``x.reshape(n, -1)``."""
    if (
        node.op == "call_function"
        and node.target in _FLATTENS
        or (node.op == "call_method" and node.target == "flatten")
    ):
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        return bool(start == 1 and end == -1)
    if node.op == "call_method" and node.target in ("view", "reshape"):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return bool(len(dims) == 2 and dims[1] == -1)
    return False


class _Walk:
    """The state of one trace: ops so far, and what every tensor node holds."""

    def __init__(self, module_ops: ModuleOps, overrides: dict[str, TypeOverride], state: dict):
        self.module_ops = module_ops
        self.overrides = overrides
        self.ops: list[Op] = []
        self.index: dict[str, int] = {}
        #: node -> the chain state after it (``'op'``: the op whose result it holds)
        self.held: dict[fx.Node, dict[str, Any]] = {}
        self.start = dict(state, op=INPUT)

    def tensor(self, node: fx.Node, arg: Any) -> dict[str, Any]:
        if not isinstance(arg, fx.Node) or self.held.get(arg, {}).get("op") is None:
            raise _refuse(node, f"it reads {arg!r}, not a tensor the export computes")
        return self.held[arg]

    def _path(self, src: dict[str, Any]) -> list[Op]:
        """The ops up to the one ``src`` holds (the chain a route sees as ``done``)."""
        return [] if src["op"] == INPUT else self.ops[: self.index[src["op"]] + 1]

    def emit(
        self, name: str, module: nn.Module, src: dict[str, Any], readers: int = 1
    ) -> dict[str, Any]:
        state = {k: v for k, v in src.items() if k != "op"}
        done = self._path(src)
        before = done[-1].result_type if done else None
        new = self.module_ops(name, module, state, self.overrides, done)
        if done and done[-1].result_type != before and readers > 1:
            raise ValueError(
                f"{label(name)}: its 'input' quantizer casts the result of op {done[-1].name!r} "
                f"to {done[-1].result_type}, but {readers - 1} other op(s) read that result "
                f"uncast; the export casts where a tensor is written: quantize a tensor that "
                f"several ops read at the op that writes it (its 'output' quantizer or "
                f"result=), or drop the quantizer"
            )
        if src["op"] == INPUT and src["type"] is None:  # an 'input' quantizer set the input type
            src.update(type=state["type"], explicit=state["explicit"])
        route = export_route(module)
        if not new:
            out = dict(src, **state)
            if route == "flatten":
                out.update(shape=None, flat=True)
            return out
        last = self.ops[-1].name if self.ops else INPUT
        if src["op"] != last:
            new[0].inputs = (src["op"],)
        for op in new:
            if op.name in self.index:
                raise ValueError(
                    f"{label(name)}: is called twice in the forward (op {op.name!r}); the "
                    f"export gives every call its own layer: use one module per call"
                )
            self.index[op.name] = len(self.ops)
            self.ops.append(op)
        out = dict(state, op=new[-1].name)
        if route == "flatten" or any(op.kind not in KEEPS_MAP for op in new):
            out.update(shape=None, flat=True)
        return out

    def merge(self, node: fx.Node, kind: str, args: list[Any]) -> dict[str, Any]:
        srcs = [self.tensor(node, a) for a in args]
        if any(s["type"] is None for s in srcs):
            raise ValueError(
                "input_spec is needed (a FixedPoint for the model input), e.g. "
                "input_spec=FixedPoint(16, 6)"
            )
        ins = []
        for s in srcs:
            op = self.ops[self.index[s["op"]]] if s["op"] != INPUT else None
            size = op.out_features if op is not None else self._input_size(node, s)
            ins.append((s["op"], s["type"], size, tuple(s["shape"] or ())))
        name = _qualified(node)
        if name in self.index:
            raise ValueError(f"{name}: two ops of one name")
        op = merge_op(name, kind, ins, self.overrides)
        self.index[name] = len(self.ops)
        self.ops.append(op)
        return dict(srcs[0], op=name, type=op.result_type, explicit=False, prev=name)

    def _input_size(self, node: fx.Node, src: dict[str, Any]) -> int:
        size = src.get("size")
        first = self.ops[0] if self.ops else None
        if not size and first is not None and first.in_features:
            size = first.in_features  # the first op reads the model input (an elementwise
            # op's size is only known from the layer before it: 0 here)
        if not size:
            raise _refuse(node, "it reads the model input, whose size needs input_shape=")
        return int(size)


def trace_ops(
    model: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    module_ops: ModuleOps,
    input_size: int | None,
) -> list[Op]:
    """The ops of ``model`` traced with ``torch.fx`` (see the module docs).

    ``state`` is the chain state at the model input (its type, shape, ...);
    ``module_ops(name, module, state, overrides, done)`` builds the ops of a
    leaf module as the chain walk does; ``input_size`` is the model input's
    feature count when known (``input_shape=``).
    """
    gm = _trace(model)
    walk = _Walk(module_ops, overrides, state)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(
            f"{label('')}: the forward takes {len(placeholders)} inputs "
            f"({[n.name for n in placeholders]}); the export takes a model of one input"
        )
    out_node: fx.Node | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            walk.held[node] = dict(walk.start, size=input_size)
        elif node.op == "call_module":
            target = str(node.target)
            module = gm.get_submodule(target)
            if len([a for a in node.args if isinstance(a, fx.Node)]) != 1 or node.kwargs:
                raise ValueError(f"{label(target)}: is called with {len(node.args)} tensors; "
                                 f"the export takes a module of one input")  # fmt: skip
            arg = node.args[0]
            readers = len(arg.users) if isinstance(arg, fx.Node) else 1
            walk.held[node] = walk.emit(target, module, walk.tensor(node, arg), readers)
        elif node.op in ("call_function", "call_method"):
            walk.held[node] = _call(walk, node)
        elif node.op == "output":
            out_node = node
        else:  # get_attr: a tensor constant
            raise _refuse(node, "a constant tensor of the model")
    if out_node is None or not isinstance(out_node.args[0], fx.Node):
        raise ValueError(f"{label('')}: the forward must return one tensor")
    held = walk.held.get(out_node.args[0])
    if held is None or not walk.ops or held["op"] != walk.ops[-1].name:
        raise ValueError(
            f"{label('')}: the forward returns {out_node.args[0].name!r}, not the last op "
            f"it computes; the export's output is its last op"
        )
    return walk.ops


def _call(walk: _Walk, node: fx.Node) -> dict[str, Any]:
    """The ops of a ``call_function`` / ``call_method`` node (see the module docs)."""
    target = node.target
    method = node.op == "call_method"
    if method and target == "size":
        walk.tensor(node, node.args[0])
        return {"op": None, "size_of": node.args[0]}  # only read by view / reshape
    if _is_flatten(node):
        src = walk.tensor(node, node.args[0])
        return dict(src, shape=None, flat=True)
    if (method and target == "add") or (not method and target in _ADDS):
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
            raise _refuse(node, "an add of two tensors, without alpha")
        return walk.merge(node, "add", list(node.args))
    if not method and target in _CATS:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(parts, (tuple, list)) or _dim(node) not in (1, -1):
            raise _refuse(node, "a torch.cat of two (batch, features) tensors along dim=1")
        return walk.merge(node, "concat", list(parts))
    make = _METHODS.get(str(target)) if method else _FUNCTIONS.get(target)
    if make is not None and len(node.args) == 1 and not node.kwargs:
        return walk.emit(_qualified(node), make(), walk.tensor(node, node.args[0]))
    raise _refuse(node)
