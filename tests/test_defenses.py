"""The defense suite: registration, transforms, training through the shared loop, adaptive attacks."""

import inspect
import json

import pytest
import torch

import defenses  # noqa: F401  (registers every defense)
from defenses.adversarial import BatchGuidedPGD
from defenses.jad import ProactiveTransform, augmentation_policy, channel_fusion, grayscale, sketch
from defenses.transforms import CircuitousScaling, DifferentiableJPEG, JPEGCompression, RandomResizePad
from reidbench.attack import AttackContext, build_attack
from reidbench.defense import DefendedModel, TrainBatch, build_defense
from reidbench.errors import ReIDBenchError
from reidbench.registry import DEFENSES

# The training defenses the shared loop trains here on the plain model; APD (its split head),
# DDID (its generated set) and SADSTRM (video) train in their own test modules.
TRAINING = ["at", "goat", "goat-ce", "goat-sma", "goat-fna", "jad", "jad-proactive"]
DATA_KINDS = ("image", "video", "cross-modality")


def batch(seed=0, b=8, h=64, w=32):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def input_gradient(model, x):
    """d|model(x)|²/dx, zero where the output does not depend on the input through autograd."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).pow(2).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_registered_defense_keeps_the_contract(name, tiny_model):
    cls = DEFENSES.get(name)
    assert cls.__doc__ and cls.__doc__.strip(), f"defense '{name}' has no docstring"
    defense = build_defense(name)
    described = defense.describe()
    assert described["name"] == name
    assert json.loads(json.dumps(described)) == described  # it enters every cell's key and record
    accepted = set(inspect.signature(cls).parameters)
    assert set(cls.inference_params) <= accepted and set(cls.zoo_references) <= accepted
    assert cls.data_kinds and set(cls.data_kinds) <= set(DATA_KINDS)
    assert isinstance(cls.training_version, int) and cls.training_version >= 1
    if not defense.changes_training:
        assert cls.training_version == 1, "a version of training defaults the defense does not have"
    if defense.input_transform() is None:
        # The flags describe the transform; without one they would send EOT or BPDA after nothing.
        assert not defense.stochastic and defense.differentiable

    model = DefendedModel(tiny_model.model, defense).eval()
    x = batch(b=4)
    torch.manual_seed(0)  # a stochastic transform draws from the global generator
    with torch.no_grad():
        draws = [model(x) for _ in range(3)]
    assert draws[0].shape == tiny_model(x).shape
    assert any(not torch.equal(draws[0], other) for other in draws[1:]) == defense.stochastic
    assert bool(input_gradient(model, x).abs().sum() > 0) == defense.differentiable
    if not defense.differentiable:  # what a white-box attacker then differentiates
        assert input_gradient(model.with_bpda(), x).abs().sum() > 0


def test_only_the_baseline_neither_transforms_nor_trains_differently():
    plain = [name for name in DEFENSES.names()
             if build_defense(name).input_transform() is None and not build_defense(name).changes_training]
    assert plain == ["none"]


@pytest.mark.parametrize("transform", [
    lambda x, g: grayscale(x).expand(-1, 3, -1, -1),
    lambda x, g: sketch(x).expand(-1, 3, -1, -1),
    lambda x, g: channel_fusion(x, grayscale(x), g),
    lambda x, g: channel_fusion(x, sketch(x), g),
    augmentation_policy,
    ProactiveTransform(),
    ProactiveTransform(gray=0.2, fusion_gray=0.2, fusion_sketch=0.2, policy=0.2, local=0.2),
], ids=["gray", "sketch", "fusion-gray", "fusion-sketch", "policy", "jad", "jad-every-branch"])
def test_proactive_transforms_keep_shape_and_range_and_are_seeded(transform):
    x = batch()
    a = transform(x, torch.Generator().manual_seed(3))
    b = transform(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)


def test_jad_changes_about_a_quarter_of_the_images():
    x = batch(b=400, h=16, w=8)
    out = ProactiveTransform()(x, torch.Generator().manual_seed(0))
    changed = (out - x).abs().flatten(1).amax(1) > 0
    # 25% are drawn to change; a policy draw may leave an image as is.
    assert 0.15 < changed.float().mean() < 0.32


def test_channel_fusion_takes_its_channels_from_rgb_and_the_other():
    x = batch(b=64)
    other = torch.full_like(x[:, :1], 0.5)
    out = channel_fusion(x, other, torch.Generator().manual_seed(0))
    for i in range(len(x)):
        for c in range(3):
            assert any(torch.equal(out[i, c], src) for src in (x[i, 0], x[i, 1], x[i, 2], other[i, 0]))
    # One of five pool channels per slot: most images have at least one X channel.
    has_other = (out == 0.5).flatten(2).all(-1).any(-1)
    assert 0.75 < has_other.float().mean() <= 1.0


def test_circuitous_scaling_is_differentiable_with_a_nonzero_gradient():
    x = batch().requires_grad_(True)
    scaling = CircuitousScaling()
    # The paper's steps are relative to the image's native size (Market: 128x64).
    assert scaling.steps_for(128, 64) == [(110, 50), (220, 100), (110, 50)]
    assert scaling.steps_for(64, 32) == [(55, 25), (110, 50), (55, 25)]
    # A Market image resized to 256x128 keeps the reference's steps on its native size.
    assert CircuitousScaling(native=(128, 64)).steps_for(256, 128) == [(110, 50), (220, 100), (110, 50)]
    # The pre-v2 reading (ratios of a 256x128 input) stays available.
    assert CircuitousScaling(reference=(256, 128)).steps_for(64, 32) == [(28, 12), (55, 25), (28, 12)]
    y = scaling(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    (grad,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert grad.abs().sum() > 0
    # It removes high frequencies: a checkerboard perturbation is mostly washed out.
    checker = ((torch.arange(64).view(-1, 1) + torch.arange(32).view(1, -1)) % 2).float() * 2 - 1
    delta = 4 / 255 * checker.expand(1, 3, 64, 32)
    clean = torch.full((1, 3, 64, 32), 0.5)
    assert (scaling(clean + delta) - scaling(clean)).abs().max() < 0.5 * delta.abs().max()


def test_rrp_draws_and_jpeg_reencodes():
    x = batch()
    rrp = RandomResizePad(generator=torch.Generator().manual_seed(0))
    shapes = {tuple(rrp(x).shape) for _ in range(5)}
    assert shapes == {(8, 3, 71, 35)}
    outputs = [rrp(x) for _ in range(6)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])
    jpeg = JPEGCompression(quality=75)
    y = jpeg(x)
    assert y.shape == x.shape and 0 < (y - x).abs().mean() < 0.3
    assert torch.equal(jpeg(x), y)


def test_defense_flags_drive_the_adaptive_protocol():
    assert build_defense("rrp").stochastic and build_defense("rrp").differentiable
    assert not build_defense("jpeg").differentiable
    assert build_defense("cs").input_transform() is not None and not build_defense("cs").stochastic
    assert build_defense("jad-proactive").input_transform() is None
    for name in ("cs", "rrp", "jpeg", "none"):
        assert not build_defense(name).changes_training, name
    for name in TRAINING:
        assert build_defense(name).changes_training, name


def test_bpda_gets_gradients_through_jpeg(tiny_model):
    model = DefendedModel(tiny_model.model, build_defense("jpeg")).eval()
    x = batch(b=4).requires_grad_(True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(model(x).sum(), x)  # the real transform has no gradient
    (grad,) = torch.autograd.grad(model.with_bpda()(x).pow(2).sum(), x)
    assert grad.abs().sum() > 0


def smooth_batch(seed=0, b=8, h=64, w=32):
    """Image-like inputs (JPEG is built for them): upsampled coarse colour fields plus mild noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, h // 8, w // 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (x + 0.03 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_differentiable_jpeg_follows_libjpeg(quality):
    x = smooth_batch()
    real, model = JPEGCompression(quality)(x), DifferentiableJPEG(quality)(x)
    # far closer to the real round trip than the identity (BPDA's straight-through) is
    assert (model - real).abs().mean() < 0.4 * (x - real).abs().mean()
    assert model.shape == x.shape and 0 <= float(model.min()) and float(model.max()) <= 1


