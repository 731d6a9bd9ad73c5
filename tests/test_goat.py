"""GOAT as the reference code trains it (CEA-LIST/adv-reid, ``train.py --triplet --adv``):
the loss on a fixed batch equals the reference's, and the old CE + triplet version is
``goat-ce``."""

import pytest
import torch
import torch.nn as nn

import defenses  # noqa: F401  (registers every defense)
from reidbench.defense import TrainBatch, build_defense
from reidbench.errors import ReIDBenchError
from reidbench.train.loop import Recipe
from reidbench.train.losses import reid_terms


class Fixed(nn.Module):
    """A model whose training forward returns fixed (logits, raw features)."""

    def __init__(self, logits, features):
        super().__init__()
        self.logits, self.features = logits, features

    def forward(self, images):
        return self.logits, self.features


def reference_loss(features, ids, margin=10.0, soft=False):
    """The reference's computation restated: its pairwise distance (sqrt of the clamped
    expansion), per anchor the largest positive and smallest negative distance found by a
    scan (``get_distances``), then ``MarginRankingLoss(margin)(d_an, d_ap, 1)`` or, with
    ``--soft_margin``, the mean of ``softplus(d_ap - d_an)``."""
    sq = features.pow(2).sum(1, keepdim=True)
    dist = (sq + sq.t() - 2 * features @ features.t()).clamp(min=1e-12).sqrt()
    ap, an = [], []
    for i in range(len(ids)):
        pos = max((dist[i, j] for j in range(len(ids)) if j != i and ids[j] == ids[i]), key=float)
        neg = min((dist[i, j] for j in range(len(ids)) if ids[j] != ids[i]), key=float)
        ap.append(pos)
        an.append(neg)
    ap, an = torch.stack(ap), torch.stack(an)
    if soft:
        return nn.functional.softplus(ap - an).mean()
    return nn.MarginRankingLoss(margin=margin)(an, ap, torch.ones_like(ap))


@pytest.fixture
def fixed_batch():
    g = torch.Generator().manual_seed(0)
    pids = torch.arange(4).repeat_interleave(4)  # a P x K batch, as the reference's identity sampler
    features = torch.randn(16, 32, generator=g, dtype=torch.float64) * 3
    logits = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return TrainBatch(None, pids, torch.zeros_like(pids)), features, logits


@pytest.mark.parametrize("name", ["goat", "goat-sma", "goat-fna"])
def test_goat_loss_equals_the_reference_on_a_fixed_batch(name, fixed_batch):
    batch, features, logits = fixed_batch
    pids = batch.pids
    loss, logs = build_defense(name).training_loss(Fixed(logits, features), batch, Recipe())
    assert torch.allclose(loss, reference_loss(features, pids.tolist()), rtol=1e-9, atol=1e-9)
    assert "ce" not in logs  # no classifier term
    soft, _ = build_defense({"name": name, "soft_margin": True}).training_loss(Fixed(logits, features), batch, Recipe())
    assert torch.allclose(soft, reference_loss(features, pids.tolist(), soft=True), rtol=1e-9, atol=1e-9)
    small, _ = build_defense({"name": name, "margin": 0.3}).training_loss(Fixed(logits, features), batch, Recipe())
    assert torch.allclose(small, reference_loss(features, pids.tolist(), margin=0.3), rtol=1e-9, atol=1e-9)


def test_the_margin_is_on_raw_features_not_normalised_ones(fixed_batch):
    batch, features, logits = fixed_batch
    goat = build_defense("goat")
    raw, _ = goat.training_loss(Fixed(logits, features), batch, Recipe())
    scaled, _ = goat.training_loss(Fixed(logits, 2 * features), batch, Recipe())
    assert not torch.allclose(raw, scaled)


def test_goat_ce_is_the_shared_cross_entropy_and_triplet_loss(fixed_batch):
    batch, features, logits = fixed_batch
    recipe = Recipe()
    loss, logs = build_defense("goat-ce").training_loss(Fixed(logits, features), batch, recipe)
    expected, _ = reid_terms(logits, features, batch.pids, recipe)
    assert torch.equal(loss, expected) and "ce" in logs
    assert build_defense({"name": "goat", "loss": "ce-triplet"}).describe()["loss"] == "ce-triplet"
    assert build_defense("goat-ce").training_batch.__func__ is build_defense("goat").training_batch.__func__


def test_a_bad_goat_loss_is_one_line():
    with pytest.raises(ReIDBenchError, match="loss must be one of"):
        build_defense({"name": "goat", "loss": "arcface"})
