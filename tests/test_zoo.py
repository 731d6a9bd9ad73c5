import hashlib

import pytest
import torch
from safetensors.torch import save_file

from reidbench.errors import ReIDBenchError
from reidbench.models import build_model
from reidbench.zoo import DEFAULT_ZOO, existing_weights, load_weights, load_zoo

GOOD = """
- id: m1
  backbone: resnet18
  dataset: {name: synthetic, preset: tiny}
  defense: {name: none}
"""


def write(tmp_path, text):
    path = tmp_path / "zoo.yaml"
    path.write_text(text)
    return path


def test_the_shipped_zoo_is_valid_and_has_a_default_suite():
    zoo = load_zoo(DEFAULT_ZOO)
    assert any("default" in e.suite for e in zoo.values())
    # `reidbench run --all` must stay a small CPU job: nothing above 64x32 may fall into the
    # default suite (an entry without `suite` does), and the papers' scale (256x128) lives in
    # the gpu suite alone; market-cpu's ImageNet MobileNetV2 entries run at Market's native 128x64
    for entry in zoo.values():
        size = tuple(entry.model.get("input_size", (64, 32)))
        if size > (64, 32):
            assert "default" not in entry.suite, entry.id
        if size >= (256, 128):
            assert entry.suite == ["gpu"], entry.id


def test_every_registered_defense_is_in_the_default_suite():
    """`reidbench run --all` is the benchmark a newcomer sees: a defense joins the default
    suite with its registration (a zoo entry with `suite: [default]`)."""
    from reidbench.registry import DEFENSES

    zoo = load_zoo(DEFAULT_ZOO)
    in_default = {entry.defense["name"] for entry in zoo.values() if "default" in entry.suite}
    missing = sorted(set(DEFENSES.names()) - in_default)
    assert not missing, f"registered defenses without a default-suite zoo entry: {missing}"


def test_a_minimal_entry_gets_defaults(tmp_path):
    entry = load_zoo(write(tmp_path, GOOD))["m1"]
    assert entry.suite == ["default"] and entry.defense == {"name": "none"} and entry.dataset_name == "synthetic"


@pytest.mark.parametrize("text, message", [
    ("- id: m1\n  backbone: [oops\n", "not valid YAML at line"),
    ("id: m1\n", "must be a list of model entries"),
    (GOOD + "  colour: red\n", "entry 'm1': unknown field 'colour'"),
    (GOOD.replace("backbone: resnet18", "backbone: 18"), "entry 'm1': field 'backbone' must be a string"),
    (GOOD.replace("  backbone: resnet18\n", ""), "entry 'm1': missing required field 'backbone'"),
    (GOOD + GOOD, "model id 'm1' appears twice"),
    (GOOD + "  weights: {repo: org/x, file: m.safetensors, sha256: abc}\n", "pinned revision"),
    (GOOD + "  weights: {url: http://x}\n", "unknown field 'weights.url'"),
    (GOOD.replace("dataset: {name: synthetic, preset: tiny}", "dataset: {preset: tiny}"), "'dataset' needs a string 'name'"),
])
def test_malformed_zoo_files_name_the_entry_and_field(tmp_path, text, message):
    with pytest.raises(ReIDBenchError) as info:
        load_zoo(write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_zoo_file(tmp_path):
    with pytest.raises(ReIDBenchError, match="not found"):
        load_zoo(tmp_path / "nope.yaml")


def _weights(tmp_path):
    model = build_model({"backbone": "resnet18"})
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_weights_are_hash_checked(tmp_path):
    _, path, digest = _weights(tmp_path)
    ok = load_zoo(write(tmp_path, GOOD + f"  weights: {{path: {path}, sha256: {digest}}}\n"))["m1"]
    assert existing_weights(ok) == path
    bad = load_zoo(write(tmp_path, GOOD + f"  weights: {{path: {path}, sha256: '{'0' * 64}'}}\n"))["m1"]
    with pytest.raises(ReIDBenchError, match="do not match their sha256"):
        existing_weights(bad)


def test_hub_weights_come_from_the_hub_cache_and_are_hash_checked(tmp_path, monkeypatch):
    import huggingface_hub

    _, path, digest = _weights(tmp_path)
    calls = []

    def fake_download(repo_id, filename, revision, force_download=False):
        calls.append((repo_id, filename, revision))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    entry_text = GOOD + f"  weights: {{repo: org/m1, file: w.safetensors, revision: abc123, sha256: {digest}}}\n"
    assert existing_weights(load_zoo(write(tmp_path, entry_text))["m1"]) == path
    assert calls == [("org/m1", "w.safetensors", "abc123")]
    wrong = entry_text.replace(digest, "f" * 64)
    with pytest.raises(ReIDBenchError, match="do not match their sha256"):
        existing_weights(load_zoo(write(tmp_path, wrong))["m1"])


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**_):
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    entry = load_zoo(write(tmp_path, GOOD + "  weights: {repo: org/m1, file: w.safetensors, revision: abc, sha256: ab}\n"))["m1"]
    with pytest.raises(ReIDBenchError, match="cannot fetch weights of 'm1' from the hub"):
        existing_weights(entry)


