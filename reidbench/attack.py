"""The attack contract: ``adv = attack(model, queries, ctx)``.

``queries`` are images in [0, 1] (B, 3, H, W); the result is in [0, 1] and within the
attack's ε-ball. ``ctx`` carries what the threat model grants the attacker (clean query
features, gallery features and ids, a seeded generator). Budgets (ε, step, iterations)
come from the protocol, not from defaults scattered in modules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

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
                 normalize: bool = True, chunk: int = 512):
        self._model, self._gallery = model, gallery_feats
        self.top_k, self.budget, self.normalize = int(top_k), int(budget), normalize
        #: images per forward pass: a call may carry every query of the run, more than one
        #: pass should hold in memory
        self.chunk = int(chunk)
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
        feats = torch.cat([embed(self._model, part, self.normalize).cpu() for part in images.split(self.chunk)])
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
    #: the network without the defense's input transform and its clean features, for the
    #: oblivious attacker (filled for attacks that list "bare" in ``Attack.needs``)
    bare: Optional[SurrogateView] = None
    oracle: Optional[RankOracle] = None
    train: Optional[TrainView] = None
    #: an attack whose batch is long work (:attr:`Attack.whole_query_set`) reports the share
    #: of it done, in [0, 1], so the runner's progress bar moves
    report: Optional[Callable[[float], None]] = None
    extra: dict = field(default_factory=dict)

    def batch(self, index: torch.Tensor) -> "AttackContext":
        """The context restricted to the queries at ``index`` (gallery unchanged)."""
        views = {}
        for name in ("surrogate", "bare"):
            view = getattr(self, name)
            views[name] = None if view is None else dataclasses.replace(view, query_feats=view.query_feats[index])
        return dataclasses.replace(
            self,
            query_pids=self.query_pids[index],
            query_camids=self.query_camids[index],
            query_feats=self.query_feats[index],
            extra=dict(self.extra),
            **views,
        )

    def select(self, index: torch.Tensor) -> "AttackContext":
        """:meth:`batch`, also restricting what an attack prepared per query: every tensor of
        ``extra`` whose first dimension is the number of queries (the guides, weights and
        targets that :meth:`IterativeMetricAttack.prepare` sets). For a loop that drops the
        queries it is done with midway; ``batch`` is for a fresh run, which prepares again."""
        count = len(self.query_pids)
        view = self.batch(index)
        view.extra = {key: value[index.to(value.device)] if torch.is_tensor(value) and value.dim() and value.shape[0] == count
                      else value for key, value in self.extra.items()}
        return view

    def same_identity_mask(self, exclude_same_camera: bool = True) -> torch.Tensor:
        """(B, G) mask of gallery images showing each query's identity. By default only the
        cross-camera ones, i.e. the matches that count under the Market protocol."""
        mask = self.query_pids.view(-1, 1) == self.gallery_pids.view(1, -1)
        if exclude_same_camera:
            mask &= self.query_camids.view(-1, 1) != self.gallery_camids.view(1, -1)
        return mask

    def match_rank(self, feats: torch.Tensor) -> torch.Tensor:
        """(B,) 0-based rank of each query's first true match when the queries' features
        ``feats`` are ranked against the gallery, under the Market protocol (same pid and
        camera, and pid -1, are junk; distractors count as negatives); a negative at exactly
        the match's distance ranks before it (pessimistic). -1 for a query without a match.
        0 means the query is still retrieved at Rank-1: what "unbroken" means for a restart."""
        from .metrics import pairwise_distance

        dist = pairwise_distance(feats.detach().float(), self.gallery_feats.float())
        dev = dist.device
        q_pids, g_pids = self.query_pids.to(dev).view(-1, 1), self.gallery_pids.to(dev).view(1, -1)
        same_pid = q_pids == g_pids
        junk = (same_pid & (self.query_camids.to(dev).view(-1, 1) == self.gallery_camids.to(dev).view(1, -1))) \
            | (g_pids == -1)
        match = same_pid & ~junk
        nearest = dist.masked_fill(~match, float("inf")).amin(1, keepdim=True)
        rank = ((dist <= nearest) & ~match & ~junk).sum(1)
        return torch.where(match.any(1), rank, torch.full_like(rank, -1))


def training_batch_context(model: torch.nn.Module, images: torch.Tensor, pids: torch.Tensor, seed: int,
                           rows: Optional[torch.Tensor] = None) -> AttackContext:
    """The context for attacking a training batch with ``model`` (adversarial training's inner
    attack, DDID's self-meta step): the batch is its own gallery, with ``model``'s clean
    features, taken in eval mode (frozen batch-norm statistics; the caller restores the mode);
    the queries are the images at ``rows`` (all of them when None), which ``extra["rows"]``
    names.

    Each image is its own camera. Under the Market protocol a same-camera match is junk, so
    every other image of a query's identity in the batch is a true match (what the attacks'
    guides, ``same_identity_mask``, and ``match_rank`` count), and the query itself is not.
    The dataset's cameras would drop an identity's same-camera images, which a P×K batch
    draws regardless of camera (for an identity seen by one camera, every one of them); one
    camera for all would leave no match at all.
    """
    from .features import embed

    model.eval()
    with torch.no_grad():
        feats = embed(model, images)
    own_camera = torch.arange(len(images), device=pids.device)
    rows = torch.arange(len(images), device=pids.device) if rows is None else rows
    ctx = AttackContext(query_pids=pids[rows], query_camids=own_camera[rows], query_feats=feats[rows],
                        gallery_feats=feats, gallery_pids=pids, gallery_camids=own_camera,
                        generator=torch.Generator().manual_seed(seed))
    ctx.extra["rows"] = rows
    return ctx


class Attack:
    """Base class of every registered attack.

    Subclasses set ``threat_model`` and implement :meth:`perturb`. ``eps`` bounds the
    L∞ norm of the perturbation in [0, 1] pixel units.

    The traits below are class data, so that planning a grid reads them from the registry
    without building an attack; an attack that wraps another (``inner``) takes the inner
    one's traits per instance (:meth:`take_traits_of`), and its class data are those of
    its default inner attack.
    """

    registry_name = "attack"
    threat_model = "white-box"
    #: what the runner must put into the context: any of "surrogate", "oracle", "train",
    #: "bare"; read through :meth:`needs_for`, which knows the parameters it depends on
    needs: tuple[str, ...] = ()
    #: which side is perturbed: "query" (protocol v1) or "gallery" (Bai's original variant)
    perturbs = "query"
    #: whether the runner hands the attack every query as one batch instead of its usual
    #: batches: for an attack whose queries move through one shared schedule (a query-based
    #: search), so that each step's model calls carry every still-active query. Only for
    #: attacks that draw nothing from ``ctx.generator``, whose seed depends on the batch.
    whole_query_set = False
    #: whether the attack's objective reads identity labels; one that does not (it moves a
    #: query's feature away from its own) can at best push the query to chance level
    uses_identity = True
    #: whether one perturbation, learned once, serves every query (weaker by design than a
    #: per-query attack: Moosavi-Dezfooli et al. 2017)
    universal = False
    #: whether :meth:`strengthen` applies to the attack (it has an iterative loop to restart
    #: and whose iterates can be tracked); a learned or universal perturbation has neither
    strengthenable = False
    #: protocol settings of attack strength (AutoAttack's standard, protocol v2): runs in all
    #: (1 = no restart), and whether the best iterate is kept instead of the last
    restarts = 1
    best_iterate = False
    #: whether the attack averages its gradients over draws of a stochastic transform (EOT)
    #: when the protocol asks for it through :meth:`adapt`
    supports_eot = False

    def __init__(self, eps: float, step: float, iterations: int, seed: int = 0, **params):
        if not (0 < float(eps) <= 1):
            raise ReIDBenchError(f"attack '{self.registry_name}': eps must be in (0, 1], got {eps}")
        if iterations < 1:
            raise ReIDBenchError(f"attack '{self.registry_name}': iterations must be >= 1, got {iterations}")
        self.eps, self.step, self.iterations, self.seed = float(eps), float(step), int(iterations), int(seed)
        self.params = params

    @classmethod
    def needs_for(cls, **params) -> tuple[str, ...]:
        """What the runner must supply to an attack built with ``params``, without building it."""
        return cls.needs

    def take_traits_of(self, inner) -> None:
        """Perturb the side the wrapped attack (an instance or a registered class) perturbs,
        and read the labels it reads: a wrapper changes how it is run, not what it attacks."""
        self.perturbs, self.uses_identity, self.universal = inner.perturbs, inner.uses_identity, inner.universal

    def describe(self) -> dict:
        """Every parameter that decides the attack's output (recorded with each result). The
        strength settings appear only when they differ from v1's, so a v1 cell keeps its key."""
        out = {"name": self.registry_name, "threat_model": self.threat_model, "eps": self.eps,
               "step": self.step, "iterations": self.iterations, "seed": self.seed, **self.params}
        if self.restarts != 1:
            out["restarts"] = self.restarts
        if self.best_iterate:
            out["best_iterate"] = True
        return out

    def strengthen(self, restarts: int = 1, best_iterate: bool = False) -> "Attack":
        """Apply the protocol's strength settings (``Protocol.restarts``, ``best_iterate``).
        An attack that is not :attr:`strengthenable` keeps its single run (its description
        then records none, since none was applied)."""
        if int(restarts) < 1:
            raise ReIDBenchError(f"attack '{self.registry_name}': restarts counts runs and must be >= 1, got {restarts}")
        if self.strengthenable:
            self.restarts, self.best_iterate = int(restarts), bool(best_iterate)
        return self

    def adapt(self, eot_samples: int = 1) -> "Attack":
        """Apply the protocol's adaptive settings against a stochastic defense: at least
        ``eot_samples`` gradient draws per step for an attack that :attr:`supports_eot`; the
        others are unchanged (their description then records none, since none was applied)."""
        if int(eot_samples) < 1:
            raise ReIDBenchError(f"attack '{self.registry_name}': eot_samples must be >= 1, got {eot_samples}")
        if self.supports_eot:
            self.eot_samples = max(self.eot_samples, int(eot_samples))
        return self

    def perturb(self, model: torch.nn.Module, queries: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        raise NotImplementedError

    #: whether :meth:`perturb_by_budget` is implemented (an iterative loop whose budget can grow)
    sweepable = False

    def perturb_by_budget(self, model: torch.nn.Module, queries: torch.Tensor, ctx: AttackContext,
                          budgets: list[int]) -> dict[int, torch.Tensor]:
        """The attack at several iteration budgets from one run (the budget sweep's)."""
        raise ReIDBenchError(f"attack '{self.registry_name}' has no iteration count to sweep")

    def __call__(self, model: torch.nn.Module, queries: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return self._within_contract(queries, self._in_eval(model, lambda: self.perturb(model, queries, ctx)))

    def by_budget(self, model: torch.nn.Module, queries: torch.Tensor, ctx: AttackContext,
                  budgets: list[int]) -> dict[int, torch.Tensor]:
        """:meth:`perturb_by_budget` under the same contract as a call: {budget: images}."""
        found = self._in_eval(model, lambda: self.perturb_by_budget(model, queries, ctx, budgets))
        return {budget: self._within_contract(queries, adv) for budget, adv in found.items()}

    @staticmethod
    def _in_eval(model, run):
        # An attack sees frozen batch-norm statistics and no dropout whatever the caller's mode
        # (a training defense attacks its model mid-training); the caller gets its mode back.
        was_training = model.training
        model.eval()
        try:
            return run()
        finally:
            model.train(was_training)

    def _within_contract(self, queries: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        # The contract is enforced once here, whatever a subclass did.
        return torch.min(torch.max(adv, queries - self.eps), queries + self.eps).clamp_(0.0, 1.0).detach()


def build_attack(name: str, eps: float, step: float, iterations: int, seed: int = 0, **params) -> Attack:
    cls = ATTACKS.get(name)
    try:
        return cls(eps=eps, step=step, iterations=iterations, seed=seed, **params)
    except TypeError as exc:
        raise ReIDBenchError(f"attack '{name}': bad parameters {sorted(params)}: {exc}") from None
