"""Bring your own ONNX model: an ONNX graph turned into a differentiable ``torch.nn.Module``.

White-box attacks need input gradients, which ONNX runtimes do not give; so the graph is
re-expressed in torch operators (:mod:`.ops`), validated and simplified by a dry run at
conversion (:mod:`.plan`), and run as a list of torch steps (:mod:`.module`). The converter
covers the operators that exported ReID and person-detection backbones use across opsets
9-18; any other operator is refused when the model is loaded, naming the operator and its node.

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

from .convert import convert_onnx_graph, load_onnx_model
from .module import OnnxGraph, OnnxReIDModel
from .ops import OPERATORS
from .spec import INPUT_SPEC_DEFAULTS, INPUT_SPEC_FIELDS, input_spec_problem

__all__ = ["load_onnx_model", "convert_onnx_graph", "OnnxGraph", "OnnxReIDModel", "OPERATORS",
           "INPUT_SPEC_DEFAULTS", "INPUT_SPEC_FIELDS", "input_spec_problem"]
