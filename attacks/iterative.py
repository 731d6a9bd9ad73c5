"""The iterative L∞ loop shared by every gradient attack on a metric.

A subclass says only what differs: its loss (to be *ascended*), whether it starts at a
random point of the ε-ball, and its momentum. The loop itself -- projected sign-gradient
steps, gradient normalisation for momentum, EOT averaging -- is written once here.

Queries may be images (B, 3, H, W) or video tracklets (B, T, 3, H, W): every step and the
projection are elementwise, so each frame of a tracklet gets its own perturbation within ε.
"""

from __future__ import annotations

import dataclasses

import torch

from reidbench.attack import Attack, AttackContext
from reidbench.errors import ReIDBenchError
from reidbench.features import embed


def private_view(ctx: AttackContext) -> AttackContext:
    """The context an attack works on: its own ``extra`` and a copy of the generator in its
    current state. Random draws (start point, guides) still come from ``ctx.generator`` but do
    not advance the caller's, so the same context gives the same output however often the
    attack is called (the runner seeds one generator per batch anyway)."""
    generator = torch.Generator(device=ctx.generator.device)
    generator.set_state(ctx.generator.get_state())
    return dataclasses.replace(ctx, generator=generator, extra=dict(ctx.extra))


WORST_BY = ("rank", "loss")


