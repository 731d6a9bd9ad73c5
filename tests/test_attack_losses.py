"""Per-attack properties that the generic test (tests/test_attacks.py) cannot see: the
direction of each loss (a wrong sign) and the guides each attack uses (a wrong guide).

Kept cheap: a few queries of the tiny split and few iterations."""

import pytest
import torch

from attacks.bouniot import MultiGuideIFGSM
from attacks.lta import LocalTransformationAttack
from attacks.metric_fgsm import MetricIFGSM, guide_centroids
from reidbench.attack import AttackContext, build_attack
from reidbench.features import embed, extract_features

EPS, STEP = 5 / 255, 1 / 255
N = 8  # queries attacked per test


def make_context(model, split, index=None, swap=False):
    size = tuple(model.input_size)
    own, other = (split.gallery, split.query) if swap else (split.query, split.gallery)
    ctx = AttackContext(
        query_pids=own.pids, query_camids=own.camids,
        query_feats=extract_features(model, own, size, progress=False),
        gallery_feats=extract_features(model, other, size, progress=False),
        gallery_pids=other.pids, gallery_camids=other.camids,
    )
    index = torch.arange(N) if index is None else index
    return ctx.batch(index), own.load(index, size)


@pytest.fixture(scope="module")
def setting(tiny_model, tiny_split):
    ctx, queries = make_context(tiny_model, tiny_split)
    return tiny_model, ctx, queries


def fresh(ctx, seed=0):
    """A copy of the batch context with its own generator, seeded like the runner's."""
    batch = ctx.batch(torch.arange(len(ctx.query_pids)))
    batch.generator = torch.Generator().manual_seed(seed)
    return batch


def run(name, setting, iterations=3, seed=0, **params):
    """(attack, adversarial images, their features, the guides the attack prepared)."""
    model, ctx, queries = setting
    attack = build_attack(name, eps=EPS, step=STEP, iterations=iterations, seed=seed, **params)
    adv = attack(model, queries, fresh(ctx, seed))
    with torch.no_grad():
        feats = embed(model, adv)
    # the attack works on a private copy of the context: replay its preparation to see its guides
    prepared = attack.prepare(model, queries, fresh(ctx, seed))
    return attack, adv, feats, prepared


def sq_dist(a, b):
    return (a - b).pow(2).sum(1)


# ---------------------------------------------------------------------------- Bai et al.


def test_m_fgsm_is_one_step_of_eps_whatever_the_protocol_says(setting):
    model, ctx, queries = setting
    attack, adv, _, batch = run("m-fgsm", setting, iterations=15)
    described = attack.describe()
    assert described["step"] == pytest.approx(EPS) and described["iterations"] == 1
    reference = MetricIFGSM(eps=EPS, step=STEP, iterations=1)
    grad = reference.gradient(model, queries, reference.prepare(model, queries, ctx.batch(torch.arange(N))))
    expected = (queries + EPS * grad.sign()).clamp(0, 1)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert (adv - queries).abs().amax() == pytest.approx(EPS, abs=1e-6)


def test_m_mifgsm_uses_momentum_and_differs_from_m_ifgsm(setting):
    attack, one_step, _, _ = run("m-mifgsm", setting, iterations=1)
    assert attack.momentum == 1.0 and attack.describe()["momentum"] == 1.0
    _, plain_one_step, _, _ = run("m-ifgsm", setting, iterations=1)
    # one step: sign(g / mean|g|) = sign(g), the two coincide ...
    assert torch.equal(one_step, plain_one_step)
    # ... later steps follow the accumulated gradient
    _, adv, _, _ = run("m-mifgsm", setting)
    _, plain, _, _ = run("m-ifgsm", setting)
    assert not torch.equal(adv, plain)


def test_m_ifgsm_gallery_perturbs_the_gallery_away_from_its_same_identity_queries(tiny_model, tiny_split):
    attack = build_attack("m-ifgsm-gallery", eps=EPS, step=STEP, iterations=3)
    assert attack.perturbs == "gallery" and MetricIFGSM.perturbs == "query"
    # roles swapped as the runner does: the attacked images are gallery images, guided by queries
    ctx, images = make_context(tiny_model, tiny_split, torch.arange(len(tiny_split.gallery)), swap=True)
    index = torch.nonzero(ctx.same_identity_mask().any(1)).flatten()[:N]
    batch, images = ctx.batch(index), images[index]
    # the last two play Market distractors (pid 0): no query shows them, so they have no guide
    batch.query_pids = batch.query_pids.clone()
    batch.query_pids[-2:] = 0
    guided = batch.same_identity_mask().any(1)
    assert guided[:-2].all() and not guided[-2:].any()
    adv = attack(tiny_model, images, batch)
    with torch.no_grad():
        feats, clean = embed(tiny_model, adv), embed(tiny_model, images)
    assert torch.equal(adv[~guided], images[~guided])  # left clean, as in Bai's code
    centroids, _ = guide_centroids(batch)
    before, after = sq_dist(clean, centroids)[guided], sq_dist(feats, centroids)[guided]
    assert (after > before).all()


