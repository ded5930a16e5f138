"""Op builders of 1-D convolutions and pooling on ``(C, L)`` maps (``conv1d``, pools).

=================== ====================  ==============================================
route               modules               ops
=================== ====================  ==============================================
``'conv1d'``        ``QuantConv1d``       ``conv1d``: hls4ml's ``Conv1D`` (im2col in
                    (``groups=1``, zero   ``(k, c)`` order, every product cast to the
                    padding)              accumulator), weights ``(O, C, 1, k)``
``'tucker_conv1d'`` ``TuckerConv1d``      three ``conv1d``: ``U_in^T`` (size 1), the
                                          core ``G`` (stride, padding, dilation), ``U_out``
                                          + bias (``'<layer>.0'``..``'.2'``)
``'maxpool1d'``     ``nn.MaxPool1d``      ``maxpool1d``: exact, the input type kept
``'avgpool1d'``     ``nn.AvgPool1d``      ``avgpool1d``: the exact mean (a power-of-two
                                          size), as ``avgpool2d``
``'global_avgpool1d'`` ``nn.Adaptive-     ``avgpool1d`` over the whole length ``L``
                    AvgPool1d(1)``        (a power of two)
=================== ====================  ==============================================

A ``(C, L)`` map is carried as the ``(C, 1, L)`` map of the 2-D ops, its
windows as ``(1, k)`` windows (stride ``(1, s)``, padding ``(0, p)``, dilation
``(1, d)``): hls4ml's 1-D kernels (``nnet_conv1d_latency.h``,
``nnet_pooling.h``) compute what the 2-D ones do on such maps, so the
emulator (:mod:`tnquant.export.conv_ops`) and the types (:mod:`tnquant.export.conv_routes`)
are shared; ``input_shape=(C, L)`` starts such a network.

Examples
--------
>>> sorted(CONV1D_ROUTES)
['avgpool1d', 'conv1d', 'global_avgpool1d', 'maxpool1d', 'tucker_conv1d']
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn

from tnquant.export.codes import fixed_codes
from tnquant.export.conv_routes import ONE_BY_ONE, conv_op, pool_op, spatial_shape
from tnquant.export.ir import Op, TypeOverride, label
from tnquant.export.routes import Route

__all__ = ["CONV1D_ROUTES"]


def _single(value: Any, what: str, name: str) -> int:
    v = (value,) if isinstance(value, int) else tuple(value)
    if len(v) != 1 or not isinstance(v[0], int) or isinstance(v[0], bool):
        raise ValueError(f"{label(name)}: {what} must be an int or a 1-tuple, got {value!r}")
    return int(v[0])


def _conv1d_params(name: str, conv: Any) -> dict[str, tuple[int, ...]]:
    """A Conv1d's window as the ``(1, k)`` window of a ``(C, 1, L)`` map."""
    if int(getattr(conv, "groups", 1)) != 1:
        raise ValueError(
            f"{label(name)}: a grouped Conv1d (groups={conv.groups}) has no fixed-point "
            f"export; only groups=1"
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{label(name)}: padding_mode={conv.padding_mode!r} has no fixed-point export; "
            f"only zero padding (padding_mode='zeros')"
        )
    padding: Any = 0 if conv.padding == "valid" else conv.padding
    if isinstance(padding, str):
        raise ValueError(
            f"{label(name)}: padding={padding!r} has no fixed-point export; give the "
            f"padding as an int (e.g. padding=1 for a size-3 'same')"
        )
    return {
        "kernel": (1, _single(conv.kernel_size, "kernel_size", name)),
        "stride": (1, _single(conv.stride, "stride", name)),
        "padding": (0, _single(padding, "padding", name)),
        "dilation": (1, _single(conv.dilation, "dilation", name)),
    }


def _map_1d(name: str, state: dict[str, Any], what: str) -> None:
    """Refuse a layer that reads no ``(C, L)`` map, saying what to pass."""
    if state.get("shape") is None and not state.get("flat"):
        raise ValueError(
            f"{label(name)}: a {what} needs the input's (C, L): pass input_shape=(C, L) "
            f"(e.g. input_shape=(2, 16))"
        )
    shape = spatial_shape(name, state, what)
    if shape[1] != 1:
        raise ValueError(
            f"{label(name)}: a {what} reads a (C, L) map, but a (C, H, W) = {shape} map "
            f"reaches it; pass input_shape=(C, L)"
        )


def conv1d_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """The ``conv1d`` op of a ``QuantConv1d`` (hls4ml's ``Conv1D``; weights ``(O, C, 1, k)``)."""
    conv = cast(Any, module)
    params = _conv1d_params(name, conv)
    _map_1d(name, state, "Conv1d")
    q = module._modules.get("weight_quantizer")
    q = None if isinstance(q, nn.Identity) else q
    notes: list[str] = []
    m, wtype, exps = fixed_codes(
        q, cast(Tensor, conv.weight), f"{name}.weight", op=name, notes=notes
    )
    m = m.reshape(m.shape[0], m.shape[1], 1, m.shape[2])
    bias = cast("Tensor | None", module._parameters.get("bias"))
    out = conv.out_channels
    codes = (m, wtype, exps)
    return [
        conv_op(name, name, module, "output", codes, notes, params, out, bias, state,
                 overrides, "conv1d")
    ]  # fmt: skip


