"""An ONNX graph becomes a differentiable torch module that attacks can use."""

import json

import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")

from reidbench.cli import main  # noqa: E402
from reidbench.errors import ReIDBenchError  # noqa: E402
from reidbench.models import build_model  # noqa: E402
from reidbench.models.onnx_import import load_onnx_model  # noqa: E402


def export(module: nn.Module, example: torch.Tensor, path, opset: int = 17) -> None:
    torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=["embedding"], dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}})


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Fresh BN statistics are 0 and 1: make them carry information the converter must keep."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return model


@pytest.fixture(scope="module")
def resnet_and_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model({"backbone": "resnet18", "input_size": [32, 16]})).eval()
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    export(model, torch.rand(2, 3, 32, 16), path)
    return model, path


def embedding_and_gradient(model, x, direction):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * direction).sum().backward()
    return out.detach(), x.grad


def test_an_exported_reid_model_converts_back_with_its_outputs_and_gradients(resnet_and_onnx):
    model, path = resnet_and_onnx
    imported = load_onnx_model(path, {"input_size": [32, 16]})
    assert imported.input_size == (32, 16)
    x = torch.rand(3, 3, 32, 16, generator=torch.Generator().manual_seed(1))
    direction = torch.randn(3, model.feat_dim, generator=torch.Generator().manual_seed(2))
    expected, expected_grad = embedding_and_gradient(model, x, direction)
    out, grad = embedding_and_gradient(imported, x, direction)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-4, rtol=0), (out - expected).abs().max()
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, expected_grad, atol=1e-5 + 1e-3 * expected_grad.abs().max(), rtol=1e-3)
    assert nn.functional.cosine_similarity(grad.flatten(), expected_grad.flatten(), dim=0) > 0.9999


class BGR255NHWC(nn.Module):
    """A deployed model whose preprocessing lives outside the graph: it takes BGR pixels in
    0..255, normalized with 0..255 statistics, in NHWC layout."""

    mean = torch.tensor([103.5, 116.3, 123.7])
    std = torch.tensor([57.4, 57.1, 58.4])

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        bgr255 = z.permute(0, 3, 1, 2) * self.std.view(1, 3, 1, 1) + self.mean.view(1, 3, 1, 1)
        return self.model(bgr255.flip(1) / 255.0)