# ---------------------------------------------------------------------------- Bouniot et al.


def test_sg_ifgsm_draws_one_cross_camera_same_identity_guide_from_the_generator(setting):
    model, ctx, queries = setting
    _, _, feats, batch = run("sg-ifgsm", setting)
    mask = batch.same_identity_mask()
    chosen = batch.extra["guide_index"]
    assert mask[torch.arange(N), chosen].all()  # every tiny query has a cross-camera match
    guides = batch.gallery_feats[chosen]
    assert torch.equal(batch.extra["guides"], guides)
    assert (sq_dist(feats, guides) > sq_dist(batch.query_feats, guides)).all()
    # one guide per query, drawn from the generator: reproducible per seed, varying over seeds
    attack = build_attack("sg-ifgsm", eps=EPS, step=STEP, iterations=1)
    draws = [attack.prepare(model, queries, fresh(ctx, s)).extra["guide_index"] for s in range(8)]
    assert torch.equal(draws[0], chosen)
    several = mask.sum(1) > 1
    assert several.any()
    assert any(not torch.equal(d[several], draws[0][several]) for d in draws[1:])
    assert all(mask[torch.arange(N), d].all() for d in draws)


def test_mg_ifgsm_sums_over_all_guides_and_matches_m_ifgsm_without_self(setting):
    model, ctx, queries = setting
    attack, adv, feats, batch = run("mg-ifgsm", setting)
    counts = batch.same_identity_mask().sum(1)
    assert torch.equal(batch.extra["guide_counts"], counts.float())
    assert (batch.extra["self_weight"] == 0).all()
    centroids, _ = guide_centroids(batch)
    assert (sq_dist(feats, centroids) > sq_dist(batch.query_feats, centroids)).all()
    # a sum and a mean over the same guides point the same way: the same steps as Bai's
    _, plain, _, _ = run("m-ifgsm", setting)
    assert (adv == plain).float().mean() > 0.99
    # the reference's self-padding: own feature weighs 1 + (largest set) - (own set size)
    padded = MultiGuideIFGSM(eps=EPS, step=STEP, iterations=1, include_self=True)
    ctx2 = padded.prepare(model, queries, fresh(ctx))
    assert counts.min() < counts.max()
    assert torch.equal(ctx2.extra["self_weight"], 1.0 + counts.max() - counts.float())
    assert padded.describe()["include_self"] is True


def test_sma_needs_its_random_start_and_pushes_away_from_the_clean_feature(setting):
    model, ctx, queries = setting
    attack = build_attack("sma", eps=EPS, step=STEP, iterations=1)
    batch = attack.prepare(model, queries, fresh(ctx))
    # zero up to float rounding (the clean feature is recomputed by other kernels under other
    # thread counts: 4.5e-8 was seen with one thread), hence the random start
    assert attack.gradient(model, queries, batch).abs().max() < 1e-6
    assert attack.describe()["random_start"] is True
    _, adv, feats, batch = run("sma", setting)
    assert ((feats * batch.query_feats).sum(1) < 0.9).all()
    _, other, _, _ = run("sma", setting, iterations=1, seed=1)
    assert not torch.equal(adv, other)  # the start comes from the generator


def test_fna_pulls_toward_the_furthest_other_identity_prototype(setting):
    model, ctx, queries = setting
    attack, adv, feats, batch = run("fna", setting)
    # brute force: the mean gallery feature of each other identity, furthest from the clean query
    pids = torch.unique(batch.gallery_pids)
    protos = torch.stack([batch.gallery_feats[batch.gallery_pids == p].mean(0) for p in pids])
    for i in range(N):
        d = torch.cdist(batch.query_feats[i:i + 1], protos)[0]
        d[pids == batch.query_pids[i]] = -1
        assert int(batch.extra["prototype_pid"][i]) == int(pids[d.argmax()])
        assert int(batch.extra["prototype_pid"][i]) != int(batch.query_pids[i])
    # the pushes (weight: number of guides) dominate the pull (weight 1), so the feature need
    # not get closer to the prototype than it started; but the pull is there: the same pushes
    # without it (mg-ifgsm) end farther from the prototype
    proto = batch.extra["prototype"]
    _, _, mg_feats, _ = run("mg-ifgsm", setting)
    closer = sq_dist(feats, proto) < sq_dist(mg_feats, proto)
    assert closer.float().mean() >= 0.75 and sq_dist(feats, proto).mean() < sq_dist(mg_feats, proto).mean()
    # and it still pushes away from the identity's guides
    centroids, _ = guide_centroids(batch)
    assert (sq_dist(feats, centroids) > sq_dist(batch.query_feats, centroids)).float().mean() >= 0.75


