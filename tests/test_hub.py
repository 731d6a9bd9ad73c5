"""The zoo on the Hugging Face Hub, against a fake hub: a hub cache laid out on disk with the
hub switched offline, and a recording stand-in for HfApi. No test touches the network."""

import hashlib
import json
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

import reidbench.zoo as zoo_module
from reidbench.cache import sha256_file
from reidbench.cli import main
from reidbench.models import build_model
from reidbench.zoo import load_weights, load_zoo

REVISION = "0123456789abcdef0123456789abcdef01234567"
MODEL = {"backbone": "resnet10t", "input_size": [32, 16]}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache; huggingface_hub may only read it (offline mode)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_file(cache: Path, repo: str, revision: str, filename: str, data: bytes) -> str:
    """Put a file where huggingface_hub keeps a downloaded one; returns its sha256."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / revision / filename).write_bytes(data)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return hashlib.sha256(data).hexdigest()


def hub_zoo(tmp_path, sha256: str, revision: str = REVISION, extra: str = "") -> str:
    path = tmp_path / "zoo.yaml"
    path.write_text(f"""
- id: m1
  backbone: resnet10t
  dataset: {{name: synthetic, preset: tiny}}
  model: {{input_size: [32, 16]}}
  recipe: {{epochs: 1, batch: {{p: 4, k: 2}}}}
  weights: {{repo: org/m1, file: model.safetensors, revision: '{revision}', sha256: '{sha256}'}}
{extra}""")
    return str(path)


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("reidbench: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_pull_takes_pinned_weights_from_the_hub_cache_after_checking_their_hash(tmp_path, hub_cache, capsys):
    digest = cache_file(hub_cache, "org/m1", REVISION, "model.safetensors", b"weights")
    code, out, err = run_cli(capsys, "zoo", "pull", "m1", "--zoo", hub_zoo(tmp_path, digest))
    assert code == 0, err
    assert f"snapshots/{REVISION}/model.safetensors" in out and f"sha256 {digest}" in out


def test_pull_refuses_weights_whose_hash_differs(tmp_path, hub_cache, capsys):
    cache_file(hub_cache, "org/m1", REVISION, "model.safetensors", b"tampered weights")
    code, _, err = run_cli(capsys, "zoo", "pull", "m1", "--zoo", hub_zoo(tmp_path, "ab" * 32))
    assert_one_line_error(code, err, "weights of 'm1' do not match their sha256")


def test_an_unpinned_or_unknown_revision_is_one_line(tmp_path, hub_cache, capsys, monkeypatch):
    unpinned = hub_zoo(tmp_path, "ab" * 32)
    Path(unpinned).write_text(Path(unpinned).read_text().replace(f"revision: '{REVISION}', ", ""))
    assert_one_line_error(*run_cli(capsys, "zoo", "pull", "m1", "--zoo", unpinned)[::2], "hub weights need a pinned revision")

    from huggingface_hub.errors import RevisionNotFoundError

    def no_such_revision(**_):
        raise RevisionNotFoundError("404 Client Error. Revision Not Found", response=types.SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_such_revision)
    code, _, err = run_cli(capsys, "zoo", "pull", "m1", "--zoo", hub_zoo(tmp_path, "ab" * 32, revision="f" * 40))
    assert_one_line_error(code, err, f"the repo has no revision '{'f' * 40}'")


def test_an_unreachable_hub_is_one_line_that_offers_training(tmp_path, hub_cache, capsys):
    code, _, err = run_cli(capsys, "zoo", "pull", "m1", "--zoo", hub_zoo(tmp_path, "ab" * 32))
    assert_one_line_error(code, err, "cannot fetch weights of 'm1' from the hub (org/m1@",
                          "the hub cannot be reached", "pass --train-missing")


def fake_trainer(calls):
    """Stands in for the training loop: a checkpoint of the right shape, written where the
    loop writes, with the recipe key the loop records."""
    def train(entry, split=None, device="cpu", progress=True, zoo=None):
        calls.append(entry.id)
        target = zoo_module.trained_weights_file(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        model = build_model(entry.model_spec())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target),
                  metadata={"recipe_key": json.dumps(entry.recipe_key())})
        return target
    return train


def test_train_missing_falls_back_to_training_when_the_hub_is_unreachable(tmp_path, hub_cache, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(zoo_module.training, "train_entry", fake_trainer(calls))
    zoo = hub_zoo(tmp_path, "ab" * 32)
    code, out, err = run_cli(capsys, "zoo", "pull", "m1", "--zoo", zoo, "--train-missing")
    assert code == 0, err
    assert calls == ["m1"] and "model.safetensors" in out
    assert run_cli(capsys, "zoo", "pull", "m1", "--zoo", zoo, "--train-missing")[0] == 0
    assert calls == ["m1"], "the locally trained fallback is cached, not retrained"

    # The runner: hub failure -> training only when asked; the fallback weights load into the model.
    from reidbench.runner import Runner

    entries = load_zoo(zoo)
    with pytest.raises(zoo_module.HubUnreachable):
        Runner(entries, tmp_path / "results", device="cpu", progress=False).bundle(entries["m1"])
    bundle = Runner(entries, tmp_path / "results", device="cpu", progress=False, train_if_unreachable=True).bundle(entries["m1"])
    assert bundle.weights_sha256 == sha256_file(zoo_module.trained_weights_file(entries["m1"]))
    assert_one_line_error(*run_cli(capsys, "run", "--model", "m1", "--zoo", zoo, "--no-train", "--train-missing")[::2],
                          "contradict")


def test_zoo_list_says_where_weights_are_and_whether_they_are_here(tmp_path, hub_cache, capsys):
    digest = cache_file(hub_cache, "org/m1", REVISION, "model.safetensors", b"weights")
    (tmp_path / "local.safetensors").write_bytes(b"x")
    extra = """
