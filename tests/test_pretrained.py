"""ImageNet initialisation from a pinned local file (reidbench/models/pretrained.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reidbench.errors import ReIDBenchError
from reidbench.models import ReIDModel, build_model
from reidbench.models.pretrained import LAYOUTS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "weights" / "imagenet" / "mobilenet_v2-imagenet1k.safetensors"
SHARED_SHA = "56ec2c53fabd9fd2d328fe9ead7659ccd875af992f689ca261cf2123fb5ff4f8"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _torchvision_layout_file(tmp_path: Path) -> Path:
    """A MobileNetV2 trunk in torchvision's key layout with random values (the shared ImageNet
    file's layout, without needing it)."""
    from conftest import random_mobilenet_trunk

    path = tmp_path / "mnv2.safetensors"
    random_mobilenet_trunk(path)
    return path


def test_torchvision_layout_loads_and_matches_torchvision(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    path = _torchvision_layout_file(tmp_path)
    spec = {"file": str(path), "sha256": _sha(path), "layout": "torchvision"}
    model = ReIDModel("mobilenetv2_100", pretrained=spec, last_stride=2, input_size=(64, 32)).eval()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert model.load_pretrained() == path
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after if after[k].is_floating_point())
    reference = torchvision.models.mobilenet_v2().eval()
    reference.load_state_dict(load_file(str(path)), strict=False)
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        expected = reference.features(model.normalize(x)).mean((2, 3))
        assert torch.allclose(model.backbone(model.normalize(x)), expected, atol=1e-5)


@pytest.mark.skipif(not SHARED.is_file(), reason="the shared ImageNet weights are not here")
def test_shared_imagenet_file_found_by_relative_name(monkeypatch):
    monkeypatch.setenv("REIDBENCH_WEIGHTS", str(SHARED.parents[1]))
    spec = {"file": "imagenet/mobilenet_v2-imagenet1k.safetensors", "sha256": SHARED_SHA, "layout": "torchvision"}
    model = build_model({"backbone": "mobilenetv2_100", "pretrained": spec, "input_size": [64, 32]})
    stem_before = model.backbone.conv_stem.weight.detach().clone()
    assert model.load_pretrained() == SHARED.resolve() or model.load_pretrained().samefile(SHARED)
    assert not torch.equal(stem_before, model.backbone.conv_stem.weight)


def test_tampered_file_is_refused_before_loading(tmp_path, monkeypatch):
    path = _torchvision_layout_file(tmp_path)
    spec = {"file": str(path), "sha256": _sha(path), "layout": "torchvision"}
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("a tampered file was parsed"))
    model = ReIDModel("mobilenetv2_100", pretrained=spec, input_size=(64, 32))
    with pytest.raises(ReIDBenchError, match="sha256") as info:
        model.load_pretrained()
    assert "\n" not in str(info.value)


def test_truncated_file_is_refused(tmp_path):
    path = _torchvision_layout_file(tmp_path)
    spec = {"file": str(path), "sha256": _sha(path), "layout": "torchvision"}
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ReIDBenchError, match="refusing to load"):
        ReIDModel("mobilenetv2_100", pretrained=spec, input_size=(64, 32)).load_pretrained()


