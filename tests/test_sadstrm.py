"""SADSTRM: the video model, the self-attack defense trained through the shared loop,
white-box attacks on video queries, and the one-line errors around video data."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attack_setup import mean_ap, white_box_context

from reidbench.attack import build_attack
from reidbench.cli import main
from reidbench.data import ReIDSplit
from reidbench.defense import TrainBatch, build_defense
from reidbench.errors import ReIDBenchError
from reidbench.models import build_model, check_model_fits
from reidbench.runner import Runner
from reidbench.train.loop import Recipe, train_model
from reidbench.train.augment import random_erasing, random_pad_crop
from reidbench.train.loop import relabel
from reidbench.zoo import load_zoo

from defenses.sadstrm import StyleShift, modality_gap, stage_module

VIDEO = {"backbone": "resnet10t", "input_size": [32, 16], "last_stride": 1, "video": {"parts": 4}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests do many small convolutions, where a second thread only adds hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_video_model(num_classes=0, seed=0):
    torch.manual_seed(seed)
    return build_model(VIDEO, num_classes=num_classes)


@pytest.fixture(scope="module")
def small_clips(tiny_vi_split):
    """The tiny split at the model's 32x16 input."""
    return {part: getattr(tiny_vi_split, part).materialize((32, 16)) for part in ("train", "query", "gallery")}


def test_video_model_maps_tracklets_to_embeddings():
    model = tiny_video_model(num_classes=5).eval()
    clips = torch.rand(3, 4, 3, 32, 16)
    with torch.no_grad():
        out = model(clips)
        assert out.shape == (3, model.feat_dim)
        # an image batch is a batch of one-frame tracklets
        assert torch.allclose(model(clips[:, 0]), model(clips[:, :1]))
        # the aggregation does not depend on frame order
        assert torch.allclose(model(clips.flip(1)), out, atol=1e-5)
    logits, feats = model.train()(clips)
    assert logits.shape == (3, 5) and feats.shape == (3, model.feat_dim)
    with pytest.raises(ReIDBenchError, match=r"takes \(B, T, 3, H, W\) tracklets, got a tensor of shape \(3, 16\)"):
        model(torch.rand(3, 16))


def test_tracklet_augmentation_treats_the_frames_alike():
    frame = torch.rand(2, 1, 3, 16, 8)
    clip = frame.expand(2, 3, 3, 16, 8).contiguous()
    cropped = random_pad_crop(clip, 2, torch.Generator().manual_seed(0))
    erased = random_erasing(clip, 1.0, torch.Generator().manual_seed(0))
    for out in (cropped, erased):
        assert out.shape == clip.shape and torch.equal(out[:, 0], out[:, 2]) and not torch.equal(out, clip)


def test_self_attack_shift_raises_the_attack_objective(small_clips):
    train = small_clips["train"]
    model = tiny_video_model(num_classes=train.num_ids).train()
    index = torch.arange(16)
    images, pids, modality = train.load(index), relabel(train.pids)[index], train.modality[index]
    defense = build_defense({"name": "sadstrm", "style_eps": 1.0})
    hook = StyleShift()
    handle = stage_module(model, 1).register_forward_hook(hook)

    def objective(logits, feats):
        return float((torch.nn.functional.cross_entropy(logits, pids) + modality_gap(feats, pids, modality)).detach())

    torch.manual_seed(0)
    logits, feats = model(images)
    before = objective(logits, feats)
    defense.self_attack(hook, logits, feats, pids, modality)
    assert all(s.abs().sum() > 0 for s in hook.shift)
    logits, feats = model(images)
    handle.remove()
    assert objective(logits, feats) > before


def test_modality_gap_counts_identities_seen_in_both_modalities():
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    pids, modality = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    assert float(modality_gap(feats, pids, modality)) == pytest.approx(2.0)  # |(1, 0) - (0, 1)|^2
    assert float(modality_gap(feats, pids, modality, normalize=False)) == pytest.approx(13.0)
    assert float(modality_gap(feats, pids, torch.zeros(3, dtype=torch.long))) == 0.0


