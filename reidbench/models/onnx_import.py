"""Where the zoo, the runner and older code import the ONNX converter from; it lives in
:mod:`reidbench.models.onnx`."""

from .onnx import (INPUT_SPEC_DEFAULTS, INPUT_SPEC_FIELDS, OPERATORS, OnnxGraph, OnnxReIDModel,
                   convert_onnx_graph, input_spec_problem, load_onnx_model)

__all__ = ["INPUT_SPEC_DEFAULTS", "INPUT_SPEC_FIELDS", "OPERATORS", "OnnxGraph", "OnnxReIDModel",
           "convert_onnx_graph", "input_spec_problem", "load_onnx_model"]
