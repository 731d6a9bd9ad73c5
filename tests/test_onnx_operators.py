"""Every operator the ONNX converter supports, against onnxruntime, on small graphs built
node by node at the opsets whose semantics differ (outputs within 1e-4, input gradients
non-zero); and the graphs it must refuse, one line each, at load time."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from reidbench.errors import ReIDBenchError  # noqa: E402
from reidbench.models.onnx_import import load_onnx_model  # noqa: E402

H, W = 8, 6


def const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def ints(name, values):
    return const(name, values, np.int64)


def weights(name, *shape, seed=0):
    return const(name, np.random.default_rng(seed).normal(0, 0.5, shape))


def save(tmp_path, nodes, initializers=(), opset=13, batch=None, tag="g"):
    """A graph from image ``x`` (batch ``batch``, or dynamic) to ``y``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "N", 3, H, W])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, tag, [x], [y], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    path = tmp_path / f"{tag}.onnx"
    onnx.save(model, str(path))
    return path


def runtime(path, x: np.ndarray, per_image: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if per_image:  # a graph fixed at batch 1 is run image by image
        return np.concatenate([session.run(["y"], {"x": x[k:k + 1]})[0] for k in range(len(x))])
    return session.run(["y"], {"x": x})[0]


def check(path, batch_fixed=False, differentiable=True, tolerance=1e-4, batch=3):
    graph = load_onnx_model(path, {"input_size": [H, W]}).graph
    x = torch.rand(batch, 3, H, W, generator=torch.Generator().manual_seed(7)) * 2 - 0.5
    expected = runtime(path, x.numpy(), per_image=batch_fixed)
    x.requires_grad_(True)
    out = graph(x)
    assert tuple(out.shape) == expected.shape
    assert np.abs(out.detach().numpy() - expected).max() <= tolerance, np.abs(out.detach().numpy() - expected).max()
    if differentiable:
        direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
        (out * direction).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    return graph


def node(op, inputs, outputs=("y",), name=None, **attributes):
    return helper.make_node(op, list(inputs), list(outputs), name=name or f"{op.lower()}_node", **attributes)


def sizes_after_batch_and_channels(*spatial):
    """Resize sizes as exporters write them for a dynamic batch: the input's N, C, then H', W'."""
    nodes = [node("Shape", ["x"], ["shape"]), node("Slice", ["shape", "zero", "two"], ["nc"]),
             node("Concat", ["nc", "spatial"], ["size"], axis=0)]
    return nodes, [ints("zero", [0]), ints("two", [2]), ints("spatial", list(spatial))]


# (id, opset, nodes, initializers, differentiable)
CASES = [
    ("mvn-axes-opset9", 9, [node("MeanVarianceNormalization", ["x"], axes=[2, 3])], [], True),
    ("mvn-chw-opset13", 13, [node("MeanVarianceNormalization", ["x"], axes=[1, 2, 3])], [], True),
    ("upsample-nearest-opset9", 9, [node("Upsample", ["x", "s"], mode="nearest")],
     [const("s", [1, 1, 2, 1.5])], True),
    ("upsample-linear-opset9", 9, [node("Upsample", ["x", "s"], mode="linear")], [const("s", [1, 1, 2, 2])], True),
    ("resize-nearest-opset10", 10, [node("Resize", ["x", "s"], mode="nearest")], [const("s", [1, 1, 0.5, 1.5])], True),
    ("resize-linear-opset10", 10, [node("Resize", ["x", "s"], mode="linear")], [const("s", [1, 1, 1.5, 0.5])], True),
    ("resize-linear-half-pixel-opset11", 11, [node("Resize", ["x", "roi", "s"], mode="linear")],
     [const("roi", []), const("s", [1, 1, 1.7, 0.6])], True),
    ("resize-linear-align-corners-sizes-opset11", 11,
     sizes_after_batch_and_channels(13, 4)[0] +
     [node("Resize", ["x", "roi", "s", "size"], mode="linear", coordinate_transformation_mode="align_corners")],
     [const("roi", []), const("s", [])] + sizes_after_batch_and_channels(13, 4)[1], True),
    ("resize-nearest-asymmetric-floor-opset11", 11,
     [node("Resize", ["x", "roi", "s"], mode="nearest", coordinate_transformation_mode="asymmetric",
           nearest_mode="floor")], [const("roi", []), const("s", [1, 1, 2, 3])], True),
    ("resize-nearest-half-pixel-opset13", 13,
     sizes_after_batch_and_channels(5, 11)[0] +
     [node("Resize", ["x", "", "", "size"], mode="nearest", nearest_mode="round_prefer_ceil")],
     sizes_after_batch_and_channels(5, 11)[1], True),
    ("resize-pytorch-half-pixel-opset13", 13,
     [node("Resize", ["x", "", "s"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")],
     [const("s", [1, 1, 0.5, 2])], True),
    ("resize-cubic-opset13", 13, [node("Resize", ["x", "", "s"], mode="cubic")], [const("s", [1, 1, 2, 0.75])], True),
    ("resize-cubic-exclude-outside-opset13", 13,
     [node("Resize", ["x", "", "s"], mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5)],
     [const("s", [1, 1, 1.5, 2])], True),
    ("resize-axes-opset18", 18, [node("Resize", ["x", "", "", "size"], mode="linear", axes=[3, 2])],
     [ints("size", [9, 5])], True),
    ("resize-keep-aspect-opset18", 18,
     [node("Resize", ["x", "", "", "size"], mode="nearest", keep_aspect_ratio_policy="not_larger", axes=[2, 3])],
     [ints("size", [12, 12])], True),
    ("split-attribute-opset11", 11, [node("Split", ["x"], ["a", "b"], axis=2, split=[3, 5]),
                                     node("Concat", ["b", "a"], axis=2)], [], True),
    ("split-input-opset13", 13, [node("Split", ["x", "parts"], ["a", "b", "c"], axis=1),
                                 node("Mul", ["a", "c"], ["ac"]), node("Sub", ["ac", "b"])], [ints("parts", [1, 1, 1])],
     True),
    ("split-num-outputs-opset18", 18, [node("Split", ["x"], ["a", "b", "c"], axis=3, num_outputs=3),
                                       node("Concat", ["c", "a", "b"], axis=3)], [], True),
    ("flatten-gemm-opset9", 9, [node("Flatten", ["x"], ["f"], axis=1), node("Gemm", ["f", "w", "b"], transB=1)],
     [weights("w", 5, 3 * H * W), weights("b", 5, seed=1)], True),
    ("reshape-shape-chain-opset13", 13,
     [node("Shape", ["x"], ["s"]), node("Gather", ["s", "zero"], ["n"], axis=0),
      node("Unsqueeze", ["n", "zero1"], ["n1"]), node("Concat", ["n1", "minus1"], ["target"], axis=0),
      node("Reshape", ["x", "target"])], [ints("zero", 0), ints("zero1", [0]), ints("minus1", [-1])], True),
    ("pad-reflect-opset9", 9, [node("Pad", ["x"], mode="reflect", pads=[0, 0, 1, 2, 0, 0, 2, 1])], [], True),
    ("pad-constant-value-opset9", 9, [node("Pad", ["x"], pads=[0, 1, 1, 0, 0, 0, 0, 2], value=0.5)], [], True),
    ("pad-edge-input-opset11", 11, [node("Pad", ["x", "p"], mode="edge")], [ints("p", [0, 0, 2, 1, 0, 0, 1, 3])], True),
    ("pad-constant-input-crop-opset13", 13, [node("Pad", ["x", "p", "v"])],
     [ints("p", [0, 0, 1, -1, 0, 0, -2, 2]), const("v", 0.25)], True),
    ("pad-axes-opset18", 18, [node("Pad", ["x", "p", "", "axes"], mode="reflect")],
     [ints("p", [1, 2, 2, 1]), ints("axes", [-1, 2])], True),
    ("clip-attributes-opset9", 9, [node("Clip", ["x"], min=0.1, max=0.9)], [], True),
    ("clip-inputs-opset11", 11, [node("Clip", ["x", "lo", "hi"])], [const("lo", 0.0), const("hi", 0.6)], True),
    ("clip-max-only-opset13", 13, [node("Clip", ["x", "", "hi"])], [const("hi", 0.7)], True),
    ("reduce-l2-attribute-opset13", 13, [node("ReduceL2", ["x"], axes=[2, 3], keepdims=0)], [], True),
    ("reduce-l2-input-opset18", 18, [node("ReduceL2", ["x", "axes"], keepdims=1)], [ints("axes", [1, -1])], True),
    ("reduce-mean-attribute-opset9", 9, [node("ReduceMean", ["x"], axes=[-1], keepdims=0)], [], True),
    ("reduce-mean-input-opset18", 18, [node("ReduceMean", ["x", "axes"], keepdims=0)], [ints("axes", [1, 2])], True),
    ("reduce-sum-input-opset13", 13, [node("ReduceSum", ["x", "axes"])], [ints("axes", [3])], True),
    ("erf-opset9", 9, [node("Erf", ["x"])], [], True),
    ("gelu-tanh-opset20", 20, [node("Gelu", ["x"], approximate="tanh")], [], True),
    ("gelu-opset20", 20, [node("Gelu", ["x"])], [], True),
    ("layernorm-last-axis-opset17", 17, [node("LayerNormalization", ["x", "g", "b"], epsilon=1e-3)],
     [weights("g", W), weights("b", W, seed=1)], True),
    ("layernorm-chw-broadcast-opset17", 17, [node("LayerNormalization", ["x", "g", "b"], axis=1)],
     [weights("g", 3, 1, W), weights("b", 1, H, 1, seed=1)], True),
    ("einsum-opset12", 12, [node("Einsum", ["x", "w"], equation="nchw,dc->ndhw")], [weights("w", 4, 3)], True),
    ("softmax-coerced-opset11", 11, [node("Softmax", ["x"], axis=2)], [], True),
    ("softmax-axis-opset13", 13, [node("Softmax", ["x"], axis=1)], [], True),
    ("logsoftmax-opset9", 9, [node("LogSoftmax", ["x"])], [], True),
    ("conv-same-upper-bn-opset9", 9,
     [node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
      node("BatchNormalization", ["c", "g", "b", "m", "v"], epsilon=1e-3)],
     [weights("w", 4, 3, 3, 2), weights("g", 4, seed=1), weights("b", 4, seed=2), weights("m", 4, seed=3),
      const("v", [0.5, 1.0, 2.0, 0.1])], True),
    ("conv-depthwise-dilated-opset13", 13,
     [node("Conv", ["x", "w", "b"], kernel_shape=[3, 3], group=3, dilations=[2, 1], pads=[2, 1, 2, 0])],
     [weights("w", 3, 1, 3, 3), weights("b", 3, seed=1)], True),
    ("activations-opset18", 18,
     [node("Mish", ["x"], ["a"]), node("HardSigmoid", ["a"], ["b"], alpha=0.3), node("Elu", ["b"], ["c"]),
      node("Softplus", ["c"], ["d"]), node("HardSwish", ["d"], ["e"]), node("PRelu", ["x", "slope"], ["f"]),
      node("Mul", ["e", "f"])], [const("slope", np.full((3, 1, 1), 0.2))], True),
    ("slice-negative-step-opset13", 13, [node("Slice", ["x", "st", "en", "ax", "sp"])],
     [ints("st", [-1, 5]), ints("en", [-100, 0]), ints("ax", [3, 2]), ints("sp", [-2, -1])], True),
    ("slice-attributes-opset9", 9, [node("Slice", ["x"], starts=[1, 0], ends=[7, 4], axes=[2, 3])], [], True),
    ("transpose-matmul-opset13", 13, [node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                                      node("MatMul", ["t", "w"])], [weights("w", 3, 5)], True),
    ("where-greater-opset13", 13, [node("Greater", ["x", "half"], ["m"]), node("Neg", ["x"], ["n"]),
                                   node("Where", ["m", "x", "n"])], [const("half", 0.5)], True),
    ("tile-expand-opset13", 13, [node("ReduceMean", ["x"], ["m"], axes=[1]), node("Tile", ["m", "rep"], ["t"]),
                                 node("Expand", ["t", "shape"])], [ints("rep", [1, 2, 1, 1]), ints("shape", [1, 2, 1, 1])],
     True),
    ("depth-to-space-opset13", 13, [node("SpaceToDepth", ["x"], ["s"], blocksize=2),
                                    node("DepthToSpace", ["s"], blocksize=2, mode="DCR")], [], True),
    ("depth-to-space-crd-opset13", 13, [node("SpaceToDepth", ["x"], ["s"], blocksize=2),
                                        node("DepthToSpace", ["s"], blocksize=2, mode="CRD")], [], True),
    ("pooling-opset10", 10,
     [node("MaxPool", ["x"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
      node("AveragePool", ["m"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], count_include_pad=0)], [], True),
    ("elementwise-opset13", 13,
     [node("Abs", ["x"], ["a"]), node("Add", ["a", "tenth"], ["b"]), node("Sqrt", ["b"], ["c"]),
      node("Log", ["c"], ["d"]), node("Exp", ["d"], ["e"]), node("Reciprocal", ["e"], ["f"]),
      node("Tanh", ["f"], ["g"]), node("Max", ["g", "x", "tenth"], ["h"]), node("Min", ["h", "x"], ["k"]),
      node("Sum", ["k", "g", "x"], ["m"]), node("Mean", ["m", "f"], ["n"]), node("Selu", ["n"], ["o"]),
      node("Softsign", ["o"], ["p"]), node("Pow", ["p", "two"], ["q"]), node("Div", ["q", "b"], ["r"]),
      node("Cast", ["r"], ["r64"], to=TensorProto.DOUBLE),
      node("Cast", ["r64"], ["r32"], name="back_to_float", to=TensorProto.FLOAT),
      node("Dropout", ["r32"], ["s"]), node("Identity", ["s"], ["t"]), node("Neg", ["t"], ["u"]),
      node("LeakyRelu", ["u"], ["v"], alpha=0.2), node("Sigmoid", ["v"], ["w"]), node("Sub", ["w", "x"])],
     [const("tenth", 0.1), const("two", 2.0)], True),
    ("reductions-opset13", 13,
     [node("ReduceMax", ["x"], ["a"], axes=[2, 3]), node("ReduceMin", ["x"], ["b"], axes=[2, 3]),
      node("ReduceL1", ["x"], ["c"], axes=[2, 3]), node("ReduceSumSquare", ["x"], ["d"], axes=[2, 3]),
      node("ReduceLogSumExp", ["x"], ["e"], axes=[2, 3]), node("ReduceProd", ["x"], ["f"], axes=[3]),
      node("ReduceMean", ["f"], ["g"], axes=[2]), node("GlobalMaxPool", ["x"], ["h"]),
      node("GlobalAveragePool", ["x"], ["k"]), node("Concat", ["a", "b", "c", "d", "e", "g", "h", "k"], axis=1)],
     [], True),
    ("normalizations-opset13", 13,
     [node("InstanceNormalization", ["x", "s", "b"], ["i"], epsilon=1e-3), node("LpNormalization", ["i"], ["l"], axis=1),
      node("Unsqueeze", ["l", "last"], ["q"]), node("Squeeze", ["q", "last"], ["u"]),
      node("Gather", ["u", "picks"], ["g"], axis=1), node("Transpose", ["g"], ["t"], perm=[0, 1, 3, 2]),
      node("Reshape", ["t", "back"])],
     [weights("s", 3), weights("b", 3, seed=1), ints("last", [4]), ints("picks", [2, 0, 2]),
      ints("back", [0, 3, H, W])], True),
    ("constant-of-shape-range-opset13", 13,
     [node("Shape", ["x"], ["shape"]), node("ConstantOfShape", ["shape"], ["ones"],
                                            value=numpy_helper.from_array(np.array([0.5], dtype=np.float32))),
      node("Range", ["start", "limit", "delta"], ["r"]), node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
      node("Mul", ["x", "rf"], ["xr"]), node("Add", ["xr", "ones"], ["xo"], name="shift"),
      node("Equal", ["r", "three"], ["eq"]),
      node("Not", ["eq"], ["ne"]), node("Less", ["x", "half"], ["lt"]), node("Where", ["ne", "xo", "x"], ["w"]),
      node("Where", ["lt", "w", "xo"], ["ww"], name="second_where"), node("Floor", ["ww"], ["fl"]), node("Ceil", ["ww"], ["ce"]),
      node("Add", ["fl", "ce"], ["fc"], name="rounded"), node("Mul", ["fc", "tiny"], ["small"], name="scaled"),
      node("Add", ["ww", "small"])],
     [ints("start", 0), ints("limit", W), ints("delta", 1), ints("three", 3), const("half", 0.5),
      const("tiny", 1e-3)], True),
    ("argmax-opset13", 13, [node("ArgMax", ["x"], ["i"], axis=1), node("Cast", ["i"], to=TensorProto.FLOAT)], [],
     False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_operator_matches_onnxruntime_with_gradients(tmp_path, case):
    _, opset, nodes, initializers, differentiable = case
    check(save(tmp_path, nodes, initializers, opset=opset), differentiable=differentiable)


@pytest.mark.parametrize("batch_fixed", [True, False])
def test_mean_variance_normalization_with_default_axes_normalizes_each_image(tmp_path, batch_fixed):
    """Its default axes (0, 2, 3) include the batch: exported at batch 1, that meant one image."""
    path = save(tmp_path, [node("MeanVarianceNormalization", ["x"], ["m"]), node("ReduceMean", ["m"], ["r"]),
                           node("Sub", ["m", "r"])], opset=9, batch=1 if batch_fixed else None)
    check(path, batch_fixed=True, batch=3)  # compared with onnxruntime image by image


def test_a_graph_that_mixes_the_images_of_a_batch_is_refused_naming_the_node(tmp_path):
    path = save(tmp_path, [node("ReduceMean", ["x"], ["mean"], axes=[0]), node("Sub", ["x", "mean"], name="centre")])
    with pytest.raises(ReIDBenchError, match=r"node 'centre' \(Sub\) mixes the images of a batch") as info:
        load_onnx_model(path, {"input_size": [H, W]})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("opset", [9, 13])
def test_a_graph_whose_batch_is_fixed_at_1_runs_at_any_batch(tmp_path, opset):
    """Reshape to literal [1, C, H, W] and [1, -1], Expand and Resize sizes with a batch of 1."""
    nodes = [node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             node("Reshape", ["c", "full"], ["r"], name="reshape_full"), node("Relu", ["r"], ["a"]),
             node("Expand", ["a", "same"], ["e"]),
             node("Upsample" if opset < 10 else "Resize", ["e", "scales"] if opset < 10 else ["e", "", "", "sizes"],
                  ["u"], mode="nearest"),
             node("Reshape", ["u", "flat"], ["f"]), node("Gemm", ["f", "fc", "fcb"], transB=1)]
    initializers = [weights("w", 4, 3, 3, 3), ints("full", [1, 4, H, W]), ints("same", [1, 4, H, W]),
                    ints("flat", [1, -1]), weights("fc", 5, 4 * H * W * 2, seed=1), weights("fcb", 5, seed=2)]
    initializers.append(const("scales", [1, 1, 2, 1]) if opset < 10 else ints("sizes", [1, 4, 2 * H, W]))
    path = save(tmp_path, nodes, initializers, opset=opset, batch=1)
    graph = check(path, batch_fixed=True, batch=4)
    assert graph(torch.rand(1, 3, H, W)).shape == (1, 5)


def test_a_batch_1_transformer_graph_repeats_its_class_token_for_every_image(tmp_path):
    """Patches to tokens through a literal [1, D, -1] Reshape, a constant class token of batch 1
    concatenated in front, position embeddings, the tokens' mean (a stand-in for attention),
    LayerNormalization, the class token out."""
    tokens = (H // 2) * (W // 2)
    nodes = [node("Conv", ["x", "patch"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Reshape", ["p", "as_tokens"], ["t"]), node("Transpose", ["t"], ["tt"], perm=[0, 2, 1]),
             node("Concat", ["cls", "tt"], ["z"], axis=1), node("Add", ["z", "pos"], ["zp"]),
             node("ReduceMean", ["zp"], ["context"], axes=[1]), node("Add", ["zp", "context"], ["mixed"], name="mix"),
             node("LayerNormalization", ["mixed", "g", "b"], ["n"]), node("Gather", ["n", "first"], axis=1)]
    initializers = [weights("patch", 4, 3, 2, 2), ints("as_tokens", [1, 4, -1]), weights("cls", 1, 1, 4, seed=1),
                    weights("pos", 1, tokens + 1, 4, seed=2), weights("g", 4, seed=3), weights("b", 4, seed=4),
                    ints("first", 0)]
    check(save(tmp_path, nodes, initializers, opset=17, batch=1), batch_fixed=True, batch=3)


@pytest.mark.parametrize("opset", [9, 13])
def test_a_batch_1_graph_that_squeezes_its_batch_away_keeps_it(tmp_path, opset):
    squeeze = node("Squeeze", ["p"], ["s"]) if opset < 13 else node("Squeeze", ["p", "axes"], ["s"])
    path = save(tmp_path, [node("GlobalAveragePool", ["x"], ["p"]), squeeze, node("Mul", ["s", "s"])],
                [ints("axes", [0, 2, 3])] if opset >= 13 else [], opset=opset, batch=1)
    graph = load_onnx_model(path, {"input_size": [H, W]}).graph
    x = torch.rand(4, 3, H, W)
    expected = np.stack([runtime(path, x[k:k + 1].numpy(), per_image=False) for k in range(4)])
    assert expected.shape == (4, 3)  # each image's run gives a vector of 3: the batch squeezed away
    assert np.abs(graph(x).numpy() - expected).max() < 1e-5


def test_batch_dependent_shape_arithmetic_is_folded_out_of_the_forward(tmp_path):
    path = save(tmp_path, CASES[[c[0] for c in CASES].index("reshape-shape-chain-opset13")][2],
                CASES[[c[0] for c in CASES].index("reshape-shape-chain-opset13")][3])
    graph = check(path)
    kinds = [type(step).__name__ + ":" + getattr(step, "op", "") for step in graph.steps]
    assert kinds == ["AffineStep:", "OpStep:Reshape"], kinds


def test_convolutions_are_torch_modules_with_batchnorm_folded_in(tmp_path):
    case = CASES[[c[0] for c in CASES].index("conv-same-upper-bn-opset9")]
    graph = check(save(tmp_path, case[2], case[3], opset=9))
    assert [type(step).__name__ for step in graph.steps] == ["ConvStep"]
    assert isinstance(graph.steps[0].conv, torch.nn.Conv2d) and graph.steps[0].pre_pad is not None


# --- refused, one line each, at load time ----------------------------------------------------

def refused(path, pattern, **spec):
    with pytest.raises(ReIDBenchError, match=pattern) as info:
        load_onnx_model(path, {"input_size": [H, W], **spec})
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    return str(info.value)


def test_initializers_that_do_not_fit_their_nodes_are_refused_at_load_naming_the_node(tmp_path):
    wrong_channels = save(tmp_path, [node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]), node("Relu", ["c"])],
                          [weights("w", 4, 5, 3, 3)], tag="conv")
    refused(wrong_channels, r"node 'conv_node' \(Conv\) fails on its inputs")
    wrong_features = save(tmp_path, [node("Flatten", ["x"], ["f"]), node("Gemm", ["f", "w"], transB=1)],
                          [weights("w", 5, 7)], tag="gemm")
    refused(wrong_features, r"node 'gemm_node' \(Gemm\) fails on its inputs")
    wrong_bn = save(tmp_path, [node("BatchNormalization", ["x", "g", "b", "m", "v"])],
                    [weights(n, 4, seed=k) for k, n in enumerate("gbmv")], tag="bn")
    refused(wrong_bn, r"node 'batchnormalization_node' \(BatchNormalization\) fails on its inputs")
    wrong_reshape = save(tmp_path, [node("Reshape", ["x", "s"])], [ints("s", [-1, 7, 5])], tag="reshape")
    refused(wrong_reshape, r"node 'reshape_node' \(Reshape\) fails on its inputs")


def test_a_batch_1_graph_that_cannot_run_at_another_batch_says_so(tmp_path):
    path = save(tmp_path, [node("Reshape", ["x", "s"])], [ints("s", [3 * H, W])], batch=1)
    message = refused(path, r"node 'reshape_node' \(Reshape\) fails on its inputs at batch 2|no batch axis")
    assert "reshape_node" in message


def test_dangling_inputs_outputs_without_batch_and_odd_attributes_are_one_line(tmp_path):
    refused(save(tmp_path, [node("Add", ["x", "ghost"])], tag="ghost"), r"uses 'ghost', which no earlier node")
    refused(save(tmp_path, [node("ReduceMean", ["x"], axes=[0], keepdims=0)], tag="nobatch"),
            r"output 'y' has no batch axis first \(lost at node 'reducemean_node'")
    refused(save(tmp_path, [node("Resize", ["x", "", "s"], mode="area")], [const("s", [1, 1, 2, 2])], tag="mode"),
            r"node 'resize_node' \(Resize\) fails on its inputs: Resize mode 'area' is not supported")
    refused(save(tmp_path, [node("Identity", ["w"])], [weights("w", 2, 3)], tag="const"), "does not depend on the image")
