"""Conversion-time analysis of an ONNX graph: one dry run that validates it and decides what
is left to do per forward.

The graph runs once on dummy images at batch 1, 2 and 3 (three "worlds"). That dry run

- turns every failure (initializers that do not fit their nodes, a missing input, an
  unsupported attribute) into one :class:`ReIDBenchError` line naming the node, at load time
  rather than at the first forward;
- folds constants: a node whose inputs are all constants is computed here, once;
- folds shape arithmetic: an integer value computed from tensor shapes (``Shape``, ``Gather``,
  ``Concat`` ... feeding ``Reshape``) is affine in the batch size ``B`` (the image size is
  fixed), so it is stored as ``a + c * B`` and costs one small op per forward, and nothing
  when ``c`` is 0;
- makes a graph exported with its batch fixed at 1 run at any batch: a literal 1 in the batch
  position of a shape (``Reshape`` to ``[1, -1]``, ``Expand``, ``Resize`` sizes) becomes ``B``,
  a ``Squeeze`` keeps the batch axis, and a constant with a batch of 1 concatenated to
  batched tensors (a class token) is repeated;
- in any graph, a normalization over the batch axis and others (``MeanVarianceNormalization``'s
  default axes 0, 2, 3; ``ReduceMean`` over 0, 2, 3) leaves the batch axis out: an export at
  batch 1 meant each image (onnxruntime, at batch B, would mix the images; image by image it
  agrees);
- checks that each image's output does not depend on the other images of its batch (the
  first rows of world 3 must equal worlds 1 and 2), naming the first node that mixes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ...errors import ReIDBenchError, first_line
from .ops import OPERATORS

WORLDS = (1, 2, 3)

# Operators whose listed input is a shape with the batch in its first position.
_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "Resize": 3}
_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare",
               "ReduceLogSumExp", "ReduceProd"}


@dataclass
class Value:
    """One named value of the graph: a constant, an affine function of the batch size
    (``shape``) or a tensor computed from the image (``dynamic``)."""

    kind: str
    const: Optional[torch.Tensor] = None
    worlds: list = field(default_factory=list)   # the value at each batch size of WORLDS
    affine: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    batch_axis: Optional[int] = None
    lost_batch_at: Optional[str] = None           # the node where a dynamic value lost the batch axis
    shape: tuple = ()                             # a dynamic value's shape at batch 1

    def at(self, world: int) -> Optional[torch.Tensor]:
        return self.const if self.kind == "const" else self.worlds[world]


@dataclass
class PlannedNode:
    """A node left to run per forward, with its (possibly rewritten) attributes."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict


@dataclass
class Plan:
    values: dict[str, Value]
    nodes: list[PlannedNode]
    input_name: str
    output_name: str


def node_label(node, position: int) -> str:
    return f"node '{node.name or position}' ({node.op_type})"


def _batch_axis(tensors: list[torch.Tensor]) -> Optional[int]:
    """The axis whose size is the batch size in every world (the others fixed), or None."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(len(s) != len(shapes[0]) for s in shapes):
        return None
    for axis in range(len(shapes[0])):
        others_fixed = all(s[:axis] + s[axis + 1:] == shapes[0][:axis] + shapes[0][axis + 1:] for s in shapes)
        if others_fixed and all(s[axis] == b for s, b in zip(shapes, WORLDS)):
            return axis
    return None


def _fit_affine(tensors: list[torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(a, c)`` with value == a + c * B in every world, or None when it is not affine."""
    if any(t.shape != tensors[0].shape or t.dtype != tensors[0].dtype for t in tensors) or tensors[0].numel() > 64:
        return None
    v1, v2 = tensors[0], tensors[1]
    c = v2 - v1 if v1.dtype != torch.bool else None
    if c is None:
        return (v1, torch.zeros_like(v1)) if all(torch.equal(v1, t) for t in tensors) else None
    a = v1 - c
    for b, t in zip(WORLDS, tensors):
        expected = a + c * b
        if not (torch.equal(expected, t) if not t.is_floating_point() else torch.allclose(expected, t, rtol=1e-6)):
            return None
    return a, c


def _mixes_batch(tensors: list[torch.Tensor]) -> bool:
    """Whether world 3's first rows differ from the smaller worlds' (batch axis 0 assumed)."""
    full = tensors[-1]
    scale = float(full.abs().max()) if full.numel() else 0.0
    for b, t in zip(WORLDS[:-1], tensors[:-1]):
        if not torch.allclose(t, full[:b], rtol=1e-3, atol=1e-4 + 1e-4 * scale):
            return True
    return False