def test_jpeg_bpda_surrogate_is_a_parameter(tiny_model):
    x = smooth_batch(b=4).requires_grad_(True)
    grads = {}
    for bpda in ("differentiable", "identity"):
        model = DefendedModel(tiny_model.model, build_defense({"name": "jpeg", "bpda": bpda})).eval().with_bpda()
        (grads[bpda],) = torch.autograd.grad(model(x).pow(2).sum(), x)
        assert grads[bpda].abs().sum() > 0
    assert not torch.allclose(grads["differentiable"], grads["identity"])
    with pytest.raises(ReIDBenchError, match="bpda must be"):
        build_defense({"name": "jpeg", "bpda": "exact"})


@pytest.mark.parametrize("guides", ["intra", "sma", "fna"])
def test_inner_attack_respects_eps_and_raises_its_loss(tiny_model, guides):
    model = tiny_model.model.eval()
    x = batch(b=8)
    pids = torch.arange(4).repeat_interleave(2)
    attack = BatchGuidedPGD(5 / 255, 1 / 255, 5, guides=guides)
    from reidbench.features import embed

    with torch.no_grad():
        feats = embed(model, x)
    ctx = AttackContext(query_pids=pids, query_camids=pids * 0, query_feats=feats, gallery_feats=feats,
                        gallery_pids=pids, gallery_camids=pids * 0, generator=torch.Generator().manual_seed(0))
    adv = attack(model, x, ctx)
    assert (adv - x).abs().max() <= 5 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    prepared = attack.prepare(model, x, ctx)
    with torch.no_grad():
        before = attack.loss(embed(model, x), prepared).mean()
        after = attack.loss(embed(model, adv), prepared).mean()
    assert after > before


