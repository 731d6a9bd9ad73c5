"""DDID's bi-adversarial self-meta defense: the FNES metric loss, the per-step meta split, the
batch attacks, and the meta step (see the package docstring for every choice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.func import functional_call

from attacks.iterative import IterativeMetricAttack
from reidbench.attack import training_batch_context
from reidbench.errors import ReIDBenchError
from reidbench.registry import ATTACKS
from reidbench.train.losses import batch_hard_triplet


def fnes_loss(features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3, extension_margin: float = 0.3,
              temperature: float = 0.1, extension_weight: float = 1.0, normalize: bool = True) -> tuple[torch.Tensor, dict]:
    """Triplet loss with farthest-negative extension softening.

    ``relu(d_ap − d_an⁻ + m) + λ · relu(d_ap − d̃_an + m + m_ext)`` averaged over anchors:
    ``d_ap`` the farthest positive, ``d_an⁻`` the nearest negative (batch-hard, Hermans et al.
    2017), and ``d̃_an = Σ_n softmax_n(d_an / τ) d_an`` a softened farthest negative: τ → 0
    gives the farthest negative, τ → ∞ the mean negative distance. The second term extends
    the margin to the far side of the negatives, the side the furthest-negative attack pulls
    a query towards.
    """
    hard = batch_hard_triplet(features, pids, margin, normalize=normalize)
    if normalize:
        features = nn.functional.normalize(features, dim=1)
    dist = torch.cdist(features, features).clamp(min=1e-12)
    same = pids.view(1, -1) == pids.view(-1, 1)
    has_negative = (~same).any(1)
    if extension_weight == 0 or not has_negative.any():
        return hard, {"fnes_hard": float(hard.detach())}
    # Only anchors with a negative: a row of -inf logits would put NaNs into the backward pass.
    dist, same = dist[has_negative], same[has_negative]
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(1)
    weights = torch.softmax((dist / temperature).masked_fill(same, float("-inf")), dim=1)
    soft_far = (weights * dist).sum(1)
    extension = torch.relu(hardest_pos - soft_far + margin + extension_margin).mean()
    logs = {"fnes_hard": float(hard.detach()), "fnes_far": float(extension.detach())}
    return hard + extension_weight * extension, logs


def check_meta_attacks(names) -> tuple[str, ...]:
    """The meta split's attack pool: registered white-box query attacks of the shared
    iterative loop that need nothing beyond the batch (at least two of them)."""
    names = tuple(names)
    usable = sorted(n for n in ATTACKS.names() if _usable(ATTACKS.get(n)))
    for name in names:
        if name not in ATTACKS or not _usable(ATTACKS.get(name)):
            raise ReIDBenchError(f"defense 'ddid': unknown attack '{name}' in meta_attacks (choose from {', '.join(usable)})")
    if len(set(names)) < 2:
        raise ReIDBenchError(f"defense 'ddid': meta_attacks needs two different attacks to split, got {list(names)}")
    return names


def _usable(cls) -> bool:
    return (isinstance(cls, type) and issubclass(cls, IterativeMetricAttack) and cls.threat_model == "white-box"
            and not cls.needs and cls.perturbs == "query")


def attack_batch(model: nn.Module, attack, images: torch.Tensor, pids: torch.Tensor, seed: int) -> torch.Tensor:
    """Adversarial versions of (part of) a training batch, which is its own gallery (see
    ``training_batch_context``: an attack's cross-camera same-identity guides are the other
    same-identity images). The model is left in eval mode; the caller restores its mode."""
    return attack(model, images, training_batch_context(model, images, pids, seed))


class AtWeights(nn.Module):
    """``model`` evaluated at other weights (``torch.func.functional_call``), as an attack target."""

    def __init__(self, model: nn.Module, weights: dict):
        super().__init__()
        self.model, self.weights = model, weights
        self.input_size = getattr(model, "input_size", None)

    def forward(self, x):
        return functional_call(self.model, self.weights, (x,))


@dataclass
class MetaPlan:
    """One step's meta split: rows of the batch and attack of each side, seeds, and the
    meta-train adversarial images (made at the current weights by ``training_batch``)."""

    train_rows: torch.Tensor
    test_rows: torch.Tensor
    inner_attack: str
    outer_attack: str
    inner_seed: int
    outer_seed: int
    inner_adversarial: Optional[torch.Tensor] = None


def draw_meta_plan(pids: torch.Tensor, attacks: tuple[str, ...], train_share: float,
                   generator: torch.Generator) -> MetaPlan:
    """Split the batch's identities at random into meta-train (``train_share`` of them, at
    least 2 on each side, so each side has negatives) and meta-test; the attack pool's random
    permutation gives the meta-train attack (first) and the meta-test attack (second)."""
    ids = torch.unique(pids.cpu())
    if len(ids) < 4:
        raise ReIDBenchError(f"defense 'ddid': the meta split needs batches of at least 4 identities (p >= 4), got {len(ids)}")
    order = ids[torch.randperm(len(ids), generator=generator)]
    n_train = min(max(round(train_share * len(ids)), 2), len(ids) - 2)
    in_train = torch.isin(pids.cpu(), order[:n_train])
    pick = torch.randperm(len(attacks), generator=generator)
    inner_seed, outer_seed = torch.randint(0, 2**62, (2,), generator=generator).tolist()
    return MetaPlan(torch.nonzero(in_train).flatten().to(pids.device), torch.nonzero(~in_train).flatten().to(pids.device),
                    attacks[int(pick[0])], attacks[int(pick[1])], inner_seed, outer_seed)
