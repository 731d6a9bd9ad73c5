import pytest
import torch
from safetensors.torch import save_file

from reidbench.errors import ReIDBenchError
from reidbench.models import ReIDModel, build_model


def test_eval_returns_embeddings_and_train_returns_logits_and_features():
    model = ReIDModel("resnet18", num_classes=7, input_size=(64, 32))
    model.eval()
    assert model(torch.rand(3, 3, 64, 32)).shape == (3, 512)
    model.train()
    logits, feats = model(torch.rand(3, 3, 64, 32))
    assert logits.shape == (3, 7) and feats.shape == (3, 512)


def test_last_stride_one_doubles_the_final_feature_map():
    strided = ReIDModel("resnet18", last_stride=2).backbone.forward_features(torch.rand(1, 3, 64, 32))
    unstrided = ReIDModel("resnet18", last_stride=1).backbone.forward_features(torch.rand(1, 3, 64, 32))
    assert unstrided.shape[-2:] == (strided.shape[-2] * 2, strided.shape[-1] * 2)


def test_normalization_lives_inside_the_model():
    model = ReIDModel("resnet18", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    x = torch.rand(2, 3, 64, 32)
    expected = model.bottleneck(model.backbone((x - 0.5) / 0.25))
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("pooling", ["max", "gem"])
def test_other_poolings(pooling):
    model = ReIDModel("resnet18", pooling=pooling).eval()
    assert model(torch.rand(2, 3, 64, 32)).shape == (2, 512)


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(ReIDBenchError, match="did you mean 'resnet50'"):
        build_model({"backbone": "resnet5O"})


def test_unknown_model_option_is_reported():
    with pytest.raises(ReIDBenchError, match="unknown model option"):
        build_model({"backbone": "resnet18", "strde": 1})


def test_pretrained_offline_fails_with_one_clear_line(monkeypatch):
    import huggingface_hub.constants

    # What HF_HUB_OFFLINE=1 in the environment does, set after import (the hub reads it at call time).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ReIDBenchError) as info:
        ReIDModel("resnet18", pretrained=True)
    message = str(info.value)
    assert "cannot load pretrained weights for 'resnet18'" in message and "\n" not in message


def test_pretrained_from_a_local_file(tmp_path):
    import timm

    source = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = ReIDModel("resnet18", pretrained=str(path), last_stride=2)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_missing_local_pretrained_file(tmp_path):
    with pytest.raises(ReIDBenchError, match="not found"):
        ReIDModel("resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_backbone_args_reach_timm_and_a_wrong_one_is_one_line():
    narrow = build_model({"backbone": "resnet18", "input_size": [32, 16],
                          "backbone_args": {"channels": [16, 32, 64, 128], "stem_width": 16}})
    assert narrow.feat_dim == 128
    with pytest.raises(ReIDBenchError, match="backbone 'resnet18' does not accept backbone_args") as info:
        build_model({"backbone": "resnet18", "backbone_args": {"colour": 3}})
    assert "\n" not in str(info.value)
