"""APD (Tan et al. 2025): each loss term by its definition, the MPG-Net stage and its cache, the
SP-Net split and its SSD branches, training through the shared loop, reloading and
cross-dataset evaluation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import defenses  # noqa: F401  (registers every defense and model head)
from defenses.apd import APD
from defenses.apd.mpg import (FrozenFeatures, MetricPerturbationGenerator, content_loss, discriminator_loss,
                              draw_negatives, generator_adversarial_loss, idempotence_loss, metric_perturbation_loss,
                              train_mpg)
from defenses.apd.spnet import SemanticPurificationModel, reversed_triplet, running_stats_frozen, shuffle_partners
from reidbench.defense import TrainBatch, build_defense
from reidbench.errors import ReIDBenchError
from reidbench.models import ReIDModel, build_model
from reidbench.registry import DEFENSES
from reidbench.train.loop import Recipe

SPLIT_MODEL = {"backbone": "resnet10t", "input_size": [32, 16], "head": "apd-split"}
TINY_MPG = {"gen_width": 4, "gen_blocks": 1, "disc_width": 4, "mpg_batch": 4, "negatives": 2, "mpg_lr": 1e-3}


def images(seed=0, b=8, h=32, w=16):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def split_model(num_classes=4, **options):
    torch.manual_seed(0)
    return build_model({**SPLIT_MODEL, **options}, num_classes=num_classes)


# --- stage 1: loss terms ---------------------------------------------------------------------
def test_adversarial_losses_follow_the_papers_definitions():
    fake, negative = torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.5], [3.0], [-2.0]])
    d_fake, d_negative = torch.sigmoid(fake), torch.sigmoid(negative)
    assert float(generator_adversarial_loss(fake)) == pytest.approx(float(-0.5 * d_fake.log().mean()), rel=1e-5)
    expected = -0.5 * (1 - d_fake).log().mean() - 0.5 * d_negative.log().mean()
    assert float(discriminator_loss(fake, negative)) == pytest.approx(float(expected), rel=1e-5)


def test_metric_perturbation_loss_rewards_moving_towards_the_negatives():
    source = torch.tensor([[0.0, 0.0]])
    negatives = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])  # (B, M, D)
    # Distances to the negatives 1 and 5, to the source 3.
    generated = torch.tensor([[3.0, 0.0]])
    expected = (F.softplus(torch.tensor(1.0 - 3.0)) + F.softplus(torch.tensor(5.0 - 3.0))) / 2
    assert float(metric_perturbation_loss(generated, source, negatives)) == pytest.approx(float(expected), rel=1e-5)
    # Its sign: above softplus(0) = log 2 at the source, below it next to the negative, so
    # minimising it moves the sample across identities.
    one = negatives[:, :1]
    at_source = metric_perturbation_loss(source, source, one)
    near_negative = metric_perturbation_loss(torch.tensor([[3.9, 0.1]]), source, one)
    assert near_negative < math.log(2) < at_source


def test_idempotence_and_content_terms():
    x = images()
    idempotent = lambda t: t.clamp(0.2, 0.8)  # noqa: E731  (a projection: G(G(x)) = G(x))
    assert float(idempotence_loss(idempotent(idempotent(x)), idempotent(x))) == 0.0
    halve = lambda t: t * 0.5  # noqa: E731
    assert float(idempotence_loss(halve(halve(x)), halve(x))) == pytest.approx(float((x * 0.25).abs().mean()))
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert float(content_loss(a, b)) == pytest.approx((1 + 2 + 2 + 0) / 4)


def test_negatives_are_other_identities():
    pids = torch.tensor([0, 0, 0, 1, 2, 2])
    anchors = torch.tensor([0, 1, 3, 4])
    index = draw_negatives(pids, anchors, 5, torch.Generator().manual_seed(0))
    assert index.shape == (4, 5)
    assert (pids[index] != pids[anchors].view(-1, 1)).all()


def test_generator_starts_as_the_identity_and_keeps_shape_and_range():
    x = images(h=30, w=14)  # not a multiple of the encoder's stride
    gen = MetricPerturbationGenerator(width=4, blocks=1)
    with torch.no_grad():
        out = gen(x)
        assert torch.equal(out, x)  # zero-initialised residual: content kept, idempotent
        assert float(idempotence_loss(gen(out), out)) == 0.0
        torch.nn.init.normal_(gen.out.weight, std=1.0)
        out = gen(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    bounded = MetricPerturbationGenerator(width=4, blocks=1, eps=8 / 255)
    bounded.load_state_dict(gen.state_dict())
    with torch.no_grad():
        assert (bounded(x) - x).abs().max() <= 8 / 255 + 1e-6


def test_frozen_features_pass_gradients_to_images_but_not_to_their_weights():
    torch.manual_seed(0)
    features = FrozenFeatures(ReIDModel("resnet10t", input_size=(32, 16)), metric_stage=4, content_stage=2)
    x = images(b=2, h=64, w=32).requires_grad_(True)  # resized to the net's input size
    vec, fmap = features(x)
    assert vec.shape == (2, 512) and fmap.shape[1] == 128
    (vec.sum() + fmap.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in features.parameters())
    with pytest.raises(ReIDBenchError, match=r"metric_stage must be in \[0, 4\]"):
        FrozenFeatures(ReIDModel("resnet10t", input_size=(32, 16)), metric_stage=5, content_stage=2)


def test_a_few_mpg_steps_lower_its_objective(tiny_split):
    import copy

    from defenses.apd.mpg import mpg_losses

    torch.manual_seed(0)
    features = FrozenFeatures(ReIDModel("resnet10t", input_size=(32, 16)), 4, 2)
    apd = APD(feature_net="unused", **{**TINY_MPG, "gen_width": 8, "mpg_batch": 8})
    gen, disc = apd.build_mpg()
    start = copy.deepcopy(gen)
    imgs, pids = tiny_split.train.load_uint8(None, (32, 16)), tiny_split.train.pids
    rng = torch.Generator().manual_seed(99)
    anchors = torch.randint(0, len(imgs), (16,), generator=rng)
    x = imgs[anchors].float() / 255
    negatives = (imgs[draw_negatives(pids, anchors, 2, rng)].float() / 255)  # (16, 2, 3, H, W)
    history = train_mpg(gen, disc, features, imgs, pids, 30, 8, 2, 1e-3, apd.params, torch.Generator().manual_seed(0),
                        progress=False)
    assert {"mpg_g", "mpg_mp", "mpg_s", "mpg_c", "mpg_d"} <= set(history[0])
    assert history[0]["mpg_s"] == 0.0 and history[0]["mpg_c"] == 0.0  # G starts as the identity
    # L_MPG on a fixed batch, both generators judged by the trained discriminator.
    with torch.no_grad():
        before = mpg_losses(start, disc, features, x, negatives, apd.params)[1]
        after = mpg_losses(gen, disc, features, x, negatives, apd.params)[1]
    assert after["mpg"] < before["mpg"] - 0.1, (before, after)
    assert after["mpg_mp"] < before["mpg_mp"]  # G moved the samples towards other identities


# --- stage 2: SP-Net -------------------------------------------------------------------------
@pytest.mark.parametrize("maps", ["element", "spatial"])
def test_msp_split_sums_to_the_map_and_its_maps_are_attention(maps):
    model = split_model(msp_maps=maps)
    fmap = model.embedding_map(images(b=2))
    identity, irrelevant = model.split(fmap)
    assert torch.allclose(identity + irrelevant, fmap, atol=1e-6, rtol=0)
    attention = model.msp(fmap)
    assert attention.shape == ((2, fmap.shape[1]) if maps == "element" else (2, 1)) + fmap.shape[2:]
    assert attention.min() > 0 and attention.max() < 1
    assert torch.allclose(identity, attention * fmap)


def test_msp_maps_have_two_scales():
    """MSP₁ and MSP₃ (3×3, dilation 2) see 5×5 positions of E; MSP₂ (a 2×2 dilation-2
    convolution on them) sees 7×7."""
    torch.manual_seed(0)
    model = split_model()
    fmap = torch.randn(1, 64, 15, 15)
    moved = fmap.clone()
    moved[..., 7, 7] += 10.0
    reach = [((a - b).abs().sum(1)[0] > 0).nonzero() for a, b in zip(model.msp.maps(moved), model.msp.maps(fmap))]
    spans = [int(r[:, 0].max() - r[:, 0].min() + 1) for r in reach]
    assert spans == [5, 7, 5]


def test_head_keeps_the_backbone_and_adds_only_msp():
    plain = ReIDModel("resnet10t", num_classes=4, input_size=(32, 16))
    model = split_model()
    extra = {k: v.shape for k, v in model.state_dict().items() if k not in plain.state_dict()}
    assert extra and all(k.startswith("msp.") for k in extra)
    assert all(model.state_dict()[k].shape == v.shape for k, v in plain.state_dict().items())
    assert model.config["head"] == "apd-split" and model.config["split_stage"] == 0


def test_the_deployed_embedding_is_branch_one_alone():
    model = split_model().eval()
    x = images(b=3)
    calls = []
    model.backbone.layer4.register_forward_hook(lambda *args: calls.append(1))
    out = model(x)
    assert len(calls) == 1  # one pass through the shared network: no K* or NK branch
    identity = model.split(model.embedding_map(x))[0]
    assert torch.allclose(out, model.bottleneck(model.branch_features(identity)), atol=1e-6)
    assert out.shape == (3, model.feat_dim)
    model.train()
    logits, feats = model(x)
    assert torch.allclose(model.branch(model.split(model.embedding_map(x))[0])[1], feats, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_later_split_stages(stage):
    model = split_model(split_stage=stage)
    assert model.embedding_map(images(b=2)).shape[1] == model.backbone.feature_info[stage]["num_chs"]
    assert model.eval()(images(b=2)).shape == (2, model.feat_dim)


# --- stage 2: SSD --------------------------------------------------------------------------
def test_shuffled_partners_cross_identities_and_are_seeded():
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    partners = shuffle_partners(pids, torch.Generator().manual_seed(3))
    assert (pids[partners] != pids).all()
    assert torch.equal(partners, shuffle_partners(pids, torch.Generator().manual_seed(3)))
    draws = torch.stack([shuffle_partners(pids, torch.Generator().manual_seed(s)) for s in range(20)])
    assert len(torch.unique(draws[:, 0])) > 3  # drawn among all other identities, not a fixed pairing
    with pytest.raises(ReIDBenchError, match="at least two identities"):
        shuffle_partners(torch.tensor([1, 1]), torch.Generator())


def test_reversed_triplet_rewards_features_that_do_not_match_identities():
    pids = torch.tensor([0, 0, 1, 1])
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    loss, negatives = reversed_triplet(feats, pids)
    # Farthest negative, closest positive other than the anchor itself.
    assert negatives.tolist() == [3, 3, 0, 0]
    expected = F.softplus(torch.tensor([7.0 - 1, 6 - 1, 3 - 4, 7 - 4])).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    partner, chosen = reversed_triplet(feats, pids, torch.tensor([2, 2, 1, 0]))
    assert chosen.tolist() == [2, 2, 1, 0]
    assert float(partner) == pytest.approx(float(F.softplus(torch.tensor([3.0 - 1, 2 - 1, 2 - 4, 7 - 4])).mean()))
    # Identity-clustered features (what NK must not be) cost more than mixed ones.
    clustered, _ = reversed_triplet(torch.tensor([[0.0], [0.1], [5.0], [5.1]]), pids)
    mixed, _ = reversed_triplet(torch.tensor([[0.0], [5.0], [0.1], [5.1]]), pids)
    assert mixed < clustered


def ssd_inputs(b=8):
    pids = torch.arange(b) // 2
    apd = APD(feature_net="unused")
    model = split_model(num_classes=int(pids.max()) + 1)
    batch = TrainBatch(images(b=b), pids, torch.zeros_like(pids))
    apd.training_batch(model, batch, torch.Generator().manual_seed(0))
    return apd, model, batch


def test_branches_share_every_parameter_of_the_network():
    apd, model, batch = ssd_inputs()
    x, pids = batch.images, batch.pids
    recipe = Recipe(triplet_margin=None)
    loss, logs = apd.training_loss(model, batch, recipe)
    assert {"l_k", "l_nk", "l_k_star", "nk_triplet", "nk_ce", "ce", "triplet", "ce_star", "triplet_star"} <= set(logs)
    expected = logs["l_k"] + 0.5 * logs["l_nk"] + 0.1 * logs["l_k_star"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    # Each branch alone reaches the same weights: one network, not three copies.
    identity, irrelevant = model.split(model.embedding_map(x))
    partners = shuffle_partners(pids, torch.Generator().manual_seed(1))
    for part in (identity, identity + irrelevant[partners], irrelevant):
        model.zero_grad()
        logits, feats = model.branch(part)
        (feats.pow(2).sum() + logits.pow(2).sum()).backward(retain_graph=True)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.layer4.parameters())
        assert model.classifier.weight.grad.abs().sum() > 0


def test_running_statistics_follow_the_deployed_branch_only():
    apd, model, batch = ssd_inputs()
    x = batch.images
    reference = split_model(num_classes=int(batch.pids.max()) + 1)
    reference.load_state_dict(model.state_dict())
    model.train(), reference.train()
    apd.training_loss(model, batch, Recipe())
    reference.branch(reference.split(reference.embedding_map(x))[0])
    assert torch.allclose(model.bottleneck.running_mean, reference.bottleneck.running_mean, atol=1e-6)
    assert torch.allclose(model.backbone.layer4[0].bn1.running_var, reference.backbone.layer4[0].bn1.running_var,
                          atol=1e-6)
    with running_stats_frozen(model):
        before = model.bottleneck.running_mean.clone()
        model.branch(model.split(model.embedding_map(x))[1])
        assert torch.equal(before, model.bottleneck.running_mean)
    assert model.bottleneck.momentum == 0.1


def test_nk_classifier_target_is_the_negatives_identity(monkeypatch):
    apd, model, batch = ssd_inputs()
    pids = batch.pids
    seen = {}
    import defenses.apd as module

    def spy(logits, targets, epsilon):
        seen.setdefault("targets", []).append(targets.clone())
        return F.cross_entropy(logits, targets, label_smoothing=epsilon)

    monkeypatch.setattr(module, "cross_entropy_label_smoothing", spy)
    partners = apd._partners.clone()
    apd.params["nk_negative"] = "partner"
    apd.training_loss(model, batch, Recipe())
    assert torch.equal(seen["targets"][-1], pids[partners])
    assert (seen["targets"][-1] != pids).all()


def test_a_few_ssd_training_steps_lower_the_loss(tiny_split, tmp_path):
    from reidbench.train.loop import train_model

    torch.manual_seed(0)
    model = build_model(SPLIT_MODEL, num_classes=tiny_split.num_train_ids)
    apd = build_defense({"name": "apd", "feature_net": "unused"})
    recipe = Recipe(epochs=4, p=8, k=4, lr=1e-3, warmup_epochs=0, iters_per_epoch=3, random_erasing=0.0,
                    triplet_margin=None)
    result = train_model(model, tiny_split.train, recipe, tmp_path, defense=apd, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    assert {"l_k", "l_nk", "l_k_star", "nk_ce", "ce"} <= set(result.history[0])


# --- stage 1 through prepare_train; the zoo: training, reloading, evaluation on another dataset ---
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
    defense = ("{name: apd, feature_net: tiny-synthetic-none, mpg_steps: 2, gen_width: 4, gen_blocks: 1, "
               "disc_width: 4, mpg_batch: 4, negatives: 2}")
    path = root / "model_zoo.yaml"
    path.write_text(f"""
