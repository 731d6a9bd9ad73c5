"""What an ONNX entry's ``model`` mapping may say about the graph's input (plain Python: the
zoo schema checks it without the ``onnx`` package)."""

from __future__ import annotations

from typing import Any, Optional

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
