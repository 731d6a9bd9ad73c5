"""A ReID model as inference toolkits ship it: opset 9, batch fixed at 1, a Reshape chain with
literal batch-1 shapes and a MeanVarianceNormalization with its default axes (0, 2, 3). It
converts unmodified, runs at any batch, matches onnxruntime, and M-I-FGSM attacks it."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from reidbench.attack import build_attack  # noqa: E402
from reidbench.features import embed  # noqa: E402
from reidbench.metrics import evaluate_rank, pairwise_distance  # noqa: E402
from reidbench.models.onnx_import import load_onnx_model  # noqa: E402

from attack_setup import white_box_context  # noqa: E402

SIZE = [64, 32]


def deployed_style(model: torch.nn.Module, path) -> None:
    """Export at batch 1 and opset 9, then end the graph as a toolkit's converter does: the
    embedding reshaped to [1, 1, D, 1], standardized by MVN, reshaped back to [1, -1]."""
    torch.onnx.export(model.eval(), (torch.rand(1, 3, *SIZE),), str(path), dynamo=False, opset_version=9,
                      input_names=["data"], output_names=["features"])
    proto = onnx.load(str(path))
    graph = proto.graph
    dim = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    graph.initializer.extend([numpy_helper.from_array(np.array([1, 1, dim, 1], dtype=np.int64), "as_map"),
                              numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "as_row")])
    graph.node.extend([helper.make_node("Reshape", ["features", "as_map"], ["map"], name="reshape_to_map"),
                       helper.make_node("MeanVarianceNormalization", ["map"], ["normalized"], name="mvn"),
                       helper.make_node("Reshape", ["normalized", "as_row"], ["embedding"], name="reshape_to_row")])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, dim]))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def deployed(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("deployed") / "reid_deployed.onnx"
    deployed_style(tiny_model.model, path)
    return path


def test_a_deployed_batch_1_opset_9_model_converts_unmodified_and_matches_onnxruntime(deployed):
    proto = onnx.load(str(deployed))
    assert proto.opset_import[0].version == 9
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    imported = load_onnx_model(deployed, {"input_size": SIZE})
    x = torch.rand(5, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(deployed), providers=["CPUExecutionProvider"])
    expected = np.concatenate([session.run(None, {"data": x[k:k + 1].numpy()})[0] for k in range(len(x))])
    x.requires_grad_(True)
    out = imported(x)
    assert np.abs(out.detach().numpy() - expected).max() < 1e-3
    out.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0


def rank1(model, images, ctx) -> float:
    with torch.no_grad():
        feats = embed(model, images)
    return float(evaluate_rank(pairwise_distance(feats, ctx.gallery_feats), ctx.query_pids, ctx.gallery_pids,
                               ctx.query_camids, ctx.gallery_camids).cmc[0])


def test_m_ifgsm_on_the_deployed_model_lowers_rank1(deployed, tiny_split):
    imported = load_onnx_model(deployed, {"input_size": SIZE})
    queries = tiny_split.query.load(None, tuple(SIZE))
    ctx = white_box_context(imported, tiny_split)
    adv = build_attack("m-ifgsm", eps=5 / 255, step=1 / 255, iterations=10, seed=0)(imported, queries, ctx)
    assert (adv - queries).abs().max() <= 5 / 255 + 1e-6
    clean, attacked = rank1(imported, queries, ctx), rank1(imported, adv, ctx)
    assert clean > 0.2, clean  # the tiny baseline's own level (0.4 when written)
    assert attacked < 0.5 * clean, (clean, attacked)
