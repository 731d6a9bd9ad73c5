"""Transfer, query-based and adaptive (EOT, BPDA) attacks on the tiny baseline.

Budgets are cut (fewer queries, iterations, EOT draws, oracle queries) to keep the file fast
on 2 CPU cores; ε and the step are the protocol's.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reidbench.attack import RankOracle, SurrogateView, build_attack
from reidbench.defense import BPDA, DefendedModel, Defense
from reidbench.errors import ReIDBenchError

from attack_setup import mean_ap, white_box_context


EPS, STEP = 5 / 255, 1 / 255


@pytest.fixture(scope="module")
def setting(tiny_model, tiny_split):
    index = torch.arange(8)
    queries = tiny_split.query.load(index, tuple(tiny_model.input_size))
    return tiny_model, tiny_split, index, queries, white_box_context(tiny_model, tiny_split, index)


def in_ball(adv, queries):
    return adv.min() >= 0 and adv.max() <= 1 and (adv - queries).abs().max() <= EPS + 1e-6


# --- transfer ------------------------------------------------------------------------------
class Untouchable(nn.Module):
    def forward(self, x):
        raise AssertionError("a transfer attack called the target model")


def test_transfer_crafts_on_the_surrogate_and_never_calls_the_target(setting):
    model, _, _, queries, ctx = setting
    queries, ctx = queries[:4], ctx.batch(torch.arange(4))
    ctx.surrogate = SurrogateView("tiny-none", model, ctx.query_feats, ctx.gallery_feats)
    attack = build_attack("transfer", eps=EPS, step=STEP, iterations=2, inner="m-ifgsm")
    adv = attack(Untouchable(), queries, ctx)
    assert in_ball(adv, queries)
    # On its own surrogate, the transfer attack is exactly the inner white-box attack.
    assert torch.equal(adv, build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=2)(model, queries, ctx))
    described = attack.describe()
    assert described["threat_model"] == "transfer" and described["surrogate"] == "tiny-none"
    assert described["inner"]["name"] == "m-ifgsm"


def test_transfer_refuses_a_missing_or_different_surrogate(setting):
    model, _, _, queries, ctx = setting
    with pytest.raises(ReIDBenchError, match="needs a surrogate"):
        build_attack("transfer", eps=EPS, step=STEP, iterations=1)(Untouchable(), queries, ctx)
    ctx = ctx.batch(torch.arange(len(queries)))
    ctx.surrogate = SurrogateView("other", model, ctx.query_feats, ctx.gallery_feats)
    with pytest.raises(ReIDBenchError, match="configured for surrogate 'tiny-none'"):
        build_attack("transfer", eps=EPS, step=STEP, iterations=1, surrogate="tiny-none")(Untouchable(), queries, ctx)


# --- rank-query ----------------------------------------------------------------------------
def rank_query(model, queries, ctx, budget, **params):
    """Run rank-query against an oracle that returns the whole ranking; return (adv, oracle)."""
    ctx = ctx.batch(torch.arange(len(queries)))
    ctx.oracle = RankOracle(model, ctx.gallery_feats, top_k=len(ctx.gallery_pids), budget=budget,
                            batch_size=len(queries))
    adv = build_attack("rank-query", eps=EPS, step=STEP, iterations=15, **params)(model, queries, ctx)
    return adv, ctx.oracle


def test_rank_query_respects_the_budget_and_the_ball_is_deterministic_and_lowers_map(setting):
    model, _, _, queries, ctx = setting
    adv, oracle = rank_query(model, queries, ctx, budget=40)
    assert int(oracle.used.max()) <= 40
    assert in_ball(adv, queries)
    clean, attacked = mean_ap(model, queries, ctx), mean_ap(model, adv, ctx)
    assert attacked < 0.85 * clean, (clean, attacked)
    # SignHunter draws nothing at random: the same inputs give the same images.
    assert torch.equal(rank_query(model, queries[:4], ctx, budget=10)[0], rank_query(model, queries[:4], ctx, budget=10)[0])


def test_rank_query_plans_with_what_is_left_of_the_budget(setting):
    model, _, _, queries, ctx = setting
    queries, ctx = queries[:3], ctx.batch(torch.arange(3))
    ctx.oracle = RankOracle(model, ctx.gallery_feats, top_k=10, budget=6, batch_size=3)
    ctx.oracle(queries)  # someone already spent one query per image
    build_attack("rank-query", eps=EPS, step=STEP, iterations=15, max_queries=100)(model, queries, ctx)
    assert int(ctx.oracle.used.max()) <= 6
    _, oracle = rank_query(model, queries, ctx, budget=50, max_queries=4)
    assert int(oracle.used.max()) <= 4


def test_rank_query_on_the_whole_query_set_equals_its_batches_and_chunks(setting):
    """The runner hands rank-query every query at once and the oracle chunks its forward
    passes: neither may change any query's search (each follows its own loss through one
    shared schedule), only how many images share a pass."""
    model, _, _, queries, ctx = setting
    whole, _ = rank_query(model, queries, ctx, budget=30)
    parts = [rank_query(model, queries[i:i + 3], ctx.batch(torch.arange(i, min(i + 3, len(queries)))), budget=30)[0]
             for i in range(0, len(queries), 3)]
    assert torch.equal(whole, torch.cat(parts))
    chunked_ctx = ctx.batch(torch.arange(len(queries)))
    chunked_ctx.oracle = RankOracle(model, chunked_ctx.gallery_feats, top_k=len(chunked_ctx.gallery_pids), budget=30,
                                    batch_size=len(queries), chunk=3)
    shares = []
    chunked_ctx.report = shares.append
    adv = build_attack("rank-query", eps=EPS, step=STEP, iterations=15)(model, queries, chunked_ctx)
    assert torch.equal(adv, whole)
    assert shares and all(0 <= a < b <= 1 for a, b in zip(shares, shares[1:]))


# --- EOT -----------------------------------------------------------------------------------
class RandomResizePad(nn.Module):
    """Random resizing and padding (Xie et al., ICLR 2018), drawn per image from its own
    generator so that evaluation can fix the draws: shrink by a factor in [0.7, 1] and paste
    at a random place on a black canvas of the same size. Differentiable."""

    def __init__(self, seed=0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x):
        scale = 0.7 + 0.3 * torch.rand(len(x), generator=self.generator)
        shift = (1 - scale).view(-1, 1) * (torch.rand(len(x), 2, generator=self.generator) * 2 - 1)
        theta = torch.zeros(len(x), 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        theta[:, :, 2] = -shift / scale.view(-1, 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid.to(x), align_corners=False)


class Randomized(Defense):
    stochastic = True

    def input_transform(self):
        return RandomResizePad()


def expected_map(defended, images, ctx, draws=4):
    """mAP averaged over ``draws`` fixed draws of the transform, the same for every input."""
    values = []
    for draw in range(draws):
        defended.transform.generator.manual_seed(1000 + draw)
        values.append(mean_ap(defended, images, ctx))
    return sum(values) / draws


def test_eot_does_at_least_as_well_as_the_plain_attack_on_a_stochastic_transform(setting):
    model, split, index, queries, _ = setting
    defended = DefendedModel(model.model, Randomized()).eval()
    ctx = white_box_context(defended, split, index)
    plain = build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=4)(defended, queries, ctx)
    eot = build_attack("eot", eps=EPS, step=STEP, iterations=4, eot_samples=4)(defended, queries, ctx)
    assert in_ball(eot, queries)
    clean, with_plain, with_eot = (expected_map(defended, x, ctx) for x in (queries, plain, eot))
    assert with_eot <= with_plain + 0.005, (clean, with_plain, with_eot)
    assert with_eot < 0.9 * clean, (clean, with_plain, with_eot)


# --- BPDA ----------------------------------------------------------------------------------
class Quantize(nn.Module):
    """Quantisation to 8 levels per channel: piecewise constant, so its gradient is zero
    almost everywhere."""

    def forward(self, x):
        return torch.round(x * 7) / 7


class Halve(nn.Module):
    def forward(self, x):
        return x / 2


class Quantized(Defense):
    differentiable = False

    def input_transform(self):
        return Quantize()


def test_bpda_is_the_transform_forward_and_the_surrogate_backward():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    y = BPDA(Quantize())(x)
    assert torch.equal(y, Quantize()(x))
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))  # identity backward
    x.grad = None
    BPDA(Quantize(), surrogate=Halve())(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5))  # the surrogate's backward


def test_bpda_breaks_quantisation_where_the_plain_attack_is_useless(setting):
    model, split, index, queries, _ = setting
    defended = DefendedModel(model.model, Quantized()).eval()
    ctx = white_box_context(defended, split, index)
    plain = build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=4)(defended, queries, ctx)
    assert torch.equal(plain, queries)  # a zero gradient moves nothing
    adv = build_attack("bpda", eps=EPS, step=STEP, iterations=4)(defended, queries, ctx)
    assert in_ball(adv, queries)
    clean, attacked = mean_ap(defended, queries, ctx), mean_ap(defended, adv, ctx)
    assert attacked < 0.7 * clean, (clean, attacked)


# --- both wrappers without a transform -----------------------------------------------------
@pytest.mark.parametrize("name", ["eot", "bpda"])
def test_adaptive_wrappers_reduce_to_the_inner_attack_without_a_transform(setting, name):
    model, _, _, queries, ctx = setting
    queries, ctx = queries[:4], ctx.batch(torch.arange(4))
    inner = build_attack("m-ifgsm", eps=EPS, step=STEP, iterations=2)(model, queries, ctx)
    attack = build_attack(name, eps=EPS, step=STEP, iterations=2)
    assert torch.equal(attack(model, queries, ctx), inner)
    assert attack.describe()["inner"] == "m-ifgsm" and "unchanged" in attack.describe()["rule"]


def test_adaptive_wrappers_need_an_iterative_inner_attack():
    with pytest.raises(ReIDBenchError, match="not an iterative gradient attack"):
        build_attack("eot", eps=EPS, step=STEP, iterations=2, inner="rank-query")