def test_missing_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("REIDBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    spec = {"file": "imagenet/nope.safetensors", "sha256": "0" * 64}
    with pytest.raises(ReIDBenchError, match="not found") as info:
        ReIDModel("resnet18", pretrained=spec, input_size=(64, 32)).load_pretrained()
    assert "REIDBENCH_WEIGHTS" in str(info.value) and "\n" not in str(info.value)


def test_keys_that_do_not_fit_the_backbone_are_one_line(tmp_path):
    path = _torchvision_layout_file(tmp_path)
    # the right file for the wrong network: a timm-layout load into a ResNet-18
    spec = {"file": str(path), "sha256": _sha(path), "layout": "timm"}
    with pytest.raises(ReIDBenchError, match="do not fit backbone 'resnet18'") as info:
        ReIDModel("resnet18", pretrained=spec, input_size=(64, 32)).load_pretrained()
    assert "missing" in str(info.value) and "\n" not in str(info.value)
    # a torchvision layout for an architecture with no known renaming
    spec["layout"] = "torchvision"
    with pytest.raises(ReIDBenchError, match="no 'torchvision' key layout"):
        ReIDModel("resnet18", pretrained=spec, input_size=(64, 32)).load_pretrained()


def test_a_file_of_another_width_is_refused(tmp_path):
    model = ReIDModel("mobilenetv2_100", input_size=(64, 32))
    state = {k: torch.zeros(*(s + 1 for s in v.shape)) if k == "conv_stem.weight" else v
             for k, v in model.backbone.state_dict().items()}
    path = tmp_path / "wide.safetensors"
    save_file(state, str(path))
    spec = {"file": str(path), "sha256": _sha(path)}
    with pytest.raises(ReIDBenchError, match="of another shape"):
        ReIDModel("mobilenetv2_100", pretrained=spec, input_size=(64, 32)).load_pretrained()


@pytest.mark.parametrize("spec, match", [
    ({"file": "x.safetensors"}, "file and sha256"),
    ({"file": "x.safetensors", "sha256": "abc"}, "64 lowercase hex"),
    ({"file": "x.safetensors", "sha256": "0" * 64, "layout": "caffe"}, "unknown pretrained layout"),
    ({"file": "x.safetensors", "sha256": "0" * 64, "revision": "main"}, "file and sha256"),
])
def test_malformed_spec(spec, match):
    with pytest.raises(ReIDBenchError, match=match):
        ReIDModel("resnet18", pretrained=spec, input_size=(64, 32)).load_pretrained()


def test_last_stride_one_on_a_mobilenet():
    """MobileNetV2's last reported stage does not downsample; the block before it does."""
    x = torch.rand(1, 3, 128, 64)
    one = ReIDModel("mobilenetv2_100", last_stride=1, input_size=(128, 64)).eval()
    two = ReIDModel("mobilenetv2_100", last_stride=2, input_size=(128, 64)).eval()
    assert one.backbone.forward_features(x).shape[-2:] == (8, 4)
    assert two.backbone.forward_features(x).shape[-2:] == (4, 2)


def test_every_layout_covers_its_architecture(tmp_path):
    """Each renaming maps the reference layout onto every key of the timm backbone."""
    import timm
    import torchvision

    sources = {("torchvision", "mobilenetv2_100"): torchvision.models.mobilenet_v2}
    assert set(sources) == set(LAYOUTS)
    for (layout, name), rename in LAYOUTS.items():
        keys = [k for k in sources[(layout, name)]().state_dict() if k.startswith("features.")]
        assert sorted(map(rename, keys)) == sorted(timm.create_model(name, num_classes=0).state_dict())


def test_trained_entry_starts_from_the_pinned_file(tmp_path, monkeypatch):
    """train_entry loads the pinned file before the first step; an entry with init.from does not."""
    from reidbench import zoo as zoo_module

    path = _torchvision_layout_file(tmp_path)
    calls = []
    monkeypatch.setattr(ReIDModel, "load_pretrained", lambda self: calls.append(self) or path)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("reidbench.train.loop.train_model", stop)
    monkeypatch.setenv("REIDBENCH_CACHE", str(tmp_path / "cache"))
    entry = zoo_module.ZooEntry(
        id="m", backbone="mobilenetv2_100", dataset={"name": "synthetic", "preset": "tiny"}, defense={"name": "none"},
        model={"input_size": [64, 32], "pretrained": {"file": str(path), "sha256": _sha(path), "layout": "torchvision"}},
        recipe={"epochs": 1})
    with pytest.raises(Stop):
        zoo_module.train_entry(entry, progress=False)
    assert len(calls) == 1


def test_zoo_checks_a_pinned_pretrained_file_at_load(tmp_path):
    from reidbench.zoo import load_zoo

    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("- id: m\n  backbone: mobilenetv2_100\n  dataset: synthetic\n"
                   "  model: {pretrained: {file: x.safetensors, sha256: nothex}}\n")
    with pytest.raises(ReIDBenchError, match="entry 'm'.*64 lowercase hex"):
        load_zoo(zoo)


def test_market_imagenet_entries_pin_the_shared_file():
    """Every market-cpu entry starts from the pinned ImageNet trunk, directly or through its base."""
    from reidbench.zoo import load_zoo, training_entry

    zoo = load_zoo()
    market = [e for e in zoo.values() if "market-cpu" in e.suite]
    assert market
    for entry in market:
        source = training_entry(entry, zoo)
        while source.init:
            source = zoo[source.init["from"]]
        assert source.model["pretrained"]["sha256"] == SHARED_SHA, entry.id