def test_normalized_eps_reproduces_the_reference_budget(tiny_model):
    model = tiny_model.model
    defense = build_defense({"name": "goat-sma", "eps_space": "normalized"})
    x = batch(b=8)
    pids = torch.arange(4).repeat_interleave(2)
    out = defense.training_batch(model, TrainBatch(x, pids, torch.zeros_like(pids)), torch.Generator().manual_seed(0))
    per_channel = (out - x).abs().amax(dim=(0, 2, 3))
    assert torch.allclose(per_channel, 5 / 255 * model.std.view(3), atol=1e-6)


def test_inner_attack_leaves_batch_norm_statistics_alone_by_default(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model.model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x, pids = batch(b=8), torch.arange(4).repeat_interleave(2)
    labelled = TrainBatch(x, pids, torch.zeros_like(pids))
    build_defense("goat").training_batch(model, labelled, torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k)
    build_defense({"name": "goat", "bn_mode": "train"}).training_batch(model, labelled, torch.Generator().manual_seed(0))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "running_mean" in k)


@pytest.mark.parametrize("name", TRAINING)
def test_each_defense_trains_a_few_steps_and_lowers_its_loss(name, tiny_split, tmp_path):
    from reidbench.models import build_model
    from reidbench.train.loop import Recipe, train_model

    torch.manual_seed(0)
    model = build_model({"backbone": "resnet10t", "input_size": [32, 16]}, num_classes=tiny_split.num_train_ids)
    recipe = Recipe(epochs=4, p=8, k=4, lr=1e-3, warmup_epochs=0, iters_per_epoch=3, random_erasing=0.0,
                    schedule="cosine")
    overrides = {"iterations": 2} if name.startswith(("at", "goat")) else {}
    result = train_model(model, tiny_split.train, recipe, tmp_path / name, defense=build_defense({"name": name, **overrides}),
                         progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0], losses


def test_eot_does_at_least_as_well_as_the_plain_attack_on_rrp(tiny_model, tiny_split):
    from reidbench.features import embed, extract_features
    from reidbench.metrics import evaluate_rank, pairwise_distance

    defended = DefendedModel(tiny_model.model, build_defense("rrp"),
                             RandomResizePad(generator=torch.Generator().manual_seed(0))).eval()
    queries = tiny_split.query.materialize((64, 32))
    gallery = tiny_split.gallery.materialize((64, 32))
    x = queries.images.float() / 255
    gallery_feats = extract_features(defended, gallery, progress=False)
    ctx = AttackContext(query_pids=queries.pids, query_camids=queries.camids, query_feats=embed(defended, x).detach(),
                        gallery_feats=gallery_feats, gallery_pids=gallery.pids, gallery_camids=gallery.camids)

    def mean_ap(adv):
        torch.manual_seed(123)  # the same transform draws for both evaluations
        with torch.no_grad():
            feats = torch.stack([embed(defended, adv) for _ in range(4)]).mean(0)
        return evaluate_rank(pairwise_distance(feats, gallery_feats), queries.pids, gallery.pids,
                             queries.camids, gallery.camids).mAP

    plain = build_attack("m-ifgsm", 5 / 255, 1 / 255, 10)
    eot = build_attack("m-ifgsm", 5 / 255, 1 / 255, 10, eot_samples=8)
    assert mean_ap(eot(defended, x, ctx)) <= mean_ap(plain(defended, x, ctx)) + 0.01