def _rebatch(op: str, inputs: list[Optional[Value]], attributes: dict) -> tuple[list, dict]:
    """Rewrite a batch-1 graph's node to mean "whatever the batch is" (see the module doc)."""
    batched = [v for v in inputs if v is not None and v.kind == "dynamic" and v.batch_axis == 0]
    if op == "Concat" and batched and int(attributes.get("axis", 0)) % len(batched[0].shape) != 0:
        constant_row = any(v is not None and v.kind == "const" and v.const.dim() and v.const.shape[0] == 1
                           for v in inputs)
        if constant_row:
            return inputs, {**attributes, "_broadcast_batch": True}
    data = inputs[0] if inputs else None
    if data is None or data.kind != "dynamic" or data.batch_axis != 0:
        return inputs, attributes
    if op == "Squeeze":  # squeezing the batch of 1 away: keep it, whatever it is
        given = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
        if given is None and "axes" not in attributes:
            axes = [k for k, size in enumerate(data.shape) if size == 1 and k != 0]
        elif given is None:
            axes = [int(ax) % len(data.shape) for ax in attributes["axes"] if int(ax) % len(data.shape) != 0]
        elif given.kind == "const":
            axes = [int(ax) % len(data.shape) for ax in given.const.tolist() if int(ax) % len(data.shape) != 0]
        else:
            return inputs, attributes
        return [data], {**attributes, "_kept_batch_axes": axes}
    k = _SHAPE_INPUTS.get(op)
    if k is not None and len(inputs) > k and inputs[k] is not None and inputs[k].kind == "const":
        shape = inputs[k].const
        if shape.dim() == 1 and shape.numel() and not shape.is_floating_point() and int(shape[0]) == 1:
            a, c = shape.clone(), torch.zeros_like(shape)
            a[0], c[0] = 0, 1
            inputs = list(inputs)
            inputs[k] = Value("shape", worlds=[a + c * b for b in WORLDS], affine=(a, c))
    return inputs, attributes


def _per_image(op: str, inputs: list[Optional[Value]], attributes: dict) -> tuple[list, dict]:
    """A normalization over the batch axis and others is what an export at batch 1 leaves
    (MVN's default axes are 0, 2, 3): it meant each image on its own, whatever the graph
    declares, and an embedding that depended on the batch would make no sense to rank."""
    data = inputs[0] if inputs else None
    if data is None or data.kind != "dynamic" or data.batch_axis != 0:
        return inputs, attributes
    if not (op == "MeanVarianceNormalization" or (op in _REDUCTIONS and attributes.get("keepdims", 1))):
        return inputs, attributes
    rank = len(data.shape)
    axes_input = op in _REDUCTIONS and len(inputs) > 1 and inputs[1] is not None
    if axes_input and inputs[1].kind == "const":
        axes = [int(v) % rank for v in inputs[1].const.tolist()]
        if 0 in axes and len(axes) > 1:
            inputs = list(inputs)
            inputs[1] = Value("const", const=torch.tensor([ax for ax in axes if ax != 0], dtype=inputs[1].const.dtype))
    elif not axes_input:
        default = [0, 2, 3] if op == "MeanVarianceNormalization" else list(range(rank))
        axes = [int(v) % rank for v in attributes.get("axes", default)]
        if 0 in axes and len(axes) > 1:
            attributes = {**attributes, "axes": [ax for ax in axes if ax != 0]}
    return inputs, attributes


