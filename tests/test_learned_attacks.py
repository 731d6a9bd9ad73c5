"""Attacks that learn before they attack: the DMR generator (transfer) and the universal
perturbation (white-box), on the tiny fixtures with CPU-sized training."""

import copy
import dataclasses

import pytest
import torch

from attacks.dmr import DeepMisRanking, mis_ranking_loss, ms_ssim, ms_ssim_levels
from attacks.uap import UniversalPerturbation, smooth_average_precision
from reidbench.attack import AttackContext, SurrogateView, TrainView, build_attack
from reidbench.data import cache_dir
from reidbench.errors import ReIDBenchError
from reidbench.features import embed, extract_features
from reidbench.metrics import evaluate_rank, pairwise_distance

EPS, STEP, ITERS = 5 / 255, 1 / 255, 15
# A generator small enough to train in seconds on batches of 4 identities × 2 images; the
# losses, the bound and the cache are the same code as at full size.
SMALL_DMR = dict(ngf=8, n_blocks=1, ndf=8, num_scales=2, lr=1e-3, batch_p=4, batch_k=2)


@pytest.fixture(scope="module")
def setting(tiny_model, tiny_split):
    size = tuple(tiny_model.input_size)
    query_feats = extract_features(tiny_model, tiny_split.query, size, progress=False)
    gallery_feats = extract_features(tiny_model, tiny_split.gallery, size, progress=False)
    ctx = AttackContext(
        query_pids=tiny_split.query.pids, query_camids=tiny_split.query.camids, query_feats=query_feats,
        gallery_feats=gallery_feats, gallery_pids=tiny_split.gallery.pids, gallery_camids=tiny_split.gallery.camids,
        surrogate=SurrogateView(entry_id="tiny", model=tiny_model, query_feats=query_feats,
                                gallery_feats=gallery_feats),
        train=TrainView(subset=tiny_split.train, size=size),
    )
    return tiny_model, tiny_split, tiny_split.query.load(None, size), ctx


def train_batch(split, size):
    """Every training image once, with its identity: the fixed set the learned attacks are scored on."""
    return split.train.load(None, size), split.train.pids


# --- DMR ----------------------------------------------------------------------------------


def dmr(steps=8, **params):
    return build_attack("dmr", eps=EPS, step=STEP, iterations=ITERS, train_steps=steps, **{**SMALL_DMR, **params})


@pytest.fixture(scope="module")
def trained_dmr(setting):
    model, split, queries, ctx = setting
    attack = dmr()
    return attack, attack.generator(ctx)


def test_dmr_is_a_registered_transfer_attack_with_the_papers_defaults():
    attack = build_attack("dmr", eps=EPS, step=STEP, iterations=ITERS)
    assert attack.threat_model == "transfer" and set(attack.needs) == {"surrogate", "train"}
    p = attack.params
    assert (p["ngf"], p["n_blocks"], p["ndf"], p["num_scales"]) == (32, 6, 64, 3)
    assert (p["margin"], p["reid_factor"], p["ssim_weight"], p["lr"], p["beta1"]) == (0.3, 10.0, 0.1, 2e-4, 0.5)
    assert p["batch_p"] * p["batch_k"] == 32


def test_dmr_training_improves_the_mis_ranking_loss(setting, trained_dmr):
    model, split, queries, ctx = setting
    attack, trained = trained_dmr
    x, pids = train_batch(split, ctx.train.size)
    untrained = attack.build_generator().eval()
    with torch.no_grad():
        clean = embed(model, x)

        def loss(g):
            return float(mis_ranking_loss(embed(model, (x + g.perturbation(x)).clamp(0, 1)), clean, pids, margin=0.3))

        before, after = loss(untrained), loss(trained)
    assert after < before, (before, after)


def test_dmr_output_is_inside_the_ball_and_the_unit_cube(setting, trained_dmr):
    model, split, queries, ctx = setting
    attack, _ = trained_dmr
    adv = attack.perturb(model, queries, ctx)  # before the base class's clip
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - queries).abs().max() <= EPS + 1e-6
    assert (adv - queries).abs().max() > EPS / 2  # it does perturb