- id: m2
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  weights: {repo: org/m2, file: model.safetensors, revision: 'ffffffffffffffffffffffffffffffffffffffff', sha256: ab}
- id: m3
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  weights: {path: local.safetensors}
- id: m4
  backbone: my-osnet
  dataset: {name: synthetic, preset: tiny}
  model: {input_size: [64, 32], channel_order: BGR, value_range: 255}
  weights: {onnx: models/osnet.onnx}
- id: m5
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  defense: cs
  model: {input_size: [32, 16]}
  weights: {from: m1}
- id: m6
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
"""
    code, out, err = run_cli(capsys, "zoo", "list", "--zoo", hub_zoo(tmp_path, digest, extra=extra))
    assert code == 0, err
    rows = [line.split("\t") for line in out.strip().splitlines()]
    assert rows[0] == ["id", "backbone", "dataset", "defense", "weights", "local"]
    table = {row[0]: (row[4], row[5]) for row in rows[1:]}
    assert table == {
        "m1": (f"hub org/m1@{REVISION[:12]}", "yes"), "m2": ("hub org/m2@ffffffffffff", "no"),
        "m3": ("path local.safetensors", "yes"), "m4": ("onnx models/osnet.onnx", "no"),
        "m5": ("from m1", "yes"), "m6": ("local-train", "no"),
    }


class RecordingHfApi:
    """HfApi with the two calls push makes; keeps what would have been uploaded."""

    uploads: list = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.uploads.append(("create", repo_id, private))

    def upload_folder(self, repo_id, folder_path, commit_message=None):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.uploads.append(("upload", repo_id, files, commit_message))
        return types.SimpleNamespace(oid=REVISION)


def a_result_cell(results: Path, model_id: str) -> None:
    record = {"attack_id": "m-ifgsm-eps5", "threat_model": "white-box", "protocol": {"version": "v2"},
              "model": {"id": model_id, "backbone": "resnet10t", "defense": {"name": "none"}},
              "dataset": {"name": "synthetic", "split_hash": "abc"}, "attack": {"name": "m-ifgsm"},
              "clean": {"rank1": 0.9, "mAP": 0.8},
              "attacked": {"rank1": 0.125, "mAP": 0.05, "mINP": 0.01, "ci95": {"rank1": [0.1, 0.15]}},
              "sanity_flags": []}
    folder = results / "v2" / "synthetic" / model_id
    folder.mkdir(parents=True)
    (folder / "m-ifgsm-eps5.json").write_text(json.dumps(record))


def test_push_uploads_safetensors_and_a_model_card_then_pull_gets_them_back(tmp_path, hub_cache, capsys, monkeypatch):
    torch.manual_seed(0)
    trained = build_model(MODEL, num_classes=5)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "trained.pth")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("""