def test_a_checkpoint_that_does_not_fit_its_entry(tmp_path):
    _, path, _ = _weights(tmp_path)
    with pytest.raises(ReIDBenchError, match="recipe does not match its zoo entry"):
        load_weights(build_model({"backbone": "resnet34"}), path, "m1")


def test_torch_checkpoints_load_with_weights_only(tmp_path):
    model = build_model({"backbone": "resnet18"})
    path = tmp_path / "w.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    fresh = build_model({"backbone": "resnet18"})
    load_weights(fresh, path, "m1")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


BORROWING = GOOD + """
- id: m1-cs
  backbone: resnet18
  dataset: {name: synthetic, preset: tiny}
  defense: {name: cs}
  weights: {from: m1}
"""


def test_inference_only_defenses_borrow_the_baselines_weights(tmp_path, monkeypatch):
    from reidbench.zoo import training

    zoo = load_zoo(write(tmp_path, BORROWING))
    trained = []
    monkeypatch.setattr(training, "train_entry", lambda entry, *a, **k: trained.append(entry.id) or tmp_path / "w")
    assert training.obtain_weights(zoo["m1-cs"], split=None, zoo=zoo) == tmp_path / "w"
    assert trained == ["m1"]


@pytest.mark.parametrize("text, message", [
    (BORROWING.replace("from: m1", "from: m2"), "weights.from names no zoo entry"),
    (BORROWING.replace("{name: cs}", "{name: goat}"), "changes training, so it needs its own weights"),
    (BORROWING.replace("backbone: resnet18\n  dataset: {name: synthetic, preset: tiny}\n  defense: {name: cs}",
                       "backbone: resnet34\n  dataset: {name: synthetic, preset: tiny}\n  defense: {name: cs}"),
     "has another backbone"),
    (BORROWING + "  recipe: {epochs: 3}\n", "a borrowing entry trains nothing; remove its own 'recipe'"),
])
def test_bad_weight_borrowing_is_one_line(tmp_path, text, message):
    with pytest.raises(ReIDBenchError, match=message):
        load_zoo(write(tmp_path, text))


def test_a_checkpoint_from_another_recipe_is_refused(tmp_path):
    model = build_model({"backbone": "resnet18"})
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"recipe_key": '"aaaaaaaaaaaa"'})
    load_weights(model, path, "m1", recipe_key="aaaaaaaaaaaa")
    with pytest.raises(ReIDBenchError, match="recipe does not match its zoo entry"):
        load_weights(model, path, "m1", recipe_key="bbbbbbbbbbbb")


FINETUNED = GOOD + """
- id: m1-at
  backbone: resnet18
  dataset: {name: synthetic, preset: tiny}
  defense: {name: at}
  init: {from: m1}
  recipe: {epochs: 2}
"""


def test_fine_tuned_entries_pin_their_bases_recipe(tmp_path):
    zoo = load_zoo(write(tmp_path, FINETUNED))
    assert zoo["m1-at"].init == {"from": "m1", "recipe_key": zoo["m1"].recipe_key()}
    changed = load_zoo(write(tmp_path, FINETUNED.replace("defense: {name: none}", "defense: {name: none}\n  recipe: {epochs: 7}")))
    # retraining the base must retrain what starts from it
    assert changed["m1-at"].recipe_key() != zoo["m1-at"].recipe_key()


def test_a_defense_naming_another_entry_pins_its_recipe(tmp_path):
    text = GOOD + """
- id: m1-apd
  backbone: resnet18
  dataset: {name: synthetic, preset: tiny}
  defense: {name: apd, feature_net: m1}
  model: {head: apd-split}
"""
    zoo = load_zoo(write(tmp_path, text))
    assert zoo["m1-apd"].references == {"feature_net": {"from": "m1", "recipe_key": zoo["m1"].recipe_key()}}
    changed = load_zoo(write(tmp_path, text.replace("defense: {name: none}", "defense: {name: none}\n  recipe: {epochs: 7}")))
    # APD's frozen feature network changed: its generated samples, hence its weights, change
    assert changed["m1-apd"].recipe_key() != zoo["m1-apd"].recipe_key()
    imagenet = load_zoo(write(tmp_path, text.replace("feature_net: m1", "feature_net: imagenet")))
    assert imagenet["m1-apd"].references == {}