def test_bad_defense_parameters_are_one_line_errors():
    with pytest.raises(ReIDBenchError, match="adversarial_share"):
        build_defense({"name": "at", "adversarial_share": 0})
    with pytest.raises(ReIDBenchError, match="eps_space"):
        build_defense({"name": "goat", "eps_space": "latent"})
    with pytest.raises(ReIDBenchError, match="bad parameters"):
        build_defense({"name": "jad", "colour": 1})
    with pytest.raises(ReIDBenchError, match="sum to at most 1"):
        build_defense({"name": "jad", "gray": 0.9, "local": 0.5})
    with pytest.raises(ReIDBenchError, match="quality"):
        build_defense({"name": "jpeg", "quality": 0})
    with pytest.raises(ReIDBenchError, match="did you mean 'goat'"):
        build_defense("gaot")


def test_a_defense_refuses_a_dataset_it_cannot_train_on(tiny_split):
    from reidbench.defense import Defense

    class VideoOnly(Defense):
        registry_name = "video-only"
        data_kinds = ("video",)

    with pytest.raises(ReIDBenchError, match="trains on video data, but dataset 'synthetic' is image data"):
        VideoOnly().check_dataset(tiny_split)
    for name in DEFENSES.names():
        if "image" in DEFENSES.get(name).data_kinds:
            build_defense(name).check_dataset(tiny_split)  # every image defense accepts the image default


def test_oblivious_attack_ignores_the_transform_and_adaptive_differentiates_through_it(tiny_model, tiny_split):
    import dataclasses

    from reidbench.attack import SurrogateView
    from reidbench.features import embed

    bare = tiny_model.model
    defended = DefendedModel(bare, build_defense("cs")).eval()
    queries = tiny_split.query.materialize((64, 32))
    x = queries.images[:16].float() / 255
    with torch.no_grad():
        feats, bare_feats = embed(defended, x), embed(bare, x)
    ctx = AttackContext(query_pids=queries.pids[:16], query_camids=queries.camids[:16], query_feats=feats,
                        gallery_feats=feats, gallery_pids=queries.pids[:16], gallery_camids=queries.camids[:16] + 1,
                        bare=SurrogateView("tiny", bare, bare_feats, bare_feats))
    oblivious = build_attack("oblivious", 5 / 255, 1 / 255, 3)
    assert oblivious.threat_model == "oblivious" and "bare" in oblivious.needs
    # Gradients and guides both from the network without the transform.
    bare_ctx = dataclasses.replace(ctx, query_feats=bare_feats, gallery_feats=bare_feats, bare=None)
    plain_on_bare = build_attack("m-ifgsm", 5 / 255, 1 / 255, 3)(bare, x, bare_ctx)
    assert torch.equal(oblivious(defended, x, ctx), plain_on_bare)
    assert not torch.equal(build_attack("m-ifgsm", 5 / 255, 1 / 255, 3)(defended, x, ctx), plain_on_bare)


@pytest.mark.parametrize("name", ["cs", "jad"])
def test_the_scaling_reading_enters_the_cell_key_but_not_the_training_record(name):
    described = build_defense(name).describe()
    assert described["scaling_reference"] == [128, 64] and described["native_size"] is None
    assert build_defense({"name": name, "scaling_reference": [256, 128]}).describe() != described
    if name == "jad":  # JAD trains: its scaling must not look like a training change
        assert {"scaling_reference", "native_size"} <= set(type(build_defense(name)).inference_params)
    with pytest.raises(ReIDBenchError, match="native"):
        build_defense({"name": name, "native_size": [128]})