class IterativeMetricAttack(Attack):
    """Projected (I-)FGSM on a feature-space loss.

    Momentum follows MI-FGSM (Dong et al., CVPR 2018) as adapted to metrics by Bai et al.
    (2019): each step's gradient is divided by its mean absolute value (per image) before it
    is accumulated, ``g ← μ·g + ∇/mean|∇|``, and the step follows ``sign(g)``.
    ``eot_samples > 1`` averages the gradient over that many forward passes, which is EOT
    (Athalye et al., ICML 2018) when the model's input transform is stochastic.

    Attack strength as AutoAttack (Croce & Hein, ICML 2020) runs APGD, set by the protocol
    (:meth:`strengthen`; protocol v1: one run, last iterate):

    * ``best_iterate``: each query returns the worst point for its retrieval seen among its
      iterates (the start point, every step and the final point), not the last one. APGD
      keeps, per sample, both the highest-loss point and the first misclassified one, and
      AutoAttack reports the latter; the ReID reading of "misclassified" is a true match
      that left Rank-1, so by default (``worst_by="rank"``) the worst point is the one whose
      first true match ranks lowest against the gallery the attacker holds
      (:meth:`AttackContext.match_rank`), ties broken by the attack's own loss.
      ``worst_by="loss"`` keeps the highest loss alone (APGD's ``x_best``); it is weaker for
      attacks whose loss changes between iterations (LTA re-draws its guide) or is noisy
      (EOT), which is why the rank is the default. Under EOT, each draw of the forward pass
      ranks the query: a point is worse when fewer draws keep the match at Rank-1, then when
      its mean rank is lower. The rank is the attacker's own, from its model and the clean
      gallery features of its context (a transfer attacker ranks on its surrogate; a
      gallery-perturbing attack, whose roles are swapped, ranks the attacked gallery image
      against the clean queries, a proxy of the queries' rankings the evaluation measures).
    * ``restarts``: the number of runs, as AutoAttack's ``n_restarts`` (1 = no restart). Only
      a randomised attack restarts (a random start, random draws such as SG's guide or LTA's
      greyscale patches, or EOT on a stochastic model): a deterministic one would repeat
      itself. The restarts are a cascade: a run restarts only the queries still *unbroken*,
      i.e. whose first true match is at Rank-1 under some draw of the attacker's model, with
      fresh draws from the same seeded generator, and each query keeps the worst point (same
      order as above) over all of its runs.
    """

    random_start = False
    momentum = 0.0
    #: the attack draws randomness besides a random start (guides): a restart can end elsewhere
    random_draws = False
    strengthenable = True
    supports_eot = True

    def __init__(self, eps, step, iterations, seed=0, eot_samples: int = 1, restarts: int = 1,
                 best_iterate: bool = False, worst_by: str = "rank", **params):
        super().__init__(eps, step, iterations, seed, **params)
        if worst_by not in WORST_BY:
            raise ReIDBenchError(f"attack '{self.registry_name}': worst_by must be one of {WORST_BY}, got {worst_by!r}")
        self.eot_samples = int(eot_samples)
        self.worst_by = worst_by
        self.strengthen(restarts, best_iterate)

    def describe(self) -> dict:
        out = {**super().describe(), "random_start": self.random_start, "momentum": self.momentum,
               "eot_samples": self.eot_samples}
        if self.tracking:
            out["worst_by"] = self.worst_by
        return out

    @property
    def tracking(self) -> bool:
        """Whether the loop scores its iterates (v1: it does not, and runs exactly as before)."""
        return self.best_iterate or self.restarts > 1

    def randomized(self, model) -> bool:
        """Whether a second run could end elsewhere than the first."""
        return bool(self.random_start or self.random_draws or self.eot_samples > 1 or getattr(model, "stochastic", False))

    def loss(self, feats: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """Per-query objective to maximise, shape (B,)."""
        raise NotImplementedError

    def prepare(self, model, queries: torch.Tensor, ctx: AttackContext) -> AttackContext:
        """Hook to compute guides once before the loop."""
        return ctx

    def begin_iteration(self, model, queries: torch.Tensor, ctx: AttackContext, iteration: int) -> AttackContext:
        """Hook called at the start of every iteration, before its gradient, with the clean
        ``queries``: attacks whose guides are re-drawn at each step (LTA) refresh them here."""
        return ctx

    def gradient(self, model, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return self._forward(model, x, ctx, with_grad=True)[0]

    def _forward(self, model, x: torch.Tensor, ctx: AttackContext, with_grad: bool = True):
        """The EOT-averaged input gradient (None without ``with_grad``) and, when the loop
        tracks its iterates, the point's score (see :meth:`_score`) from the same passes."""
        grad = torch.zeros_like(x) if with_grad else None
        losses, ranks = [], []
        for _ in range(self.eot_samples):
            x_var = x.detach().requires_grad_(with_grad)
            with torch.set_grad_enabled(with_grad):
                feats = embed(model, x_var)
                per_query = self.loss(feats, ctx)
            if with_grad:
                grad += torch.autograd.grad(per_query.sum(), x_var)[0]
            if self.tracking:
                losses.append(per_query.detach().double())
                ranks.append(ctx.match_rank(feats.detach()).to(per_query.device))
        if with_grad:
            grad = grad / self.eot_samples
        if not self.tracking:
            return grad, None
        return grad, self._score(torch.stack(losses).mean(0), torch.stack(ranks))

    def _score(self, loss: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """(B, 3) float64 columns compared lexicographically, larger = worse for the query:
        the share of draws where the match left Rank-1, the mean rank, the loss. A query
        without a match counts as broken (nothing to gain) and is ordered by its loss alone."""
        has_match = ranks[0] >= 0
        broken = (ranks > 0).double().mean(0)
        rank = ranks.double().mean(0)
        broken = torch.where(has_match, broken, torch.ones_like(broken))
        rank = torch.where(has_match, rank, torch.zeros_like(rank))
        return torch.stack([broken, rank, loss], 1)

    def _worse(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """(B,) whether each row of ``new`` is strictly worse for its query than ``old``'s."""
        worse = torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
        tied = torch.ones_like(worse)
        for column in ((2,) if self.worst_by == "loss" else range(new.shape[1])):
            worse |= tied & (new[:, column] > old[:, column])
            tied &= new[:, column] == old[:, column]
        return worse

    def perturb(self, model, queries: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        base = private_view(ctx)
        x0 = queries.detach()
        adv, score = self._run(model, x0, base)
        runs = self.restarts if self.randomized(model) else 1
        if runs == 1:
            return adv
        # A stochastic transform draws from the global RNG: the restarts draw from a fork of it,
        # so that the draws after the attack (the evaluation's) are the same however many
        # restarts ran -- the submission check attacks a subset of a batch, which may restart less.
        with torch.random.fork_rng(devices=[x0.device.index or 0] if x0.is_cuda else []):
            for _ in range(1, runs):
                # The cascade: only what still holds its match at Rank-1 (score column 0 < 1) runs again.
                unbroken = (score[:, 0] < 1).nonzero().flatten()
                if not len(unbroken):
                    break
                index = unbroken.cpu()
                # Same generator object: the restart's draws continue the seeded stream.
                new_adv, new_score = self._run(model, x0[unbroken], base.batch(index))
                worse = self._worse(new_score, score[unbroken])
                adv[unbroken[worse]] = new_adv[worse]
                score[unbroken[worse]] = new_score[worse]
        return adv

    sweepable = True

    def perturb_by_budget(self, model, queries: torch.Tensor, ctx: AttackContext,
                          budgets: list[int]) -> dict[int, torch.Tensor]:
        """The attack at each of ``budgets`` iterations per run, from one run of the largest
        (the budget sweep of protocol v2: does Rank-1 keep falling with more iterations?).

        The loop does not depend on its length (fixed step, momentum, no schedule), so a run of
        ``n`` iterations is the first ``n`` of a longer one, and the best iterate within ``n``
        is a snapshot of the longer run's. A query stops once it is *broken* (its first true
        match left Rank-1 under every draw of the attacker's model, the restarts' rule): its
        Rank-1 outcome can no longer change, since the best iterate keeps the broken point.
        AutoAttack likewise attacks only the points still robust. A long budget then costs
        little more than the unbroken queries' steps.

        What differs from ``iterations = n`` run alone, for a reader of the numbers: a broken
        query keeps the point that first broke it, not a later, worse one, so mAP is that of
        an attack that stops on success (Rank-1 is the same on a deterministic model, up to
        floating-point differences between batch sizes; on a stochastic one, a point broken
        under each of the attacker's draws may still hold under the evaluation's own draw,
        which a longer run, pushing the match further down, would make less likely); random draws (start, guides, EOT)
        come from the same seeded stream shared by fewer queries; the restarts run every
        query unbroken at the smallest budget, each budget keeping its worse point. A
        point is scored with the guides its iteration drew (LTA), including the last. Without
        the protocol's strength settings (v1: last iterate, no scoring) nothing is broken or
        stopped, and each budget's images are the run's iterate after that many steps."""
        budgets = sorted({int(b) for b in budgets})
        if not budgets or budgets[0] < 1:
            raise ReIDBenchError(f"attack '{self.registry_name}': budgets must be iteration counts >= 1, got {budgets}")
        base = private_view(ctx)
        x0 = queries.detach()
        found = self._run_budgets(model, x0, base, budgets)
        runs = self.restarts if self.randomized(model) else 1
        with torch.random.fork_rng(devices=[x0.device.index or 0] if x0.is_cuda else []):
            for _ in range(1, runs):
                unbroken = (found[budgets[0]][1][:, 0] < 1).nonzero().flatten()
                if not len(unbroken):
                    break
                again = self._run_budgets(model, x0[unbroken], base.batch(unbroken.cpu()), budgets)
                for b in budgets:
                    adv, score = found[b]
                    worse = self._worse(again[b][1], score[unbroken])
                    adv[unbroken[worse]] = again[b][0][worse]
                    score[unbroken[worse]] = again[b][1][worse]
        return {b: adv for b, (adv, _) in found.items()}

    def _run_budgets(self, model, x0: torch.Tensor, base: AttackContext, budgets: list[int]):
        """One run to ``budgets[-1]`` iterations that drops each query once broken: {budget:
        (the best iterate among the points 0..budget, its score)}."""
        full = self.prepare(model, x0, dataclasses.replace(base, extra=dict(base.extra)))
        delta = self._start(x0, full.generator)
        accumulated = torch.zeros_like(x0)
        best_delta, best_score = delta.clone(), None
        active = torch.arange(len(x0), device=x0.device)
        found = {}
        for iteration in range(budgets[-1] + 1):
            ctx = full if len(active) == len(x0) else full.select(active.cpu())
            ctx = self.begin_iteration(model, x0[active], ctx, iteration)
            last = iteration == budgets[-1]
            grad, score = self._forward(model, x0[active] + delta[active], ctx, with_grad=not last)
            if not self.tracking:  # v1: the iterate itself
                best_delta = delta
            elif best_score is None:
                best_score = score.clone()
            else:
                worse = self._worse(score, best_score[active])
                best_delta[active[worse]] = delta[active[worse]]
                best_score[active[worse]] = score[worse]
            if iteration in budgets:
                found[iteration] = (x0 + best_delta, None if best_score is None else best_score.clone())
            if last:
                break
            if self.tracking:
                going = best_score[active, 0] < 1
                grad, active = grad[going], active[going]
                if not len(active):
                    break
            delta[active], accumulated[active] = self._advance(x0[active], delta[active], accumulated[active], grad)
        for b in budgets:  # every query broke before the largest budget: later snapshots are the last
            if b not in found:
                found[b] = (x0 + best_delta, best_score.clone())
        return found

    def _run(self, model, x0: torch.Tensor, base: AttackContext):
        """One run of the loop from a fresh start: its result (the last iterate, or the worst
        one with ``best_iterate``) and that point's score (None when not tracking)."""
        ctx = self.prepare(model, x0, dataclasses.replace(base, extra=dict(base.extra)))
        delta = self._start(x0, ctx.generator)
        accumulated = torch.zeros_like(x0)
        best_delta, best_score = None, None
        for iteration in range(self.iterations):
            ctx = self.begin_iteration(model, x0, ctx, iteration)
            grad, score = self._forward(model, x0 + delta, ctx)
            if self.best_iterate:
                best_delta, best_score = self._keep_worse(best_delta, best_score, delta, score)
            delta, accumulated = self._advance(x0, delta, accumulated, grad)
        if not self.tracking:
            return x0 + delta, None
        # The final point is scored with the last iteration's guides (no new draw).
        _, score = self._forward(model, x0 + delta, ctx, with_grad=False)
        if self.best_iterate:
            delta, score = self._keep_worse(best_delta, best_score, delta, score)
        return x0 + delta, score

    def _start(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A run's first perturbation: none, or a uniform draw in the ε-ball (random start),
        kept inside [0, 1]."""
        if self.random_start:
            noise = torch.rand(x0.shape, generator=generator).to(x0.device)
            delta = (noise * 2 - 1) * self.eps
        else:
            delta = torch.zeros_like(x0)
        return (x0 + delta).clamp(0, 1) - x0

    def _advance(self, x0: torch.Tensor, delta: torch.Tensor, accumulated: torch.Tensor, grad: torch.Tensor):
        """One projected sign step from ``delta``: the new perturbation and momentum accumulator."""
        if self.momentum > 0:
            # per query: over all of its pixels, every frame of a tracklet included
            scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True).clamp_min(1e-12)
            accumulated = self.momentum * accumulated + grad / scale
            direction = accumulated.sign()
        else:
            direction = grad.sign()
        delta = (delta + self.step * direction).clamp(-self.eps, self.eps)
        return (x0 + delta).clamp(0, 1) - x0, accumulated

    def _keep_worse(self, best_delta, best_score, delta, score):
        if best_delta is None:
            return delta.clone(), score.clone()
        worse = self._worse(score, best_score)
        best_delta = torch.where(worse.view(-1, *([1] * (delta.dim() - 1))), delta, best_delta)
        best_score = torch.where(worse.view(-1, 1), score, best_score)
        return best_delta, best_score