- id: m1
  description: A model trained elsewhere
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  model: {input_size: [32, 16]}
  recipe: {epochs: 7, batch: {p: 4, k: 2}, lr: 2.0e-4}
  weights: {path: trained.pth}
- id: m1-cs
  backbone: resnet10t
  dataset: {name: synthetic, preset: tiny}
  defense: cs
  model: {input_size: [32, 16]}
  weights: {from: m1}
""")
    a_result_cell(tmp_path / "results", "m1")
    RecordingHfApi.uploads = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    code, out, err = run_cli(capsys, "zoo", "push", "m1", "--repo", "me/m1", "--zoo", str(zoo),
                             "--results", str(tmp_path / "results"))
    assert code == 0, err
    (_, repo, private), (_, _, files, message) = RecordingHfApi.uploads
    assert repo == "me/m1" and not private and "m1" in message
    assert set(files) == {"model.safetensors", "README.md"}
    digest = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert f"revision {REVISION}" in out and f"sha256: {digest}" in out

    card = files["README.md"].decode()
    assert "library_name: reidbench" in card and "A model trained elsewhere" in card
    assert "recipe: {epochs: 7, batch: {p: 4, k: 2}, lr: 0.0002}" in card
    assert digest in card and "not written by reidbench's training loop" in card
    assert "| synthetic | m-ifgsm-eps5 | white-box | 90.0 | 80.0 | 12.5 ± 2.5 | 5.0 |" in card

    # The printed weights line pins the upload: pulled back, it loads into the entry's model.
    cache_file(hub_cache, "me/m1", REVISION, "model.safetensors", files["model.safetensors"])
    weights_line = next(line.strip() for line in out.splitlines() if line.strip().startswith("weights:"))
    zoo.write_text(zoo.read_text().replace("weights: {path: trained.pth}", weights_line))
    code, out, err = run_cli(capsys, "zoo", "pull", "m1", "--zoo", str(zoo))
    assert code == 0, err
    pulled = Path(out.split("\t")[1])
    assert not any(k.startswith("classifier.") for k in load_file(str(pulled)))
    fresh = build_model(MODEL)
    load_weights(fresh, pulled, "m1", recipe_key=load_zoo(zoo)["m1"].recipe_key())
    assert torch.equal(fresh.state_dict()["backbone.conv1.0.weight"], trained.state_dict()["backbone.conv1.0.weight"])

    assert_one_line_error(*run_cli(capsys, "zoo", "push", "m1-cs", "--repo", "me/x", "--zoo", str(zoo))[::2],
                          "borrows the weights of 'm1'; push that entry instead")


def test_push_of_an_entry_without_weights_or_to_an_unreachable_hub_is_one_line(tmp_path, capsys, monkeypatch):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("- id: m1\n  backbone: resnet10t\n  dataset: {name: synthetic, preset: tiny}\n")
    assert_one_line_error(*run_cli(capsys, "zoo", "push", "m1", "--repo", "me/m1", "--zoo", str(zoo))[::2],
                          "no weights for 'm1' on this machine; train them first")

    model = build_model(MODEL)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    zoo.write_text(zoo.read_text() + "  model: {input_size: [32, 16]}\n  weights: {path: w.pt}\n")

    class Offline(RecordingHfApi):
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("[Errno -2] Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    assert_one_line_error(*run_cli(capsys, "zoo", "push", "m1", "--repo", "me/m1", "--zoo", str(zoo))[::2],
                          "cannot push 'm1' to the hub repo me/m1: [Errno -2] Name or service not known")
