"""APD (Tan et al. 2025): MPG-Net, SP-Net with SSD, training through the shared loop, reloading
and cross-dataset evaluation."""

import numpy as np
import pytest
import torch
from PIL import Image

import defenses  # noqa: F401  (registers every defense and model head)
from defenses.apd import (APD, MetricPerturbationGenerator, SemanticPurificationModel, metric_perturbation_loss,
                          mix_statistics, ssim, structural_loss)
from reidbench.defense import build_defense
from reidbench.errors import ReIDBenchError
from reidbench.features import embed
from reidbench.models import ReIDModel, build_model
from reidbench.registry import DEFENSES

SPLIT_MODEL = {"backbone": "resnet10t", "input_size": [32, 16], "head": "apd-split"}


def images(seed=0, b=8, h=32, w=16):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def randomized_generator(decode, eps=8 / 255):
    torch.manual_seed(0)
    gen = MetricPerturbationGenerator(width=4, eps=eps, decode=decode)
    torch.nn.init.normal_(gen.perturber[-1].weight, std=1.0)  # a non-zero latent shift
    return gen


@pytest.mark.parametrize("decode", ["residual", "image"])
def test_generator_keeps_shape_and_range_and_bounds_its_perturbation(decode):
    x = images(h=30, w=14)  # not a multiple of the encoder's stride
    out, recon = randomized_generator(decode)(x, with_reconstruction=True)
    assert out.shape == recon.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1 and recon.min() >= 0 and recon.max() <= 1
    delta = (out - x).abs()
    assert delta.max() <= 8 / 255 + 1e-6 and delta.max() > 1 / 255


def test_generator_starts_from_no_perturbation_in_residual_mode():
    x = images()
    assert torch.allclose(MetricPerturbationGenerator(width=4)(x), x, atol=1e-6)


def test_structural_term_is_zero_for_identical_images_only():
    x, y = images(0), images(1)
    assert torch.allclose(ssim(x, x), torch.ones(len(x)), atol=1e-5)
    assert float(structural_loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(structural_loss(y, x)) > 0.3
    # SSIM sees structure: a constant brightness shift costs L1 but little SSIM.
    assert float(ssim((x * 0.8 + 0.1), x).mean()) > float(ssim(y, x).mean())


def test_metric_perturbation_loss_rewards_pushing_same_identity_apart():
    pids = torch.tensor([0, 0, 1, 1])
    clean = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]]), dim=1)
    swapped = clean[[2, 3, 0, 1]]  # each image now looks like the other identity
    assert metric_perturbation_loss(swapped, clean, pids) < 0 < metric_perturbation_loss(clean, clean, pids)