def tucker_conv1d_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """A ``TuckerConv1d`` as three ``conv1d`` ops, as its forward: ``1`` ``U_in^T``
    (``inter_0``), the size-``k`` core ``G`` (the layer's stride, padding, dilation;
    ``inter_1``), ``1`` ``U_out`` with the bias; ``'<layer>.0'``..``'.2'``."""
    layer = cast(Any, module)
    params = _conv1d_params(name, layer)
    _map_1d(name, state, "Conv1d")
    u_out, g, u_in = layer.cores
    qs = module._modules.get("core_quantizers")
    quantizers = list(cast(nn.ModuleList, qs)) if qs is not None else [None] * 3
    ops = []
    plan = ((u_in, 2, True, ONE_BY_ONE, "inter_0"), (g, 1, False, params, "inter_1"),
            (u_out, 0, False, ONE_BY_ONE, "output"))  # fmt: skip
    for step, (core, k, transposed, p, site) in enumerate(plan):
        q = quantizers[k]
        q = None if isinstance(q, nn.Identity) else q
        notes: list[str] = []
        m, wtype, exps = fixed_codes(q, core, f"{name}.cores.{k}", op=f"{name}.{step}", notes=notes)
        m = m.T.copy() if transposed else m
        m = m.reshape(m.shape[0], m.shape[1], 1, m.shape[2] if m.ndim == 3 else 1).copy()
        bias = cast("Tensor | None", module._parameters.get("bias")) if step == 2 else None
        codes = (m, wtype, exps)
        ops.append(
            conv_op(name, f"{name}.{step}", module, site, codes, notes, p, m.shape[0], bias,
                     state, overrides, "conv1d")
        )  # fmt: skip
    return ops


def _pool1d_params(name: str, module: nn.Module, cls: str) -> dict[str, tuple[int, ...]]:
    pool = cast(Any, module)
    kernel = _single(pool.kernel_size, "kernel_size", name)
    stride = kernel if pool.stride is None else _single(pool.stride, "stride", name)
    if _single(pool.padding, "padding", name) != 0 or pool.ceil_mode:
        raise ValueError(
            f"{label(name)}: {cls} with padding or ceil_mode=True has no fixed-point export; "
            f"only padding=0"
        )
    if cls == "MaxPool1d" and (
        _single(pool.dilation, "dilation", name) != 1 or pool.return_indices
    ):
        raise ValueError(
            f"{label(name)}: MaxPool1d with dilation or return_indices has no fixed-point export"
        )
    return {"kernel": (1, kernel), "stride": (1, stride), "padding": (0, 0), "dilation": (1, 1)}


def _pool1d_ops(kind: str, cls: str) -> Route:
    def ops(
        name: str,
        module: nn.Module,
        state: dict[str, Any],
        overrides: dict[str, TypeOverride],
        done: list[Op],
    ) -> list[Op]:
        _map_1d(name, state, cls)
        return pool_op(kind, name, _pool1d_params(name, module, cls), state)

    return ops


def _global1d_ops(
    name: str,
    module: nn.Module,
    state: dict[str, Any],
    overrides: dict[str, TypeOverride],
    done: list[Op],
) -> list[Op]:
    """``nn.AdaptiveAvgPool1d(1)``: the ``avgpool1d`` op of one size-``L`` window."""
    size = cast(Any, module).output_size
    if size not in (1, (1,)):
        raise ValueError(
            f"{label(name)}: AdaptiveAvgPool1d(output_size={size!r}) has no fixed-point "
            f"export; only output_size=1 (global average pooling)"
        )
    _map_1d(name, state, "AdaptiveAvgPool1d")
    length = spatial_shape(name, state, "AdaptiveAvgPool1d")[2]
    params: dict[str, tuple[int, ...]] = {
        "kernel": (1, length),
        "stride": (1, length),
        "padding": (0, 0),
        "dilation": (1, 1),
    }
    return pool_op("avgpool1d", name, params, state)


#: export route name -> (takes an 'input' type, its ops), as :data:`~tnquant.export.routes.ROUTES`
CONV1D_ROUTES: dict[str, tuple[bool, Route]] = {
    "conv1d": (True, conv1d_ops),
    "tucker_conv1d": (True, tucker_conv1d_ops),
    "maxpool1d": (False, _pool1d_ops("maxpool1d", "MaxPool1d")),
    "avgpool1d": (False, _pool1d_ops("avgpool1d", "AvgPool1d")),
    "global_avgpool1d": (False, _global1d_ops),
}