@pytest.mark.parametrize("text, message", [
    (FINETUNED.replace("init: {from: m1}", "init: {from: m9}"), "init.from names no zoo entry"),
    (FINETUNED.replace("init: {from: m1}", "init: {from: m1, lr: 3}"), "'init' takes exactly one string field"),
    (FINETUNED.replace("dataset: {name: synthetic, preset: tiny}\n  defense: {name: at}",
                       "dataset: {name: synthetic, preset: small}\n  defense: {name: at}"), "has another dataset"),
    (FINETUNED.replace("defense: {name: none}", "defense: {name: none}\n  init: {from: m1-at}"), "makes a cycle"),
])
def test_bad_fine_tuning_is_one_line(tmp_path, text, message):
    with pytest.raises(ReIDBenchError, match=message):
        load_zoo(write(tmp_path, text))


def test_fine_tuning_starts_from_the_bases_weights(tmp_path, tiny_split):
    import reidbench.zoo as zoo_module

    text = FINETUNED.replace("backbone: resnet18", "backbone: resnet10t").replace(
        "defense: {name: none}", "defense: {name: none}\n  model: {input_size: [32, 16]}\n  recipe: {epochs: 1, batch: {p: 4, k: 2}}"
    ).replace("init: {from: m1}", "init: {from: m1}\n  model: {input_size: [32, 16]}").replace(
        "recipe: {epochs: 2}", "recipe: {epochs: 1, batch: {p: 4, k: 2}, iters_per_epoch: 1, lr: 0.0, warmup_epochs: 0}")
    # ids of its own: the session cache may hold another test's "m1" with the same recipe key
    zoo = load_zoo(write(tmp_path, text.replace("m1", "ftbase")))
    at_weights = zoo_module.obtain_weights(zoo["ftbase-at"], tiny_split, progress=False, zoo=zoo)
    base_weights = zoo_module.existing_weights(zoo["ftbase"])
    from safetensors.torch import load_file

    base, tuned = load_file(str(base_weights)), load_file(str(at_weights))
    # lr 0: one step of fine-tuning leaves the base's trained weights (classifier included)
    assert torch.equal(base["classifier.weight"], tuned["classifier.weight"])
    assert torch.equal(base["backbone.conv1.0.weight"], tuned["backbone.conv1.0.weight"])


ONNX = GOOD + "  model: {input_size: [64, 32], channel_order: BGR, value_range: 255, mean: [1, 2, 3], std: [4, 5, 6]}\n" \
    "  weights: {onnx: models/m1.onnx}\n"


def test_an_onnx_entry_reads_its_file_next_to_the_zoo_file(tmp_path):
    entry = load_zoo(write(tmp_path, ONNX))["m1"]
    assert entry.is_onnx
    with pytest.raises(ReIDBenchError, match=f"weights of 'm1' not found at {tmp_path / 'models' / 'm1.onnx'}"):
        existing_weights(entry)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m1.onnx").write_bytes(b"graph")
    assert existing_weights(entry) == tmp_path / "models" / "m1.onnx"


@pytest.mark.parametrize("old, new, message", [
    ("channel_order: BGR", "channel_order: bgr", "field 'model.channel_order' must be RGB or BGR, got 'bgr'"),
    ("value_range: 255", "value_range: 256", "field 'model.value_range' must be 1 or 255"),
    ("input_size: [64, 32], ", "", "an ONNX model needs 'model.input_size: [H, W]'"),
    ("input_size: [64, 32]", "input_size: [64]", "field 'model.input_size' must be two positive integers"),
    ("mean: [1, 2, 3]", "mean: [1, 2]", "field 'model.mean' must be a list of three numbers"),
    ("std: [4, 5, 6]", "std: [4, 0, 6]", "field 'model.std' must be positive"),
    ("std: [4, 5, 6]", "last_stride: 1", "unknown field 'model.last_stride' for an ONNX model"),
    ("{onnx: models/m1.onnx}", "{onnx: models/m1.onnx, path: w.safetensors}", "'weights.onnx' names the model file itself"),
])
def test_onnx_input_specs_are_checked_with_the_entry(tmp_path, old, new, message):
    with pytest.raises(ReIDBenchError) as info:
        load_zoo(write(tmp_path, ONNX.replace(old, new)))
    assert f"entry 'm1': {message}" in str(info.value) and "\n" not in str(info.value)


def test_an_onnx_entry_is_not_trained(tmp_path):
    from reidbench.zoo import train_entry

    with pytest.raises(ReIDBenchError, match="imported ONNX model; reidbench cannot train it"):
        train_entry(load_zoo(write(tmp_path, ONNX))["m1"])


def test_a_torch_checkpoint_that_needs_pickled_code_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {}, "recipe": ReIDBenchError("a pickled object")}, path)
    with pytest.raises(ReIDBenchError, match="cannot read w.pt as a weights-only torch checkpoint"):
        load_weights(build_model({"backbone": "resnet18"}), path, "m1")