def plan_graph(graph, name: str, opset: int, attributes_of, tensor_of, input_shape: list[int],
               output: Optional[str]) -> Plan:
    """Dry-run ``graph`` (an ``onnx.GraphProto``) on images of ``input_shape`` (batch first,
    any value there) and return what is left to run per forward."""
    values: dict[str, Value] = {}
    for proto in graph.initializer:
        values[proto.name] = Value("const", const=tensor_of(proto))
    inputs = [i for i in graph.input if i.name not in values]
    if len(inputs) != 1:
        raise ReIDBenchError(f"ONNX model {name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "an image model has one")
    input_name = inputs[0].name
    declared = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    batch_one = bool(declared) and declared[0] == 1
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(max(WORLDS), *input_shape[1:], generator=generator)
    values[input_name] = Value("dynamic", worlds=[images[:b] for b in WORLDS], batch_axis=0,
                               shape=(1, *input_shape[1:]))
    outputs = [o.name for o in graph.output]
    if output is not None and output not in outputs:
        raise ReIDBenchError(f"ONNX model {name} has no output '{output}' (outputs: {', '.join(outputs)})")
    output_name = output or outputs[0]

    # Free each world's tensors after their last use: the dry run holds three batches.
    last_use: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        for value in node.input:
            last_use[value] = position
    planned: list[PlannedNode] = []
    for position, node in enumerate(graph.node):
        label = node_label(node, position)
        attributes = {**attributes_of(node), "_op": node.op_type, "_opset": opset, "_outputs": len(node.output)}
        missing = [v for v in node.input if v and v not in values]
        if missing:
            raise ReIDBenchError(f"ONNX model {name}: {label} uses '{missing[0]}', which no earlier node produces")
        node_inputs = [values[v] if v else None for v in node.input]
        node_inputs, attributes = _per_image(node.op_type, node_inputs, attributes)
        if batch_one:
            node_inputs, attributes = _rebatch(node.op_type, node_inputs, attributes)
        results = _run_node(node.op_type, node_inputs, attributes, name, label)
        for out_name, out in zip(node.output, results):
            if out_name:
                values[out_name] = out
        if any(v.kind == "dynamic" for v in results):
            _check_batch(results, node_inputs, name, label)
        # Constants and batch-affine shapes need no step: a reader computes them (module.py).
        if any(v.kind == "dynamic" for v in results):
            inputs_named = list(node.input)
            for k, given in enumerate(node_inputs):  # a rewritten input gets a name of its own
                if given is not None and node.input[k] and given is not values.get(node.input[k]):
                    inputs_named[k] = f"{node.input[k]}@{position}"
                    values[inputs_named[k]] = given
            planned.append(PlannedNode(node.name or str(position), node.op_type, inputs_named,
                                       list(node.output), attributes))
        for value in node.input:
            if value and last_use.get(value) == position and value != output_name and values[value].kind == "dynamic":
                values[value].worlds = []
    if output_name not in values:
        raise ReIDBenchError(f"ONNX model {name}: no node produces the output '{output_name}'")
    result = values[output_name]
    if result.kind != "dynamic":
        raise ReIDBenchError(f"ONNX model {name}: the output '{output_name}' does not depend on the image")
    if result.batch_axis != 0:
        where = f" (lost at {result.lost_batch_at})" if result.lost_batch_at else ""
        raise ReIDBenchError(f"ONNX model {name}: the output '{output_name}' has no batch axis first{where}, "
                             "so it cannot give one embedding per image")
    return Plan(values, planned, input_name, output_name)


def _run_node(op: str, inputs: list[Optional[Value]], attributes: dict, name: str, label: str) -> list[Value]:
    fn = OPERATORS[op]
    if all(v is None or v.kind == "const" for v in inputs):
        try:
            with torch.no_grad():
                return [Value("const", const=t) for t in fn([v and v.const for v in inputs], attributes)]
        except Exception as exc:
            raise ReIDBenchError(f"ONNX model {name}: {label} fails on its inputs: {first_line(exc)}") from None
    per_world = []
    for world, batch in enumerate(WORLDS):
        try:
            with torch.no_grad():
                per_world.append(fn([v and v.at(world) for v in inputs], attributes))
        except Exception as exc:
            where = "" if batch == 1 else f" at batch {batch}"
            raise ReIDBenchError(f"ONNX model {name}: {label} fails on its inputs{where}: {first_line(exc)}") from None
    shape_only = all(v is None or v.kind in ("const", "shape") for v in inputs) or op == "Shape"
    results = []
    for k in range(len(per_world[0])):
        tensors = [outs[k] for outs in per_world]
        affine = _fit_affine(tensors) if shape_only else None
        if affine is not None and not bool(affine[1].any()):
            results.append(Value("const", const=affine[0]))
        elif affine is not None:
            results.append(Value("shape", worlds=tensors, affine=affine))
        else:
            results.append(Value("dynamic", worlds=tensors, batch_axis=_batch_axis(tensors),
                                 shape=tuple(tensors[0].shape)))
    return results


def _check_batch(results: list[Value], inputs: list[Optional[Value]], name: str, label: str) -> None:
    batched = [v for v in inputs if v is not None and v.kind == "dynamic"]
    for value in results:
        if value.kind != "dynamic":
            continue
        lost = next((v.lost_batch_at for v in batched if v.lost_batch_at), None)
        if value.batch_axis is None:
            had_batch = any(v.batch_axis is not None for v in batched)
            value.lost_batch_at = lost or (label if had_batch else None)
            continue
        value.lost_batch_at = lost
        # The first node that mixes is the one named: had an input mixed, its node would have.
        if value.batch_axis == 0 and value.worlds[0].is_floating_point() and _mixes_batch(value.worlds):
            raise ReIDBenchError(
                f"ONNX model {name}: {label} mixes the images of a batch, so an image's embedding would "
                "depend on the other images it is batched with")