- id: tiny-synthetic-none
  backbone: resnet10t
  dataset: {{name: synthetic, preset: tiny}}
  model: {{input_size: [32, 16]}}
  recipe: {{epochs: 1, iters_per_epoch: 2, batch: {{p: 4, k: 4}}, random_erasing: 0.0}}
- id: tiny-synthetic-apd
  backbone: resnet10t
  dataset: {{name: synthetic, preset: tiny}}
  defense: {defense}
  model: {{input_size: [32, 16], head: apd-split}}
  recipe: {{epochs: 1, iters_per_epoch: 2, batch: {{p: 4, k: 4}}, random_erasing: 0.0, triplet_margin: null}}
- id: tiny-market-apd
  backbone: resnet10t
  dataset: {market}
  defense: {defense}
  model: {{input_size: [32, 16], head: apd-split}}
  recipe: {{epochs: 1, iters_per_epoch: 2, batch: {{p: 4, k: 2}}, random_erasing: 0.0, triplet_margin: null}}
""")
    return path, market


@pytest.fixture(scope="module")
def feature_zoo(apd_zoo):
    from reidbench.zoo import load_zoo

    return load_zoo(apd_zoo[0])  # its tiny-synthetic-none entry is the frozen feature net


def test_prepare_train_appends_a_generated_set_that_is_cached(tiny_split, feature_zoo, monkeypatch):
    import defenses.apd as module
    from reidbench.data import cache_dir

    apd = APD(feature_net="tiny-synthetic-none", mpg_steps=3, **TINY_MPG)
    train = apd.prepare_train(tiny_split, zoo=feature_zoo)
    n = len(tiny_split.train)
    assert len(train) == 2 * n and torch.equal(train.pids, tiny_split.train.pids.repeat(2))
    assert torch.equal(train.camids[n:], tiny_split.train.camids)
    generated = train.images[n:]
    assert generated.shape == tiny_split.train.load_uint8().shape and generated.dtype == torch.uint8
    assert not torch.equal(generated, train.images[:n])  # three steps already move G off the identity
    assert len(list((cache_dir() / "apd").glob("mpg-*.safetensors"))) >= 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached MPG-Net must not be retrained")

    monkeypatch.setattr(module, "train_mpg", no_training)
    again = APD(feature_net="tiny-synthetic-none", mpg_steps=3, **TINY_MPG)
    assert torch.equal(again.generated_set(tiny_split, zoo=feature_zoo).images, generated)
    for path in (cache_dir() / "apd").glob("generated-*.pt"):  # the set is remade from the cached MPG-Net
        path.unlink()
    assert torch.equal(again.generated_set(tiny_split, zoo=feature_zoo).images, generated)
    alone = APD(feature_net="tiny-synthetic-none", mpg_steps=3, include_real=False, **TINY_MPG)
    assert len(alone.prepare_train(tiny_split, zoo=feature_zoo)) == n
    changed = APD(feature_net="tiny-synthetic-none", mpg_steps=4, **TINY_MPG)  # another parameter, another MPG-Net
    with pytest.raises(AssertionError, match="must not be retrained"):
        changed.generated_set(tiny_split, zoo=feature_zoo)


def test_an_unreachable_imagenet_feature_net_is_one_line(tiny_split, monkeypatch):
    import timm

    create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nCheck your connection")
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    apd = APD(mpg_steps=1, **TINY_MPG)
    with pytest.raises(ReIDBenchError, match="feature_net 'imagenet' needs timm's ImageNet resnet50 weights") as info:
        apd.generated_set(tiny_split)
    assert "\n" not in str(info.value) and "couldn't connect" in str(info.value)


def test_an_unknown_feature_net_is_one_line(tiny_split, feature_zoo):
    apd = APD(feature_net="tiny-synthetic-nne", mpg_steps=1, **TINY_MPG)
    with pytest.raises(ReIDBenchError, match="unknown feature_net zoo entry .* did you mean 'tiny-synthetic-none'"):
        apd.generated_set(tiny_split, zoo=feature_zoo)


def test_repository_apd_entries_name_their_datasets_baseline_or_imagenet():
    """psi/phi: ImageNet (online, or a pinned file as the Market entry has) or the undefended
    baseline of the entry's own dataset."""
    from reidbench.zoo import load_zoo

    zoo = load_zoo()
    entries = [e for e in zoo.values() if e.defense["name"] == "apd"]
    assert entries
    for entry in entries:
        assert entry.model.get("head") == "apd-split"
        net = entry.defense.get("feature_net", "imagenet")
        if isinstance(net, dict):
            assert set(net) == {"backbone", "pretrained"} and len(net["pretrained"]["sha256"]) == 64, entry.id
        elif net != "imagenet":
            assert zoo[net].defense["name"] == "none" and zoo[net].dataset == entry.dataset, entry.id


