"""The converted graph as a torch module, and the wrapper that makes it a ReID model.

What the dry run (:mod:`.plan`) left to do per forward becomes a list of steps over numbered
slots: a convolution with constant weights is an ``nn.Conv*d`` (with a following constant
BatchNormalization folded into it, as inference runtimes do), any other node calls its
operator with its constant inputs bound once (floating-point ones as buffers, so ``.to``
moves them), and shape arithmetic that depends on the batch is one ``a + c * B``. Nothing
in a forward depends on the batch size but the kernels themselves. On a CPU the images run
channels-last, the layout oneDNN's convolutions are fastest in.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ReIDBenchError
from .ops import OPERATORS, _pads, _torch_pad_order
from .plan import Plan, PlannedNode, Value
from .spec import INPUT_SPEC_DEFAULTS

_BATCH_SLOT, _INPUT_SLOT = 0, 1


class _Step(nn.Module):
    def run(self, inputs: list) -> list:
        raise NotImplementedError


class OpStep(_Step):
    """One node: its operator, its attributes, its constant inputs."""

    def __init__(self, node: PlannedNode, constants: dict[int, torch.Tensor], dynamic: list[int], count: int):
        super().__init__()
        self.op, self.node_name = node.op, node.name
        self.fn, self.attributes = OPERATORS[node.op], node.attributes
        self.template: list[Optional[torch.Tensor]] = [None] * count
        self.buffer_positions: list[tuple[int, str]] = []
        for position, value in constants.items():
            if value.is_floating_point():
                self.register_buffer(f"c{position}", value)
                self.buffer_positions.append((position, f"c{position}"))
            else:  # integers are shapes, axes, indices: read on the CPU, never moved
                self.template[position] = value
        self.dynamic = dynamic

    def run(self, inputs: list) -> list:
        full = list(self.template)
        for position, value in zip(self.dynamic, inputs):
            full[position] = value
        for position, name in self.buffer_positions:
            full[position] = self._buffers[name]
        return self.fn(full, self.attributes)


class ConvStep(_Step):
    """A convolution with constant weights; uneven or SAME padding is one pad before it."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], attributes: dict, input_shape: tuple):
        super().__init__()
        nd = weight.dim() - 2
        strides = list(attributes.get("strides", [1] * nd))
        dilations = list(attributes.get("dilations", [1] * nd))
        group = int(attributes.get("group", 1))
        begin, end = _pads(torch.empty(input_shape, device="meta"), attributes, list(weight.shape[2:]), strides,
                           dilations)
        self.pre_pad = None if begin == end else _torch_pad_order(begin, end)
        conv_class = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        self.conv = conv_class(weight.shape[1] * group, weight.shape[0], tuple(weight.shape[2:]), stride=strides,
                               padding=begin if begin == end else 0, dilation=dilations, groups=group,
                               bias=bias is not None)
        self.conv.requires_grad_(False)
        self.conv.weight.copy_(weight)
        if bias is not None:
            self.conv.bias.copy_(bias)

    def fold_batch_norm(self, scale, shift, mean, var, epsilon: float) -> None:
        """Merge a following inference BatchNormalization into the weights and bias."""
        factor = scale / torch.sqrt(var + epsilon)
        weight = self.conv.weight.double() * factor.double().view(-1, *[1] * (self.conv.weight.dim() - 1))
        bias = self.conv.bias.double() if self.conv.bias is not None else torch.zeros_like(mean, dtype=torch.float64)
        bias = (bias - mean.double()) * factor.double() + shift.double()
        self.conv.weight.copy_(weight.float())
        if self.conv.bias is None:
            self.conv.bias = nn.Parameter(torch.empty_like(bias, dtype=torch.float32), requires_grad=False)
        self.conv.bias.copy_(bias.float())

    def run(self, inputs: list) -> list:
        x = inputs[0]
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        return [self.conv(x)]