def test_dmr_generator_is_cached_on_disk_and_reused(setting, trained_dmr, monkeypatch):
    model, split, queries, ctx = setting
    attack, _ = trained_dmr
    path = attack.cache_path(attack.cache_key(ctx))
    assert path.is_file() and path.parent == cache_dir() / "attacks" / "dmr"
    assert not list(path.parent.glob("*.tmp"))
    first = attack(model, queries, ctx)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cached generator")

    monkeypatch.setattr(DeepMisRanking, "_train_generator", no_training)
    fresh = dmr()
    assert torch.equal(fresh(model, queries, ctx), first)
    # A transfer attack: the target model is never consulted.
    assert torch.equal(fresh(torch.nn.Identity(), queries, ctx), first)
    # per image, batch-independent up to rounding: on some hosts (AVX2) the convolution kernels
    # chosen for the first 7 queries alone and for all of them round differently in the last bit
    torch.testing.assert_close(fresh(model, queries[:7], ctx.batch(torch.arange(7))), first[:7], rtol=0, atol=1e-6)
    # Another hyper-parameter is another generator: it would have to be trained.
    with pytest.raises(AssertionError, match="trained again"):
        dmr(margin=0.5)(model, queries, ctx)


def test_dmr_training_is_deterministic_under_a_seed(setting, tmp_path, monkeypatch):
    model, split, queries, ctx = setting
    outputs = []
    for run in ("a", "b"):
        monkeypatch.setenv("REIDBENCH_CACHE", str(tmp_path / run))
        outputs.append(dmr(steps=2)(model, queries[:8], ctx.batch(torch.arange(8))))
    assert torch.equal(*outputs)
    monkeypatch.setenv("REIDBENCH_CACHE", str(tmp_path / "c"))
    assert not torch.equal(dmr(steps=2, seed=1)(model, queries[:8], ctx.batch(torch.arange(8))), outputs[0])


def test_dmr_pixel_mask_limits_the_perturbed_pixels(setting, tmp_path, monkeypatch):
    model, split, queries, ctx = setting
    monkeypatch.setenv("REIDBENCH_CACHE", str(tmp_path))
    adv = dmr(steps=1, pixels=50).perturb(model, queries, ctx)
    changed = ((adv - queries).abs().amax(dim=1) > 0).flatten(1).sum(1)
    assert changed.max() <= 50 and changed.min() > 0


def test_dmr_without_a_surrogate_or_training_images_is_a_user_error(setting):
    model, split, queries, ctx = setting
    for missing in ("surrogate", "train"):
        with pytest.raises(ReIDBenchError, match="needs a surrogate model and training images"):
            dmr()(model, queries, dataclasses.replace(ctx, **{missing: None}))


def test_ms_ssim_is_one_on_equal_images_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 32, generator=g)
    assert ms_ssim_levels(64, 32) == 2 and ms_ssim_levels(256, 128) == 4
    assert torch.allclose(ms_ssim(x, x), torch.ones(4), atol=1e-5)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    worse = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ms_ssim(x, worse) < ms_ssim(x, noisy)).all() and (ms_ssim(x, noisy) < 1).all()
    y = x.clone().requires_grad_(True)
    ms_ssim(x, y + 0.01).sum().backward()
    assert torch.isfinite(y.grad).all()


def test_mis_ranking_loss_pushes_the_nearest_positive_beyond_the_farthest_negative():
    clean = torch.eye(4)
    pids = torch.tensor([0, 0, 1, 1])
    # Unperturbed: the other positive and both negatives are √2 away, so the loss is the margin.
    assert float(mis_ranking_loss(clean, clean, pids, margin=0.3)) == pytest.approx(0.3)
    # Each anchor on its positive: nearest positive at 0, negatives at √2.
    assert float(mis_ranking_loss(clean[[1, 0, 3, 2]], clean, pids, margin=0.3)) == pytest.approx(2**0.5 + 0.3)
    # Each anchor between the other identity's two images: both negatives (0.77) are nearer
    # than the positive (√2) by more than the margin.
    between = torch.nn.functional.normalize(torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0.0]]),
                                            dim=1)
    assert float(mis_ranking_loss(between, clean, pids, margin=0.3)) == 0.0


# --- UAP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uap_result(setting):
    model, split, queries, ctx = setting
    # 8 epochs of the 16 training identities (16 steps) instead of the protocol's 15 epochs.
    attack = build_attack("uap", eps=EPS, step=STEP, iterations=8)
    return attack, attack(model, queries, ctx)