# ---------------------------------------------------------------------------- ODFA


def test_odfa_turns_the_feature_toward_its_opposite(setting):
    # the first step follows a rounding residual (the gradient vanishes at δ = 0), which differs
    # with the thread count; 6 steps leave room for it
    attack, adv, feats, batch = run("odfa", setting, iterations=6)
    assert attack.describe()["random_start"] is False
    assert torch.equal(batch.extra["target"], -batch.query_feats)
    cos = (feats * batch.query_feats).sum(1)
    assert (cos < 0.95).all() and cos.mean() < 0.6
    # adv-reid's ODFA ascends the distance to -f(x): it pulls back toward f(x)
    _, _, wrong, _ = run("odfa", setting, iterations=6, adv_reid_sign=True)
    assert (wrong * batch.query_feats).sum(1).mean() > cos.mean() + 0.2


def test_odfa_with_a_random_start_is_sma(setting):
    """With unit-norm features |f + f0|^2 = 2 + 2 f.f0 = 4 - |f - f0|^2: the same gradient."""
    _, odfa, _, _ = run("odfa", setting, iterations=2, random_start=True)
    _, sma, _, _ = run("sma", setting, iterations=2)
    assert (odfa == sma).float().mean() > 0.99


# ---------------------------------------------------------------------------- LTA


class CountingLTA(LocalTransformationAttack):
    registry_name = "lta"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guides = []

    def draw_guides(self, queries, generator):
        guides = super().draw_guides(queries, generator)
        self.guides.append(guides)
        return guides


def test_lta_redraws_a_local_grayscale_guide_at_every_iteration(setting):
    model, ctx, queries = setting
    attack = CountingLTA(eps=EPS, step=STEP, iterations=3)
    assert attack.momentum == 1.0 and attack.random_start is False
    batch = fresh(ctx, 7)
    adv = attack(model, queries, batch)
    assert len(attack.guides) == 3
    # the first draw comes from the context's generator
    assert torch.equal(attack.guides[0], attack.draw_guides(queries, torch.Generator().manual_seed(7)))
    for a, b in zip(attack.guides[:2], attack.guides[1:3]):
        assert not torch.equal(a, b)
    for guide in attack.guides[:3]:
        changed = (guide != queries).any(1)  # (B, H, W)
        assert changed.flatten(1).any(1).float().mean() > 0.5
        g = guide.permute(0, 2, 3, 1)[changed]
        assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])  # gray inside
    # it pushes the feature away from (freshly drawn) guides
    other = attack.draw_guides(queries, torch.Generator().manual_seed(123))
    with torch.no_grad():
        fg, f_adv = embed(model, other), embed(model, adv)
    assert sq_dist(f_adv, fg).mean() > sq_dist(batch.query_feats, fg).mean()


@pytest.mark.parametrize("pil_axes", [False, True])
def test_lta_rectangle_follows_the_reference_ranges(pil_axes):
    attack = LocalTransformationAttack(eps=EPS, step=STEP, iterations=1, pil_axes=pil_axes)
    assert attack.describe()["pil_axes"] is pil_axes
    g = torch.Generator().manual_seed(0)
    H, W = 64, 32
    boxes = [attack.region(H, W, g) for _ in range(300)]
    assert all(b is not None for b in boxes)
    for top, left, rows, cols in boxes:
        assert 0 <= top and top + rows <= H and 0 <= left and left + cols <= W and rows > 0 and cols > 0
    rows = torch.tensor([b[2] for b in boxes])
    areas = torch.tensor([b[2] * b[3] / (H * W) for b in boxes])
    if not pil_axes:  # area in [0.02, 0.4] of the image (up to rounding), tall boxes allowed
        assert areas.min() >= 0.015 and areas.max() <= 0.42 and rows.max() >= W
    else:  # the reference's mix-up: rows bounded by the WIDTH, boxes cut off at the border
        at_border = torch.tensor([left + cols == W or top + r == H for top, left, r, cols in boxes])
        assert rows.max() < W and at_border.float().mean() > 0.25