def test_the_wrapper_converts_images_to_the_graphs_layout_range_and_normalization(resnet_and_onnx, tmp_path):
    model, _ = resnet_and_onnx
    path = tmp_path / "bgr.onnx"
    export(BGR255NHWC(model), torch.rand(2, 32, 16, 3), path)
    spec = {"input_size": [32, 16], "channel_order": "BGR", "value_range": 255, "layout": "NHWC",
            "mean": BGR255NHWC.mean.tolist(), "std": BGR255NHWC.std.tolist()}
    x = torch.rand(2, 3, 32, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(load_onnx_model(path, spec)(x), expected, atol=1e-4, rtol=0)
        as_rgb = load_onnx_model(path, {**spec, "channel_order": "RGB"})(x)
    assert not torch.allclose(as_rgb, expected, atol=1e-2), "the channel order made no difference"


class ManyOperators(nn.Module):
    """Operators a ReID network may use beyond a plain ResNet export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=(1, 2), groups=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.InstanceNorm2d(8, affine=True)
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        x = nn.functional.pad(x, (1, 1, 2, 0), mode="reflect")
        x = nn.functional.hardswish(self.conv(x))
        x = self.norm(self.depthwise(x)) * torch.sigmoid(x) - 0.1
        x = nn.functional.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False, ceil_mode=True)
        x = nn.functional.leaky_relu(x, 0.2).clamp(min=1e-6)
        gem = nn.functional.adaptive_avg_pool2d(x.pow(3.0), 1).pow(1 / 3.0).flatten(1)
        top = x[:, :, : x.shape[2] // 2].mean(dim=(2, 3))
        y = self.fc(torch.cat([gem, top], dim=1))
        return nn.functional.normalize(y.reshape(y.shape[0], 2, 3), dim=-1).reshape(y.shape[0], -1) / 2.0


@pytest.mark.parametrize("opset", [11, 17])
def test_more_operators_match_torch_in_value_and_gradient(tmp_path, opset):
    torch.manual_seed(0)
    module = ManyOperators().eval()
    path = tmp_path / "many.onnx"
    export(module, torch.rand(2, 3, 20, 12), path, opset=opset)
    imported = load_onnx_model(path, {"input_size": [20, 12]})
    x = torch.rand(3, 3, 20, 12, generator=torch.Generator().manual_seed(4))
    direction = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    expected, expected_grad = embedding_and_gradient(module, x, direction)
    out, grad = embedding_and_gradient(imported, x, direction)
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    assert torch.allclose(grad, expected_grad, atol=1e-5, rtol=1e-3)


def test_an_unsupported_operator_is_one_line_naming_it(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("GridSample", ["x", "x"], ["y"], name="fancy_warp")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "warp.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ReIDBenchError) as info:
        load_onnx_model(path, {"input_size": [8, 4]})
    message = str(info.value)
    assert "operator 'GridSample'" in message and "node 'fancy_warp'" in message and "\n" not in message


def test_a_graph_of_another_input_size_or_a_broken_file_is_one_line(resnet_and_onnx, tmp_path):
    _, path = resnet_and_onnx
    static = tmp_path / "static.onnx"
    torch.onnx.export(resnet_and_onnx[0], (torch.rand(1, 3, 32, 16),), str(static), dynamo=False)
    with pytest.raises(ReIDBenchError, match=r"does not fit model.input_size \[64, 32\]"):
        load_onnx_model(static, {"input_size": [64, 32]})
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00not a protobuf at all" * 10)
    with pytest.raises(ReIDBenchError, match="not a readable ONNX model"):
        load_onnx_model(broken, {"input_size": [32, 16]})
    with pytest.raises(ReIDBenchError, match="has no output 'logits'"):
        load_onnx_model(path, {"input_size": [32, 16], "output": "logits"})


def test_the_runner_evaluates_and_attacks_an_onnx_entry_like_its_torch_original(tiny_zoo_file, tiny_model, tmp_path):
    export(tiny_model.model, torch.rand(2, 3, 64, 32), tmp_path / "tiny.onnx")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(tiny_zoo_file.read_text() + """
- id: tiny-onnx
  backbone: resnet10t (ONNX export)
  dataset: {name: synthetic, preset: tiny}
  defense: none
  model: {input_size: [64, 32]}
  weights: {onnx: tiny.onnx}
""")
    results = tmp_path / "results"
    argv = ["run", "--model", "tiny-none", "tiny-onnx", "--zoo", str(zoo), "--results", str(results),
            "--site", str(tmp_path / "site"), "--device", "cpu", "--attack", "m-fgsm", "--no-rerank", "--no-train"]
    assert main(argv) == 0
    torch_cell, onnx_cell = (json.loads((results / f"v2/synthetic/{m}/m-fgsm-eps5.json").read_text())
                             for m in ("tiny-none", "tiny-onnx"))
    assert onnx_cell["clean"]["mAP"] == pytest.approx(torch_cell["clean"]["mAP"], abs=1e-6)
    assert onnx_cell["attacked"]["mAP"] == pytest.approx(torch_cell["attacked"]["mAP"], abs=0.02)
    assert onnx_cell["attacked"]["mAP"] < onnx_cell["clean"]["mAP"] - 0.05


def test_the_python_api_takes_the_preprocessing_as_keywords(resnet_and_onnx, tmp_path):
    model, _ = resnet_and_onnx
    path = tmp_path / "bgr.onnx"
    export(BGR255NHWC(model), torch.rand(2, 32, 16, 3), path)
    imported = load_onnx_model(path, input_size=(32, 16), channel_order="BGR", value_range=255, layout="NHWC",
                               mean=BGR255NHWC.mean.tolist(), std=BGR255NHWC.std.tolist())
    x = torch.rand(2, 3, 32, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(imported(x), model(x), atol=1e-4, rtol=0)
    with pytest.raises(ReIDBenchError, match="unknown option 'colour_order'"):
        load_onnx_model(path, input_size=(32, 16), colour_order="BGR")
    with pytest.raises(ReIDBenchError, match="must be RGB or BGR"):
        load_onnx_model(path, input_size=(32, 16), channel_order="GBR")


def test_a_converted_model_copies_and_refuses_images_of_another_size(resnet_and_onnx):
    import copy

    _, path = resnet_and_onnx
    imported = load_onnx_model(path, {"input_size": [32, 16]})
    twin = copy.deepcopy(imported)
    for step in twin.graph.steps:  # the copy's weights are its own: changing them leaves the original
        if hasattr(step, "conv"):
            step.conv.weight.mul_(0)
    x = torch.rand(2, 3, 32, 16)
    with torch.no_grad():
        assert not torch.allclose(imported(x), twin(x))
    with pytest.raises(ReIDBenchError, match=r"converted for images of shape \[3, 32, 16\].*got \[3, 64, 32\]"):
        imported(torch.rand(1, 3, 64, 32))