def test_attacked_styles_enter_batch_norm_statistics_only_when_asked(small_clips):
    train = small_clips["train"]
    index = torch.arange(8)
    images, pids = train.load(index), relabel(train.pids)[index]

    def running_means(**params):
        model = tiny_video_model(num_classes=train.num_ids).train()
        defense = build_defense({"name": "sadstrm", **params})
        if params:
            defense.training_loss(model, TrainBatch(images, pids, train.camids[index], train.modality[index]), Recipe())
        else:
            model(images)
        return torch.cat([m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])

    clean_only = running_means()
    assert torch.equal(running_means(attacked_bn_update=False), clean_only)
    assert not torch.equal(running_means(attacked_bn_update=True), clean_only)


def test_sadstrm_training_lowers_its_loss(small_clips):
    train = small_clips["train"]
    model = tiny_video_model(num_classes=train.num_ids).train()
    defense = build_defense("sadstrm")
    recipe = Recipe.from_dict({"p": 4, "k": 4})
    index = torch.arange(16)
    images, pids = train.load(index), relabel(train.pids)[index]
    batch = TrainBatch(images, pids, train.camids[index], train.modality[index])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, logs = defense.training_loss(model, batch, recipe)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert {"adversarial", "center", "triplet", "ce"} <= logs.keys()
    assert losses[-1] < 0.8 * losses[0]


def test_sadstrm_trains_through_the_shared_loop(small_clips, tmp_path):
    train = small_clips["train"]
    model = tiny_video_model(num_classes=train.num_ids)
    recipe = Recipe.from_dict({"epochs": 1, "p": 4, "k": 2, "iters_per_epoch": 2, "warmup_epochs": 1})
    result = train_model(model, train, recipe, tmp_path, defense=build_defense("sadstrm"), progress=False)
    assert result.weights.is_file() and {"adversarial", "center"} <= result.history[0].keys()


def test_video_attack_stays_within_eps_on_every_frame_and_lowers_the_match(tiny_vi_split, small_clips):
    model = tiny_video_model().eval()
    split = ReIDSplit("synthetic-vi", small_clips["train"], small_clips["query"], small_clips["gallery"], (32, 16),
                      split_hash="t", info=tiny_vi_split.info)
    index = torch.arange(6)
    ctx = white_box_context(model, split, index)
    queries = split.query.load(index)
    eps = 5 / 255
    for name in ("m-ifgsm", "m-mifgsm", "lta"):
        adv = build_attack(name, eps, 1 / 255, 5)(model, queries, ctx)
        per_frame = (adv - queries).abs().amax(dim=(2, 3, 4))
        assert adv.shape == queries.shape and bool((per_frame <= eps + 1e-6).all()) and bool((per_frame > 0).all())
    assert mean_ap(model, build_attack("m-ifgsm", eps, 1 / 255, 5)(model, queries, ctx), ctx) < mean_ap(model, queries, ctx)


def test_video_defense_and_model_refuse_the_wrong_data(tiny_split, tiny_vi_split):
    defense = build_defense("sadstrm")
    with pytest.raises(ReIDBenchError, match="defense 'sadstrm' trains on video data, but dataset 'synthetic' is image data"):
        defense.check_dataset(tiny_split)
    defense.check_dataset(tiny_vi_split)
    no_modality = dataclasses.replace(tiny_vi_split.train, modality=None)
    unlabelled = ReIDSplit("plain-video", no_modality, tiny_vi_split.query, tiny_vi_split.gallery, (64, 32),
                           split_hash="x", info={"kind": "video"})
    with pytest.raises(ReIDBenchError, match="needs visible/infrared modality labels, but dataset 'plain-video' has none"):
        defense.check_dataset(unlabelled)
    with pytest.raises(ReIDBenchError, match="modality of every training sample"):
        defense.training_loss(tiny_video_model(2).train(), TrainBatch(torch.rand(2, 2, 3, 32, 16), torch.tensor([0, 1]),
                                                                      torch.tensor([0, 1])), Recipe())
    image_model = build_model({"backbone": "resnet10t", "input_size": [32, 16]})
    with pytest.raises(ReIDBenchError, match="dataset 'synthetic-vi' is video data, but model 'm' is an image model"):
        check_model_fits(image_model, tiny_vi_split, "model 'm'")
    with pytest.raises(ReIDBenchError, match="style_eps must be >= 0"):
        build_defense({"name": "sadstrm", "style_eps": -1})


