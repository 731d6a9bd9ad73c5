import pytest
import torch
from safetensors.torch import load_file

from reidbench.errors import ReIDBenchError
from reidbench.models import ReIDModel
from reidbench.train.loop import Recipe, train_model
from reidbench.train.augment import random_erasing, random_flip, random_pad_crop
from reidbench.train.losses import batch_hard_triplet

RECIPE = dict(epochs=3, p=8, k=4, lr=1e-3, warmup_epochs=1, random_erasing=0.0, iters_per_epoch=3)


def _model(split):
    torch.manual_seed(0)
    return ReIDModel("resnet10t", num_classes=split.num_train_ids, input_size=(64, 32))


def test_training_lowers_the_loss(tiny_split, tmp_path):
    recipe = Recipe.from_dict({**RECIPE, "epochs": 6})
    result = train_model(_model(tiny_split), tiny_split.train, recipe, tmp_path, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    assert result.weights.exists()
    assert "recipe" in load_file_metadata(result.weights)


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_split, tmp_path, monkeypatch):
    import reidbench.train.loop as loop

    recipe = Recipe.from_dict(RECIPE)
    full = train_model(_model(tiny_split), tiny_split.train, recipe, tmp_path / "full", progress=False)

    real_save, saves = loop.save_torch, []

    def save_then_die(obj, path):
        real_save(obj, path)
        saves.append(path)
        if len(saves) == 2:  # killed right after the second epoch's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_torch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_model(_model(tiny_split), tiny_split.train, recipe, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(loop, "save_torch", real_save)
    resumed = train_model(_model(tiny_split), tiny_split.train, recipe, tmp_path / "resumed", progress=False)

    assert resumed.epochs_run == 1
    # The training time counts the interrupted run's epochs too, and stays out of the weights
    # file, whose bytes must not depend on the machine's speed.
    record = loop.training_record(tmp_path / "resumed")
    assert record["epochs_this_run"] == 1 and record["wall_time_s"] > resumed.seconds
    # the kernels' instruction set: two hosts that differ in it train to different weights
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "cpu_model" in record
    assert loop.training_record(tmp_path / "full")["wall_time_s"] == pytest.approx(full.seconds, abs=1e-3)
    assert not any("time" in key for key in load_file_metadata(resumed.weights))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    a, b = load_file(str(full.weights)), load_file(str(resumed.weights))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_recipe_errors_are_user_errors():
    with pytest.raises(ReIDBenchError, match="unknown recipe field"):
        Recipe.from_dict({"epochz": 3})
    with pytest.raises(ReIDBenchError, match="schedule"):
        Recipe.from_dict({"schedule": "linear"})


def test_warmup_then_cosine_schedule():
    recipe = Recipe(epochs=10, warmup_epochs=2)
    assert recipe.lr_factor(0) == pytest.approx(0.01)
    assert recipe.lr_factor(2) == pytest.approx(1.0)
    assert recipe.lr_factor(10) == pytest.approx(0.0, abs=1e-9)
    step = Recipe(epochs=120, warmup_epochs=10, schedule="step", milestones=(40, 70))
    assert step.lr_factor(50) == pytest.approx(0.1) and step.lr_factor(80) == pytest.approx(0.01)


def test_batch_hard_triplet_matches_a_loop():
    torch.manual_seed(0)
    feats, pids = torch.randn(12, 5), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    dist = torch.cdist(feats, feats)
    expected = []
    for i in range(12):
        pos = max(dist[i, j] for j in range(12) if pids[j] == pids[i])
        neg = min(dist[i, j] for j in range(12) if pids[j] != pids[i])
        expected.append(torch.relu(pos - neg + 0.3))
    assert batch_hard_triplet(feats, pids, 0.3).item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)


def test_augmentations_keep_shape_range_and_are_seeded():
    x = torch.rand(6, 3, 16, 8)
    for fn in (lambda g: random_flip(x, g), lambda g: random_pad_crop(x, 2, g), lambda g: random_erasing(x, 1.0, g)):
        a, b = fn(torch.Generator().manual_seed(1)), fn(torch.Generator().manual_seed(1))
        assert a.shape == x.shape and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