def test_imagenet_feature_net_from_a_pinned_file(tmp_path):
    """feature_net {backbone, pretrained}: psi/phi read from the file, keyed by its sha256, frozen."""
    from conftest import random_mobilenet_trunk

    path = tmp_path / "mnv2.safetensors"
    spec = {"backbone": "mobilenetv2_100",
            "pretrained": {"file": str(path), "sha256": random_mobilenet_trunk(path), "layout": "torchvision"}}
    apd = build_defense({"name": "apd", "feature_net": spec})
    key, source = apd.feature_source()
    assert key == {"feature_net": "mobilenetv2_100", "sha256": spec["pretrained"]["sha256"]}
    frozen = apd.feature_network(source)
    metric, content = frozen(torch.rand(2, 3, 64, 32))
    assert metric.shape == (2, 320) and content.dim() == 4
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ReIDBenchError, match="exactly backbone and pretrained"):
        build_defense({"name": "apd", "feature_net": {"backbone": "mobilenetv2_100"}})


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
        # MSP is part of the deployed weights: a plain model does not fit them.
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


# --- one-line errors -------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ({"name": "apd", "eps_255": 0}, r"eps_255 must be in \(0, 255\] or null"),
    ({"name": "apd", "negatives": 0}, "negatives=0 must be a positive integer"),
    ({"name": "apd", "mpg_steps": 1.5}, "mpg_steps=1.5 must be a positive integer"),
    ({"name": "apd", "gen_blocks": -1}, "gen_blocks=-1 must be a positive integer"),
    ({"name": "apd", "mpg_lr": 0}, "mpg_lr must be > 0"),
    ({"name": "apd", "nk_weight": -1}, "loss weights must be >= 0, got nk_weight=-1"),
    ({"name": "apd", "nk_negative": "random"}, "nk_negative must be one of"),
    ({"name": "apd", "feature_net": ""}, "feature_net must be 'imagenet', a zoo entry id"),
    ({"name": "apd", "eps_255": 16, "decode": "image"}, "bad parameters"),
])
def test_bad_apd_parameters_are_one_line_errors(spec, message):
    with pytest.raises(ReIDBenchError, match=message) as info:
        build_defense(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ({**SPLIT_MODEL, "head": "apd-splt"}, "unknown model head 'apd-splt'; did you mean 'apd-split'"),
    ({**SPLIT_MODEL, "split_stage": 4}, "split_stage must be 0 .the stem. or 1-3, got 4"),
    ({**SPLIT_MODEL, "msp_maps": "channel"}, "msp_maps must be one of"),
    ({"backbone": "resnet10t", "split_stage": 1}, "unknown model option"),
    ({**SPLIT_MODEL, "backbone": "vit_tiny_patch16_224", "input_size": [224, 224]}, "splits a timm ResNet"),
])
def test_bad_model_heads_are_one_line_errors(spec, message):
    with pytest.raises(ReIDBenchError, match=message) as info:
        build_model(spec)
    assert "\n" not in str(info.value)