class AffineStep(_Step):
    """A shape value that grows with the batch: ``a + c * B``."""

    def __init__(self, affine: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.a, self.c = affine

    def run(self, inputs: list) -> list:
        return [self.a + self.c * inputs[0]]


class OnnxGraph(nn.Module):
    """A converted ONNX graph: images of the graph's own layout and range in, its output out,
    at any batch size (even when the file fixes the batch at 1)."""

    def __init__(self, plan: Plan, image_shape: tuple[int, ...], name: str, channels_first: bool = True):
        super().__init__()
        self.name, self.image_shape, self.channels_first = name, tuple(image_shape), channels_first
        self.input_name, self.output_name = plan.input_name, plan.output_name
        slots: dict[str, int] = {"@batch": _BATCH_SLOT, plan.input_name: _INPUT_SLOT}
        steps: list[_Step] = []
        wiring: list[tuple[list[int], list[int]]] = []
        consumers: dict[str, int] = {}
        for node in plan.nodes:
            for value in node.inputs:
                consumers[value] = consumers.get(value, 0) + 1
        convs: dict[str, ConvStep] = {}  # conv output -> its step, while a BN may still fold into it

        def slot_of(value_name: str) -> int:
            if value_name not in slots:  # a batch-dependent shape: computed where first needed
                slots[value_name] = len(slots)
                steps.append(AffineStep(plan.values[value_name].affine))
                wiring.append(([_BATCH_SLOT], [slots[value_name]]))
            return slots[value_name]

        for node in plan.nodes:
            values = [plan.values[v] if v else None for v in node.inputs]
            if self._fold(node, values, convs, slots):
                continue
            step = self._compile(node, values)
            dynamic = [k for k, v in enumerate(values) if v is not None and v.kind != "const"]
            ins = [slot_of(node.inputs[k]) for k in dynamic]
            outs = []
            for out in node.outputs:
                slots[out] = len(slots)
                outs.append(slots[out])
            if isinstance(step, ConvStep) and consumers.get(node.outputs[0]) == 1 \
                    and node.outputs[0] != plan.output_name:
                convs[node.outputs[0]] = step
            steps.append(step)
            wiring.append((ins, outs))
        self.steps = nn.ModuleList(steps)
        self.slot_count = len(slots)
        self.output_slot = slots[plan.output_name]
        # Drop each slot after its last reader, so a no-grad forward holds few activations.
        last: dict[int, int] = {}
        for position, (ins, _) in enumerate(wiring):
            for k in ins:
                last[k] = position
        frees: list[list[int]] = [[] for _ in wiring]
        for k, position in last.items():
            if k not in (self.output_slot, _BATCH_SLOT):
                frees[position].append(k)
        self._program = [(ins, outs, free) for (ins, outs), free in zip(wiring, frees)]

    @staticmethod
    def _compile(node: PlannedNode, values: list[Optional[Value]]) -> _Step:
        constant = {k: v.const for k, v in enumerate(values) if v is not None and v.kind == "const"}
        if node.op == "Conv" and 1 in constant and values[0] is not None and values[0].kind == "dynamic" \
                and (len(values) < 3 or values[2] is None or 2 in constant) and values[1].const.dim() in (3, 4, 5):
            return ConvStep(constant[1], constant.get(2), node.attributes, values[0].shape)
        dynamic = [k for k, v in enumerate(values) if v is not None and v.kind != "const"]
        return OpStep(node, constant, dynamic, len(values))

    @staticmethod
    def _fold(node: PlannedNode, values: list, convs: dict, slots: dict) -> bool:
        """Fold an inference BatchNormalization into the convolution right before it."""
        if node.op != "BatchNormalization" or node.inputs[0] not in convs or len(node.outputs) != 1 \
                or any(v is None or v.kind != "const" for v in values[1:5]):
            return False
        scale, shift, mean, var = (v.const.float() for v in values[1:5])
        convs.pop(node.inputs[0]).fold_batch_norm(scale, shift, mean, var, float(node.attributes.get("epsilon", 1e-5)))
        slots[node.outputs[0]] = slots[node.inputs[0]]
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ReIDBenchError(f"ONNX model {self.name} was converted for images of shape "
                                 f"{list(self.image_shape)} (after the batch), got {list(x.shape[1:])}")
        if self.channels_first and x.dim() == 4 and x.device.type == "cpu":
            # oneDNN's CPU convolutions run NHWC images faster (depthwise ones several times
            # over at batch 32) and keep the layout from one to the next; every operator reads
            # either layout. Weights stay NCHW: on a GPU nothing changes.
            x = x.contiguous(memory_format=torch.channels_last)
        slots: list = [None] * self.slot_count
        slots[_BATCH_SLOT], slots[_INPUT_SLOT] = x.shape[0], x
        for step, (ins, outs, free) in zip(self.steps, self._program):
            results = step.run([slots[k] for k in ins])
            for k, value in zip(outs, results):
                slots[k] = value
            for k in free:
                slots[k] = None
        return slots[self.output_slot]


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
