"""DDID: the conditional DDPM, the balancing plan, the generated training set, the self-meta step."""

import dataclasses

import pytest
import torch

import defenses  # noqa: F401  (registers every defense)
from defenses.ddid import DDID
from defenses.ddid.balance import NO_CAMERA, plan_balance, select_diverse, thumbnail_features
from defenses.ddid.diffusion import ConditionalDDPM, ConditionalUNet, train_ddpm
from defenses.ddid.meta import fnes_loss
from reidbench.data import ReIDSplit, ReIDSubset, concat_subsets
from reidbench.defense import TrainBatch, build_defense
from reidbench.errors import ReIDBenchError
from reidbench.models import ReIDModel
from reidbench.registry import DEFENSES
from reidbench.train.loop import Recipe

# A DDPM small enough for a unit test: two levels of 8 channels, 32x16 images.
TINY_DDPM = dict(ddpm_size=[32, 16], ddpm_channels=8, ddpm_levels=[1, 2], ddpm_timesteps=20, ddpm_batch=16,
                 ddpm_steps=4, sample_steps=2, guidance=1.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny convolutions gain nothing from a second thread, and on a loaded machine its
    spin-waiting costs more than ten times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_ddpm(tiny_split):
    torch.manual_seed(0)
    train = tiny_split.train
    ids, labels = torch.unique(train.pids, return_inverse=True)
    cams, cam_labels = torch.unique(train.camids, return_inverse=True)
    ddpm = ConditionalDDPM(ConditionalUNet(len(ids), len(cams), channels=8, levels=(1, 2)), timesteps=20)
    losses = train_ddpm(ddpm, train.load_uint8(None, (32, 16)), labels, cam_labels, steps=40, batch_size=16,
                        lr=2e-3, generator=torch.Generator().manual_seed(0), ema=0.0, progress=False)
    return ddpm, losses


def test_ddid_is_registered_with_a_one_line_summary():
    assert "ddid" in DEFENSES.names()
    assert DEFENSES.get("ddid").__doc__.strip().splitlines()[0].startswith("DDID")
    assert build_defense("ddid").changes_training


def test_ddpm_loss_falls(trained_ddpm):
    _, losses = trained_ddpm
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first


def test_sampling_gives_images_in_range_of_the_asked_identities(trained_ddpm):
    ddpm, _ = trained_ddpm
    ids, cams = torch.tensor([0, 1, 2, 3, 0, 5]), torch.tensor([0, 1, 2, 3, 1, 0])
    out = ddpm.sample(ids, cams, (32, 16), steps=4, generator=torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 32, 16)
    assert out.min() >= 0 and out.max() <= 1
    # Same noise, other condition: the identity (and camera) embeddings reach the output.
    again = ddpm.sample(ids, cams, (32, 16), steps=4, generator=torch.Generator().manual_seed(1))
    other = ddpm.sample(ids.flip(0), cams, (32, 16), steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.allclose(out, other)
    guided = ddpm.sample(ids, cams, (32, 16), steps=4, guidance=2.0, generator=torch.Generator().manual_seed(1))
    assert guided.shape == out.shape and guided.min() >= 0 and guided.max() <= 1
    # A top-up image of the balancing has no camera: it is sampled with the null camera condition.
    any_camera = torch.full_like(cams, ddpm.net.num_cameras)
    free = ddpm.sample(ids, any_camera, (32, 16), steps=4, guidance=2.0, generator=torch.Generator().manual_seed(1))
    assert free.shape == out.shape and not torch.allclose(free, guided)


def _three_identities():
    """Identity 0: 3 images, all camera 0; 1: 5 images, 4 of them camera 1; 2: 8 images over 3 cameras."""
    pids = torch.tensor([0] * 3 + [1] * 5 + [2] * 8)
    camids = torch.tensor([0, 0, 0] + [0, 1, 1, 1, 1] + [0, 1, 2, 0, 1, 2, 0, 1])
    return pids, camids


def test_balancing_plan_follows_the_papers_two_rules_by_hand():
    pids, camids = _three_identities()
    plan = plan_balance(pids, camids, min_images=6, camera_share=0.5, generator=torch.Generator().manual_seed(0))
    # Rule 1 (δ1 = 6): 3 top-ups for identity 0, 1 for identity 1, none for identity 2, all with the null camera.
    # Rule 2 (δ2 = 0.5): identity 0's camera 0 holds 3/3, identity 1's camera 1 holds 4/5, identity 2's best 3/8,
    # so one image for each other camera of {0, 1, 2} for identities 0 and 1.
    assert plan.target == 6 and plan.diversify == 4
    assert plan.pids.tolist() == [0, 0, 0, 1, 0, 0, 1, 1]
    assert plan.camids.tolist() == [NO_CAMERA] * 4 + [1, 2, 0, 2]
    # The share must exceed δ2: at 0.8 identity 1 (4/5) is left alone.
    assert plan_balance(pids, camids, min_images=6, camera_share=0.8).camids.tolist() == [NO_CAMERA] * 4 + [1, 2]
    # Own cameras only (ablation): identity 0 has no other camera, identity 1 gets camera 0.
    own = plan_balance(pids, camids, min_images=6, unseen_cameras=False)
    assert own.camids.tolist()[4:] == [0] and own.pids.tolist()[4:] == [1]
    # camera_share 1 and no cameras both turn rule 2 off.
    assert plan_balance(pids, camids, min_images=6, camera_share=1.0).diversify == 0
    assert plan_balance(pids, camids, min_images=6, use_cameras=False).camids.tolist() == [NO_CAMERA] * 4


def test_balancing_plan_top_up_target_and_camera_fill():
    pids, camids = _three_identities()
    plan = plan_balance(pids, camids, target_quantile=1.0, camera_share=1.0, topup_cameras="fill",
                        generator=torch.Generator().manual_seed(0))
    assert plan.target == 8
    assert torch.bincount(torch.cat([pids, plan.pids]), minlength=3).tolist() == [8, 8, 8]
    # Identity 0 was seen by camera 0 only: its 5 new images go to the unseen cameras 1 and 2 first.
    per_camera = torch.bincount(torch.cat([camids[pids == 0], plan.camids[plan.pids == 0]]), minlength=3)
    assert per_camera.max() - per_camera.min() <= 1
    own = plan_balance(pids, camids, target_quantile=1.0, camera_share=1.0, unseen_cameras=False, topup_cameras="fill")
    assert set(own.camids[own.pids == 0].tolist()) == {0}
    median = plan_balance(pids, camids, target_quantile=0.5, use_cameras=False)
    assert median.target == 5 and median.pids.tolist() == [0, 0] and set(median.camids.tolist()) == {NO_CAMERA}


@pytest.mark.parametrize("option, message", [
    ({"min_images": 0}, "min_images must be a positive integer or null, got 0"),
    ({"camera_share": 0}, r"camera_share must be in \(0, 1\]"),
    ({"topup_cameras": "all"}, "topup_cameras must be one of none, fill, got 'all'"),
    ({"target_quantile": 1.5}, r"target_quantile must be in \(0, 1\]"),
])
def test_balancing_option_out_of_range_is_one_clear_line(option, message):
    with pytest.raises(ReIDBenchError, match=message) as err:
        build_defense({"name": "ddid", **option})
    assert "\n" not in str(err.value)


def test_diverse_selection_drops_a_copy_of_a_real_image():
    real = torch.rand(2, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    fresh = torch.rand(1, 3, 32, 16, generator=torch.Generator().manual_seed(1))
    candidates = thumbnail_features(torch.cat([real[:1], fresh, fresh, real[1:]]))
    keep = select_diverse(candidates, torch.tensor([0, 0, 1, 1]), torch.tensor([7, 7]), {7: thumbnail_features(real)})
    # Slot 0 takes the new image over the copy; slot 1's choice is then between a repeat of it and a real copy.
    assert keep[0] == 1 and keep[1] in (2, 3)


def test_prepare_train_appends_a_balanced_cached_generated_set(tiny_split, monkeypatch):
    defense = build_defense({"name": "ddid", **TINY_DDPM})
    train = defense.prepare_train(tiny_split)
    real = tiny_split.train
    plan = plan_balance(real.pids, real.camids, generator=torch.Generator().manual_seed(1))
    assert plan.diversify > 0 and len(plan) > plan.diversify  # the tiny split exercises both rules
    assert torch.equal(train.pids[len(real):], plan.pids) and torch.equal(train.camids[len(real):], plan.camids)
    assert torch.unique(train.pids, return_counts=True)[1].min() >= torch.unique(real.pids, return_counts=True)[1].max()
    assert train.images.shape[1:] == (3, *tiny_split.image_size)
    assert torch.equal(train.images[: len(real)], real.images)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached generated set must not be regenerated")

    monkeypatch.setattr("defenses.ddid.train_ddpm", no_training)
    assert torch.equal(build_defense({"name": "ddid", **TINY_DDPM}).prepare_train(tiny_split).images, train.images)
    # The generator itself is reachable for diagnostics (benchmarks/ddid_generation.py), from the cache too.
    ddpm = build_defense({"name": "ddid", **TINY_DDPM}).ddpm_for(tiny_split)
    assert ddpm.sample(torch.tensor([0, 1]), torch.tensor([0, 0]), (32, 16), steps=2).shape == (2, 3, 32, 16)
    assert build_defense({"name": "ddid", "balance": False}).prepare_train(tiny_split) is tiny_split.train


def test_concat_subsets_resizes_every_part():
    a = ReIDSubset([1, 2], [0, 1], images=torch.zeros(2, 3, 8, 4, dtype=torch.uint8))
    b = ReIDSubset([1], [-1], images=torch.full((1, 3, 16, 8), 255, dtype=torch.uint8))
    both = concat_subsets([a, b], (8, 4))
    assert both.images.shape == (3, 3, 8, 4) and both.pids.tolist() == [1, 2, 1] and both.camids.tolist() == [0, 1, -1]


def test_fnes_extension_pushes_far_negatives_beyond_the_hard_margin():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    pids = torch.tensor([0, 0, 1, 1])
    hard_only, _ = fnes_loss(feats, pids, margin=0.3, extension_weight=0.0)
    assert float(hard_only) == 0.0  # the nearest negative is beyond the margin...
    extended, logs = fnes_loss(feats, pids, margin=0.3, extension_margin=2.0)
    assert float(extended) > 0 and logs["fnes_far"] > 0  # ...but not the extended one


@pytest.mark.parametrize("order", ["first", "second"])
def test_self_meta_step_trains_and_its_loss_falls(order):
    torch.manual_seed(0)
    model = ReIDModel("resnet10t", num_classes=0, input_size=(32, 16))
    defense = build_defense({"name": "ddid", "iterations": 1, "meta_order": order})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(4, 3, 1, 1, generator=generator)
    images = (colours.repeat_interleave(4, 0) + 0.15 * torch.rand(16, 3, 32, 16, generator=generator)).clamp(0, 1)
    pids = torch.arange(4).repeat_interleave(4)
    losses = []
    clean = TrainBatch(images, pids, torch.zeros_like(pids))
    for _ in range(8):
        batch = dataclasses.replace(clean, images=defense.training_batch(model, clean, generator))
        model.train()
        loss, logs = defense.training_loss(model, batch, Recipe(lr=1e-3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert {"inner", "outer", "inner_fnes_far", "outer_fnes_hard"} <= set(logs)
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])


def test_training_loss_needs_the_meta_split_of_training_batch():
    model = ReIDModel("resnet10t", num_classes=0, input_size=(32, 16))
    with pytest.raises(ReIDBenchError, match="training_batch"):
        pids = torch.arange(4).repeat(2)
        build_defense("ddid").training_loss(model, TrainBatch(torch.rand(8, 3, 32, 16), pids, torch.zeros_like(pids)), Recipe())


def test_camera_conditioning_without_camera_labels_is_one_clear_line(tiny_split):
    train = ReIDSubset(tiny_split.train.pids, torch.full_like(tiny_split.train.camids, -1), images=tiny_split.train.images)
    split = ReIDSplit("no-cameras", train, tiny_split.query, tiny_split.gallery, tiny_split.image_size)
    with pytest.raises(ReIDBenchError, match="camera_condition is true, but dataset 'no-cameras' has no camera labels") as err:
        build_defense({"name": "ddid", "camera_condition": True}).check_dataset(split)
    assert "\n" not in str(err.value)
    assert not build_defense("ddid").uses_cameras(split)  # auto falls back to identity-only conditioning


def test_unknown_meta_attack_is_one_clear_line():
    with pytest.raises(ReIDBenchError, match="unknown attack 'pgd-xyz' in meta_attacks") as err:
        build_defense({"name": "ddid", "meta_attacks": ["m-ifgsm", "pgd-xyz"]})
    assert "\n" not in str(err.value)
    with pytest.raises(ReIDBenchError, match="two different attacks"):
        build_defense({"name": "ddid", "meta_attacks": ["sma", "sma"]})


def test_meta_split_needs_four_identities():
    model = ReIDModel("resnet10t", num_classes=0, input_size=(32, 16))
    with pytest.raises(ReIDBenchError, match="at least 4 identities"):
        pids = torch.arange(3).repeat(2)
        DDID().training_batch(model, TrainBatch(torch.rand(6, 3, 32, 16), pids, torch.zeros_like(pids)), torch.Generator())
