"""The attack contract: ``adv = attack(model, queries, ctx)``.

``queries`` are images in [0, 1] (B, 3, H, W); the result is in [0, 1] and within the
attack's ε-ball. ``ctx`` carries what the threat model grants the attacker (clean query
features, gallery features and ids, a seeded generator). Budgets (ε, step, iterations)
come from the protocol, not from defaults scattered in modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import ReIDBenchError
from .registry import ATTACKS

THREAT_MODELS = ("white-box", "transfer", "query-based", "oblivious")


class BudgetExceeded(ReIDBenchError):
    """A query-based attack asked the oracle more often than the protocol allows."""


@dataclass
class SurrogateView:
    """A transfer attacker's own model: a fixed zoo model and its clean features. ``crafted``
    holds what a transfer attack has already crafted on it; the runner shares one store with
    every target of a run, since images made without the target are the same for all."""

    entry_id: str
    model: torch.nn.Module
    query_feats: torch.Tensor
    gallery_feats: torch.Tensor
    crafted: dict = field(default_factory=dict)


@dataclass
class TrainView:
    """Training images an attacker may learn from (UAP, DMR): the surrogate's or the
    target's training split, loaded at ``size``."""

    subset: object  # reidbench.data.ReIDSubset
    size: tuple[int, int]


class RankOracle:
    """Black-box access for query-based attacks: images in, the top-k ranked gallery
    indices out, nothing else. Each image sent costs one query of the per-image budget."""

    def __init__(self, model: torch.nn.Module, gallery_feats: torch.Tensor, top_k: int, budget: int, batch_size: int,
                 normalize: bool = True):
        self._model, self._gallery = model, gallery_feats
        self.top_k, self.budget, self.normalize = int(top_k), int(budget), normalize
        self.used = torch.zeros(batch_size, dtype=torch.long)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, owners: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rankings (len(images), top_k) of gallery indices. ``owners[i]`` is the query whose
        budget image i is charged to (default: image i belongs to query i)."""
        from .features import embed
        from .metrics import pairwise_distance

        owners = torch.arange(len(images)) if owners is None else owners.cpu()
        self.used.index_add_(0, owners, torch.ones_like(owners))
        if int(self.used.max()) > self.budget:
            raise BudgetExceeded(f"query budget of {self.budget} per image exceeded")
        feats = embed(self._model, images, self.normalize).cpu()
        dist = pairwise_distance(feats, self._gallery)
        return dist.topk(min(self.top_k, dist.shape[1]), dim=1, largest=False).indices


@dataclass
class AttackContext:
    """What an attacker may use about a batch of queries and the gallery.

    ``surrogate``, ``oracle`` and ``train`` are filled by the runner only for attacks
    that list them in ``Attack.needs``.
    """

    query_pids: torch.Tensor
    query_camids: torch.Tensor
    query_feats: torch.Tensor
    gallery_feats: torch.Tensor
    gallery_pids: torch.Tensor
    gallery_camids: torch.Tensor
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    surrogate: Optional[SurrogateView] = None
    oracle: Optional[RankOracle] = None
    train: Optional[TrainView] = None
    extra: dict = field(default_factory=dict)

    def batch(self, index: torch.Tensor) -> "AttackContext":
        """The context restricted to the queries at ``index`` (gallery unchanged)."""
        surrogate = self.surrogate
        if surrogate is not None:
            surrogate = dataclasses.replace(surrogate, query_feats=surrogate.query_feats[index])
        return dataclasses.replace(
            self,
            query_pids=self.query_pids[index],
            query_camids=self.query_camids[index],
            query_feats=self.query_feats[index],
            surrogate=surrogate,
            extra=dict(self.extra),
        )

    def same_identity_mask(self, exclude_same_camera: bool = True) -> torch.Tensor:
        """(B, G) mask of gallery images showing each query's identity. By default only the
        cross-camera ones, i.e. the matches that count under the Market protocol."""
        mask = self.query_pids.view(-1, 1) == self.gallery_pids.view(1, -1)
        if exclude_same_camera:
            mask &= self.query_camids.view(-1, 1) != self.gallery_camids.view(1, -1)
        return mask


class Attack:
    """Base class of every registered attack.

    Subclasses set ``threat_model`` and implement :meth:`perturb`. ``eps`` bounds the
    L∞ norm of the perturbation in [0, 1] pixel units.
    """

    registry_name = "attack"
    threat_model = "white-box"
    #: what the runner must put into the context: any of "surrogate", "oracle", "train"
    needs: tuple[str, ...] = ()
    #: which side is perturbed: "query" (protocol v1) or "gallery" (Bai's original variant)
    perturbs = "query"

    def __init__(self, eps: float, step: float, iterations: int, seed: int = 0, **params):
        if not (0 < float(eps) <= 1):
            raise ReIDBenchError(f"attack '{self.registry_name}': eps must be in (0, 1], got {eps}")
        if iterations < 1:
            raise ReIDBenchError(f"attack '{self.registry_name}': iterations must be >= 1, got {iterations}")
        self.eps, self.step, self.iterations, self.seed = float(eps), float(step), int(iterations), int(seed)
        self.params = params

    def describe(self) -> dict:
        """Every parameter that decides the attack's output (recorded with each result)."""
        return {"name": self.registry_name, "threat_model": self.threat_model, "eps": self.eps,
                "step": self.step, "iterations": self.iterations, "seed": self.seed, **self.params}

    def perturb(self, model: torch.nn.Module, queries: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: torch.nn.Module, queries: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        adv = self.perturb(model, queries, ctx)
        # The contract is enforced once here, whatever a subclass did.
        adv = torch.min(torch.max(adv, queries - self.eps), queries + self.eps).clamp_(0.0, 1.0)
        return adv.detach()


def build_attack(name: str, eps: float, step: float, iterations: int, seed: int = 0, **params) -> Attack:
    cls = ATTACKS.get(name)
    try:
        return cls(eps=eps, step=step, iterations=iterations, seed=seed, **params)
    except TypeError as exc:
        raise ReIDBenchError(f"attack '{name}': bad parameters {sorted(params)}: {exc}") from None