def test_generator_steps_raise_same_identity_distances_on_a_fixed_model(tiny_split):
    queries = tiny_split.query.materialize((32, 16))
    x, pids = queries.images[:32].float() / 255, queries.pids[:32]
    apd = APD(gen_lr=1e-3, width=8)
    torch.manual_seed(0)
    model = ReIDModel("resnet10t", input_size=(32, 16)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def same_identity_distance():
        with torch.no_grad():
            dist = torch.cdist(embed(model, apd.generator(x)), embed(model, x))
        return float(dist[pids.view(-1, 1) == pids.view(1, -1)].mean())

    start = same_identity_distance()
    for _ in range(8):
        apd.generator_step(model, x, pids)
    # An untrained model maps everything close together: 2% is far above float noise.
    assert same_identity_distance() > start * 1.02
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is only the metric


def test_split_head_parts_sum_to_the_map_and_eval_gives_the_identity_embedding():
    torch.manual_seed(0)
    model = build_model(SPLIT_MODEL, num_classes=5)
    assert isinstance(model, SemanticPurificationModel) and model.config["head"] == "apd-split"
    x = images(b=4)
    model.eval()
    fmap = model.feature_map(x)
    identity, irrelevant = model.split(fmap)
    assert torch.allclose(identity + irrelevant, fmap, atol=1e-6)
    assert torch.allclose(model(x), model.bottleneck(model.pool_map(identity)), atol=1e-5)
    assert model(x).shape == (4, model.feat_dim)


def test_mixing_statistics_is_seeded_and_changes_them():
    fmap = torch.randn(6, 8, 4, 2)
    a = mix_statistics(fmap, torch.Generator().manual_seed(1), alpha=0.5)
    assert torch.equal(a, mix_statistics(fmap, torch.Generator().manual_seed(1), alpha=0.5))
    assert not torch.allclose(a.mean((2, 3)), fmap.mean((2, 3)))


def test_apd_trains_a_few_steps_lowers_its_loss_and_trains_its_generator(tiny_split, tmp_path):
    from reidbench.train import Recipe, train_model

    torch.manual_seed(0)
    model = build_model(SPLIT_MODEL, num_classes=tiny_split.num_train_ids)
    apd = build_defense({"name": "apd", "gen_lr": 1e-3, "width": 4})
    start = {k: v.clone() for k, v in apd.generator.state_dict().items()}
    recipe = Recipe(epochs=3, p=8, k=4, lr=1e-3, warmup_epochs=0, iters_per_epoch=3, random_erasing=0.0)
    result = train_model(model, tiny_split.train, recipe, tmp_path, defense=apd, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    assert {"ssd_mpg", "ssd_self", "mpg_metric", "mpg_struct", "ce", "triplet"} <= set(result.history[0])
    assert any(not torch.equal(start[k], v) for k, v in apd.generator.state_dict().items())
    # A resumed run gets the generator back from the checkpoint.
    state = torch.load(tmp_path / "last_state.pt", weights_only=True)["defense"]
    fresh = build_defense({"name": "apd", "gen_lr": 1e-3, "width": 4})
    fresh.load_training_state(state)
    fresh._on(torch.device("cpu"))
    assert all(torch.equal(v, fresh.generator.state_dict()[k]) for k, v in apd.generator.state_dict().items())


def fake_market(root, ids=10, cams=2, per_cam=3):
    folder = root / "market1501-trainsplit" / "bounding_box_train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for pid in range(1, ids + 1):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        for cam in range(1, cams + 1):
            for i in range(per_cam):
                Image.new("RGB", (16, 32), colour).save(folder / f"{pid:04d}_c{cam}s1_{i:06d}_00.jpg")
    return root


@pytest.fixture(scope="module")
def apd_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("apd-zoo")
    fake_market(root / "data")
    market = f"{{name: market1501-trainsplit, root: {root / 'data'}, num_train_ids: 6}}"
    path = root / "model_zoo.yaml"
    path.write_text(f"""
- id: tiny-synthetic-apd
  backbone: resnet10t
  dataset: {{name: synthetic, preset: tiny}}
  defense: {{name: apd, width: 4}}
  model: {{input_size: [32, 16], head: apd-split}}
  recipe: {{epochs: 1, iters_per_epoch: 2, batch: {{p: 4, k: 4}}, random_erasing: 0.0}}
- id: tiny-market-apd
  backbone: resnet10t
  dataset: {market}
  defense: {{name: apd, width: 4}}
  model: {{input_size: [32, 16], head: apd-split}}
  recipe: {{epochs: 1, iters_per_epoch: 2, batch: {{p: 4, k: 2}}, random_erasing: 0.0}}
""")
    return path, market


def test_trained_apd_reloads_as_an_embedding_model_and_evaluates_across_datasets(apd_zoo, tmp_path):
    import yaml

    from reidbench.runner import Runner
    from reidbench.zoo import existing_weights, load_weights, load_zoo

    path, market = apd_zoo
    zoo = load_zoo(path)
    runner = Runner(zoo, results_root=tmp_path, device="cpu", progress=False, rerank=False)
    for source, target in (("tiny-synthetic-apd", yaml.safe_load(market)),
                           ("tiny-market-apd", {"name": "synthetic", "preset": "tiny"})):
        bundle = runner.bundle(zoo[source], target)
        assert isinstance(bundle.model.model, SemanticPurificationModel)
        assert bundle.split.name == target["name"] and bundle.split.image_size == (32, 16)
        with torch.no_grad():
            out = bundle.model(images(b=3))
        assert out.shape == (3, bundle.model.model.feat_dim)
        feats = runner.clean_features(bundle)
        assert feats["query"].shape == (len(bundle.split.query), out.shape[1])
        # The gate is part of the deployed weights: a plain model does not fit them.
        with pytest.raises(ReIDBenchError, match="do not fit"):
            load_weights(ReIDModel("resnet10t", input_size=(32, 16)), existing_weights(zoo[source]), source)


def test_cli_evaluates_an_apd_entry_on_another_dataset(apd_zoo, tmp_path, capsys, monkeypatch):
    from reidbench.cli import main

    path, _ = apd_zoo
    # `eval --dataset NAME` builds NAME with its defaults: the trainsplit keeps 500 train ids.
    monkeypatch.setenv("REIDBENCH_DATA", str(fake_market(tmp_path / "data", ids=503, cams=2, per_cam=2)))
    code = main(["eval", "--model", "tiny-synthetic-apd", "--zoo", str(path), "--dataset", "market1501-trainsplit",
                 "--device", "cpu", "--results", str(tmp_path), "--no-rerank"])
    assert code == 0
    assert "tiny-synthetic-apd on market1501-trainsplit" in capsys.readouterr().err  # rich's console is stderr


@pytest.mark.parametrize("spec, message", [
    ({"name": "apd", "eps_255": 0}, "eps_255 must be in"),
    ({"name": "apd", "decode": "pixels"}, "decode must be one of"),
    ({"name": "apd", "gen_steps": 0}, "gen_steps and width must be >= 1"),
    ({"name": "apd", "gen_lr": 0}, "gen_lr and mix_alpha must be > 0"),
    ({"name": "apd", "self_weight": -1}, "loss weights must be >= 0, got self_weight=-1"),
    ({"name": "apd", "latent": 3}, "bad parameters"),
])
def test_bad_apd_parameters_are_one_line_errors(spec, message):
    with pytest.raises(ReIDBenchError, match=message) as info:
        build_defense(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ({**SPLIT_MODEL, "head": "apd-splt"}, "unknown model head 'apd-splt'; did you mean 'apd-split'"),
    ({**SPLIT_MODEL, "gate_reduction": 0}, "gate_reduction must be >= 1"),
    ({"backbone": "resnet10t", "gate_reduction": 4}, "unknown model option"),
    ({**SPLIT_MODEL, "backbone": "vit_tiny_patch16_224", "input_size": [224, 224]}, "needs a backbone with a spatial feature map"),
])
def test_bad_model_heads_are_one_line_errors(spec, message):
    with pytest.raises(ReIDBenchError, match=message):
        model = build_model(spec)
        model.eval()(images(b=1, h=224, w=224) if "vit" in spec["backbone"] else images(b=1))


def test_apd_refuses_a_model_without_the_split_head(tiny_split):
    apd = DEFENSES.get("apd")()
    model = ReIDModel("resnet10t", num_classes=4, input_size=(32, 16))
    x, pids = images(b=4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ReIDBenchError, match=r"model: \{head: apd-split\}"):
        apd.training_loss(model, torch.cat([x, x]), pids, None)
