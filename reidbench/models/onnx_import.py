"""Bring your own ONNX model: an ONNX graph turned into a differentiable ``torch.nn.Module``.

White-box attacks need input gradients, which ONNX runtimes do not give; so the graph is
re-expressed in torch operators, node by node, with the graph's initializers as tensors.
The converter covers the operators that exported ReID CNNs use (ResNet, OSNet, IBN-Net,
MobileNet style: convolutions, normalization, pooling, activations, element-wise arithmetic,
and the shape arithmetic exporters emit around ``Reshape``); any other operator is refused
when the model is loaded, naming the operator and its node.

The wrapper :class:`OnnxReIDModel` makes the imported model look like a
:class:`~reidbench.models.ReIDModel` to attacks: images enter in [0, 1] RGB NCHW and the
wrapper converts them to what the graph expects, as declared by the zoo entry's ``model``:

- ``input_size: [H, W]`` (required), the image size the model runs at;
- ``channel_order: RGB | BGR`` (default RGB);
- ``value_range: 1 | 255`` (default 1), what a white pixel is for the graph;
- ``mean``, ``std``: three numbers each (default 0 and 1: normalization inside the graph),
  in the graph's channel order and value range, i.e. applied after reordering and scaling;
- ``layout: NCHW | NHWC`` (default NCHW);
- ``output``: the graph output holding the embedding (default: the first output).

Parsing needs the ``onnx`` package (``pip install 'reidbench[onnx]'``); checking a zoo entry's
``model`` mapping does not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ReIDBenchError

INPUT_SPEC_DEFAULTS = {"channel_order": "RGB", "value_range": 1, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                       "layout": "NCHW", "output": None}
INPUT_SPEC_FIELDS = ("input_size", *INPUT_SPEC_DEFAULTS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def input_spec_problem(spec: dict) -> Optional[str]:
    """What is wrong with an ONNX entry's ``model`` mapping, or None (plain Python: the zoo
    schema checks it without the ``onnx`` package)."""
    for key in spec:
        if key not in INPUT_SPEC_FIELDS:
            return f"unknown field 'model.{key}' for an ONNX model (known: {', '.join(INPUT_SPEC_FIELDS)})"
    size = spec.get("input_size")
    if size is None:
        return "an ONNX model needs 'model.input_size: [H, W]'"
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        return f"field 'model.input_size' must be two positive integers [H, W], got {size!r}"
    choices = {"channel_order": ("RGB", "BGR"), "layout": ("NCHW", "NHWC"), "value_range": (1, 255)}
    for key, allowed in choices.items():
        if key in spec and (spec[key] not in allowed or isinstance(spec[key], bool)):
            return f"field 'model.{key}' must be {' or '.join(map(str, allowed))}, got {spec[key]!r}"
    for key in ("mean", "std"):
        value = spec.get(key, [])
        if key in spec and not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
            return f"field 'model.{key}' must be a list of three numbers, got {value!r}"
    if any(s <= 0 for s in spec.get("std", [1])):
        return "field 'model.std' must be positive"
    if "output" in spec and not isinstance(spec["output"], str):
        return f"field 'model.output' must be a string (a graph output name), got {spec['output']!r}"
    return None


# --- operators -------------------------------------------------------------------------
# Each takes the node's inputs (None for an omitted optional input) and its attributes and
# returns its outputs. ONNX semantics, torch arithmetic: everything stays differentiable.

def _ints(t: Optional[torch.Tensor]) -> list[int]:
    return [] if t is None else [int(v) for v in t.flatten().tolist()]


def _scalar(t: Optional[torch.Tensor], default: Optional[float]) -> Optional[float]:
    return default if t is None or t.numel() == 0 else float(t.flatten()[0])


def _pads(x: torch.Tensor, a: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> tuple[list, list]:
    """Begin and end padding per spatial axis, from ``pads`` or ``auto_pad``."""
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
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
    x, w = i[0], i[1]
    bias = i[2] if len(i) > 2 else None
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
        raise ReIDBenchError("ONNX AveragePool with dilations is not supported")
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


def _reduce(fn: Callable) -> Callable:
    def run(i, a):
        x = i[0]
        axes = _ints(i[1]) if len(i) > 1 and i[1] is not None else list(a.get("axes", []))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, axes, bool(a.get("keepdims", 1)))]
    return run


def _reshape(i, a):
    x, shape = i[0], _ints(i[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(i, a):
    x = i[0]
    axis = int(a.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


def _unsqueeze(i, a):
    x = i[0]
    axes = _ints(i[1]) if len(i) > 1 and i[1] is not None else list(a["axes"])
    rank = x.dim() + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(axis)
    return [x]


def _squeeze(i, a):
    x = i[0]
    axes = _ints(i[1]) if len(i) > 1 and i[1] is not None else list(a.get("axes", []))
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
        starts, ends = _ints(i[1]), _ints(i[2])
        axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
        steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        index = torch.arange(*slice(start, end, step).indices(x.shape[axis]), device=x.device)
        x = torch.index_select(x, axis, index)
    return [x]


def _pad(i, a):
    x = i[0]
    mode = a.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = _ints(i[1]) if len(i) > 1 else list(a["pads"])
    value = _scalar(i[2] if len(i) > 2 else None, float(a.get("value", 0.0)))
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(x.dim()))
    n = len(axes)
    begin, end = [0] * x.dim(), [0] * x.dim()
    for k, axis in enumerate(axes):
        begin[axis % x.dim()], end[axis % x.dim()] = pads[k], pads[n + k]
    # F.pad pads trailing axes; drop the untouched leading ones so reflect/edge modes accept it.
    first = next((k for k in range(x.dim()) if begin[k] or end[k]), x.dim())
    order = _torch_pad_order(begin[first:], end[first:])
    if mode == "constant":
        return [F.pad(x, order, value=value)]
    return [F.pad(x, order, mode={"reflect": "reflect", "edge": "replicate"}[mode])]


def _gemm(i, a):
    x, w = i[0], i[1]
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = float(a.get("alpha", 1.0)) * (x @ w)
    if len(i) > 2 and i[2] is not None:
        y = y + float(a.get("beta", 1.0)) * i[2]
    return [y]


def _div(i, a):
    x, y = i
    if not x.is_floating_point() and not y.is_floating_point():
        return [torch.div(x, y, rounding_mode="trunc")]
    return [x / y]


def _clip(i, a):
    low = _scalar(i[1] if len(i) > 1 else None, a.get("min"))
    high = _scalar(i[2] if len(i) > 2 else None, a.get("max"))
    return [torch.clamp(i[0], low, high)]


def _shape(i, a):
    shape = list(i[0].shape)
    return [torch.tensor(shape[a.get("start", 0):a.get("end", len(shape))], dtype=torch.long)]


def _constant(i, a):
    for key, value in a.items():
        if key == "value":
            return [value]
        if key.startswith("value_"):
            return [torch.tensor(value, dtype=torch.long if key in ("value_int", "value_ints") else torch.float32)]
    raise ReIDBenchError("ONNX Constant node without a value")


def _constant_of_shape(i, a):
    value = a.get("value", torch.zeros(1))
    return [torch.full(_ints(i[0]), value.flatten()[0].item(), dtype=value.dtype)]


def _cast(i, a):
    from onnx import helper

    return [i[0].to(_TORCH_DTYPES[helper.tensor_dtype_to_np_dtype(a["to"]).name])]


_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "int64": torch.long,
                 "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


def _softmax(i, a):
    return [torch.softmax(i[0], dim=int(a.get("axis", -1)))]


def _variadic(fn: Callable) -> Callable:
    def run(i, a):
        out = i[0]
        for other in i[1:]:
            out = fn(out, other)
        return [out]
    return run


OPERATORS: dict[str, Callable] = {
    "Conv": _conv,
    "BatchNormalization": lambda i, a: [F.batch_norm(i[0], i[3], i[4], i[1], i[2], False, 0.0, float(a.get("epsilon", 1e-5)))],
    "InstanceNormalization": lambda i, a: [F.instance_norm(i[0], weight=i[1], bias=i[2], eps=float(a.get("epsilon", 1e-5)))],
    "Relu": lambda i, a: [F.relu(i[0])],
    "LeakyRelu": lambda i, a: [F.leaky_relu(i[0], float(a.get("alpha", 0.01)))],
    "PRelu": lambda i, a: [torch.where(i[0] >= 0, i[0], i[0] * i[1])],
    "Sigmoid": lambda i, a: [torch.sigmoid(i[0])],
    "Tanh": lambda i, a: [torch.tanh(i[0])],
    "HardSigmoid": lambda i, a: [torch.clamp(float(a.get("alpha", 0.2)) * i[0] + float(a.get("beta", 0.5)), 0, 1)],
    "HardSwish": lambda i, a: [F.hardswish(i[0])],
    "Softmax": _softmax,
    "Clip": _clip,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": lambda i, a: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a: [i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "Add": lambda i, a: [i[0] + i[1]],
    "Sub": lambda i, a: [i[0] - i[1]],
    "Mul": lambda i, a: [i[0] * i[1]],
    "Div": _div,
    "Pow": lambda i, a: [torch.pow(i[0], i[1])],
    "Sqrt": lambda i, a: [torch.sqrt(i[0])],
    "Exp": lambda i, a: [torch.exp(i[0])],
    "Log": lambda i, a: [torch.log(i[0])],
    "Neg": lambda i, a: [-i[0]],
    "Abs": lambda i, a: [torch.abs(i[0])],
    "Reciprocal": lambda i, a: [1.0 / i[0]],
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Gemm": _gemm,
    "MatMul": lambda i, a: [torch.matmul(i[0], i[1])],
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Expand": lambda i, a: [i[0].expand(torch.broadcast_shapes(i[0].shape, tuple(_ints(i[1]))))],
    "Transpose": lambda i, a: [i[0].permute(*(a.get("perm") or reversed(range(i[0].dim()))))],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda i, a: [torch.cat([t for t in i if t is not None], dim=int(a["axis"]))],
    "Gather": _gather,
    "Slice": _slice,
    "Shape": _shape,
    "Pad": _pad,
    "Cast": _cast,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "ReduceMean": _reduce(lambda x, axes, keep: x.mean(dim=axes, keepdim=keep)),
    "ReduceSum": _reduce(lambda x, axes, keep: x.sum(dim=axes, keepdim=keep)),
    "ReduceMax": _reduce(lambda x, axes, keep: x.amax(dim=axes, keepdim=keep)),
    "ReduceL2": _reduce(lambda x, axes, keep: x.pow(2).sum(dim=axes, keepdim=keep).sqrt()),
    "LpNormalization": lambda i, a: [F.normalize(i[0], p=float(a.get("p", 2)), dim=int(a.get("axis", -1)))],
    "Identity": lambda i, a: [i[0]],
    "Dropout": lambda i, a: [i[0]],  # inference: no dropout
}


# --- the graph as a module ---------------------------------------------------------------

def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ReIDBenchError("importing ONNX models needs the 'onnx' package: pip install 'reidbench[onnx]'") from None
    return onnx


def _tensor(proto) -> torch.Tensor:
    from onnx import numpy_helper

    return torch.from_numpy(numpy_helper.to_array(proto).copy())


def _attributes(node) -> dict:
    from onnx import AttributeProto, helper

    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if attribute.type == AttributeProto.TENSOR:
            value = _tensor(value)
        elif attribute.type == AttributeProto.STRING:
            value = value.decode()
        values[attribute.name] = value
    return values


def _align_devices(values: list) -> list:
    """Shape arithmetic runs on CPU tensors while the image tensors may sit on a GPU:
    move CPU operands next to the first floating-point one."""
    device = next((v.device for v in values if v is not None and v.is_floating_point()), None)
    if device is None or device.type == "cpu":
        return values
    return [v.to(device) if v is not None and v.device != device else v for v in values]


class OnnxGraph(nn.Module):
    """The nodes of one ONNX graph, run in their (topological) file order with torch
    operators. Floating-point initializers are buffers, so ``.to(device)`` moves them."""

    def __init__(self, graph, name: str, output: Optional[str] = None):
        super().__init__()
        for position, node in enumerate(graph.node):
            if node.domain not in ("", "ai.onnx") or node.op_type not in OPERATORS:
                domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
                raise ReIDBenchError(
                    f"ONNX model {name}: operator '{domain}{node.op_type}' (node '{node.name or position}') is not "
                    f"supported by reidbench's converter (supported: {', '.join(sorted(OPERATORS))})")
        self._buffer_names: dict[str, str] = {}
        self._fixed: dict[str, torch.Tensor] = {}  # integer constants: shape arithmetic, kept on the CPU
        for proto in graph.initializer:
            self._keep(proto.name, _tensor(proto))
        self.nodes = []
        for node in graph.node:
            attributes = _attributes(node)
            if node.op_type == "Constant":
                self._keep(node.output[0], _constant([], attributes)[0])
                continue
            self.nodes.append((node.op_type, list(node.input), list(node.output), attributes))
        known = set(self._buffer_names) | set(self._fixed)
        inputs = [i.name for i in graph.input if i.name not in known]
        if len(inputs) != 1:
            raise ReIDBenchError(f"ONNX model {name} has {len(inputs)} inputs ({', '.join(inputs)}); an image model has one")
        self.input_name = inputs[0]
        self.input_shape = [d.dim_value if d.HasField("dim_value") else None
                            for d in next(i for i in graph.input if i.name == self.input_name).type.tensor_type.shape.dim]
        outputs = [o.name for o in graph.output]
        if output is not None and output not in outputs:
            raise ReIDBenchError(f"ONNX model {name} has no output '{output}' (outputs: {', '.join(outputs)})")
        self.output_name = output or outputs[0]

    def _keep(self, name: str, value: torch.Tensor) -> None:
        if value.is_floating_point():
            self._buffer_names[name] = f"c{len(self._buffer_names)}"
            self.register_buffer(self._buffer_names[name], value)
        else:
            self._fixed[name] = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, Optional[torch.Tensor]] = {"": None, self.input_name: x, **self._fixed}
        values.update({name: getattr(self, buffer) for name, buffer in self._buffer_names.items()})
        for op_type, inputs, outputs, attributes in self.nodes:
            results = OPERATORS[op_type](_align_devices([values[i] for i in inputs]), attributes)
            values.update(zip(outputs, results))
        return values[self.output_name]


class OnnxReIDModel(nn.Module):
    """An imported ONNX graph seen as a ReID model: images in [0, 1] RGB NCHW in, (B, D)
    embeddings out; layout, channel order, value range and normalization as the entry says."""

    def __init__(self, graph: OnnxGraph, spec: dict):
        super().__init__()
        spec = {**INPUT_SPEC_DEFAULTS, **spec}
        self.graph = graph
        self.config = dict(spec)
        self.input_size = tuple(int(s) for s in spec["input_size"])
        self.bgr = spec["channel_order"] == "BGR"
        self.nhwc = spec["layout"] == "NHWC"
        self.value_range = float(spec["value_range"])
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            x = x.flip(1)
        x = (x * self.value_range - self.mean) / self.std
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)
        return self.graph(x).flatten(1)


def load_onnx_model(path: Path, spec: dict) -> OnnxReIDModel:
    """Parse ``path`` and wrap it per the entry's input ``spec``; every problem is one line."""
    problem = input_spec_problem(spec)
    if problem is not None:
        raise ReIDBenchError(f"ONNX model {Path(path).name}: {problem}")
    onnx = _require_onnx()
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises its own DecodeError; any failure means the same to the user
        raise ReIDBenchError(f"{path} is not a readable ONNX model: {exc.__class__.__name__}") from None
    graph = OnnxGraph(proto.graph, Path(path).name, spec.get("output"))
    expected = list(spec["input_size"])
    height_width = graph.input_shape[1:3] if spec.get("layout") == "NHWC" else graph.input_shape[2:4]
    if len(graph.input_shape) != 4 or any(d is not None and d != e for d, e in zip(height_width, expected)):
        raise ReIDBenchError(
            f"ONNX model {Path(path).name} takes input of shape {graph.input_shape}, "
            f"which does not fit model.input_size {expected} (layout {spec.get('layout', 'NCHW')})")
    return OnnxReIDModel(graph, spec).eval()
