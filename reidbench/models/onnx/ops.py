"""The operator table: ONNX semantics in torch arithmetic, so everything stays differentiable.

Each operator takes the node's inputs (None for an omitted optional input) and its attributes
and returns its outputs. The converter adds private attributes to every node: ``_op`` (its
type), ``_opset`` (the graph's default-domain opset, for operators whose meaning changed
between opsets) and ``_outputs`` (how many outputs the node declares).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...errors import ReIDBenchError
from .args import axes_of, ints, optional, scalar
from .resize import resize


def _pads(x: torch.Tensor, a: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> tuple[list, list]:
    """Begin and end padding per spatial axis, from ``pads`` or ``auto_pad``."""
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else large)
            end.append(large if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(a.get("pads", [0] * 2 * nd))
    return pads[:nd], pads[nd:]


def _torch_pad_order(begin: list[int], end: list[int]) -> list[int]:
    """ONNX lists pads first axis first; ``F.pad`` wants the last axis first."""
    order = []
    for b, e in zip(reversed(begin), reversed(end)):
        order += [b, e]
    return order


def _window(a: dict, nd: int) -> tuple[list, list, list]:
    kernel = list(a["kernel_shape"])
    return kernel, list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))


def _conv(i, a):
    x, w, bias = i[0], i[1], optional(i, 2)
    nd = w.dim() - 2
    kernel, strides, dilations = list(w.shape[2:]), list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    begin, end = _pads(x, a, kernel, strides, dilations)
    padding: Any = begin
    if begin != end:
        x, padding = F.pad(x, _torch_pad_order(begin, end)), 0
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return [conv(x, w, bias, strides, padding, dilations, int(a.get("group", 1)))]


def _max_pool(i, a):
    x = i[0]
    nd = x.dim() - 2
    kernel, strides, dilations = _window(a, nd)
    begin, end = _pads(x, a, kernel, strides, dilations)
    if any(begin + end):
        x = F.pad(x, _torch_pad_order(begin, end), value=-math.inf)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return [pool(x, kernel, strides, 0, dilations, ceil_mode=bool(a.get("ceil_mode", 0)))]


def _average_pool(i, a):
    x = i[0]
    nd = x.dim() - 2
    kernel, strides, dilations = _window(a, nd)
    if any(d != 1 for d in dilations):
        raise ReIDBenchError("AveragePool with dilations is not supported")
    begin, end = _pads(x, a, kernel, strides, dilations)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    ceil = bool(a.get("ceil_mode", 0))
    order = _torch_pad_order(begin, end)
    summed = pool(F.pad(x, order), kernel, strides, 0, ceil_mode=ceil)
    if a.get("count_include_pad", 0) or not any(order):
        return [summed]
    # Exclude padded cells from each window's count: divide by the pooled share of real cells.
    real = pool(F.pad(torch.ones_like(x[:1, :1]), order), kernel, strides, 0, ceil_mode=ceil)
    return [summed / real]


def _reduce(fn: Callable, axes_input_from: int = 18) -> Callable:
    """ReduceX: ``axes`` is an input from opset ``axes_input_from`` (13 for ReduceSum), an
    attribute before; no axes means all of them unless ``noop_with_empty_axes``."""
    def run(i, a):
        x = i[0]
        axes = axes_of(i, a, 1)
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, [ax % x.dim() for ax in axes], bool(a.get("keepdims", 1)))]
    return run


def _mean_variance_normalization(i, a):
    """(x - mean) / (std + 1e-9) over ``axes`` (default N, H, W), as the ONNX function body."""
    x = i[0]
    axes = [ax % x.dim() for ax in a.get("axes", [0, 2, 3])]
    var, mean = torch.var_mean(x, dim=axes, unbiased=False, keepdim=True)
    return [(x - mean) / (var.sqrt() + 1e-9)]


def _layer_normalization(i, a):
    x, scale, bias = i[0], i[1], optional(i, 2)
    axis = int(a.get("axis", -1)) % x.dim()
    shape, eps = tuple(x.shape[axis:]), float(a.get("epsilon", 1e-5))
    exact = tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape)
    if exact:
        y = F.layer_norm(x, shape, scale, bias, eps)
    else:  # Scale and B may be anything that broadcasts to the normalized shape
        y = F.layer_norm(x, shape, None, None, eps) * scale
        y = y if bias is None else y + bias
    if a["_outputs"] == 1:
        return [y]
    axes = list(range(axis, x.dim()))
    var, mean = torch.var_mean(x, dim=axes, unbiased=False, keepdim=True)
    return [y, mean, torch.rsqrt(var + eps)]


def _reshape(i, a):
    x, shape = i[0], ints(i[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(i, a):
    x = i[0]
    axis = int(a.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


def _unsqueeze(i, a):
    x = i[0]
    axes = axes_of(i, a, 1)
    rank = x.dim() + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(axis)
    return [x]


def _squeeze(i, a):
    x = i[0]
    if "_kept_batch_axes" in a:  # a batch-1 graph's Squeeze, rewritten not to drop the batch
        axes = a["_kept_batch_axes"]
        if not axes:
            return [x]
    else:
        axes = axes_of(i, a, 1)
    if not axes:
        return [x.squeeze()]
    for axis in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


def _gather(i, a):
    x, index = i[0], i[1].to(device=i[0].device, dtype=torch.long)
    axis = int(a.get("axis", 0)) % x.dim()
    index = torch.where(index < 0, index + x.shape[axis], index)
    picked = torch.index_select(x, axis, index.flatten())
    return [picked.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1:]))]


def _slice(i, a):
    x = i[0]
    if len(i) > 1:  # opset >= 10: starts, ends, axes, steps are inputs
        starts, ends = ints(i[1]), ints(i[2])
        axes = ints(i[3]) if optional(i, 3) is not None else list(range(len(starts)))
        steps = ints(i[4]) if optional(i, 4) is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        begin, stop, stride = slice(start, end, step).indices(x.shape[axis])
        if stride > 0:
            index[axis] = slice(begin, stop, stride)
        else:  # torch has no negative strides: take the same cells forwards, then flip
            count = len(range(begin, stop, stride))
            last = begin + (count - 1) * stride if count else 0
            index[axis] = slice(last, last + (count - 1) * -stride + 1 if count else 0, -stride)
            flips.append(axis)
    x = x[tuple(index)]
    return [x.flip(flips) if flips else x]


def _concat(i, a):
    tensors = [t for t in i if t is not None]
    if a.get("_broadcast_batch"):  # a batch-1 graph's constant (a class token) joins batched tensors
        batch = max(t.shape[0] for t in tensors)
        tensors = [t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t for t in tensors]
    return [torch.cat(tensors, dim=int(a["axis"]))]


def _split(i, a):
    x = i[0]
    axis = int(a.get("axis", 0)) % x.dim()
    sizes = ints(optional(i, 1)) or list(a.get("split", []))
    if not sizes:
        parts = int(a["_outputs"])
        chunk = -(-x.shape[axis] // parts)  # opset 18: the last part may be smaller
        sizes = [min(chunk, x.shape[axis] - k * chunk) for k in range(parts)]
    return list(torch.split(x, sizes, dim=axis))


def _pad(i, a):
    x = i[0]
    mode = a.get("mode", "constant")
    pads = ints(i[1]) if len(i) > 1 else list(a.get("pads", a.get("paddings", [])))
    value = scalar(optional(i, 2), float(a.get("value", 0.0)))
    axes = ints(i[3]) if optional(i, 3) is not None else list(range(x.dim()))
    n = len(axes)
    begin, end = [0] * x.dim(), [0] * x.dim()
    for k, axis in enumerate(axes):
        begin[axis % x.dim()], end[axis % x.dim()] = pads[k], pads[n + k]
    # F.pad pads trailing axes; drop the untouched leading ones so reflect/edge modes accept it.
    first = next((k for k in range(x.dim()) if begin[k] or end[k]), x.dim())
    order = _torch_pad_order(begin[first:], end[first:])
    if not order:
        return [x]
    if mode == "constant":
        return [F.pad(x, order, value=value)]
    if mode not in ("reflect", "edge", "wrap"):
        raise ReIDBenchError(f"Pad mode '{mode}' is not supported")
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    # torch's non-constant modes pad the last 1-3 axes of a batched tensor: give them one.
    extra = max(0, 2 + len(order) // 2 - x.dim())
    y = x.reshape((1,) * extra + tuple(x.shape)) if extra else x
    y = F.pad(y, order, mode=torch_mode)
    return [y.reshape(y.shape[extra:]) if extra else y]


def _gemm(i, a):
    x, w, c = i[0], i[1], optional(i, 2)
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = float(a.get("alpha", 1.0)) * (x @ w)
    if c is not None:
        y = y + float(a.get("beta", 1.0)) * c
    return [y]


def _div(i, a):
    x, y = i
    if not x.is_floating_point() and not y.is_floating_point():
        return [torch.div(x, y, rounding_mode="trunc")]
    return [x / y]


def _clip(i, a):
    x, low, high = i[0], optional(i, 1), optional(i, 2)
    if low is None and high is None and len(i) == 1:  # opset < 11: bounds are attributes
        low, high = a.get("min"), a.get("max")
        return [torch.clamp(x, low, high)]
    low = None if low is None else (low.to(x.device) if low.dim() else float(low))
    high = None if high is None else (high.to(x.device) if high.dim() else float(high))
    return [torch.clamp(x, low, high)]


def _shape(i, a):
    shape = list(i[0].shape)
    return [torch.tensor(shape[a.get("start", 0):a.get("end", len(shape))], dtype=torch.long)]


def _constant(i, a):
    for key, value in a.items():
        if key == "value":
            return [value]
        if key.startswith("value_"):
            return [torch.tensor(value, dtype=torch.long if key in ("value_int", "value_ints") else torch.float32)]
    raise ReIDBenchError("Constant node without a value")


def _constant_of_shape(i, a):
    value = a.get("value", torch.zeros(1))
    return [torch.full(ints(i[0]), value.flatten()[0].item(), dtype=value.dtype)]


_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "int64": torch.long,
                 "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


def _cast(i, a):
    from onnx import helper

    name = helper.tensor_dtype_to_np_dtype(a["to"]).name
    if name not in _TORCH_DTYPES:
        raise ReIDBenchError(f"Cast to {name} is not supported")
    return [i[0].to(_TORCH_DTYPES[name])]


def _softmax(fn: Callable) -> Callable:
    """Before opset 13, Softmax and LogSoftmax flatten the input to 2-D at ``axis`` (default 1)."""
    def run(i, a):
        x = i[0]
        if a["_opset"] >= 13:
            return [fn(x, int(a.get("axis", -1)))]
        axis = int(a.get("axis", 1)) % max(x.dim(), 1)
        return [fn(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)]
    return run


def _variadic(fn: Callable) -> Callable:
    def run(i, a):
        out = i[0]
        for other in i[1:]:
            out = fn(out, other)
        return [out]
    return run


def _mean(i, a):
    return [_variadic(torch.add)(i, a)[0] / len(i)]


def _where(i, a):
    condition = i[0].to(device=i[1].device if i[1].is_floating_point() else i[2].device)
    return [torch.where(condition, i[1], i[2])]


def _tile(i, a):
    return [i[0].repeat(ints(i[1]))]


def _expand(i, a):
    x, shape = i[0], ints(i[1])
    return [x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))]


def _range(i, a):
    start, limit, delta = (v.item() for v in i)
    return [torch.arange(start, limit, delta, dtype=i[0].dtype)]


def _arg(fn: Callable) -> Callable:
    def run(i, a):
        x = i[0]
        axis, keep = int(a.get("axis", 0)), bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return [x.shape[axis] - 1 - flipped]
        return [fn(x, dim=axis, keepdim=keep)]
    return run


def _gelu(i, a):
    return [F.gelu(i[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")]


def _depth_to_space(i, a):
    x, block = i[0], int(a["blocksize"])
    if a.get("mode", "DCR") == "CRD":
        return [F.pixel_shuffle(x, block)]
    n, c, h, w = x.shape
    y = x.reshape(n, block, block, c // block ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
    return [y.reshape(n, c // block ** 2, h * block, w * block)]


def _space_to_depth(i, a):
    x, block = i[0], int(a["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * block ** 2, h // block, w // block)]


def _prod(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    for axis in sorted(axes, reverse=True):
        x = x.prod(dim=axis, keepdim=keep)
    return x


def _einsum(i, a):
    return [torch.einsum(a["equation"], *i)]


def _unary(fn: Callable) -> Callable:
    return lambda i, a: [fn(i[0])]


def _binary(fn: Callable) -> Callable:
    return lambda i, a: [fn(i[0], i[1])]


OPERATORS: dict[str, Callable] = {
    "Conv": _conv,
    "BatchNormalization": lambda i, a: [F.batch_norm(i[0], i[3], i[4], i[1], i[2], False, 0.0, float(a.get("epsilon", 1e-5)))],
    "InstanceNormalization": lambda i, a: [F.instance_norm(i[0], weight=i[1], bias=i[2], eps=float(a.get("epsilon", 1e-5)))],
    "MeanVarianceNormalization": _mean_variance_normalization,
    "LayerNormalization": _layer_normalization,
    "LpNormalization": lambda i, a: [F.normalize(i[0], p=float(a.get("p", 2)), dim=int(a.get("axis", -1)))],
    "Relu": _unary(F.relu),
    "LeakyRelu": lambda i, a: [F.leaky_relu(i[0], float(a.get("alpha", 0.01)))],
    "PRelu": lambda i, a: [torch.where(i[0] >= 0, i[0], i[0] * i[1])],
    "Elu": lambda i, a: [F.elu(i[0], float(a.get("alpha", 1.0)))],
    "Selu": lambda i, a: [float(a.get("gamma", 1.0507009873554805)) * torch.where(
        i[0] > 0, i[0], float(a.get("alpha", 1.6732632423543772)) * torch.expm1(i[0]))],
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSigmoid": lambda i, a: [torch.clamp(float(a.get("alpha", 0.2)) * i[0] + float(a.get("beta", 0.5)), 0, 1)],
    "HardSwish": _unary(F.hardswish),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "Erf": _unary(torch.erf),
    "Gelu": _gelu,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Clip": _clip,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": lambda i, a: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a: [i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Reciprocal": _unary(torch.reciprocal),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "Not": _unary(torch.logical_not),
    "Where": _where,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Einsum": _einsum,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Expand": _expand,
    "Tile": _tile,
    "Transpose": lambda i, a: [i[0].permute(*(a.get("perm") or reversed(range(i[0].dim()))))],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Gather": _gather,
    "Slice": _slice,
    "Shape": _shape,
    "Range": _range,
    "Pad": _pad,
    "Cast": _cast,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Resize": resize,
    "Upsample": resize,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "ReduceMean": _reduce(lambda x, axes, keep: x.mean(dim=axes, keepdim=keep)),
    "ReduceSum": _reduce(lambda x, axes, keep: x.sum(dim=axes, keepdim=keep)),
    "ReduceMax": _reduce(lambda x, axes, keep: x.amax(dim=axes, keepdim=keep)),
    "ReduceMin": _reduce(lambda x, axes, keep: x.amin(dim=axes, keepdim=keep)),
    "ReduceProd": _reduce(lambda x, axes, keep: _prod(x, axes, keep)),
    "ReduceL1": _reduce(lambda x, axes, keep: x.abs().sum(dim=axes, keepdim=keep)),
    "ReduceL2": _reduce(lambda x, axes, keep: x.pow(2).sum(dim=axes, keepdim=keep).sqrt()),
    "ReduceSumSquare": _reduce(lambda x, axes, keep: x.pow(2).sum(dim=axes, keepdim=keep)),
    "ReduceLogSumExp": _reduce(lambda x, axes, keep: torch.logsumexp(x, dim=axes, keepdim=keep)),
    "Identity": _unary(lambda x: x),
    "Dropout": lambda i, a: [i[0]] + ([torch.ones_like(i[0], dtype=torch.bool)] if a["_outputs"] > 1 else []),
}
