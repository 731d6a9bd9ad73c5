"""Reading an ONNX file and converting it: every problem with the file is one line, at load time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ...errors import ReIDBenchError
from .module import OnnxGraph, OnnxReIDModel
from .ops import OPERATORS
from .plan import plan_graph
from .spec import INPUT_SPEC_FIELDS, input_spec_problem


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


def _default_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def convert_onnx_graph(proto, name: str, spec: dict) -> OnnxGraph:
    """The graph of ``proto`` (an ``onnx.ModelProto``) as a torch module taking the graph's
    own input (layout, range, normalization as ``spec`` declares them)."""
    graph = proto.graph
    for position, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPERATORS:
            domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            raise ReIDBenchError(
                f"ONNX model {name}: operator '{domain}{node.op_type}' (node '{node.name or position}') is not "
                f"supported by reidbench's converter (supported: {', '.join(sorted(OPERATORS))})")
    known = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in known]
    if len(inputs) != 1:
        raise ReIDBenchError(f"ONNX model {name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "an image model has one")
    declared = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    expected = list(spec["input_size"])
    nhwc = spec.get("layout", "NCHW") == "NHWC"
    height_width = declared[1:3] if nhwc else declared[2:4]
    if len(declared) != 4 or any(d is not None and d != e for d, e in zip(height_width, expected)):
        raise ReIDBenchError(
            f"ONNX model {name} takes input of shape {declared}, "
            f"which does not fit model.input_size {expected} (layout {spec.get('layout', 'NCHW')})")
    channels = (declared[3] if nhwc else declared[1]) or 3
    if channels != 3:
        raise ReIDBenchError(f"ONNX model {name} takes {channels}-channel images; reidbench's images are RGB")
    image = [*expected, 3] if nhwc else [3, *expected]
    plan = plan_graph(graph, name, _default_opset(proto), _attributes, _tensor, [1, *image], spec.get("output"))
    return OnnxGraph(plan, tuple(image), name, channels_first=not nhwc)


def load_onnx_model(path: Path | str, spec: Optional[dict] = None, **options: Any) -> OnnxReIDModel:
    """An ONNX file as a differentiable ReID model taking [0, 1] RGB NCHW images.

    ``spec`` is a zoo entry's ``model`` mapping; its fields may also be given as keywords
    (``input_size=(256, 128), channel_order="BGR", value_range=255, mean=[...], std=[...],
    layout="NCHW", output=None``). Every problem is one :class:`ReIDBenchError` line, raised
    here (the graph is validated by a dry run), never at the first forward."""
    spec = dict(spec or {})
    for key, value in options.items():
        if key not in INPUT_SPEC_FIELDS:
            raise ReIDBenchError(f"load_onnx_model: unknown option '{key}' (known: {', '.join(INPUT_SPEC_FIELDS)})")
        if value is not None:
            spec[key] = [float(v) for v in value] if key in ("mean", "std") else \
                [int(v) for v in value] if key == "input_size" else value
    name = Path(path).name
    problem = input_spec_problem(spec)
    if problem is not None:
        raise ReIDBenchError(f"ONNX model {name}: {problem}")
    onnx = _require_onnx()
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises its own DecodeError; any failure means the same to the user
        raise ReIDBenchError(f"{path} is not a readable ONNX model: {exc.__class__.__name__}") from None
    return OnnxReIDModel(convert_onnx_graph(proto, name, spec), spec).eval()