def test_uap_is_one_perturbation_shared_by_every_query(setting, uap_result):
    model, split, queries, ctx = setting
    attack, adv = uap_result
    assert attack.threat_model == "white-box" and attack.needs == ("train",)
    delta = attack.universal_perturbation(model, ctx)
    assert delta.shape == (3, 64, 32) and 0 < delta.abs().max() <= EPS + 1e-6
    # Where the [0, 1] clip did not bite, every query carries exactly the same δ.
    diff = adv - queries
    unclipped = ((queries + delta) > 0) & ((queries + delta) < 1)
    assert unclipped.float().mean() > 0.5
    assert torch.allclose(diff[unclipped], delta.expand_as(diff)[unclipped], atol=1e-6)


def test_uap_stays_in_the_ball(setting, uap_result):
    model, split, queries, ctx = setting
    _, adv = uap_result
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - queries).abs().max() <= EPS + 1e-6


def test_uap_lowers_map_on_the_images_it_learned_from(setting, uap_result):
    """Ranked against the clean training images (the Market protocol drops each image's own
    camera, hence itself), the perturbed training images lose mAP. Measured on the training
    split, where δ was learned: the tiny model barely generalises (test mAP ≈ 0.33 against
    0.91 on its training images), and a universal δ moves its test mAP by only a few points,
    too little for a stable fast test (the slow suite checks the real baseline)."""
    model, split, queries, ctx = setting
    attack, _ = uap_result
    x, pids = train_batch(split, ctx.train.size)
    camids = split.train.camids
    delta = attack.universal_perturbation(model, ctx)
    with torch.no_grad():
        clean = embed(model, x)
        adv = embed(model, (x + delta).clamp(0, 1))
    before = evaluate_rank(pairwise_distance(clean, clean), pids, pids, camids, camids).mAP
    after = evaluate_rank(pairwise_distance(adv, clean), pids, pids, camids, camids).mAP
    assert after < 0.9 * before, (before, after)


def test_uap_is_learned_once_per_model_and_never_shared_across_models(setting, uap_result, monkeypatch):
    model, split, queries, ctx = setting
    attack, adv = uap_result
    learned = []
    original = UniversalPerturbation._learn

    def counting(self, m, train):
        learned.append(m)
        return original(self, m, train)

    monkeypatch.setattr(UniversalPerturbation, "_learn", counting)
    assert torch.equal(attack(model, queries[:5], ctx.batch(torch.arange(5))), adv[:5])
    assert learned == []
    other = UniversalPerturbation(eps=EPS, step=STEP, iterations=1, batch_p=4, batch_k=2)
    copied = copy.deepcopy(model)
    for target in (model, model, copied):
        other(target, queries, ctx)
    assert learned == [model, copied]  # the same weights in another model object: learned anew
    with torch.no_grad():
        next(copied.parameters()).mul_(1.01)
    other(copied, queries, ctx)
    assert learned == [model, copied, copied]  # the same object with other weights: learned anew


def test_smooth_ap_tends_to_the_protocols_ap_as_the_temperature_falls():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1)
    other = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1)
    pids = torch.arange(24) // 4
    cams = torch.arange(24)  # one camera per image: the protocol then drops exactly the query itself
    exact = evaluate_rank(pairwise_distance(feats, other), pids, pids, cams, cams).per_query_ap
    smooth, valid = smooth_average_precision(feats, other, pids, temperature=1e-5)
    assert valid.all() and torch.allclose(smooth, exact.float(), atol=1e-4)


def test_uap_eot_is_a_no_op_on_a_deterministic_model(setting):
    model, split, queries, ctx = setting
    plain = UniversalPerturbation(eps=EPS, step=STEP, iterations=1, batch_p=4, batch_k=2)
    eot = UniversalPerturbation(eps=EPS, step=STEP, iterations=1, batch_p=4, batch_k=2, eot_samples=2)
    assert eot.describe()["eot_samples"] == 2
    assert torch.equal(plain.universal_perturbation(model, ctx), eot.universal_perturbation(model, ctx))


def test_uap_without_training_images_is_a_user_error(setting):
    model, split, queries, ctx = setting
    bare = AttackContext(ctx.query_pids, ctx.query_camids, ctx.query_feats, ctx.gallery_feats, ctx.gallery_pids,
                         ctx.gallery_camids)
    with pytest.raises(ReIDBenchError, match="needs training images"):
        build_attack("uap", eps=EPS, step=STEP, iterations=ITERS)(model, queries, bare)