def test_apd_refuses_a_model_without_the_split_head_or_a_batch_without_its_shuffle():
    apd = DEFENSES.get("apd")()
    pids = torch.tensor([0, 0, 1, 1])
    batch = TrainBatch(images(b=4), pids, torch.zeros_like(pids))
    model = ReIDModel("resnet10t", num_classes=2, input_size=(32, 16))
    with pytest.raises(ReIDBenchError, match=r"model: \{head: apd-split\}"):
        apd.training_loss(model, batch, Recipe())
    with pytest.raises(ReIDBenchError, match="call it first"):
        apd.training_loss(split_model(num_classes=2), batch, Recipe())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_split_head_on_a_mobilenet_keeps_the_trunk(stage):
    """SP-Net on an EfficientNet-family trunk: E(x) then the rest, without the split, is the
    plain trunk's pooled feature; the split parts still sum to E(x)."""
    model = SemanticPurificationModel("mobilenetv2_100", input_size=(64, 32), last_stride=1, split_stage=stage).eval()
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        fmap = model.embedding_map(x)
        assert fmap.shape[1] == model.backbone.feature_info[stage]["num_chs"]
        assert torch.allclose(model.branch_features(fmap), model.backbone(model.normalize(x)), atol=1e-5)
        k, nk = model.split(fmap)
        assert torch.allclose(k + nk, fmap)
        assert model(x).shape == (2, model.feat_dim)