def test_listings_and_zoo_entries(capsys):
    assert main(["list", "defenses"]) == 0
    assert "sadstrm\t" in capsys.readouterr().out
    assert main(["list", "datasets"]) == 0
    names = {line.split("\t")[0] for line in capsys.readouterr().out.splitlines()}
    assert {"synthetic-vi", "hitsz-vcm", "sysu-mm01", "regdb", "synthetic"} <= names
    zoo = load_zoo()
    cpu = [e for e in zoo.values() if "video-cpu" in e.suite]
    assert {e.defense["name"] for e in cpu} == {"none", "sadstrm"}
    assert all(e.dataset_name == "synthetic-vi" and "video" in e.model for e in cpu)
    gpu = [e for e in zoo.values() if e.dataset_name == "hitsz-vcm"]
    assert gpu and all("gpu" in e.suite and e.backbone == "resnet50" and e.model["input_size"] == [256, 128] for e in gpu)


def test_a_direction_entry_borrows_the_weights_trained_for_the_other(tmp_path):
    base = """
- id: a
  backbone: resnet10t
  dataset: {name: synthetic-vi, preset: tiny}
  defense: sadstrm
  model: {video: {}}
- id: b
  backbone: resnet10t
  dataset: {name: synthetic-vi, preset: tiny, direction: visible-to-infrared}
  defense: sadstrm
  model: {video: {}}
  weights: {from: a}
"""
    path = tmp_path / "zoo.yaml"
    path.write_text(base)
    assert load_zoo(path)["b"].weights == {"from": "a"}
    path.write_text(base.replace("preset: tiny, direction", "preset: small, direction"))
    with pytest.raises(ReIDBenchError, match="weights.from 'a' has another dataset"):
        load_zoo(path)


def test_the_runner_scores_and_records_a_video_cell(tmp_path, capsys):
    """A white-box cell on a video entry, written with its example query (first frames)."""
    import json

    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("""
- id: tiny-vi
  backbone: resnet10t
  dataset: {name: synthetic-vi, preset: tiny}
  defense: {name: none}
  model: {input_size: [32, 16], last_stride: 1, video: {parts: 4}}
  recipe: {epochs: 1, batch: {p: 4, k: 2}, iters_per_epoch: 2, warmup_epochs: 1}
""")
    results = tmp_path / "results"
    argv = ["run", "--model", "tiny-vi", "--attack", "m-fgsm", "--zoo", str(zoo), "--results", str(results),
            "--site", str(tmp_path / "site"), "--device", "cpu", "--no-rerank"]
    assert main(argv) == 0
    record = json.loads((results / "v2/synthetic-vi/tiny-vi/m-fgsm-eps5.json").read_text())
    assert record["attacked"]["rank1"] is not None and set(record["example"]["thumbnails"]) >= {"query", "query_attacked"}

    # Protocol v2 fixes no video surrogate: the grid skips the transfer cells (saying so), a
    # named transfer attack is a one-line error before any work.
    runner = Runner(load_zoo(zoo), results_root=results, device="cpu", rerank=False, progress=False)
    assert runner.run([runner.zoo["tiny-vi"]], ["m-fgsm", "transfer", "dmr"]) == [
        results / "v2/synthetic-vi/tiny-vi/m-fgsm-eps5.json"]
    assert main(argv[:4] + ["transfer"] + argv[5:]) == 2
    assert "cannot run 'transfer' on model 'tiny-vi': protocol v2 fixes no transfer surrogate for dataset " \
           "'synthetic-vi'" in capsys.readouterr().err
